"""Lung-mask cleaning, side naming (patient's right = image left), fallback, crops, boxes."""
from pathlib import Path

import numpy as np
import pytest

from pneumomap.stages import lung_geometry as lg


def ellipse(shape, centre, radii):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def two_lungs(shape=(200, 200)):
    """Patient's right lung (image left) larger than the left one."""
    return ellipse(shape, (100, 55), (70, 35)), ellipse(shape, (95, 145), (55, 25))


def test_split_names_the_larger_image_left_lung_right():
    right, left = two_lungs()
    split = lg.split_lungs(right | left)
    assert not split.fallback
    assert np.array_equal(split.right, right) and np.array_equal(split.left, left)
    assert split.right.sum() > split.left.sum()
    assert split.right_box[3] <= split.left_box[1]
    assert split.right_box == lg.bounding_box(right)


def test_touching_lungs_are_cut_at_the_midline():
    right, left = two_lungs()
    bridge = np.zeros_like(right)
    bridge[90:100, 80:125] = True
    split = lg.split_lungs(right | left | bridge)
    assert not split.fallback
    assert split.right[:, :80].sum() == right[:, :80].sum()
    assert not split.right[:, 125:].any() and not split.left[:, :80].any()


def test_fallback_on_blank_mask_and_on_a_single_lung():
    blank = lg.split_lungs(np.zeros((100, 200), dtype=bool))
    assert blank.fallback
    assert blank.right_box == (15, 40, 90, 100) and blank.left_box == (15, 100, 90, 160)
    assert np.array_equal(blank.mask, blank.right | blank.left)
    right, _ = two_lungs()
    assert lg.split_lungs(right).fallback


def test_clean_mask_keeps_two_largest_and_fills_holes():
    right, left = two_lungs()
    mask = right | left
    mask[100, 55] = False                      # a hole
    mask[5:8, 5:8] = True                      # a speck
    cleaned = lg.clean_mask(mask.astype(np.float32) * 0.9)
    assert np.array_equal(cleaned, right | left)
    assert np.array_equal(lg.clean_mask((right | left).astype(np.uint8) * 255), right | left)


def test_scale_box_rounds_outwards_and_clips():
    assert lg.scale_box((10, 20, 31, 41), (100, 100), (50, 200)) == (5, 40, 16, 82)
    assert lg.scale_box((0, 0, 100, 100), (100, 100), (64, 64)) == (0, 0, 64, 64)


def test_crop_resizes_box_to_size():
    pytest.importorskip("pneumomap.stages.preprocess")
    out = lg.crop(np.ones((200, 200), np.float32), (10, 20, 150, 100), size=(64, 40))
    assert out.shape == (64, 40)


def test_module_does_not_depend_on_train_or_infer():
    source = Path(lg.__file__).read_text()
    assert "pneumomap.train" not in source and "pneumomap.infer" not in source


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    from pneumomap.stages.lung_geometry import fill_holes

    rng = np.random.default_rng(5)
    for _ in range(100):
        mask = ndimage.binary_opening(rng.random((40, 56)) < rng.uniform(0.3, 0.8))
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    for mask in (np.zeros((9, 7), bool), np.ones((9, 7), bool)):
        assert np.array_equal(fill_holes(mask), mask)
