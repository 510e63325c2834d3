"""Training augmentation: horizontal flip that swaps the sides, and rotation applied alike to image and mask.

A prepared sample is a dict. Whole-image stages hold ``image`` (h, w) and ``target`` (a mask
(h, w) or a scalar); per-lung stages hold both sides: ``image_right``, ``image_left``,
``target_right``, ``target_left``. Mirroring an image turns the patient's left lung into a
right-looking one, so ``hflip`` mirrors every 2-D array and swaps the ``_right``/``_left`` keys.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IMAGE_FILL = -1.0   # the darkest model input value ([-1, 1] scale) fills the corners uncovered by a rotation


def _swap(key: str) -> str:
    if key.endswith("_right"):
        return key[: -len("_right")] + "_left"
    if key.endswith("_left"):
        return key[: -len("_left")] + "_right"
    return key


def hflip(sample: dict) -> dict:
    """Mirror every 2-D array left-right and swap right/left keys (targets included)."""
    flipped = {}
    for key, value in sample.items():
        if isinstance(value, np.ndarray) and value.ndim == 2:
            value = np.ascontiguousarray(value[:, ::-1])
        flipped[_swap(key)] = value
    return flipped


def rotate(image: torch.Tensor, mask: torch.Tensor | None, degrees: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate a (1, h, w) image (bilinear) and optionally its (1, h, w) mask (nearest) by the same angle."""
    image = TF.rotate(image, degrees, interpolation=InterpolationMode.BILINEAR, fill=IMAGE_FILL)
    if mask is not None:
        mask = TF.rotate(mask, degrees, interpolation=InterpolationMode.NEAREST, fill=0.0)
    return image, mask


def random_angle(max_degrees: float, generator: torch.Generator | None = None) -> float:
    """A uniform angle in [-max_degrees, max_degrees]."""
    return float((torch.rand((), generator=generator) * 2.0 - 1.0) * max_degrees)
