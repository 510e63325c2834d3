"""Property-based fuzzing of the reader (issue 14): random bytes and random mutations of valid DICOM
(uncompressed, RLE, JPEG 2000, JPEG Baseline), PNG and JPEG files. Whatever the bytes, `read_image`
returns finite float32 pixels or raises `UnreadableImageError`, and no read allocates more than
ALLOCATION_BOUND (traced by tracemalloc: numpy's and Python's allocations).

CI runs a few seconds of examples (the default profile); by hand, ten minutes:
    PNEUMOMAP_FUZZ_SECONDS=600 .venv/bin/python -m pytest tests/test_reader_fuzz.py -p no:cacheprovider
"""
from __future__ import annotations

import io
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumomap.stages.reader import MAX_PIXELS, UnreadableImageError, read_image

REAL = Path(__file__).parent / "data" / "real"
SECONDS = float(os.environ.get("PNEUMOMAP_FUZZ_SECONDS", "4"))
# the largest array a read may make: MAX_PIXELS float32 pixels and a few working copies of them
ALLOCATION_BOUND = 6 * 4 * MAX_PIXELS


def _seeds() -> dict[str, bytes]:
    from pneumomap import synth

    seeds: dict[str, bytes] = {}
    rng = np.random.default_rng(0)
    for i, fmt in enumerate(synth._formats()):
        phantom = synth.make_phantom(rng, 48, "Lung Opacity")
        seeds[f"phantom-{i}.dcm"] = synth.dicom_bytes(phantom.image, fmt, f"p{i}", 0, i, "CR", "PA")
    seeds["real.dcm"] = (REAL / "dicom" / "siim_cxr_jpeg_baseline.dcm").read_bytes()
    grey = (rng.random((40, 32)) * 255).astype(np.uint8)
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format=fmt)
        seeds[f"image{suffix}"] = buffer.getvalue()
    return seeds


SEEDS = _seeds()
NAMES = sorted(SEEDS)


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(NAMES))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(("flip", "truncate", "insert", "zero")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            data[at:at + draw(st.integers(1, 64))] = bytes(min(64, len(data) - at))
    return name, bytes(data)


TRIED = {"files": 0, "unreadable": 0, "peak": 0}


def _check(tmp_path: Path, name: str, data: bytes) -> None:
    TRIED["files"] += 1
    path = tmp_path / name
    path.write_bytes(data)
    tracemalloc.start()
    try:
        image = read_image(path)
    except UnreadableImageError as error:
        TRIED["unreadable"] += 1
        assert str(error).startswith(str(path)) and error.reason
    else:
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert image.pixels.size > 0 and np.isfinite(image.pixels).all()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        TRIED["peak"] = max(TRIED["peak"], peak)
    assert peak <= ALLOCATION_BOUND, f"{name}: {peak:,} bytes"


FUZZ = settings(max_examples=10_000_000, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))


def _timed(test):
    """Run ``test`` (a hypothesis test) until SECONDS have passed."""
    def run(tmp_path):
        start, before = time.monotonic(), dict(TRIED)
        while time.monotonic() < start + SECONDS:
            test(tmp_path)
        print(f"\n{test.__name__}: {TRIED['files'] - before['files']} files in {time.monotonic() - start:.0f} s, "
              f"{TRIED['unreadable'] - before['unreadable']} unreadable, largest allocation {TRIED['peak']:,} bytes")
    return run


@given(data=st.binary(max_size=2048), suffix=st.sampled_from((".dcm", ".png", ".jpg", "")))
@settings(FUZZ, max_examples=40)
def _random_bytes(tmp_path, data, suffix):
    _check(tmp_path, f"random{suffix}", data)


@given(case=mutated())
@settings(FUZZ, max_examples=25)
def _mutations(tmp_path, case):
    _check(tmp_path, *case)


def test_every_seed_reads(tmp_path):
    for name, data in SEEDS.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert np.isfinite(read_image(path).pixels).all(), name


def test_random_bytes_never_escape_the_reader(tmp_path):
    _timed(_random_bytes)(tmp_path)


def test_mutated_files_never_escape_the_reader(tmp_path):
    _timed(_mutations)(tmp_path)


def test_a_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    import pydicom

    path = tmp_path / "huge.dcm"
    path.write_bytes(SEEDS["phantom-0.dcm"])
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(path)
    with pytest.raises(UnreadableImageError, match="more than the"):
        read_image(path)
