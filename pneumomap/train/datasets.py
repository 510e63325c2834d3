"""Training datasets for every stage, from an RSNA-format folder (or, for the lungs, image/mask pairs).

Each item is first *prepared* (decoded, cut, resized to the stage's input, target made from the
labels code) into a small dict of numpy arrays (see `pneumomap.train.augment` for its keys); that
is the expensive part, so small data sets are prepared once, in DataLoader worker processes, and
kept in memory. ``__getitem__`` then only augments. An unreadable image is skipped with a warning
and counted (``skipped``), never fatal.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pneumomap import labels as rsna
from pneumomap.stages.lung_geometry import LungSplit, crop, split_lungs
from pneumomap.stages.lungs import lung_half_inputs
from pneumomap.stages.preprocess import resize, to_model_input
from pneumomap.stages.reader import UnreadableImageError, read_image
from pneumomap.train import augment
from pneumomap.train.recipes import StageSpec

log = logging.getLogger(__name__)

Size = tuple[int, int]


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


def prepare_lungs(pair: tuple[str, str], size: Size) -> dict:
    """(image path, mask path) -> image and lung mask at the stage size."""
    pixels = read_image(pair[0]).pixels
    mask = rsna.read_lung_mask(pair[1])
    if mask.shape != pixels.shape:
        raise UnreadableImageError(pair[1], f"mask {mask.shape} does not match the image {pixels.shape}")
    return {"image": to_model_input(pixels, size), "target": resize_mask(mask, size)}


def prepare_rsna(pid: str, data: rsna.RsnaDataset, spec: StageSpec, size: Size, target_kind: str) -> dict:
    """One RSNA patient -> the prepared sample of a classifier, regressor or mapper stage."""
    pixels = read_image(data.image_path(pid)).pixels
    if spec.kind == "classifier":
        target = rsna.CLASSES.index(data.cls[pid]) if target_kind == "three_class" else data.target[pid]
        return {"image": to_model_input(pixels, size), "target": np.float32(target)}
    lungs = rsna.read_lung_mask(data.mask_path(pid))
    if lungs.shape != pixels.shape:
        raise UnreadableImageError(data.mask_path(pid), f"lung mask {lungs.shape} does not match the image {pixels.shape}")
    boxes = data.boxes[pid]
    if spec.kind == "regressor":
        split = split_lungs(lungs)
        right, left = rsna.split_extents(boxes, split)
        return {**side_crops(pixels, None, split, size), "target_right": np.float32(right),
                "target_left": np.float32(left)}
    opacity = rsna.opacity_target(boxes, lungs)
    if spec.side is None:  # mapper over the whole image
        return {"image": to_model_input(pixels, size), "target": resize_mask(opacity, size)}
    return side_crops(pixels, opacity, split_lungs(lungs), size)


def _safe(prepare: Callable[[object], dict], key) -> dict | None:
    """``prepare(key)``, or None (with a warning) when the image cannot be read."""
    try:
        return prepare(key)
    except (UnreadableImageError, OSError, ValueError) as exc:
        warnings.warn(f"skipping unreadable training image: {exc}", stacklevel=2)
        return None


# ---------------------------------------------------------------- the dataset

@dataclass
class Augment:
    rotate: float = 0.0     # max degrees
    hflip: bool = False


class StageDataset(Dataset):
    """Prepared samples of one stage; ``side`` picks a per-lung stage's side after the flip."""

    def __init__(self, keys: list, prepare: Callable[[object], dict], side: str | None = None,
                 aug: Augment | None = None, cache: bool = True, workers: int = 0, desc: str = "preparing"):
        self.keys, self.prepare, self.side = list(keys), prepare, side
        self.aug = aug or Augment()
        self.skipped = 0
        self.cached: list[dict] | None = None
        if cache:
            samples = _prepare_all(self.keys, prepare, workers, desc)
            self.cached = [s for s in samples if s is not None]
            self.skipped = len(samples) - len(self.cached)

    def __len__(self) -> int:
        return len(self.cached) if self.cached is not None else len(self.keys)

    def raw(self, index: int) -> dict | None:
        return self.cached[index] if self.cached is not None else _safe(self.prepare, self.keys[index])

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


def _prepare_all(keys: list, prepare: Callable, workers: int, desc: str) -> list[dict | None]:
    """Prepare every item once, in ``workers`` DataLoader worker processes, in order."""
    from tqdm import tqdm

    loader = DataLoader(_Preparing(keys, prepare), batch_size=None, num_workers=min(workers, len(keys)),
                        collate_fn=_identity)
    return list(tqdm(loader, total=len(keys), desc=desc, leave=False, disable=len(keys) < 32))


class _Preparing(Dataset):
    def __init__(self, keys: list, prepare: Callable):
        self.keys, self.prepare = keys, prepare

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        return _safe(self.prepare, self.keys[index])


def _identity(item):
    return item


# ---------------------------------------------------------------- building the datasets of a run

def sample_bytes(spec: StageSpec, size: Size) -> int:
    """Memory of one prepared sample (float32 image(s), uint8 masks)."""
    pixels = size[0] * size[1]
    per_side = pixels * 4 + (pixels if spec.kind in ("lungs", "mapper") else 8)
    return per_side * (2 if spec.side else 1)


def use_cache(recipe: dict, spec: StageSpec, size: Size, n_items: int) -> bool:
    if recipe["cache"] == "auto":
        return n_items * sample_bytes(spec, size) <= recipe["cache_mb"] * 2**20
    return bool(recipe["cache"])


def _limit(keys: list, recipe: dict) -> list:
    return keys[: recipe["max_images"]] if recipe.get("max_images") else keys


def rsna_datasets(data_dir: str | Path, spec: StageSpec, recipe: dict, size: Size) -> tuple[StageDataset, StageDataset]:
    """(train, val) datasets of a classifier / regressor / mapper stage, split by patient (split.csv)."""
    data = rsna.load_rsna(data_dir)
    prepare = partial(prepare_rsna, data=data, spec=spec, size=size, target_kind=recipe.get("target", "binary"))
    return _pair(prepare, _limit(data.ids_in(recipe["train_split"]), recipe),
                 _limit(data.ids_in(recipe["val_split"]), recipe), spec, recipe, size, str(data_dir))


def lung_datasets(train_pairs: list, val_pairs: list, spec: StageSpec, recipe: dict, size: Size):
    """(train, val) lung-segmentation datasets from (image path, mask path) pairs."""
    prepare = partial(prepare_lungs, size=size)
    return _pair(prepare, _limit(train_pairs, recipe), _limit(val_pairs, recipe), spec, recipe, size, "lungs")


def rsna_lung_pairs(data_dir: str | Path, split: str) -> list[tuple[str, str]]:
    data = rsna.load_rsna(data_dir)
    return [(str(data.image_path(pid)), str(data.mask_path(pid))) for pid in data.ids_in(split)]


def _pair(prepare, train_keys, val_keys, spec, recipe, size, where):
    for name, keys in (("train", train_keys), ("val", val_keys)):
        if not keys:
            raise ValueError(f"{where}: no images in split '{recipe[f'{name}_split']}' (see split.csv)")
    cache = use_cache(recipe, spec, size, len(train_keys) + len(val_keys))
    aug = Augment(rotate=float(recipe["rotate"]), hflip=bool(recipe["hflip"]))
    train = StageDataset(train_keys, prepare, spec.side, aug, cache, recipe["workers"], "preparing train")
    val = StageDataset(val_keys, prepare, spec.side, None, cache, recipe["workers"], "preparing val")
    return train, val
