"""The per-image records of a run (docs/contracts.md, "Submission folder"); where they and the maps
are written is the layout's business (`pneumomap.submission`).

Image id: the input file's stem, for every format (RSNA patientIds are DICOM file stems; MIDRC
ids are matched by file name too). The runner refuses inputs whose stems collide.

Per image the runner makes one `Record` (a JSON-able row of every table) and one 8-bit map; the
tables are written at the end, in input order, from the records.

Failure fallback: an unreadable image gets probability 0 and a map of the floor value
(the `clip` node's ``outside`` value, 1 by default) everywhere, at the size its header gives
(PNG/JPEG/DICOM header), else 1024x1024; its row in decisions.csv is empty and failures.csv
names the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pneumomap.infer.artifacts import SCALAR_DECIMALS
from pneumomap.infer.spec import DECISION_COLUMNS

FALLBACK_SIZE = (1024, 1024)
MAX_FALLBACK_SIDE = 1 << 14  # a header claiming more (or 0) is not believed: the fallback map is FALLBACK_SIZE


@dataclass
class Record:
    """One image's rows, already formatted (so the bytes written never depend on the run)."""

    image_id: str
    path: str
    probability: str
    decisions: dict[str, str] = field(default_factory=dict)
    boxes: str = ""
    failure: str | None = None


def format_value(value: Any) -> str:
    """Decision cell: bools as 1/0, floats with 6 decimals, None as empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (float, np.floating, int, np.integer)):
        return f"{float(value):.{SCALAR_DECIMALS}f}"
    return str(value)


def boxes_from_map(map8: np.ndarray, threshold: float = 0.5, min_area: int = 0) -> list[tuple[float, int, int, int, int]]:
    """(confidence, x, y, width, height) of each connected component of ``map8 / 255 >= threshold``.

    Confidence is the mean probability inside the component; boxes are in original pixels,
    sorted by decreasing confidence. The threshold is applied to the 8-bit values themselves
    (the smallest value whose probability reaches it), so a map with no pixel above it (every
    gated negative) costs one comparison.
    """
    from skimage.measure import label, regionprops

    above = np.flatnonzero(np.arange(256, dtype=np.float32) / np.float32(255.0) >= threshold)
    if not len(above):
        return []
    binary = map8 >= above[0]
    if not binary.any():
        return []
    prob = map8.astype(np.float32) / 255.0
    boxes = []
    for region in regionprops(label(binary, connectivity=2), intensity_image=prob):
        if region.area < min_area:
            continue
        r0, c0, r1, c1 = region.bbox
        boxes.append((float(region.intensity_mean), int(c0), int(r0), int(c1 - c0), int(r1 - r0)))
    return sorted(boxes, key=lambda b: (-b[0], b[1], b[2]))


def prediction_string(boxes: Iterable[tuple[float, int, int, int, int]]) -> str:
    """RSNA Kaggle PredictionString: 'confidence x y width height' repeated, space separated."""
    return " ".join(f"{c:.4f} {x} {y} {w} {h}" for c, x, y, w, h in boxes)


def make_record(image_id: str, path: str, probability: float, decisions: dict[str, Any], map8: np.ndarray,
                rsna: dict[str, Any] | None) -> Record:
    """The record of one processed image (``decisions``: column -> raw value)."""
    boxes = prediction_string(boxes_from_map(map8, rsna["threshold"], rsna["min_area"])) if rsna else ""
    return Record(image_id, str(path), format_value(float(probability)),
                  {c: format_value(decisions.get(c)) for c in DECISION_COLUMNS}, boxes)


def failure_record(image_id: str, path: str, reason: str) -> Record:
    return Record(image_id, str(path), format_value(0.0), {c: "" for c in DECISION_COLUMNS}, "", reason)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header when it can be read, else FALLBACK_SIZE."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            size = image.height, image.width
    except Exception:
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            size = int(ds.Rows), int(ds.Columns)
        except Exception:
            return FALLBACK_SIZE
    return size if 0 < size[0] <= MAX_FALLBACK_SIDE and 0 < size[1] <= MAX_FALLBACK_SIDE else FALLBACK_SIZE


def fallback_map(path: str | Path, floor: int = 1) -> np.ndarray:
    """The map written for an unreadable image: ``floor`` everywhere (see module doc)."""
    return np.full(image_size(path), floor, np.uint8)
