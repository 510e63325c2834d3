"""Preprocess: normalisation, resizing (anti-aliased, dtype-keeping) and the inverse to original size."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumomap.stages.preprocess import normalize, resize, to_model_input, to_original
from pneumomap.stages.reader import read_image

SIIM = Path(__file__).parent / "data" / "real" / "dicom" / "siim_cxr_jpeg_baseline.dcm"


def test_normalize_maps_robust_range_to_minus_one_one():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 4095, size=(200, 200)).astype(np.float32)
    pixels[0, :5] = 1e6  # outliers must not squash the range
    out = normalize(pixels)
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    low, high = np.percentile(pixels, [0.5, 99.5])
    inside = (pixels > low) & (pixels < high)
    assert np.allclose(out[inside], (pixels[inside] - low) / (high - low) * 2 - 1, atol=1e-5)


def test_normalize_flat_image_is_zero():
    assert np.array_equal(normalize(np.full((8, 8), 7.0)), np.zeros((8, 8), np.float32))


def test_normalize_is_invariant_to_units():
    pixels = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    assert np.allclose(normalize(pixels), normalize(pixels * 16 + 1000), atol=1e-5)


def test_resize_shapes_and_dtypes():
    image = np.random.default_rng(2).uniform(size=(300, 200))
    assert resize(image, (512, 320)).shape == (512, 320)
    assert resize(image, (64, 32)).dtype == np.float32
    mask = image > 0.5
    small = resize(mask, (150, 100))
    assert small.dtype == bool and set(np.unique(small)) <= {False, True}
    as_uint8 = resize((image * 255).astype(np.uint8), (600, 400))
    assert as_uint8.dtype == np.uint8


def test_downscaling_is_anti_aliased():
    checker = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    small = resize(checker, (128, 128))
    assert np.allclose(small, 0.5, atol=1e-5)


def test_upscaling_keeps_values_in_range_and_round_trips():
    rows, cols = np.mgrid[0:64, 0:64] / 64.0
    prob = (0.5 + 0.4 * np.sin(2 * np.pi * rows) * np.cos(2 * np.pi * cols)).astype(np.float32)
    big = to_original(prob, 256, 192)
    assert big.shape == (256, 192) and big.min() >= prob.min() and big.max() <= prob.max()
    back = resize(big, (64, 64))
    assert np.abs(back - prob).mean() < 0.01


def test_same_size_is_identity():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(resize(image, (3, 4)), image)


def test_to_model_input_on_real_radiograph():
    radiograph = read_image(SIIM)
    model_input = to_model_input(radiograph.pixels, (512, 512))
    assert model_input.shape == (512, 512) and model_input.dtype == np.float32
    assert model_input.min() == -1.0 and model_input.max() == 1.0
    lung, spine = model_input[150:325, 90:200].mean(), model_input[125:375, 240:272].mean()
    assert spine > lung


@pytest.mark.parametrize("size", [(512, 512), (512, 320)])
def test_to_model_input_arbitrary_size(size):
    assert to_model_input(np.random.default_rng(4).uniform(size=(700, 450)), size).shape == size


@pytest.mark.parametrize("shape,size", [((1024, 1024), (512, 512)), ((600, 400), (200, 100)), ((64, 48), (64, 16))])
def test_whole_factor_shrinking_equals_area_averaging(shape, size):
    from skimage.transform import resize_local_mean

    values = np.random.default_rng(0).random(shape, dtype=np.float32) * 4000
    expected = resize_local_mean(values, size, preserve_range=True)
    np.testing.assert_allclose(resize(values, size), expected, rtol=1e-5, atol=1e-3)
    as_uint16 = resize(values.astype(np.uint16), size)
    assert as_uint16.dtype == np.uint16 and as_uint16.shape == size


def test_whole_factor_mask_enlarging_equals_nearest():
    from skimage.transform import resize as sk_resize

    mask = np.random.default_rng(1).random((50, 40)) > 0.5
    for size in ((100, 80), (150, 40), (73, 40)):
        expected = sk_resize(mask, size, order=0, anti_aliasing=False, preserve_range=True).astype(bool)
        np.testing.assert_array_equal(resize(mask, size), expected)


@pytest.mark.parametrize("shape,size", [((64, 64), (128, 128)), ((64, 48), (250, 97)), ((40, 30), (40, 77)),
                                        ((2, 3), (5, 9))])
def test_linear_enlarging_equals_skimage(shape, size):
    from skimage.transform import resize as sk_resize

    values = np.random.default_rng(4).random(shape, dtype=np.float32)
    expected = sk_resize(values, size, order=1, anti_aliasing=False, preserve_range=True)
    out = resize(values, size)
    assert out.dtype == np.float32 and out.shape == size
    assert np.abs(out - expected).max() < 1e-5  # mirrored edges as skimage; torch's float grid inside


def test_percentiles_equal_numpy_exactly():
    from pneumomap.stages.preprocess import percentiles

    rng = np.random.default_rng(6)
    for _ in range(300):
        n = int(rng.choice([1, 2, 3, 7, 10, 201, 4097]))
        values = rng.integers(0, int(rng.choice([1, 255, 4095, 65535])) + 1, n)
        values = values.astype(rng.choice([np.float32, np.uint16, np.int32]))
        q = (float(rng.choice([0, 0.5, 50, 99.5, 100])), float(rng.uniform(0, 100)))
        assert percentiles(values, q) == [float(v) for v in np.percentile(values, q)]
    for values in (rng.normal(size=50).astype(np.float32), np.array([-3, 7, 70000]), np.array([0.5, 2.0])):
        assert percentiles(values, (0.5, 99.5)) == [float(v) for v in np.percentile(values, (0.5, 99.5))]
