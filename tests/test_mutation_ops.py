"""Post-processing ops as properties against pixel-loop oracles (issue 19: the mutants `test_infer_ops` let live).

Lungs here are random blobs whose bounding boxes overlap the other lung (so a paste that ignores the side's own
mask, or lands one pixel off, shows), and every map is random, so no constant hides a shifted paste.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from skimage.morphology import dilation, disk

from pneumomap.infer import ops
from pneumomap.infer.runner import ImageSize
from pneumomap.stages.lung_geometry import LungSplit, bounding_box
from pneumomap.stages.preprocess import resize as pre_resize
from properties import FAST


def blob_lungs(rng: np.random.Generator, shape: tuple[int, int]) -> ops.LungRegions:
    """Two disjoint random lungs: the right one (image left) in columns [0, 0.65 w), the left one in [0.35 w, w);
    the shared columns go to one side or the other pixel by pixel, so each box holds pixels of the other lung."""
    h, w = shape
    cols = np.arange(w)[None, :]
    in_lung = rng.random(shape) < 0.7
    shared = (cols >= int(0.35 * w)) & (cols < int(0.65 * w))
    to_right = np.where(shared, rng.random(shape) < 0.5, cols < int(0.35 * w))
    right, left = in_lung & to_right, in_lung & ~to_right
    right[h // 2, 0] = left[h // 2, w - 1] = True  # neither side empty
    right[0, int(0.35 * w)], left[0, int(0.35 * w)] = True, False  # a right pixel in the shared columns
    return ops.LungRegions(LungSplit(right | left, right, left, bounding_box(right), bounding_box(left), False))


def oracle_combine(split: LungSplit, whole, right, left, right_choice: str, left_choice: str) -> np.ndarray:
    """Pixel by pixel: the whole-image map (zeros when absent), then each lung's own pixels by its choice."""
    frame = split.mask.shape
    base = np.zeros(frame, np.float32) if whole is None else pre_resize(whole, frame)
    out = base.copy()
    for side, lung_map, how in (("right", right, right_choice), ("left", left, left_choice)):
        r0, c0, r1, c1 = getattr(split, f"{side}_box")
        pasted = None if lung_map is None else pre_resize(lung_map, (r1 - r0, c1 - c0))
        for r in range(frame[0]):
            for c in range(frame[1]):
                if not getattr(split, side)[r, c] or how == "whole" or (how == "lung" and pasted is None):
                    continue
                own = base[r, c] if pasted is None else pasted[r - r0, c - c0]
                out[r, c] = {"lung": own, "none": 0.0, "max": max(own, base[r, c])}[how]
    return out


@FAST
@given(seed=st.integers(0, 2**31), height=st.integers(6, 20), width=st.integers(8, 24),
       whole_kind=st.sampled_from(["none", "frame", "other"]), right_kind=st.sampled_from(["none", "box", "other"]),
       left_kind=st.sampled_from(["none", "box", "other"]),
       right_choice=st.sampled_from(ops.CHOICES), left_choice=st.sampled_from(ops.CHOICES))
def test_combine_equals_the_pixel_oracle(seed, height, width, whole_kind, right_kind, left_kind, right_choice,
                                         left_choice):
    rng = np.random.default_rng(seed)
    lungs = blob_lungs(rng, (height, width))

    def random_map(kind: str, box_shape: tuple[int, int]) -> np.ndarray | None:
        if kind == "none":
            return None
        shape = box_shape if kind in ("box", "frame") else tuple(int(v) for v in rng.integers(3, 12, 2))
        return rng.random(shape, dtype=np.float32)

    def box_shape(box):
        return box[2] - box[0], box[3] - box[1]

    whole = random_map(whole_kind, lungs.shape)
    right = random_map(right_kind, box_shape(lungs.split.right_box))
    left = random_map(left_kind, box_shape(lungs.split.left_box))
    out = ops.combine(lungs, whole, right, left, right_choice, left_choice)
    if whole is None and right is None and left is None:
        assert out is None
        return
    expected = oracle_combine(lungs.split, whole, right, left, right_choice, left_choice)
    assert out.dtype == np.float32 and out.shape == lungs.shape
    np.testing.assert_array_equal(out, expected)


