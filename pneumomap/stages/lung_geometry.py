"""Lung-mask geometry: clean a mask, split it into the two lungs, cut lung-half crops.

Side convention: in a frontal (PA or AP) radiograph the patient's RIGHT lung appears on
the IMAGE's LEFT (smaller column index) and the patient's LEFT lung on the image's right.
Every ``right``/``left`` in this module names the patient's side, never the image's.

When two lungs cannot be found, `split_lungs` falls back to fixed lung-region crops
(rows 15-90 %, columns 20-80 % of the image, split at the middle column; the cropping
used by the pediatric-CXR study of the field) and sets ``fallback=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import measure

BoxT = tuple[int, int, int, int]  # (row0, col0, row1, col1), half-open

FALLBACK_ROWS = (0.15, 0.90)
FALLBACK_COLS = (0.20, 0.80)
MIN_LUNG_FRACTION = 0.005  # of the image: less than this in total means "no lungs found"
MIN_SIDE_RATIO = 0.15  # the smaller lung must be at least this fraction of the larger one


@dataclass
class LungSplit:
    """Both lungs of one mask. ``right`` is the patient's right lung (image left).

    Boxes are ``(row0, col0, row1, col1)``, half-open, in the coordinates of ``mask``.
    With ``fallback=True`` the sides are the fixed rectangles and ``mask`` their union.
    """

    mask: np.ndarray
    right: np.ndarray
    left: np.ndarray
    right_box: BoxT
    left_box: BoxT
    fallback: bool


def clean_mask(prob_or_mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary lung mask: threshold (bool/uint8 255 masks work too), keep the two largest
    connected components, fill their holes."""
    array = np.asarray(prob_or_mask)
    if array.dtype == bool:
        binary = array
    elif array.dtype == np.uint8 and array.max(initial=0) > 1:
        binary = array > 127
    else:
        binary = array > threshold
    labels = measure.label(binary, connectivity=2)
    if labels.max() == 0:
        return np.zeros(binary.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    return fill_holes(np.isin(labels, keep))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: the background components (4-connected) that do not touch
    the border; `scipy.ndimage.binary_fill_holes` exactly, in less time
    (benchmarks/RESULTS.md, "Figures behind design choices")."""
    background, count = ndimage.label(~mask)
    hole = np.ones(count + 1, dtype=bool)
    hole[0] = False
    hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    return mask | hole[background]


def bounding_box(mask: np.ndarray) -> BoxT:
    """Half-open (row0, col0, row1, col1) of the True pixels; (0, 0, 0, 0) when empty."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return (0, 0, 0, 0)
    r = np.flatnonzero(rows)
    c = np.flatnonzero(cols)
    return (int(r[0]), int(c[0]), int(r[-1]) + 1, int(c[-1]) + 1)


def fixed_split(shape: tuple[int, int]) -> LungSplit:
    """The fallback split (``fallback=True``): fixed crops, rows 15-90 %, cols 20-80 %, split at the middle column."""
    h, w = shape
    r0, r1 = round(FALLBACK_ROWS[0] * h), round(FALLBACK_ROWS[1] * h)
    c0, c1 = round(FALLBACK_COLS[0] * w), round(FALLBACK_COLS[1] * w)
    mid = (c0 + c1) // 2
    right_box, left_box = (r0, c0, r1, mid), (r0, mid, r1, c1)
    right, left = _box_mask(right_box, shape), _box_mask(left_box, shape)
    return LungSplit(right | left, right, left, right_box, left_box, fallback=True)


def _box_mask(box: BoxT, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[box[0]:box[2], box[1]:box[3]] = True
    return mask


def _midline_cut(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Split touching lungs at the narrowest column in the middle 30-70 % of the blob's width.

    None when the blob does not look like two lungs: narrower than 40 % of the image, or
    the cut lands outside the middle 35-65 % of the image.
    """
    width = mask.shape[1]
    _, c0, _, c1 = bounding_box(mask)
    lo, hi = c0 + int(0.3 * (c1 - c0)), c0 + int(0.7 * (c1 - c0)) + 1
    counts = mask[:, lo:hi].sum(axis=0)
    cut = lo + int(np.flatnonzero(counts == counts.min()).mean())
    if c1 - c0 < 0.4 * width or not 0.35 * width <= cut <= 0.65 * width:
        return None
    image_left = mask.copy()
    image_left[:, cut:] = False
    return image_left, mask & ~image_left


def _two_sides(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(image-left lung, image-right lung) from the two largest components when both are
    lung-sized, else a midline cut of the largest; None when neither works."""
    labels = measure.label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1] + 1
    if len(order) >= 2 and sizes[order[1] - 1] >= MIN_SIDE_RATIO * sizes[order[0] - 1]:
        a, b = labels == order[0], labels == order[1]
        if np.nonzero(a)[1].mean() > np.nonzero(b)[1].mean():
            a, b = b, a
        return a, b
    return _midline_cut(labels == order[0])


def split_lungs(mask: np.ndarray, threshold: float = 0.5) -> LungSplit:
    """Clean ``mask`` (a mask, or probabilities cut at ``threshold``: `clean_mask`) and name its
    lungs: ``right`` = patient's right = image left.

    Two lung-sized components are the two lungs; one blob (lungs touching) is cut at the
    midline; anything else (blank, a single lung) gives the fixed-crop fallback.
    """
    cleaned = clean_mask(mask, threshold)
    shape = cleaned.shape
    if cleaned.sum() < MIN_LUNG_FRACTION * cleaned.size:
        return fixed_split(shape)
    sides = _two_sides(cleaned)
    if sides is None or min(s.sum() for s in sides) < MIN_SIDE_RATIO * max(s.sum() for s in sides):
        return fixed_split(shape)
    right, left = sides
    return LungSplit(cleaned, right, left, bounding_box(right), bounding_box(left), fallback=False)


def crop(array: np.ndarray, box: BoxT, size: tuple[int, int] = (512, 320)) -> np.ndarray:
    """Cut ``box`` (row0, col0, row1, col1) out of a 2-D array and resize it to ``size`` (h, w)."""
    from pneumomap.stages.preprocess import resize

    r0, c0, r1, c1 = box
    return resize(np.asarray(array)[r0:r1, c0:c1], size)


def scale_box(box: BoxT, from_shape: tuple[int, ...], to_shape: tuple[int, ...]) -> BoxT:
    """Map a half-open box between image sizes, rounding outwards and clipping to the image."""
    sr, sc = to_shape[0] / from_shape[0], to_shape[1] / from_shape[1]
    r0, c0, r1, c1 = box
    return (max(0, int(np.floor(r0 * sr))), max(0, int(np.floor(c0 * sc))),
            min(to_shape[0], int(np.ceil(r1 * sr))), min(to_shape[1], int(np.ceil(c1 * sc))))
