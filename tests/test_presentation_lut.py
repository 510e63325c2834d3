"""Presentation LUT Shape (2050,0020) INVERSE: inverted like MONOCHROME1, exactly once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pneumomap.stages.reader import read_image
from tests.test_reader import make_dicom, stored_pixels

WINDOW = dict(WindowCenter=3600, WindowWidth=200)


def read(tmp_path: Path, name: str, photometric: str, shape: str | None) -> np.ndarray:
    """Pixels of a 12-bit windowed DICOM written with pydicom, with ``shape`` as its Presentation LUT Shape."""
    attrs = dict(WINDOW, PresentationLUTShape=shape) if shape is not None else dict(WINDOW)
    path = make_dicom(tmp_path / name, stored_pixels(12), 12, photometric, **attrs)
    assert pydicom.dcmread(path).get("PresentationLUTShape") == shape  # the tag is really in the file
    return read_image(path)


@pytest.fixture
def plain(tmp_path) -> np.ndarray:
    pixels = read(tmp_path, "plain.dcm", "MONOCHROME2", None).pixels
    assert pixels.min() == 0 and pixels.max() == 4095  # the window saturates both ends: an inversion shows
    return pixels


def test_inverse_on_monochrome2_is_inverted_and_flagged(tmp_path, plain):
    image = read(tmp_path, "inv.dcm", "MONOCHROME2", "INVERSE")
    assert np.array_equal(image.pixels, 4095.0 - plain)
    assert any("INVERSE" in flag for flag in image.meta.flags)


def test_inverse_on_monochrome1_is_inverted_once(tmp_path, plain):
    mono1 = read(tmp_path, "m1.dcm", "MONOCHROME1", None)
    both = read(tmp_path, "m1inv.dcm", "MONOCHROME1", "INVERSE")
    assert np.array_equal(mono1.pixels, 4095.0 - plain)
    assert np.array_equal(both.pixels, mono1.pixels)  # not inverted twice (back to MONOCHROME2's look)
    assert not any("INVERSE" in flag for flag in both.meta.flags)  # the standard pairing: nothing to flag


@pytest.mark.parametrize("shape", ["IDENTITY", ""])
def test_identity_or_empty_changes_nothing(tmp_path, plain, shape):
    assert np.array_equal(read(tmp_path, "id.dcm", "MONOCHROME2", shape).pixels, plain)
