"""RSNA Pneumonia Detection labels: boxes, box masks, opacity targets, side extents, splits.

Folder layout (the phantom generator writes exactly this)::

    DIR/stage_2_train_images/<patientId>.dcm
    DIR/stage_2_train_labels.csv         patientId,x,y,width,height,Target  (one row per box;
                                         a negative image: one row, empty box fields, Target 0)
    DIR/stage_2_detailed_class_info.csv  patientId,class
    DIR/lung_masks/<patientId>.png       lung = 255, background 0, same size as the image (drawn;
                                         may cover only some images)
    DIR/lung_masks_predicted/<patientId>.png  the others, predicted once by `pneumomap fill-masks`
                                         (+ manifest.csv: which are drawn, which predicted, by which checkpoint)
    DIR/split.csv                        patientId,split  (train / val / test, by patient)

Whatever needs a lung mask for every image reads it through `RsnaDataset.lung_mask_path` (drawn, else
predicted, else `MissingLungMaskError` telling the user to run `pneumomap fill-masks`).

Sides are the patient's: ``right`` = the image's left (see `pneumomap.stages.lung_geometry`).
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumomap.stages.lung_geometry import LungSplit, split_lungs

log = logging.getLogger(__name__)

IMAGES_DIR = "stage_2_train_images"
LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
MASKS_DIR = "lung_masks"
PREDICTED_MASKS_DIR = "lung_masks_predicted"
MASK_MANIFEST = "manifest.csv"  # in PREDICTED_MASKS_DIR: patientId,source,checkpoint_sha256,reason
SPLIT_FILE = "split.csv"
LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")
SPLIT_COLUMNS = ("patientId", "split")
POSITIVE_CLASS = "Lung Opacity"
CLASSES = (POSITIVE_CLASS, "No Lung Opacity / Not Normal", "Normal")
SPLITS = ("train", "val", "test")


class LabelError(ValueError):
    """A label, class or split file that cannot be used; the message names file and line."""


class MissingLungMaskError(LabelError):
    """Images that need a lung mask have neither a drawn nor a predicted one; the message names them and the fix."""


@dataclass(frozen=True)
class Box:
    """An RSNA box: (x, y) its top-left corner, in pixels of the original image."""

    x: float
    y: float
    width: float
    height: float


@dataclass
class RsnaDataset:
    """An RSNA-format folder: ids in label-file order, their boxes, targets, classes, splits."""

    root: Path
    ids: list[str]
    boxes: dict[str, list[Box]]
    target: dict[str, int]
    cls: dict[str, str]
    split: dict[str, str] = field(default_factory=dict)

    def image_path(self, pid: str) -> Path:
        return self.root / IMAGES_DIR / f"{pid}.dcm"

    def mask_path(self, pid: str) -> Path:
        """The drawn lung mask's path (whether or not it exists)."""
        return self.root / MASKS_DIR / f"{pid}.png"

    def predicted_mask_path(self, pid: str) -> Path:
        """The predicted lung mask's path (`pneumomap fill-masks`; whether or not it exists)."""
        return self.root / PREDICTED_MASKS_DIR / f"{pid}.png"

    def lung_mask_path(self, pid: str) -> Path:
        """THE lung mask of an image: the drawn one, else the predicted one; `MissingLungMaskError` when neither
        exists (it names the image and the command that predicts the missing masks)."""
        for path in (self.mask_path(pid), self.predicted_mask_path(pid)):
            if path.is_file():
                return path
        raise MissingLungMaskError(f"{pid}: no lung mask ({self.mask_path(pid)} is not drawn and "
                                   f"{self.predicted_mask_path(pid)} not predicted); {fill_hint(self.root)}")

    def lung_mask(self, pid: str) -> np.ndarray:
        """`read_lung_mask` of `lung_mask_path`."""
        return read_lung_mask(self.lung_mask_path(pid))

    def mask_sources(self, ids: list[str]) -> dict[str, list[str]]:
        """``ids`` by where their lung mask comes from: 'drawn', 'predicted', 'unreadable' (no mask: the fill
        could not read the image, see its manifest) or 'missing' (two folder listings and the manifest)."""
        drawn, predicted = (_png_stems(self.root / name) for name in (MASKS_DIR, PREDICTED_MASKS_DIR))
        unreadable = _unreadable_in_manifest(self.root / PREDICTED_MASKS_DIR / MASK_MANIFEST)
        sources: dict[str, list[str]] = {"drawn": [], "predicted": [], "unreadable": [], "missing": []}
        for pid in ids:
            source = ("drawn" if pid in drawn else "predicted" if pid in predicted
                      else "unreadable" if pid in unreadable else "missing")
            sources[source].append(pid)
        return sources

    def require_lung_masks(self, ids: list[str], what: str = "") -> dict[str, int]:
        """Counts of drawn and predicted lung masks of ``ids``; ONE `MissingLungMaskError` for all that have none
        (images the fill found unreadable pass: they are skipped as unreadable where they are read)."""
        sources = self.mask_sources(ids)
        missing = sources.pop("missing")
        sources.pop("unreadable")
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise MissingLungMaskError(
                f"{self.root}: {len(missing)} of {len(ids)} image(s){what} have no lung mask, neither drawn "
                f"({MASKS_DIR}/<patientId>.png) nor predicted ({PREDICTED_MASKS_DIR}/<patientId>.png): {shown}; "
                f"{fill_hint(self.root)}")
        return {name: len(found) for name, found in sources.items()}

    def ids_in(self, split: str) -> list[str]:
        """The ids of one split, in label-file order."""
        return [pid for pid in self.ids if self.split.get(pid) == split]


