"""Training datasets for every stage, from an RSNA-format folder (or, for the lungs, image/mask pairs).

Each item is first *prepared* (decoded, cut, resized to the stage's input, target made from the
labels code) into a small dict of numpy arrays (see `pneumomap.train.augment` for its keys) by the
stage's `Preparer`; that is the expensive part, so it is done once and kept in the on-disk cache
(`pneumomap.train.cache`: memory-mapped float16 inputs and uint8 masks, shared by the stages that
take the same input, rebuilt where an image, a lung mask, the labels or the preprocessing changed).
``__getitem__`` then only reads and augments. Without a cache folder, items are prepared per batch.
An unreadable image is skipped with a warning and counted (``skipped``), never fatal; an image
without a lung mask where the stage needs one is an error before any work (`MissingLungMaskError`:
run ``pneumomap fill-masks``). The lung stage trains on the images with a drawn mask only.
"""
from __future__ import annotations

import abc
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from pneumomap import labels as rsna
from pneumomap.stages.base import LUNG_HALF, WHOLE_IMAGE
from pneumomap.stages.lung_geometry import LungSplit, crop, split_lungs
from pneumomap.stages.lungs import lung_half_inputs
from pneumomap.stages.preprocess import resize, to_model_input
from pneumomap.stages.reader import UnreadableImageError, read_image
from pneumomap.train import augment
from pneumomap.train.cache import Field, Rows, SampleCache, file_signature
from pneumomap.train.recipes import Recipe, StageSpec, target_of

log = logging.getLogger(__name__)

Size = tuple[int, int]
SIDES = ("right", "left")
INPUT_DTYPE = "float16"  # model inputs in the cache: [-1, 1] to about 4e-4


# ---------------------------------------------------------------- preparing one item

