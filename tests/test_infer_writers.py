"""RSNA boxes from an 8-bit map: the same components and confidences as thresholding the probabilities."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label, regionprops

from pneumomap.infer.writers import boxes_from_map


def reference_boxes(map8: np.ndarray, threshold: float, min_area: int) -> list:
    """The plain recipe: probabilities, threshold, 8-connected components, mean probability inside."""
    prob = map8.astype(np.float32) / 255.0
    boxes = [(float(r.intensity_mean), r.bbox[1], r.bbox[0], r.bbox[3] - r.bbox[1], r.bbox[2] - r.bbox[0])
             for r in regionprops(label(prob >= threshold, connectivity=2), intensity_image=prob) if r.area >= min_area]
    return sorted(boxes, key=lambda b: (-b[0], b[1], b[2]))


@pytest.mark.parametrize("threshold", [0.5, 0.3, 128 / 255, 127.5 / 255, 1.0, 0.0])
def test_boxes_equal_the_probability_threshold(threshold):
    rng = np.random.default_rng(3)
    map8 = np.full((96, 80), 10, np.uint8)
    map8[10:30, 5:25] = rng.integers(100, 256, (20, 20))
    map8[50:60, 40:75] = 128
    map8[70:72, 70:72] = 255  # a small component (area 4)
    for min_area in (0, 5):
        assert boxes_from_map(map8, threshold, min_area) == reference_boxes(map8, threshold, min_area)


def test_a_map_below_the_threshold_has_no_boxes():
    floor = np.full((64, 64), 10, np.uint8)
    floor[:, :8] = 1
    assert boxes_from_map(floor, 0.5) == [] and reference_boxes(floor, 0.5, 0) == []
    assert boxes_from_map(floor, 1.5) == []