def fill_hint(root: str | Path) -> str:
    """How to predict the lung masks that were not drawn."""
    return (f"predict the missing ones once with a trained lung stage: pneumomap fill-masks --data {root} "
            "--lungs runs/lungs (see README, 'Real RSNA')")


def _png_stems(folder: Path) -> set[str]:
    """Stems of the .png files directly in ``folder`` (empty when it does not exist)."""
    try:
        with os.scandir(folder) as entries:
            return {e.name[:-4] for e in entries if e.name.endswith(".png") and e.is_file()}
    except FileNotFoundError:
        return set()


def _unreadable_in_manifest(path: Path) -> set[str]:
    """The ids `pneumomap fill-masks` could not read (source 'unreadable' in its manifest)."""
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["patientId"] for row in csv.DictReader(handle) if row.get("source") == "unreadable"}


def read_lung_mask(path: str | Path) -> np.ndarray:
    """A lung-mask PNG as bool (lung = value > 127)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


# ---------------------------------------------------------------- CSV reading helpers

def _rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV; missing columns raise, unknown ones warn."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise LabelError(f"{path}, line 1: missing column(s) {', '.join(missing)}; "
                             f"expected the header {','.join(required)}")
        unknown = [c for c in header if c not in required]
        if unknown:
            warnings.warn(f"{path}, line 1: unknown column(s) {', '.join(unknown)} ignored", stacklevel=3)
        return [(number, row) for number, row in enumerate(reader, start=2)]


def _number(value: str, name: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LabelError(f"{where}: {name} {value!r} is not a number") from None


def _parse_label_row(row: dict[str, str], where: str) -> tuple[int, Box | None]:
    """(Target, box or None) of one labels row, checked for consistency and sizes."""
    target = row["Target"].strip()
    if target not in ("0", "1"):
        raise LabelError(f"{where}: Target must be 0 or 1, got {target!r}")
    fields = [row[c].strip() for c in ("x", "y", "width", "height")]
    if not any(fields):
        if target == "1":
            raise LabelError(f"{where}: Target 1 needs a box (x, y, width, height)")
        return 0, None
    if not all(fields):
        raise LabelError(f"{where}: box fields must be all given or all empty, got {fields}")
    if target == "0":
        raise LabelError(f"{where}: Target 0 must have empty box fields, got {fields}")
    box = Box(*(_number(v, c, where) for v, c in zip(fields, ("x", "y", "width", "height"))))
    if box.width <= 0 or box.height <= 0:
        raise LabelError(f"{where}: box width and height must be positive, got {box.width} x {box.height}")
    if box.x < 0 or box.y < 0:
        raise LabelError(f"{where}: box corner ({box.x}, {box.y}) is outside the image")
    return 1, box


def _check_inside(box: Box, size: tuple[int, int], where: str) -> None:
    height, width = size
    if box.x + box.width > width or box.y + box.height > height:
        raise LabelError(f"{where}: box {box} extends beyond the {width}x{height} image")


def read_labels(csv_path: str | Path,
                image_size: tuple[int, int] | dict[str, tuple[int, int]] | None = None
                ) -> dict[str, list[Box]]:
    """Boxes per patientId (an empty list for a negative image), in file order.

    Errors (LabelError, naming the file and line): missing columns, bad Target, a box on a
    Target-0 row or none on a Target-1 row, non-numeric, negative or zero sizes, a box
    outside the image when ``image_size`` ((h, w), or a dict of them per id) is known, a
    patient with both negative and positive rows. Warnings: unknown columns, duplicate rows.
    """
    path = Path(csv_path)
    boxes: dict[str, list[Box]] = {}
    targets: dict[str, int] = {}
    seen: dict[tuple[str, Box | None], int] = {}
    for number, row in _rows(path, LABEL_COLUMNS):
        where = f"{path}, line {number}"
        pid = row["patientId"].strip()
        if not pid:
            raise LabelError(f"{where}: empty patientId")
        target, box = _parse_label_row(row, where)
        size = image_size.get(pid) if isinstance(image_size, dict) else image_size
        if box is not None and size is not None:
            _check_inside(box, size, where)
        if (pid, box) in seen:
            warnings.warn(f"{where}: duplicate of line {seen[pid, box]} ignored", stacklevel=2)
            continue
        seen[pid, box] = number
        if targets.setdefault(pid, target) != target:
            raise LabelError(f"{where}: {pid} has both a negative row and box rows")
        boxes.setdefault(pid, [])
        if box is not None:
            boxes[pid].append(box)
    return boxes


def _read_per_patient(path: Path, columns, column: str, allowed, what: str) -> dict[str, str]:
    """One value of ``column`` per patientId; repeated rows must agree, values must be ``allowed``."""
    values: dict[str, str] = {}
    for number, row in _rows(path, columns):
        where = f"{path}, line {number}"
        pid, value = row["patientId"].strip(), row[column].strip()
        if value not in allowed:
            raise LabelError(f"{where}: unknown {what} {value!r}; expected one of {list(allowed)}")
        if values.setdefault(pid, value) != value:
            raise LabelError(f"{where}: {pid} has {what} {value!r} here but {values[pid]!r} before")
    return values


def read_classes(csv_path: str | Path) -> dict[str, str]:
    """class per patientId from stage_2_detailed_class_info.csv (repeated rows are normal
    there: RSNA repeats a patient once per box); unknown or conflicting classes raise."""
    return _read_per_patient(Path(csv_path), CLASS_COLUMNS, "class", CLASSES, "class")


def read_split(csv_path: str | Path) -> dict[str, str]:
    """split ('train' / 'val' / 'test') per patientId from split.csv."""
    return _read_per_patient(Path(csv_path), SPLIT_COLUMNS, "split", SPLITS, "split")


def make_split(ids: list[str], target: dict[str, int], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
               seed: int = 0) -> dict[str, str]:
    """A deterministic train/val/test split by patient, stratified by Target."""
    fractions_arr = np.asarray(fractions, dtype=float)
    if fractions_arr.shape != (3,) or (fractions_arr < 0).any() or fractions_arr.sum() <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    bounds = np.cumsum(fractions_arr / fractions_arr.sum())
    rng = np.random.default_rng(seed)
    split: dict[str, str] = {}
    for value in (0, 1):
        group = [pid for pid in ids if target[pid] == value]
        order = rng.permutation(len(group))
        cuts = np.round(bounds * len(group)).astype(int)
        names = np.searchsorted(cuts, np.arange(len(group)), side="right")
        split.update({group[i]: SPLITS[min(n, 2)] for i, n in zip(order, names)})
    return {pid: split[pid] for pid in ids}


def write_split(path: str | Path, split: dict[str, str]) -> None:
    """Write split.csv (patientId,split) atomically."""
    from pneumomap.fileio import atomic_write_text

    lines = [",".join(SPLIT_COLUMNS)] + [f"{pid},{name}" for pid, name in split.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_rsna(root: str | Path) -> RsnaDataset:
    """Read an RSNA-format folder. Without a class file the class follows Target
    ('Lung Opacity' / 'Normal'); without split.csv a seeded 60/20/20 split is made."""
    root = Path(root)
    boxes = read_labels(root / LABELS_FILE)
    ids = list(boxes)
    target = {pid: int(bool(b)) for pid, b in boxes.items()}
    cls = read_classes(root / CLASS_FILE) if (root / CLASS_FILE).is_file() else \
        {pid: POSITIVE_CLASS if target[pid] else "Normal" for pid in ids}
    for pid in ids:
        if pid not in cls:
            raise LabelError(f"{root / CLASS_FILE}: no class for {pid}")
        if (cls[pid] == POSITIVE_CLASS) != bool(target[pid]):
            raise LabelError(f"{root / CLASS_FILE}: {pid} is {cls[pid]!r} but has Target {target[pid]}")
    if (root / SPLIT_FILE).is_file():
        split = read_split(root / SPLIT_FILE)
    else:
        log.warning("%s: no %s; using a seeded 60/20/20 split by patient", root, SPLIT_FILE)
        split = make_split(ids, target)
    return RsnaDataset(root, ids, boxes, target, {pid: cls[pid] for pid in ids}, split)


# ---------------------------------------------------------------- masks and targets

def _box_window(box: Box, shape: tuple[int, int]) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Slices of the pixels whose centres lie in the box, and those centres (rows, cols)."""
    r0, r1 = (int(np.clip(np.ceil(v - 0.5), 0, shape[0])) for v in (box.y, box.y + box.height))
    c0, c1 = (int(np.clip(np.ceil(v - 0.5), 0, shape[1])) for v in (box.x, box.x + box.width))
    return slice(r0, r1), slice(c0, c1), np.arange(r0, r1)[:, None] + 0.5, np.arange(c0, c1)[None, :] + 0.5