def resize_mask(mask: np.ndarray, size: Size) -> np.ndarray:
    """A bool mask resized (anti-aliased, then thresholded at 0.5) to uint8 {0, 1}."""
    return (resize(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)


def side_crops(pixels: np.ndarray, target: np.ndarray | None, split: LungSplit, size: Size) -> dict:
    """Both lung-half model inputs (`lung_half_inputs`, as at inference) and crops of an optional target map."""
    sample = {}
    for side, (image, box) in lung_half_inputs(pixels, split, size).items():
        sample[f"image_{side}"] = image
        if target is not None:
            side_target = target & getattr(split, side)
            sample[f"target_{side}"] = (crop(side_target.astype(np.float32), box, size) >= 0.5).astype(np.uint8)
    return sample


def _image_field(size: Size) -> Field:
    """The whole-image model input (lungs, classifier, mapper_whole share it)."""
    return Field("image", f"image-{size[0]}x{size[1]}", tuple(size), INPUT_DTYPE, ("image",))


def _half_fields(size: Size) -> list[Field]:
    """Both lung-half model inputs (regressors and per-lung mappers share them)."""
    return [Field(f"image_{s}", f"half-{s}-{size[0]}x{size[1]}", tuple(size), INPUT_DTYPE, ("image", "mask"))
            for s in SIDES]


class Preparer(abc.ABC):
    """One stage's preparation of an item (its key) into a sample, and the cache `Field` of each sample key."""

    uses_mask: ClassVar[bool] = False  # whether the sample depends on the image's lung mask

    def __init__(self, size: Size) -> None:
        self.size = tuple(size)

    @abc.abstractmethod
    def fields(self) -> list[Field]:
        """The sample's keys as cache columns."""

    @abc.abstractmethod
    def image_path(self, key: Any) -> Path:
        """The radiograph of ``key``."""

    @abc.abstractmethod
    def __call__(self, key: Any) -> dict:
        """The prepared sample of ``key`` (raises when it cannot be read)."""

    def mask_path(self, key: Any) -> Path:
        """The lung mask of ``key`` (stages with ``uses_mask``)."""
        raise TypeError(f"{type(self).__name__} takes no lung mask")

    def item(self, key: Any) -> str:
        """The item's identity in the cache: its image path, absolute."""
        return os.path.abspath(self.image_path(key))

    def labels(self, key: Any) -> str:
        """The labels the sample depends on, as text (none by default)."""
        return ""

    def sources(self, key: Any) -> dict[str, str]:
        """What the rows of ``key`` depend on: image and lung-mask file signatures, the labels as text."""
        return {"image": file_signature(self.image_path(key)),
                "mask": file_signature(self.mask_path(key)) if self.uses_mask else "",
                "labels": self.labels(key)}

    def attempt(self, key: Any) -> dict | str:
        """The prepared sample, or why the image cannot be read; a missing lung mask is raised, not skipped."""
        try:
            return self(key)
        except rsna.MissingLungMaskError:
            raise
        except (UnreadableImageError, OSError, ValueError) as exc:
            return str(exc)


def _checked_mask(path: Path, pixels: np.ndarray) -> np.ndarray:
    mask = rsna.read_lung_mask(path)
    if mask.shape != pixels.shape:
        raise UnreadableImageError(path, f"lung mask {mask.shape} does not match the image {pixels.shape}")
    return mask


class LungsPreparer(Preparer):
    """Key (image path, drawn mask path) -> the whole-image input and the lung mask at the stage size."""

    uses_mask = True

    def fields(self) -> list[Field]:
        return [_image_field(self.size),
                Field("target", f"lungmask-{self.size[0]}x{self.size[1]}", self.size, "uint8", ("image", "mask"))]

    def image_path(self, key: tuple[str, str]) -> Path:
        return Path(key[0])

    def mask_path(self, key: tuple[str, str]) -> Path:
        return Path(key[1])

    def __call__(self, key: tuple[str, str]) -> dict:
        pixels = read_image(key[0]).pixels
        return {"image": to_model_input(pixels, self.size),
                "target": resize_mask(_checked_mask(Path(key[1]), pixels), self.size)}


class RsnaPreparer(Preparer):
    """Key patientId of an RSNA folder; the lung mask is the drawn one, else the predicted one."""

    def __init__(self, data: rsna.RsnaDataset, size: Size, target_kind: str = "binary") -> None:
        super().__init__(size)
        self.data, self.target_kind = data, target_kind

    def image_path(self, pid: str) -> Path:
        return self.data.image_path(pid)

    def mask_path(self, pid: str) -> Path:
        """The lung mask (drawn, else predicted); the drawn path when there is none (an image the fill could not
        read: it is skipped when read; if it reads now, `read` asks for the fill again)."""
        try:
            return self.data.lung_mask_path(pid)
        except rsna.MissingLungMaskError:
            return self.data.mask_path(pid)

    def labels(self, pid: str) -> str:
        return ";".join(f"{b.x},{b.y},{b.width},{b.height}" for b in self.data.boxes[pid]) + f"|{self.data.cls[pid]}"

    def read(self, pid: str) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, lung mask) of an image, checked against each other."""
        pixels = read_image(self.image_path(pid)).pixels
        return pixels, _checked_mask(self.data.lung_mask_path(pid), pixels)


class ClassifierPreparer(RsnaPreparer):
    """The whole-image input and the RSNA Target (or, for a detailed target such as three_class, the index
    of the detailed class)."""

    def fields(self) -> list[Field]:
        return [_image_field(self.size), Field("target", f"class-{self.target_kind}", (), "float32", ("labels",))]

    def __call__(self, pid: str) -> dict:
        pixels = read_image(self.image_path(pid)).pixels
        target = target_of(self.target_kind)
        label = rsna.CLASSES.index(self.data.cls[pid]) if target and target.detailed else self.data.target[pid]
        return {"image": to_model_input(pixels, self.size), "target": np.float32(label)}


class RegressorPreparer(RsnaPreparer):
    """Both lung halves and both sides' extents: area(boxes & lung side) / area(lung side)."""

    uses_mask = True

    def fields(self) -> list[Field]:
        return _half_fields(self.size) + [Field(f"target_{s}", f"extent-{s}", (), "float32", ("mask", "labels"))
                                          for s in SIDES]

    def __call__(self, pid: str) -> dict:
        pixels, lungs = self.read(pid)
        split = split_lungs(lungs)
        right, left = rsna.split_extents(self.data.boxes[pid], split)
        return {**side_crops(pixels, None, split, self.size), "target_right": np.float32(right),
                "target_left": np.float32(left)}


class WholeMapperPreparer(RsnaPreparer):
    """The whole-image input and the opacity target (boxes inside the lungs) at the stage size."""

    uses_mask = True

    def fields(self) -> list[Field]:
        return [_image_field(self.size), Field("target", f"opacity-{self.size[0]}x{self.size[1]}", self.size, "uint8",
                                               ("image", "mask", "labels"))]

    def __call__(self, pid: str) -> dict:
        pixels, lungs = self.read(pid)
        opacity = rsna.opacity_target(self.data.boxes[pid], lungs)
        return {"image": to_model_input(pixels, self.size), "target": resize_mask(opacity, self.size)}


