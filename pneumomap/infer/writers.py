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

Saved probabilities (``infer --save-probabilities``, read by `pneumomap.ensemble`): per processed
image ``WORK/probabilities/<image_id>.npz`` (compressed) holds ``map``, the final op's float map
input at the original size (float16, each value rounded to a float16 that keeps its 8-bit value
``rint(p * 255)``, so re-clipping it gives the run's own map), ``lungs``, the lung mask at that
size the final op used (bool), ``probability`` (float64), ``path`` (the input file) and ``key``
(the configuration and input file it was made from: a resumed run rewrites a stale file).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from pneumomap.infer.spec import Pipeline

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


# ----------------------------------------------------------------------------- saved probabilities

PROBABILITIES = "probabilities"


@dataclass
class SavedProbabilities:
    """One image's saved probabilities (module doc)."""

    map: np.ndarray  # float16 (H, W)
    lungs: np.ndarray  # bool (H, W)
    probability: float
    path: str
    key: str


def probability_path(work: str | Path, image_id: str) -> Path:
    return Path(work) / PROBABILITIES / f"{image_id}.npz"


def probability_inputs(pipeline: Pipeline) -> tuple[str, str]:
    """(map node, lungs node): the inputs of the pipeline's final map op whose values are saved;
    ValueError unless that op takes a full-size map and the lungs (as `clip` does)."""
    from pneumomap.infer.ops import OPS

    node = pipeline.nodes[pipeline.outputs.map]
    roles = OPS[node.kind].inputs if not node.is_model else ()
    if len(roles) < 2 or roles[0].types != ("fullmap",) or roles[1].types != ("lungs",):
        raise ValueError(f"outputs.map: the node '{node.name}' ({node.kind}) does not take (a full-size map, the "
                         "lungs), as `clip` does: there is no float map and lung mask to save or ensemble")
    return node.inputs[0], node.inputs[1]


def float16_keeping_bytes(values: np.ndarray) -> np.ndarray:
    """``values`` (in [0, 1]) as float16, each rounded to a float16 with the same ``rint(p * 255)`` (float64, as
    `clip` computes it): the nearest float16 unless that one crosses a rounding boundary, then its neighbour."""
    target = np.rint(values.astype(np.float64) * 255.0)
    half = values.astype(np.float16)
    for _ in range(4):  # one step suffices (a float16 step is < 1/255 in [0, 1]); the loop only guards ties
        got = np.rint(half.astype(np.float64) * 255.0)
        wrong = got != target
        if not wrong.any():
            return half
        toward = np.where(got[wrong] < target[wrong], np.inf, -np.inf).astype(np.float16)
        half[wrong] = np.nextafter(half[wrong], toward)
    raise ValueError("float16_keeping_bytes: a value has no float16 with its 8-bit value")


def save_probabilities(path: Path, prob_map: np.ndarray, lungs: np.ndarray, probability: float, source: str,
                       key: str) -> None:
    """Write one image's saved probabilities (module doc), atomically."""
    from pneumomap.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, map=float16_keeping_bytes(np.asarray(prob_map, np.float32)),
                        lungs=np.asarray(lungs, bool), probability=np.float64(probability),
                        path=np.str_(source), key=np.str_(key))
    atomic_write_bytes(path, buffer.getvalue())


def saved_key(path: Path) -> str | None:
    """The ``key`` of a saved-probabilities file; None when it is missing or unreadable."""
    try:
        with np.load(path) as data:
            return str(data["key"])
    except Exception:
        return None


def load_probabilities(path: Path) -> SavedProbabilities:
    """One saved-probabilities file; ValueError naming the file when it is unreadable or inconsistent."""
    try:
        with np.load(path) as data:
            saved = SavedProbabilities(data["map"], data["lungs"], float(data["probability"]), str(data["path"]),
                                       str(data["key"]))
    except Exception as exc:
        raise ValueError(f"{path}: not a saved-probabilities file ({type(exc).__name__}: {exc})") from None
    if saved.map.ndim != 2 or saved.lungs.shape != saved.map.shape or saved.lungs.dtype != bool:
        raise ValueError(f"{path}: map {saved.map.shape} and lung mask {saved.lungs.shape} ({saved.lungs.dtype}) "
                         "are not two (H, W) arrays of one size")
    if saved.map.dtype != np.float16 or not np.isfinite(saved.map).all():
        raise ValueError(f"{path}: the map is not finite float16 ({saved.map.dtype})")
    return saved
