"""`pneumomap inspect`: JSON keys, text lines, hashes and exit status."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pneumomap.cli import main
from pneumomap.stages.inspect import KEYS, pixel_sha1
from pneumomap.stages.reader import read_image

DICOM = Path(__file__).parent / "data" / "real" / "dicom"
GOOD = ["siim_cxr_jpeg_baseline.dcm", "siim_cxr_monochrome1_relabelled.dcm", "nih_cxr_implicit_vr.dcm",
        "ct_scout_not_cxr.dcm"]


@pytest.fixture
def folder(tmp_path) -> Path:
    for name in GOOD:
        shutil.copy(DICOM / name, tmp_path / name)
    return tmp_path


def run_json(capsys, *argv: str) -> tuple[int, list[dict]]:
    status = main(["inspect", *argv, "--json", "--workers", "2"])
    lines = capsys.readouterr().out.splitlines()
    return status, [json.loads(line) for line in lines]


def test_json_records_of_good_folder(folder, capsys):
    status, records = run_json(capsys, str(folder))
    assert status == 0
    assert [Path(r["path"]).name for r in records] == sorted(GOOD)
    for record in records:
        assert set(record) == set(KEYS) and record["error"] is None
        assert record["sha1"] == pixel_sha1(read_image(record["path"]).pixels)
    by_id = {r["id"]: r for r in records}
    siim = by_id["siim_cxr_jpeg_baseline"]
    assert (siim["height"], siim["width"], siim["photometric"], siim["bits_stored"]) == (1024, 1024, "MONOCHROME2", 8)
    assert (siim["modality"], siim["body_part"], siim["view_position"]) == ("CR", "CHEST", "PA")
    assert siim["transfer_syntax"] == "JPEG Baseline (Process 1)"
    assert 0 <= siim["min"] < siim["mean"] < siim["max"] <= 255
    assert by_id["ct_scout_not_cxr"]["flags"] == ["not_chest: modality OT"]
    assert by_id["nih_cxr_implicit_vr"]["flags"] == []
    assert siim["sha1"] != by_id["siim_cxr_monochrome1_relabelled"]["sha1"]


def test_bad_file_gives_error_record_and_nonzero_exit(folder, capsys):
    (folder / "broken.dcm").write_text("not dicom")
    status, records = run_json(capsys, str(folder))
    assert status == 1 and len(records) == len(GOOD) + 1
    bad = next(r for r in records if r["path"].endswith("broken.dcm"))
    assert set(bad) == set(KEYS) and bad["error"] and bad["sha1"] is None and bad["flags"] == []


def test_text_mode_one_line_per_file(folder, capsys):
    (folder / "broken.png").write_text("not png")
    status = main(["inspect", str(folder)])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert status == 1 and len(lines) == len(GOOD) + 1
    assert "ERROR" in next(line for line in lines if "broken.png" in line)
    assert "not_chest: modality OT" in next(line for line in lines if "ct_scout" in line)
    assert "Traceback" not in captured.out + captured.err


def test_single_file_and_empty_directory(tmp_path, capsys):
    status, records = run_json(capsys, str(DICOM / GOOD[2]))
    assert status == 0 and records[0]["id"] == "nih_cxr_implicit_vr"
    status, records = run_json(capsys, str(tmp_path))
    assert status == 2 and "no images" in records[0]["error"]  # nothing to inspect: unusable input
