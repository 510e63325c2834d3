"""The truth a submission is scored (and tuned) against: one interface, two sources.

``RsnaTruth``: an RSNA-format folder (`pneumomap.labels.load_rsna`). The opacity region of an image is
``truth_def`` (TRUTH_DEFS: the label boxes, the boxes inside the lung mask (default), or the ellipses inscribed
in the boxes inside the lung mask), counted as ONE reference level ``box_level`` (1/3, 2/3 or 1 of the
organisers' three readers; default 1); the image-level label is RSNA's Target; ``split`` picks one split of
split.csv.

``ReferenceMapTruth``: the organisers' kind of reference, a folder of ``<name>.npy`` float maps (levels 0, 1/3,
2/3, 1) or 8-bit ``<name>.png`` maps of the four levels (0, 85, 170, 255), with
``image-level-classifications.csv`` (fileNamePath,score) giving the image labels (0/1).

Either one gives, per image id (file stem): ``label``, ``codes`` (`pneumomap.metrics.reference_codes` at the
map's shape, the input of every `pneumomap.metrics.MapMetric`), ``boxes`` and ``image_path`` where known.
"""
from __future__ import annotations

import contextlib
import csv
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.submission import MIDRC_CSV, MIDRC_HEADER, SubmissionError

TRUTH_DEFS = ("boxes", "boxes_in_lungs", "ellipses")
DEFAULT_TRUTH_DEF = "boxes_in_lungs"
DEFAULT_BOX_LEVEL = 1.0
REFERENCE_SUFFIXES = (".npy", ".png")
PNG_LEVELS = (0, 85, 170, 255)  # 8-bit reference PNGs: round(255 * level) of MIDRC_LEVELS


# ----------------------------------------------------------------------------- box level

def parse_box_level(value: str | float) -> float:
    """One of metrics.MIDRC_LEVELS (exactly): ``1/3``, ``2/3``, ``1`` or a number equal to one of them.

    A decimal string counts as equal when it is the level rounded to the decimals written, with at least two
    (``0.33``, ``0.667``, ``1.0``); a fraction (``2/6``) or a float must be the level itself.
    """
    levels = metrics.MIDRC_LEVELS[1:]
    text = str(value).strip()
    choices = "1/3, 2/3 or 1 (or a decimal equal to one of them, e.g. 0.333)"
    if isinstance(value, str):
        try:
            number = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"box level {text!r}: expected {choices}") from None
        decimals = re.fullmatch(r"\+?\d*\.(\d+)", text)
        for level in levels:
            if number == Fraction(level).limit_denominator(3):
                return float(level)
            if decimals and len(decimals.group(1)) >= 2 and round(level, len(decimals.group(1))) == float(text):
                return float(level)
        raise ValueError(f"box level {text!r}: expected {choices}")
    for level in levels:
        if abs(float(value) - level) <= 1e-12:
            return float(level)
    raise ValueError(f"box level {value!r}: expected {choices}")


def level_name(level: float | None) -> str | None:
    """``1/3``, ``2/3`` or ``1`` for a box level (None stays None)."""
    if level is None:
        return None
    return {1: "1/3", 2: "2/3", 3: "1"}[metrics.MIDRC_LEVELS.index(parse_box_level(level))]


# ----------------------------------------------------------------------------- RSNA opacity masks