def test_a_paste_lands_exactly_in_its_lung_box_and_nowhere_else():
    lungs = blob_lungs(np.random.default_rng(5), (16, 20))
    for side in ("right", "left"):
        r0, c0, r1, c1 = getattr(lungs.split, f"{side}_box")
        lung_map = np.arange(1, (r1 - r0) * (c1 - c0) + 1, dtype=np.float32).reshape(r1 - r0, c1 - c0)
        out = ops.combine(lungs, None, **{side: lung_map})  # default choices: 'lung' for both
        own = getattr(lungs.split, side)
        assert np.array_equal(out[r0:r1, c0:c1][own[r0:r1, c0:c1]], lung_map[own[r0:r1, c0:c1]])
        assert not out[~own].any()  # the other lung (inside this box too) and the background stay 0


def test_combine_without_the_whole_image_map():
    lungs = blob_lungs(np.random.default_rng(9), (12, 16))
    right = np.full((3, 3), 0.8, np.float32)
    out = ops.combine(lungs, None, right, None, "lung", "lung")
    assert out.dtype == np.float32 and np.allclose(out[lungs.split.right], 0.8) and not out[~lungs.split.right].any()
    whole = np.full(lungs.shape, 0.3, np.float32)
    none_right = ops.combine(lungs, whole, None, None, "none", "whole")  # 'none' needs no lung map
    assert not none_right[lungs.split.right].any() and np.allclose(none_right[~lungs.split.right], 0.3)
    max_without_map = ops.combine(lungs, whole, None, None, "max", "max")  # the whole map's own pixels
    assert np.array_equal(max_without_map, whole)


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.75])
def test_choice_and_level_at_their_threshold_take_the_upper_branch(threshold):
    assert ops.choose(threshold, threshold) == "lung" and ops.gate(threshold, threshold)
    assert ops.level(threshold - 0.125, threshold + 0.125, threshold) == "high"  # exact in binary: mean == t


def oracle_overestimate(prob: np.ndarray, amounts: dict) -> np.ndarray:
    radius, lift = amounts.get("dilate", 0), amounts.get("raise", 0.0)
    grown = dilation(prob, disk(radius, decomposition="sequence")) if radius else prob
    return np.clip(grown.astype(np.float32) + np.float32(lift), 0.0, 1.0)


@FAST
@given(seed=st.integers(0, 2**31), level=st.sampled_from(ops.LEVELS),
       low=st.fixed_dictionaries({}, optional={"dilate": st.integers(0, 3),
                                               "raise": st.sampled_from([0.0, 0.1, 0.6])}),
       high=st.fixed_dictionaries({}, optional={"dilate": st.integers(0, 3),
                                                "raise": st.sampled_from([0.0, 0.3, 0.9])}))
def test_overestimate_grows_then_raises_by_the_level_amounts(seed, level, low, high):
    rng = np.random.default_rng(seed)
    prob = rng.random((15, 13), dtype=np.float32)
    prob[rng.random(prob.shape) < 0.3] = 0.95  # near 1, so a raise must clip there
    before = prob.copy()
    out = ops.overestimate(prob, level, low=low, high=high)
    assert out.dtype == np.float32 and np.array_equal(prob, before)  # the input is never written
    np.testing.assert_array_equal(out, oracle_overestimate(prob, high if level == "high" else low))


def test_overestimate_defaults_and_bounds():
    prob = np.random.default_rng(2).random((9, 9), dtype=np.float32)
    low, high = {"dilate": 1, "raise": 0.1}, {"dilate": 2, "raise": 0.2}
    assert np.array_equal(ops.overestimate(prob, low=low, high=high), oracle_overestimate(prob, low))  # level 'low'
    assert np.array_equal(ops.overestimate(prob, "high", low=low), prob)  # no amounts: unchanged
    assert np.array_equal(ops.overestimate(prob, "low", low={"raise": 0.5}), np.clip(prob + np.float32(0.5), 0, 1))
    assert ops.overestimate(prob, "low", low={"raise": 0.5}).max() == 1.0
    assert np.array_equal(ops.overestimate(prob, "low", low={"raise": -2.0}), np.zeros_like(prob))  # never below 0
    assert np.array_equal(ops.overestimate(prob, "low", low={"dilate": 1}),
                          dilation(prob, disk(1, decomposition="sequence")))


