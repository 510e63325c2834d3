"""Resize and rescale radiographs for the models, and map outputs back: one implementation for
training and inference alike.

Shrinking uses skimage's ``resize_local_mean`` (area averaging, anti-aliased by construction;
faster than ``resize`` with Gaussian anti-aliasing); enlarging uses spline interpolation without
smoothing. Shrinking by whole factors (RSNA's 1024 px to 512: the same area averages, to 1e-7) and
enlarging masks by whole factors take strided sums and repeats instead. Enlarging a 2-D float array
linearly (order 1, both sides at least as large) uses torch's bilinear interpolation with skimage's
mirrored edges (equal to skimage to 2e-7 at whole factors, 5e-5 otherwise). Each of these is the
faster way; the timings: benchmarks/RESULTS.md, "Figures behind design choices".
"""
from __future__ import annotations

import functools

import numpy as np
from skimage.transform import resize as _sk_resize
from skimage.transform import resize_local_mean

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


def normalize(pixels: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1]: the 0.5/99.5 percentiles map to -1/+1 (clipped); a flat image gives 0."""
    pixels = np.asarray(pixels, dtype=np.float32)
    return rescale(pixels, *intensity_range(pixels))


def intensity_range(pixels: np.ndarray) -> tuple[float, float]:
    """The (low, high) that `normalize` maps to -1/+1: the 0.5/99.5 percentiles, or the minimum and
    maximum when those coincide."""
    low, high = percentiles(pixels, (LOW_PERCENTILE, HIGH_PERCENTILE))
    if high <= low:
        low, high = float(np.min(pixels)), float(np.max(pixels))
    return low, high


def rescale(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 ``pixels`` with ``low``/``high`` at -1/+1, clipped; zeros when ``high <= low``."""
    if high <= low:
        return np.zeros(np.shape(pixels), np.float32)
    out = (pixels - np.float32(low)) * np.float32(2.0 / (high - low)) - np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out)


def percentiles(values: np.ndarray, q: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, q)`` (linear method), exactly; for whole numbers in [0, 65535] (every
    DICOM and PNG radiograph) from a histogram, faster (benchmarks/RESULTS.md, "Figures behind design choices")."""
    values = np.asarray(values)
    flat = values.ravel()
    if flat.size == 0 or flat.dtype.kind not in "fui":
        return [float(v) for v in np.percentile(values, q)]
    low, high = flat.min(), flat.max()
    whole = low >= 0 and high <= 65535
    if whole and flat.dtype.kind == "f":
        as_int = flat.astype(np.uint16)
        whole = bool(np.array_equal(as_int, flat))
        flat = as_int
    if not whole:
        return [float(v) for v in np.percentile(values, q)]
    ranks = np.cumsum(np.bincount(flat))  # ranks[v] = how many values are <= v
    n = flat.size
    fractions = np.asarray(q, dtype=np.float64) / 100
    virtual = (n - 1) * fractions  # numpy's index of the linear method
    previous = np.clip(np.floor(virtual), 0, n - 1).astype(np.intp)
    following = np.clip(previous + 1, 0, n - 1)
    previous[virtual >= n - 1] = n - 1
    gamma = virtual - np.floor(virtual)
    a = np.searchsorted(ranks, previous + 1).astype(np.float64)  # the value at each sorted position
    b = np.searchsorted(ranks, following + 1).astype(np.float64)
    out = a + (b - a) * gamma
    out = np.where(gamma >= 0.5, b - (b - a) * (1 - gamma), out)  # numpy's lerp, both halves
    return [float(v) for v in out]


def resize(array: np.ndarray, size: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize (H, W[, C]) to ``size`` = (h, w), anti-aliased when shrinking.

    order 0 (or a bool array) is nearest neighbour, for masks and labels. Otherwise shrinking
    averages the covered area and enlarging interpolates with a spline of that order.
    Floats come back as float32; bool and integer arrays keep their dtype (rounded, clipped).
    """
    array = np.asarray(array)
    size = (int(size[0]), int(size[1]))
    if tuple(array.shape[:2]) == size:
        return _restore_dtype(array.astype(np.float32, copy=False), array.dtype)
    if array.dtype == bool or order == 0:
        grow = _whole_factors(size, array.shape[:2])
        if grow is not None:
            return np.repeat(np.repeat(array, grow[0], axis=0), grow[1], axis=1)
        out = _sk_resize(array, size, order=0, anti_aliasing=False, preserve_range=True)
        return out.astype(array.dtype, copy=False)
    values = array.astype(np.float32, copy=False)
    shrink = any(new < old for new, old in zip(size, array.shape[:2]))
    grow = any(new > old for new, old in zip(size, array.shape[:2]))
    factors = _whole_factors(array.shape[:2], size)
    if factors is not None and values.ndim == 2:
        out = _block_mean(values, *factors)
    elif order == 1 and not shrink and values.ndim == 2 and min(values.shape) >= 2:
        out = _enlarge_linear(values, size)
    elif shrink and not grow:
        channel_axis = -1 if values.ndim == 3 else None
        out = resize_local_mean(values, size, preserve_range=True, channel_axis=channel_axis)
    else:
        out = _sk_resize(values, size, order=order, anti_aliasing=shrink, preserve_range=True)
    return _restore_dtype(out.astype(np.float32, copy=False), array.dtype)