def box_mask(boxes: list[Box], shape: tuple[int, int], ellipse: bool = False) -> np.ndarray:
    """bool (H, W): pixels whose centre lies in any box (or in its inscribed ellipse)."""
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        rows, cols, r, c = _box_window(box, shape)
        if ellipse:
            inside = (((r - box.y - box.height / 2) / (box.height / 2)) ** 2
                      + ((c - box.x - box.width / 2) / (box.width / 2)) ** 2) <= 1.0
            mask[rows, cols] |= inside
        else:
            mask[rows, cols] = True
    return mask


def opacity_target(boxes: list[Box], lung_mask: np.ndarray, ellipse: bool = False) -> np.ndarray:
    """bool (H, W): the opacity ground truth, boxes (or ellipses) inside the lungs."""
    lungs = np.asarray(lung_mask) > 0
    return box_mask(boxes, lungs.shape, ellipse) & lungs


def side_extents(boxes: list[Box], lung_mask: np.ndarray, ellipse: bool = False) -> tuple[float, float]:
    """(right, left): area(boxes & lung side) / area(lung side); the patient's right first."""
    return split_extents(boxes, split_lungs(np.asarray(lung_mask) > 0), ellipse)


def split_extents(boxes: list[Box], sides: LungSplit, ellipse: bool = False) -> tuple[float, float]:
    """`side_extents` of an already split lung mask."""
    covered = box_mask(boxes, sides.mask.shape, ellipse)
    return tuple(float((covered & side).sum() / max(int(side.sum()), 1)) for side in (sides.right, sides.left))
