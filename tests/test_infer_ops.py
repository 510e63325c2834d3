"""Every post-processing op on small arrays."""
from __future__ import annotations

import numpy as np
import pytest

from pneumomap.infer import ops
from pneumomap.infer.runner import ImageSize
from pneumomap.stages.lung_geometry import split_lungs


@pytest.fixture()
def lungs() -> ops.LungRegions:
    mask = np.zeros((32, 32), bool)
    mask[4:28, 3:13] = True  # patient's right lung = image left
    mask[4:28, 19:29] = True
    return ops.LungRegions(split_lungs(mask))


def test_gate_choose_level():
    assert ops.gate(0.7, 0.7) and not ops.gate(0.69, 0.7)
    assert ops.choose(0.6, 0.5) == "lung" and ops.choose(0.4, 0.5) == "whole"
    assert ops.choose(0.4, 0.5, above="max", below="none") == "none"
    assert ops.level(0.2, 0.4, 0.3) == "high" and ops.level(0.2, 0.3, 0.3) == "low"


def test_combine_pastes_each_lung_by_choice(lungs):
    whole = np.full((16, 16), 0.25, np.float32)  # another size: resized to the lungs' frame
    right, left = np.full((8, 5), 0.9, np.float32), np.full((8, 5), 0.6, np.float32)
    out = ops.combine(lungs, whole, right, left, "lung", "whole")
    assert out.shape == (32, 32)
    assert np.allclose(out[lungs.split.right], 0.9) and np.allclose(out[lungs.split.left], 0.25)
    assert np.allclose(out[~lungs.split.mask], 0.25)
    out = ops.combine(lungs, whole, right, left, "none", "max")
    assert np.allclose(out[lungs.split.right], 0.0) and np.allclose(out[lungs.split.left], 0.6)
    assert ops.combine(lungs, None, None, None) is None
    assert np.allclose(ops.combine(lungs, whole), 0.25)  # whole-image map only


def test_overestimate_dilates_and_raises_by_level():
    prob = np.zeros((21, 21), np.float32)
    prob[10, 10] = 0.5
    low = ops.overestimate(prob, "low", low={"dilate": 1, "raise": 0.0}, high={"dilate": 3, "raise": 0.1})
    high = ops.overestimate(prob, "high", low={"dilate": 1, "raise": 0.0}, high={"dilate": 3, "raise": 0.1})
    grown = high >= 0.6 - 1e-6  # about a disk of radius 3 (skimage's fast disk decomposition)
    disk3 = np.zeros_like(grown)
    disk3[7:14, 7:14] = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
    assert np.all(grown[disk3]) and not np.any(grown[:7]) and not np.any(grown[:, 14:])
    assert (low == 0.5).sum() < grown.sum() and low[10, 9] == low[9, 10] == 0.5
    assert np.isclose(high.min(), 0.1) and high.max() <= 1.0
    assert ops.overestimate(None, "high") is None
    assert np.array_equal(ops.overestimate(prob, "low", low={"dilate": 0, "raise": 0.0}), prob)


def test_resize_mask_clip(lungs):
    prob = np.full((32, 32), 0.5, np.float32)
    full = ops.to_image_size(prob, ImageSize(64, 48))
    assert full.shape == (64, 48) and np.allclose(full, 0.5)
    assert np.array_equal(ops.to_image_size(None, ImageSize(5, 7)), np.zeros((5, 7), np.float32))
    masked = ops.mask(full, lungs)
    inside = lungs.mask_at((64, 48))
    assert inside.shape == (64, 48) and np.allclose(masked[inside], 0.5) and np.all(masked[~inside] == 0)
    prob_range = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    map8 = ops.clip(prob_range, lungs)
    assert map8.dtype == np.uint8
    assert 10 <= map8[inside].min() and map8[inside].max() <= 245 and np.all(map8[~inside] == 1)
    assert np.all(ops.clip(np.zeros((64, 48), np.float32), lungs)[inside] == 10)
    assert np.all(ops.clip(np.ones((64, 48), np.float32), lungs)[inside] == 245)
    assert ops.clip(np.full((64, 48), 0.5, np.float32), lungs)[inside][0] == 128
    assert np.all(ops.clip(np.zeros((64, 48), np.float32), lungs, low=20, high=200, outside=3)[~inside] == 3)


def test_registry_signatures_match_functions():
    import inspect

    for name, definition in ops.OPS.items():
        params = inspect.signature(definition.fn).parameters
        assert len(definition.inputs) + len(definition.params) == len(params), name
        assert all(p in params for p in definition.params), name


@pytest.mark.parametrize("radius", [1, 2, 4, 5, 8, 12, 20])
def test_dilate_disk_equals_skimage_sequence_dilation(radius):
    from skimage.morphology import dilation, disk

    rng = np.random.default_rng(radius)
    for _ in range(3):
        values = rng.random((60, 50), dtype=np.float32) * 0.5
        values[rng.random(values.shape) < 0.02] = 1.0
        values[0, 7] = values[33, -1] = values[-1, 0] = 0.9  # peaks on the edges
        out = ops.dilate_disk(values, radius)
        assert out.dtype == np.float32 and np.array_equal(out, dilation(values, disk(radius, decomposition="sequence")))


def test_clip_is_the_rounded_8_bit_value_inside_and_outside_elsewhere(lungs):
    prob = np.random.default_rng(7).random(lungs.shape).astype(np.float32)
    prob[0, :4] = [0.5 / 255, 1.5 / 255, 244.5 / 255, 1.0]  # halves round to even, as np.rint does
    out = ops.clip(prob, lungs, low=10, high=245, outside=1)
    expected = np.clip(np.rint(prob.astype(np.float64) * 255.0), 10, 245).astype(np.uint8)
    inside = lungs.mask_at(prob.shape)
    assert out.dtype == np.uint8 and np.array_equal(out[inside], expected[inside]) and np.all(out[~inside] == 1)
