"""Per-image records, boxes from maps and the failure fallback, cell by cell (issue 19: the mutants
`test_infer_writers` let live or never ran)."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumomap.infer import writers
from pneumomap.infer.spec import DECISION_COLUMNS
from test_infer_writers import reference_boxes


def test_format_value_of_every_kind():
    assert writers.format_value(None) == ""
    assert writers.format_value(True) == "1" and writers.format_value(np.bool_(False)) == "0"
    assert writers.format_value(0.5) == "0.500000" and writers.format_value(np.float32(0.25)) == "0.250000"
    assert writers.format_value(3) == "3.000000" and writers.format_value(np.int64(2)) == "2.000000"
    assert writers.format_value("lung") == "lung"


def test_boxes_defaults_min_area_tie_order_and_float32_threshold():
    map8 = np.zeros((20, 20), np.uint8)
    map8[0, 0] = 200  # area 1, first in raster order
    map8[2:4, 10:12] = 200  # area 4, the same mean as the next two: ordered by x, then y
    map8[10:12, 3:5] = 200
    map8[14:16, 3:4] = 200  # lower than the one above it, but narrower
    boxes = writers.boxes_from_map(map8)
    assert boxes == writers.boxes_from_map(map8, 0.5, 0) == reference_boxes(map8, 0.5, 0)
    assert [b[1:] for b in boxes] == [(0, 0, 1, 1), (3, 10, 2, 2), (3, 14, 1, 2), (10, 2, 2, 2)]
    assert [b[1:] for b in writers.boxes_from_map(map8, 0.5, 2)] == [(3, 10, 2, 2), (3, 14, 1, 2), (10, 2, 2, 2)]
    assert [b[1:] for b in writers.boxes_from_map(map8, 0.5, 4)] == [(3, 10, 2, 2), (10, 2, 2, 2)]  # area 4 kept
    exact = float(np.float32(200) / np.float32(255))  # the float32 probability of byte 200, as a float64
    assert writers.boxes_from_map(map8, exact, 0) == reference_boxes(map8, exact, 0) != []


def test_prediction_string_and_records():
    assert writers.prediction_string([(0.91234, 1, 2, 3, 4), (0.5, 5, 6, 7, 8)]) == \
        "0.9123 1 2 3 4 0.5000 5 6 7 8"
    map8 = np.zeros((10, 10), np.uint8)
    map8[2:5, 3:7] = 255
    decisions = {DECISION_COLUMNS[0]: True}
    record = writers.make_record("img", "in/img.png", 0.25, decisions, map8, {"threshold": 0.5, "min_area": 0})
    assert record == writers.Record("img", "in/img.png", "0.250000",
                                    {c: "1" if c == DECISION_COLUMNS[0] else "" for c in DECISION_COLUMNS},
                                    "1.0000 3 2 4 3", None)
    assert writers.make_record("img", "p", 0.25, decisions, map8, {"threshold": 0.5, "min_area": 20}).boxes == ""
    assert writers.make_record("img", "p", 0.25, {}, map8, None).boxes == ""
    failure = writers.failure_record("bad", "in/bad.dcm", "unreadable: truncated")
    assert failure == writers.Record("bad", "in/bad.dcm", "0.000000", {c: "" for c in DECISION_COLUMNS}, "",
                                     "unreadable: truncated")


def dicom_header_bytes(rows: int, columns: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(np.zeros((rows, columns), np.uint8), "MONOCHROME2", 8)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_image_size_from_headers_and_the_fallback(tmp_path):
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "a.png")
    assert writers.image_size(tmp_path / "a.png") == (30, 20)
    data = dicom_header_bytes(40, 24)
    (tmp_path / "b.dcm").write_bytes(data[:-100])  # pixel data cut short: the header still gives the size
    assert writers.image_size(tmp_path / "b.dcm") == (40, 24)
    (tmp_path / "c.dcm").write_bytes(data[132:])  # no preamble and no 'DICM': read by force
    assert pydicom.dcmread(tmp_path / "c.dcm", force=True).Rows == 40
    assert writers.image_size(tmp_path / "c.dcm") == (40, 24)
    (tmp_path / "d.dcm").write_bytes(b"not an image")
    assert writers.image_size(tmp_path / "d.dcm") == writers.FALLBACK_SIZE


@pytest.mark.parametrize("rows, columns, expected", [
    (1, 1, (1, 1)), (writers.MAX_FALLBACK_SIDE, 3, (writers.MAX_FALLBACK_SIDE, 3)),
    (3, writers.MAX_FALLBACK_SIDE, (3, writers.MAX_FALLBACK_SIDE)),
    (0, 5, writers.FALLBACK_SIZE), (5, 0, writers.FALLBACK_SIZE),
    (writers.MAX_FALLBACK_SIDE + 1, 5, writers.FALLBACK_SIZE),
    (5, writers.MAX_FALLBACK_SIDE + 1, writers.FALLBACK_SIZE),
])
def test_image_size_believes_headers_within_the_limits(tmp_path, monkeypatch, rows, columns, expected):
    ds = Dataset()
    ds.Rows, ds.Columns = rows, columns
    monkeypatch.setattr(pydicom, "dcmread", lambda *args, **kwargs: ds)  # a header claiming this size
    (tmp_path / "h.dcm").write_bytes(b"header only")
    assert writers.image_size(tmp_path / "h.dcm") == expected


def test_fallback_map_is_the_floor_at_the_header_size(tmp_path):
    Image.fromarray(np.zeros((7, 5), np.uint8)).save(tmp_path / "a.png")
    floor = writers.fallback_map(tmp_path / "a.png")
    assert floor.dtype == np.uint8 and floor.shape == (7, 5) and np.all(floor == 1)
    assert np.all(writers.fallback_map(tmp_path / "a.png", floor=3) == 3)