def truth_mask(dataset, pid: str, shape: tuple[int, int], truth_def: str = DEFAULT_TRUTH_DEF) -> np.ndarray:
    """The opacity truth of one RSNA image as bool ``shape``, by ``truth_def`` (see TRUTH_DEFS).

    ``shape`` must be the lung mask's (the original image's) when the lung mask takes part, and is checked
    against the lung mask's size whenever that file exists.
    """
    from pneumomap.labels import MissingLungMaskError, box_mask, opacity_target, read_lung_mask

    if truth_def not in TRUTH_DEFS:
        raise ValueError(f"unknown truth definition {truth_def!r}; choose one of {TRUTH_DEFS}")
    boxes = dataset.boxes.get(pid, [])
    if truth_def == "boxes":
        with contextlib.suppress(MissingLungMaskError):  # a lung mask, where there is one, checks the shape
            mask_path = dataset.lung_mask_path(pid)
            _check_shape(pid, shape, _png_shape(mask_path), mask_path, "lung mask")
        return box_mask(boxes, shape)
    mask_path = dataset.lung_mask_path(pid)  # drawn, else predicted
    lungs = read_lung_mask(mask_path)
    _check_shape(pid, shape, lungs.shape, mask_path, "lung mask")
    return opacity_target(boxes, lungs, ellipse=truth_def == "ellipses")