def test_resize_and_mask_keep_float32_probabilities():
    assert ops.to_image_size(None, ImageSize(5, 7)).dtype == np.float32
    outside_range = np.linspace(-0.5, 1.5, 12 * 10, dtype=np.float32).reshape(12, 10)
    full = ops.to_image_size(outside_range, ImageSize(24, 20))
    assert full.dtype == np.float32 and full.min() == 0.0 and full.max() == 1.0
    assert np.array_equal(full, np.clip(pre_resize(outside_range, (24, 20)), 0.0, 1.0))
    lungs = blob_lungs(np.random.default_rng(3), (12, 10))
    masked = ops.mask(np.random.default_rng(4).random((12, 10)), lungs)  # float64 in
    assert masked.dtype == np.float32 and not masked[~lungs.split.mask].any()


def test_node_signatures_know_when_the_output_is_none_and_which_params_are_read():
    combine, overestimate, clip = ops.OPS["combine"], ops.OPS["overestimate"], ops.OPS["clip"]
    lungs, a_map = object(), np.zeros((2, 2), np.float32)
    assert combine.gives_none((lungs, None, None, None, "lung", "lung")) and combine.gives_none((lungs, None))
    assert not combine.gives_none((lungs, None, a_map)) and not combine.gives_none((lungs, a_map, None, None))
    assert overestimate.gives_none((None, "high")) and not overestimate.gives_none((a_map, "high"))
    assert not clip.gives_none((None, lungs))  # clip has no such rule: None is never its output
    amounts = {"low": {"dilate": 1}, "high": {"dilate": 4}}
    assert overestimate.used_params(amounts, (a_map, "high")) == {"dilate": 4}
    assert overestimate.used_params(amounts, (a_map,)) == {"dilate": 1}  # no level input: 'low'
    assert clip.used_params({"low": 10}, (a_map, lungs)) == {"low": 10}  # reads all its params


def test_clip_summaries_read_the_lung_mask_at_the_map_size_and_clip_s_defaults():
    from pneumomap import metrics

    rng = np.random.default_rng(6)
    lungs = blob_lungs(rng, (12, 10))
    prob = rng.random((24, 20))  # twice the lungs' frame: the mask is resized to the map
    codes = rng.integers(0, metrics.N_CODES, prob.shape).astype(np.uint8)
    summary = ops.clip_summary(prob, ops.clip_context(prob.shape, lungs, codes))
    assert np.array_equal(ops.clip_counts(summary), metrics.joint_counts(ops.clip(prob, lungs), codes))


def test_clip_summaries_of_an_inset_lung_box_a_one_row_lung_and_rounding_boundaries():
    from pneumomap import metrics

    rng = np.random.default_rng(8)
    shape = (23, 19)
    steps = (np.arange(256) + 0.5) / 255.0
    edges = np.concatenate([steps + d for d in (-1e-7, 0.0, 1e-7)])  # where float32 and float64 round apart
    prob = np.clip(rng.choice(edges, size=shape), 0, 1).astype(np.float32)
    codes = rng.integers(0, metrics.N_CODES, shape).astype(np.uint8)
    for rows, cols in ((slice(5, 17), slice(3, 15)), (slice(9, 10), slice(2, 18)), (slice(4, 20), slice(11, 12))):
        mask = np.zeros(shape, bool)
        mask[rows, cols] = rng.random(mask[rows, cols].shape) < 0.7
        mask[rows.start, cols.start] = mask[rows.stop - 1, cols.stop - 1] = True  # the box is exactly rows x cols

        class FixedRegions:
            def mask_at(self, shape_):
                return mask

        context = ops.clip_context(shape, FixedRegions(), codes)
        assert context[0] == (rows.start, rows.stop, cols.start, cols.stop)
        summary = ops.clip_summary(prob, context)
        for low, high, outside in ((1, 254, 1), (17, 230, 4)):
            expected = metrics.joint_counts(ops.clip(prob, FixedRegions(), low, high, outside), codes)
            assert np.array_equal(ops.clip_counts(summary, low, high, outside), expected)