def _whole_factors(big: tuple[int, ...], small: tuple[int, int]) -> tuple[int, int] | None:
    """(fy, fx) when ``big`` is exactly ``small`` times whole factors, not both 1; else None."""
    if any(b % s for b, s in zip(big, small)):
        return None
    factors = (big[0] // small[0], big[1] // small[1])
    return factors if factors != (1, 1) else None


def _block_mean(values: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Area-average shrinking by whole factors: the mean of each fy x fx block (float32)."""
    out = np.zeros((values.shape[0] // fy, values.shape[1] // fx), np.float32)
    for i in range(fy):
        rows = values[i::fy]
        for j in range(fx):
            out += rows[:, j::fx]
    out *= np.float32(1.0 / (fy * fx))
    return out


@functools.lru_cache(maxsize=64)  # a few sizes recur for every map
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output sample along one axis: (first index, second index, weight of the second, whether
    a tap lies past an edge). Pixel centres aligned (``(j + 0.5) * n_in / n_out - 0.5``); indices
    past an edge are mirrored about the edge pixel (-1 -> 1, n -> n - 2), as skimage does."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(x).astype(np.intp)
    weight = (x - first).astype(np.float32)
    second = first + 1
    edge = (first < 0) | (second > n_in - 1)
    first[first < 0] = 1
    second[second > n_in - 1] = n_in - 2
    for taps in (first, second, weight, edge):
        taps.flags.writeable = False  # cached: shared by every caller
    return first, second, weight, edge


def _enlarge_linear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear enlarging of a 2-D float32 array (each side >= 2 px): torch's interpolation (pixel
    centres aligned, edges clamped), then the few rows and columns next to an edge recomputed with
    mirrored taps."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        out = F.interpolate(torch.from_numpy(np.ascontiguousarray(values))[None, None], size=size,
                            mode="bilinear", align_corners=False)[0, 0].numpy()
    r0, r1, wr, rows = _linear_taps(values.shape[0], size[0])
    c0, c1, wc, cols = _linear_taps(values.shape[1], size[1])
    if rows.any():
        part = values[r0[rows]] * (1 - wr[rows])[:, None] + values[r1[rows]] * wr[rows][:, None]
        out[rows] = part[:, c0] * (1 - wc) + part[:, c1] * wc
    if cols.any():
        part = values[:, c0[cols]] * (1 - wc[cols]) + values[:, c1[cols]] * wc[cols]
        out[:, cols] = part[r0] * (1 - wr)[:, None] + part[r1] * wr[:, None]
    return out


def to_model_input(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A corrected radiograph as a model sees it: float32 (h, w) in [-1, 1]."""
    return normalize(resize(pixels, size))


def to_original(prob_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map computed at model size, back at the original image size (dtype kept as in ``resize``)."""
    return resize(prob_map, (height, width), order=1)


def _restore_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return values
    if dtype == bool:
        return values >= 0.5
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)