def _png_shape(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:  # the header only
        return image.height, image.width


def _check_shape(image_id: str, shape: Sequence[int], reference_shape: Sequence[int], path: Path, what: str) -> None:
    if tuple(shape) != tuple(reference_shape):
        raise SubmissionError(f"{image_id}: map shape {tuple(shape)} != {what} shape {tuple(reference_shape)} "
                              f"({path}); maps must be at the original image size")


def select_ids(dataset, split: str | None = None, ids: Iterable[str] | None = None) -> list[str]:
    """The RSNA ids to score: all, or one split of split.csv, optionally intersected with ``ids``."""
    chosen = list(dataset.ids)
    if split is not None:
        chosen = [pid for pid in chosen if dataset.split.get(pid) == split]
        if not chosen:
            raise SubmissionError(f"{dataset.root}: no image in split {split!r}")
    if ids is not None:
        wanted = set(ids)
        chosen = [pid for pid in chosen if pid in wanted]
    return chosen


def box_array(boxes: Iterable) -> np.ndarray:
    """RSNA ``Box`` objects -> (n, 4) float array of x, y, width, height."""
    return np.array([[b.x, b.y, b.width, b.height] for b in boxes], dtype=np.float64).reshape(-1, 4)


# ----------------------------------------------------------------------------- the interface

class Truth:
    """Image ids (file stems, in a stable order) with their labels and reference codes."""

    source = ""
    root: Path
    ids: list[str]
    selected = False  # True when ``ids`` is a chosen part of the folder (a split), not all of it

    def label(self, image_id: str) -> int:
        """The image-level truth, 0 or 1."""
        raise NotImplementedError

    def codes(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """uint8 reference codes (metrics.reference_codes) at ``shape``; SubmissionError when that is not the
        reference's shape (the message names the file)."""
        raise NotImplementedError

    def image_path(self, image_id: str) -> Path | None:
        """The radiograph, when the truth source knows it."""
        return None

    def boxes(self, image_id: str) -> np.ndarray | None:
        """(n, 4) opacity boxes (x, y, width, height) when the truth has boxes, else None."""
        return None

    def image_class(self, image_id: str) -> str:
        """A finer class name of the image, when the source has one."""
        return ""

    def file_name(self, image_id: str) -> str | None:
        """The ``fileNamePath`` the organisers' join would look for, when the source names it."""
        return None

    def describe(self) -> dict:
        """What the result JSON says about this truth."""
        return {"truth": str(self.root), "truth_source": self.source}

    def __str__(self) -> str:
        return f"{self.root} ({self.source})"


class RsnaTruth(Truth):
    """An RSNA-format folder, each image's opacity counted as the one reference level ``box_level``."""

    source = "rsna"

    def __init__(self, dataset, *, split: str | None = None, truth_def: str = DEFAULT_TRUTH_DEF,
                 box_level: float | str = DEFAULT_BOX_LEVEL):
        from pneumomap.labels import RsnaDataset, load_rsna

        if truth_def not in TRUTH_DEFS:
            raise ValueError(f"unknown truth definition {truth_def!r}; choose one of {TRUTH_DEFS}")
        self.dataset = dataset if isinstance(dataset, RsnaDataset) else load_rsna(dataset)
        self.root = Path(self.dataset.root)
        self.split, self.truth_def = split, truth_def
        self.box_level = parse_box_level(box_level)
        self.box_code = np.uint8(metrics.MIDRC_LEVELS.index(self.box_level))
        self.ids = select_ids(self.dataset, split)
        self.selected = split is not None
        if truth_def != "boxes":  # the lungs take part: one error for every image without a mask, before any work
            self.dataset.require_lung_masks(self.ids, f" of the truth{f' (split {split})' if split else ''}")

    def label(self, image_id: str) -> int:
        return int(self.dataset.target.get(image_id, 0))

    def mask(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """The bool opacity region (`truth_mask`)."""
        return truth_mask(self.dataset, image_id, shape, self.truth_def)

    def codes(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        return np.where(self.mask(image_id, shape), self.box_code, np.uint8(0)).astype(np.uint8)

    def image_path(self, image_id: str) -> Path | None:
        """The folder's DICOM of the id (stage_2_train_images/<id>.dcm), whether or not it is there."""
        return self.dataset.image_path(image_id)

    def boxes(self, image_id: str) -> np.ndarray:
        return box_array(self.dataset.boxes.get(image_id, []))

    def image_class(self, image_id: str) -> str:
        return self.dataset.cls.get(image_id, "")

    def describe(self) -> dict:
        return {**super().describe(), "truth_def": self.truth_def, "box_level": self.box_level,
                "box_level_name": level_name(self.box_level), "split": self.split}

    def __str__(self) -> str:
        split = f", split {self.split}" if self.split is not None else ""
        return f"{self.root} (RSNA, {self.truth_def} at box level {level_name(self.box_level)}{split})"


class ReferenceMapTruth(Truth):
    """A folder of reference maps (``<name>.npy`` levels or ``<name>.png`` 0/85/170/255) and their labels."""

    source = "reference_maps"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files: dict[str, Path] = {}
        for path in sorted(self.root.iterdir(), key=lambda p: p.name):
            if path.is_file() and path.suffix.lower() in REFERENCE_SUFFIXES:
                if path.stem in self.files:
                    raise SubmissionError(f"{self.root}: two reference maps for {path.stem!r}: "
                                          f"{self.files[path.stem].name} and {path.name}")
                self.files[path.stem] = path
        if not self.files:
            raise SubmissionError(f"{self.root}: no reference map (<name>.npy or <name>.png)")
        # the organisers' order: sorted file names (`stem.` sorts alike for .npy and .png names)
        self.ids = sorted(self.files, key=lambda stem: stem + ".")
        self.labels, self.names = self._read_labels()

    def _read_labels(self) -> tuple[dict[str, int], dict[str, str]]:
        path = self.root / MIDRC_CSV
        if not path.is_file():
            raise SubmissionError(f"{self.root}: reference maps without {MIDRC_CSV} (fileNamePath,score: "
                                  "the image labels 0/1)")
        labels, names = {}, {}
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in MIDRC_HEADER if c not in (reader.fieldnames or [])]
            if missing:
                raise SubmissionError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                stem = Path(row["fileNamePath"] or "").stem
                try:
                    value = float(row["score"])
                except (TypeError, ValueError):
                    value = float("nan")
                if value not in (0.0, 1.0):
                    raise SubmissionError(f"{path}:{line}: label {row['score']!r} is not 0 or 1")
                if stem in labels:
                    raise SubmissionError(f"{path}:{line}: second row for {stem!r}")
                labels[stem], names[stem] = int(value), row["fileNamePath"]
        unlabelled = [i for i in self.ids if i not in labels]
        if unlabelled:
            raise SubmissionError(f"{path}: no label for {len(unlabelled)} reference map(s): "
                                  f"{_first(unlabelled)}")
        mapless = [i for i in labels if i not in self.files]
        if mapless:
            raise SubmissionError(f"{path}: {len(mapless)} labelled image(s) have no reference map in "
                                  f"{self.root}: {_first(mapless)}")
        return labels, names

    def label(self, image_id: str) -> int:
        return self.labels[image_id]

    def file_name(self, image_id: str) -> str | None:
        return self.names.get(image_id)

    def reference(self, image_id: str) -> np.ndarray:
        """The reference map as stored: float levels (.npy) or the levels of a PNG."""
        return np.asarray(metrics.MIDRC_LEVELS, dtype=np.float64)[self._read_codes(image_id)] \
            if self.files[image_id].suffix.lower() == ".png" else self._load_npy(self.files[image_id])

    def codes(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        codes = self._read_codes(image_id)
        _check_shape(image_id, shape, codes.shape, self.files[image_id], "reference")
        return codes

    def _read_codes(self, image_id: str) -> np.ndarray:
        path = self.files[image_id]
        if path.suffix.lower() == ".npy":
            try:
                return metrics.reference_codes(self._load_npy(path))
            except ValueError as error:
                raise SubmissionError(f"{path}: {error}") from None
        return png_codes(path)

    @staticmethod
    def _load_npy(path: Path) -> np.ndarray:
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise SubmissionError(f"{path}: not a readable .npy reference map ({error})") from None

    def describe(self) -> dict:
        return {**super().describe(), "truth_def": "reference_maps", "box_level": None,
                "box_level_name": None, "split": None}

    def __str__(self) -> str:
        return f"{self.root} (reference maps)"


_PNG_CODE = np.full(256, 255, dtype=np.uint8)
_PNG_CODE[list(PNG_LEVELS)] = np.arange(len(PNG_LEVELS), dtype=np.uint8)


def png_codes(path: str | Path) -> np.ndarray:
    """Reference codes of an 8-bit PNG of the four levels (0, 85, 170, 255); any other value is an error."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode != "L":
                raise SubmissionError(f"{path}: reference PNG of mode {image.mode}; expected 8-bit greyscale (L) "
                                      f"with the values {PNG_LEVELS}")
            values = np.asarray(image, dtype=np.uint8)
    except OSError as error:
        raise SubmissionError(f"{path}: not a readable PNG ({error})") from None
    codes = _PNG_CODE[values]
    if (codes == 255).any():
        bad = np.unique(values[codes == 255])
        raise SubmissionError(f"{path}: value(s) {_first([int(v) for v in bad])} are not reference levels; "
                              f"a reference PNG holds only {PNG_LEVELS} (levels 0, 1/3, 2/3, 1)")
    return codes


def _first(items: Sequence, n: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# ----------------------------------------------------------------------------- loading

def is_rsna_folder(path: str | Path) -> bool:
    from pneumomap.labels import LABELS_FILE

    return (Path(path) / LABELS_FILE).is_file()


def load_truth(path: str | Path, *, split: str | None = None, truth_def: str = DEFAULT_TRUTH_DEF,
               box_level: float | str = DEFAULT_BOX_LEVEL) -> Truth:
    """An RSNA folder when stage_2_train_labels.csv is there, else a folder of reference maps.

    ``split``, ``truth_def`` and ``box_level`` concern RSNA truth (``split`` is an error with reference maps).
    """
    from pneumomap.labels import LABELS_FILE

    path = Path(path)
    if not path.is_dir():
        raise SubmissionError(f"{path}: no such truth folder")
    if is_rsna_folder(path):
        return RsnaTruth(path, split=split, truth_def=truth_def, box_level=box_level)
    if any(p.suffix.lower() in REFERENCE_SUFFIXES for p in path.iterdir() if p.is_file()):
        if split is not None:
            raise SubmissionError(f"{path}: --split {split!r} needs an RSNA-format folder (its split.csv); "
                                  "this is a folder of reference maps")
        return ReferenceMapTruth(path)
    raise SubmissionError(f"{path}: not a truth folder: it has neither {LABELS_FILE} (an RSNA-format folder) "
                          f"nor reference maps (<name>.npy or <name>.png with {MIDRC_CSV})")