class HalfMapperPreparer(RsnaPreparer):
    """Both lung halves and the opacity target cut like them."""

    uses_mask = True

    def fields(self) -> list[Field]:
        return _half_fields(self.size) + [
            Field(f"target_{s}", f"opacity-{s}-{self.size[0]}x{self.size[1]}", self.size, "uint8",
                  ("image", "mask", "labels")) for s in SIDES]

    def __call__(self, pid: str) -> dict:
        pixels, lungs = self.read(pid)
        return side_crops(pixels, rsna.opacity_target(self.data.boxes[pid], lungs), split_lungs(lungs), self.size)


# (stage kind, the input its network takes: `StageSpec.region`) -> its preparation from an RSNA folder
RSNA_PREPARERS: dict[tuple[str, str], type[RsnaPreparer]] = {
    ("classifier", WHOLE_IMAGE): ClassifierPreparer,
    ("regressor", LUNG_HALF): RegressorPreparer,
    ("mapper", WHOLE_IMAGE): WholeMapperPreparer,
    ("mapper", LUNG_HALF): HalfMapperPreparer,
}


# ---------------------------------------------------------------- the dataset

@dataclass
class Augment:
    rotate: float = 0.0     # max degrees
    hflip: bool = False


class StageDataset(Dataset):
    """Prepared samples of one stage; ``side`` picks a per-lung stage's side after the flip.

    ``cache`` with ``built`` (`SampleCache.build` of ``keys``): samples are read from the cache, unreadable
    keys left out and counted in ``skipped``; without a cache each item is prepared when asked for.
    ``lung_masks``: how many of the items' lung masks were drawn / predicted (None: the stage takes none)."""

    def __init__(self, keys: list, prepare: Preparer, side: str | None = None, aug: Augment | None = None,
                 cache: SampleCache | None = None, built: list | None = None,
                 lung_masks: dict[str, int] | None = None):
        self.keys, self.prepare, self.side = list(keys), prepare, side
        self.aug = aug or Augment()
        self.cached, self.lung_masks = cache, lung_masks
        self.rows: list[Rows] = []
        self.skipped = 0
        if cache is not None:
            if built is None or len(built) != len(self.keys):
                raise ValueError("a cached StageDataset needs the cache's build result of its keys")
            self.rows = [rows for rows in built if not isinstance(rows, str)]
            self.skipped = len(built) - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows) if self.cached is not None else len(self.keys)

    def raw(self, index: int) -> dict | None:
        """The prepared sample (at the cache's precision when cached); None when unreadable."""
        if self.cached is not None:
            return self.cached.read(self.rows[index])
        sample = self.prepare.attempt(self.keys[index])
        if isinstance(sample, str):
            warnings.warn(f"skipping unreadable training image: {sample}", stacklevel=2)
            return None
        return sample

    def __getitem__(self, index: int) -> dict | None:
        sample = self.raw(index)
        if sample is None:
            return None  # dropped (and counted) by `collate`
        if self.aug.hflip and torch.rand(()) < 0.5:
            sample = augment.hflip(sample)
        if self.side is not None:
            sample = {"image": sample[f"image_{self.side}"], "target": sample[f"target_{self.side}"]}
        image = torch.from_numpy(np.ascontiguousarray(sample["image"], dtype=np.float32))[None]
        target = torch.as_tensor(np.asarray(sample["target"]))
        is_mask = target.dim() == 2
        target = target[None].float() if is_mask else target.float()
        if self.aug.rotate:
            image, mask = augment.rotate(image, target if is_mask else None, augment.random_angle(self.aug.rotate))
            target = mask if is_mask else target
        return {"image": image, "target": target, "index": index}


def collate(samples: list[dict | None]) -> dict:
    """Stack samples; unreadable ones (None) are dropped and counted in ``skipped``."""
    kept = [s for s in samples if s is not None]
    batch = torch.utils.data.default_collate(kept) if kept else {}
    batch["skipped"] = len(samples) - len(kept)
    return batch


def lung_mask_counts(*datasets: StageDataset) -> dict[str, int] | None:
    """Drawn / predicted lung masks of the datasets' images together (None when the stage takes no masks)."""
    counts = [d.lung_masks for d in datasets if d.lung_masks is not None]
    if not counts:
        return None
    return {k: sum(c.get(k, 0) for c in counts) for k in dict.fromkeys(k for c in counts for k in c)}


