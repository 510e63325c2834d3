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


# ----------------------------------------------------------------------------- saved probabilities


def _pipeline_ending_in(op: str, inputs: list[str], is_model: bool = False):
    from types import SimpleNamespace

    final = SimpleNamespace(name="final", kind=op, is_model=is_model, inputs=inputs)
    return SimpleNamespace(nodes={"final": final}, outputs=SimpleNamespace(map="final"))


def test_probability_path_and_the_inputs_of_the_final_op(tmp_path):
    assert writers.probability_path(tmp_path, "abc") == tmp_path / "probabilities" / "abc.npz"
    assert writers.probability_path(str(tmp_path), "x.y") == tmp_path / "probabilities" / "x.y.npz"
    assert writers.probability_inputs(_pipeline_ending_in("clip", ["masked", "lungs_node"])) == ("masked", "lungs_node")
    for op, inputs, is_model in (("resize", ["grown", "image"], False), ("overestimate", ["combined"], False),
                                 ("lungs", ["image"], True)):
        with pytest.raises(ValueError, match=rf"outputs\.map: the node 'final' \({op}\) does not take"):
            writers.probability_inputs(_pipeline_ending_in(op, inputs, is_model))


def test_float16_keeping_bytes_at_every_rounding_boundary():
    steps = np.arange(256, dtype=np.float64)
    edges = np.concatenate([(steps + 0.5) / 255.0 + d for d in (-1e-4, -1e-6, 0.0, 1e-6, 1e-4)])
    values = np.clip(np.concatenate([edges, steps / 255.0, np.linspace(0, 1, 4001)]), 0, 1).astype(np.float32)
    half = writers.float16_keeping_bytes(values)
    assert half.dtype == np.float16 and half.shape == values.shape
    want = np.rint(values.astype(np.float64) * 255.0)
    assert np.array_equal(np.rint(half.astype(np.float64) * 255.0), want)
    nearest = values.astype(np.float16)
    kept = np.rint(nearest.astype(np.float64) * 255.0) == want
    assert np.array_equal(half[kept], nearest[kept])  # the nearest float16 wherever it keeps the byte
    assert (~kept).any()  # some nearest ones cross a boundary: those move one float16 step, toward the byte
    moved = half[~kept].astype(np.float64) - nearest[~kept].astype(np.float64)
    step = np.abs(np.nextafter(nearest[~kept], np.float16(np.inf)).astype(np.float64) - nearest[~kept])
    assert np.all(np.abs(moved) <= step * 1.0001) and np.all(moved != 0)
    assert np.all(np.sign(moved) == np.sign(want[~kept] - np.rint(nearest[~kept].astype(np.float64) * 255.0)))


def test_saved_probabilities_round_trip_and_their_key(tmp_path):
    rng = np.random.default_rng(4)
    prob = rng.random((9, 7)).astype(np.float32)
    lungs = rng.random((9, 7)) < 0.5
    path = tmp_path / "probabilities" / "a.npz"
    path.parent.mkdir()
    writers.save_probabilities(path, prob, lungs.astype(np.uint8), 0.123456789012345, "/data/a.dcm", "k-1")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.npz"]  # nothing half-written beside it
    saved = writers.load_probabilities(path)
    assert saved.map.dtype == np.float16 and np.array_equal(saved.map, writers.float16_keeping_bytes(prob))
    assert saved.lungs.dtype == bool and np.array_equal(saved.lungs, lungs)
    assert saved.probability == 0.123456789012345 and saved.path == "/data/a.dcm" and saved.key == "k-1"
    assert writers.saved_key(path) == "k-1"
    assert writers.saved_key(tmp_path / "missing.npz") is None
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert writers.saved_key(tmp_path / "junk.npz") is None


def _write_npz(path, **arrays):
    np.savez_compressed(path, **{"map": np.zeros((4, 4), np.float16), "lungs": np.ones((4, 4), bool),
                                 "probability": np.float64(0.5), "path": np.str_("p"), "key": np.str_("k"),
                                 **arrays})
    return path


@pytest.mark.parametrize("arrays, message", [
    (dict(map=np.zeros((4, 5), np.float16)), r"map \(4, 5\) and lung mask \(4, 4\) \(bool\) are not two"),
    (dict(lungs=np.ones((4, 4), np.uint8)), r"map \(4, 4\) and lung mask \(4, 4\) \(uint8\) are not two"),
    (dict(map=np.zeros((2, 4, 4), np.float16), lungs=np.ones((2, 4, 4), bool)), r"are not two \(H, W\) arrays"),
    (dict(map=np.zeros((4, 4), np.float32)), r"the map is not finite float16 \(float32\)"),
    (dict(map=np.full((4, 4), np.nan, np.float16)), r"the map is not finite float16 \(float16\)"),
])
def test_load_probabilities_names_the_file_and_what_is_wrong(tmp_path, arrays, message):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as error:
        writers.load_probabilities(path)
    assert str(error.value).startswith(f"{path}: ")


def test_load_probabilities_of_a_file_that_is_not_one(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz: not a saved-probabilities file \(\w+"):
        writers.load_probabilities(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", map=np.zeros((2, 2), np.float16))  # no lungs in it
    with pytest.raises(ValueError, match=r"partial\.npz: not a saved-probabilities file \(KeyError"):
        writers.load_probabilities(tmp_path / "partial.npz")


def test_probability_inputs_need_a_full_size_map_and_the_lungs(monkeypatch):
    from pneumomap.infer import ops

    for first, second in ((("map",), ("lungs",)), (("fullmap",), ("image",))):  # one of the two is wrong
        fake = ops.NodeDef((ops.Role("a", first), ops.Role("b", second)), "map8")
        monkeypatch.setitem(ops.OPS, "fake", fake)
        with pytest.raises(ValueError, match=r"the node 'final' \(fake\) does not take"):
            writers.probability_inputs(_pipeline_ending_in("fake", ["x", "y"]))
    monkeypatch.setitem(ops.OPS, "fake", ops.NodeDef((ops.Role("a", ("fullmap",)), ops.Role("b", ("lungs",))), "map8"))
    assert writers.probability_inputs(_pipeline_ending_in("fake", ["x", "y"])) == ("x", "y")


def test_saved_maps_keep_the_bytes_of_the_float32_map_that_clip_reads(tmp_path):
    # float64 values just above k + 0.5 (over 255) whose float32 lies below it: clip, on the float32 map,
    # rounds them down, and the saved map must keep that byte, not the float64 one
    values = (np.arange(255) + 0.5) / 255.0 + 1e-10
    values = values[np.rint(values.astype(np.float32).astype(np.float64) * 255.0) != np.rint(values * 255.0)]
    assert values.size > 10
    path = tmp_path / "a.npz"
    writers.save_probabilities(path, values[None, :], np.ones((1, values.size), bool), 0.5, "a", "k")
    saved = writers.load_probabilities(path).map[0].astype(np.float64)
    assert np.array_equal(np.rint(saved * 255.0), np.rint(values.astype(np.float32).astype(np.float64) * 255.0))