def describe_lung_masks(counts: dict[str, int] | None) -> str:
    """'lung masks: 12 drawn, 48 predicted' (+ the images a lung stage leaves out), or ''."""
    if counts is None:
        return ""
    text = f"lung masks: {counts.get('drawn', 0)} drawn, {counts.get('predicted', 0)} predicted"
    if counts.get("without_drawn"):
        text += f" ({counts['without_drawn']} images without a drawn mask left out)"
    return text


# ---------------------------------------------------------------- building the datasets of a run

def cache_folder(recipe: Recipe, out: str | Path) -> Path | None:
    """Where a run keeps its prepared samples: the recipe's ``cache_dir`` (``--cache``), else OUT/cache;
    None when the recipe turns the cache off."""
    if not recipe.cache:
        return None
    return Path(recipe.cache_dir) if recipe.cache_dir else Path(out) / "cache"


def _limit(keys: list, recipe: Recipe) -> list:
    return keys[: recipe.max_images] if recipe.max_images else keys


def _splits(data: rsna.RsnaDataset, recipe: Recipe) -> tuple[list[str], list[str]]:
    return _limit(data.ids_in(recipe.train_split), recipe), _limit(data.ids_in(recipe.val_split), recipe)


def rsna_datasets(data_dir: str | Path, spec: StageSpec, recipe: Recipe, size: Size,
                  cache_dir: str | Path | None = None) -> tuple[StageDataset, StageDataset]:
    """(train, val) datasets of a classifier / regressor / mapper stage, split by patient (split.csv).

    Stages that take lung masks need one (drawn or predicted) for every image of both splits."""
    data = rsna.load_rsna(data_dir)
    preparer = RSNA_PREPARERS[spec.kind, spec.region](data, size, recipe.target or "binary")
    train_ids, val_ids = _splits(data, recipe)
    masks = [None, None]
    if preparer.uses_mask:
        masks = [data.require_lung_masks(ids, f" in split {split!r}")
                 for split, ids in ((recipe.train_split, train_ids), (recipe.val_split, val_ids))]
    return _pair(preparer, train_ids, val_ids, spec, recipe, str(data_dir), cache_dir, masks)


def rsna_lung_datasets(data_dir: str | Path, spec: StageSpec, recipe: Recipe, size: Size,
                       cache_dir: str | Path | None = None) -> tuple[StageDataset, StageDataset]:
    """(train, val) lung-segmentation datasets of an RSNA folder: the images with a drawn mask (lung_masks/),
    whichever others there are left out (predicted masks never train the lung stage)."""
    data = rsna.load_rsna(data_dir)
    pairs, masks = [], []
    for ids in _splits(data, recipe):
        drawn = set(data.mask_sources(ids)["drawn"])
        pairs.append([(str(data.image_path(p)), str(data.mask_path(p))) for p in ids if p in drawn])
        masks.append({"drawn": len(drawn), "predicted": 0, "without_drawn": len(ids) - len(drawn)})
    return _pair(LungsPreparer(size), pairs[0], pairs[1], spec, recipe, f"{data_dir} ({rsna.MASKS_DIR}/)",
                 cache_dir, masks)


def lung_datasets(train_pairs: list, val_pairs: list, spec: StageSpec, recipe: Recipe, size: Size,
                  cache_dir: str | Path | None = None) -> tuple[StageDataset, StageDataset]:
    """(train, val) lung-segmentation datasets from (image path, mask path) pairs."""
    return _pair(LungsPreparer(size), _limit(train_pairs, recipe), _limit(val_pairs, recipe), spec, recipe, "lungs",
                 cache_dir, [None, None])


def _pair(preparer: Preparer, train_keys: list, val_keys: list, spec: StageSpec, recipe: Recipe, where: str,
          cache_dir: str | Path | None, masks: list) -> tuple[StageDataset, StageDataset]:
    for split, keys in ((recipe.train_split, train_keys), (recipe.val_split, val_keys)):
        if not keys:
            raise ValueError(f"{where}: no images in split '{split}' (see split.csv)")
    aug = Augment(rotate=float(recipe.rotate), hflip=bool(recipe.hflip))
    cache = SampleCache(cache_dir, preparer.fields()) if cache_dir is not None else None
    built: list = [None, None]
    if cache is not None:
        every = cache.build(train_keys + val_keys, preparer, recipe.workers, f"caching {spec.kind} samples")
        built = [every[: len(train_keys)], every[len(train_keys):]]
    train = StageDataset(train_keys, preparer, spec.side, aug, cache, built[0], masks[0])
    val = StageDataset(val_keys, preparer, spec.side, None, cache, built[1], masks[1])
    return train, val
