"""pneumomap.truth: RSNA folders and reference-map folders behind one interface."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pneumomap import metrics, score, truth
from pneumomap.labels import load_rsna
from pneumomap.submission import SubmissionError
from test_score import BOXES, SHAPE, hand_truth, make_truth

LEVELS = np.array([0, 1 / 3, 2 / 3, 1])


def write_references(root, refs: dict[str, np.ndarray], labels: dict[str, int] | None = None,
                     png: set[str] = frozenset()):
    """A reference folder: <id>.npy float levels (or <id>.png 0/85/170/255 for ids in ``png``) and labels."""
    root.mkdir(parents=True, exist_ok=True)
    for name, ref in refs.items():
        if name in png:
            Image.fromarray(np.rint(ref * 255).astype(np.uint8)).save(root / f"{name}.png")
        else:
            np.save(root / f"{name}.npy", ref)
    labels = labels if labels is not None else {k: int((v > 0).any()) for k, v in refs.items()}
    (root / "image-level-classifications.csv").write_text(
        "fileNamePath,score\n" + "".join(f"{k}.png,{v}\n" for k, v in labels.items()))
    return root


# ----------------------------------------------------------------------------- RSNA truth

@pytest.mark.parametrize("level, code", [("1/3", 1), ("2/3", 2), (1.0, 3)])
@pytest.mark.parametrize("definition", ["boxes", "boxes_in_lungs", "ellipses"])
def test_rsna_codes_are_the_region_at_the_box_level(tmp_path, level, code, definition):
    root = make_truth(tmp_path / "rsna", BOXES)
    t = truth.load_truth(root, truth_def=definition, box_level=level)
    assert isinstance(t, truth.RsnaTruth) and t.ids == list(BOXES) and not t.selected
    for pid, boxes in BOXES.items():
        codes = t.codes(pid, SHAPE)
        assert codes.dtype == np.uint8
        np.testing.assert_array_equal(codes, np.where(hand_truth(boxes, definition), code, 0))
        assert t.label(pid) == int(bool(boxes))
        assert t.boxes(pid).shape == (len(boxes), 4)
    assert t.describe()["box_level"] == metrics.MIDRC_LEVELS[code]
    assert t.image_path("p0") == root / "stage_2_train_images" / "p0.dcm"
    assert str(t) == f"{root} (RSNA, {definition} at box level {truth.level_name(level)})"


def test_rsna_split_and_the_old_score_names(tmp_path):
    root = make_truth(tmp_path / "rsna", BOXES, {pid: ("test" if i % 2 else "val") for i, pid in enumerate(BOXES)})
    t = truth.load_truth(root, split="test")
    assert t.ids == ["p1", "p3", "p5", "p7"] and t.selected
    dataset = load_rsna(root)
    assert score.select_ids(dataset, "test") == t.ids
    np.testing.assert_array_equal(score.truth_mask(dataset, "p1", SHAPE, "boxes_in_lungs"),
                                  hand_truth(BOXES["p1"], "boxes_in_lungs"))
    assert score.SubmissionError is SubmissionError
    with pytest.raises(SubmissionError, match="no image in split 'train'"):
        truth.load_truth(root, split="train")


@pytest.mark.parametrize("definition", ["boxes", "boxes_in_lungs"])
def test_rsna_wrong_shape_names_the_lung_mask(tmp_path, definition):
    root = make_truth(tmp_path / "rsna", BOXES)
    with pytest.raises(SubmissionError, match=r"p0: map shape \(10, 10\) != lung mask shape .*p0\.png"):
        truth.load_truth(root, truth_def=definition).codes("p0", (10, 10))


# ----------------------------------------------------------------------------- reference maps

def test_reference_maps_npy_and_png(tmp_path):
    rng = np.random.default_rng(0)
    refs = {name: LEVELS[rng.integers(0, 4, (12, 9))] for name in ("b", "a", "c-1")}
    refs["z"] = np.zeros((12, 9))
    root = write_references(tmp_path / "ref", refs, png={"a", "z"})
    t = truth.load_truth(root)
    assert isinstance(t, truth.ReferenceMapTruth)
    assert t.ids == ["a", "b", "c-1", "z"]  # sorted as the organisers sort the file names
    for name, ref in refs.items():
        np.testing.assert_array_equal(t.codes(name, (12, 9)), metrics.reference_codes(ref))
        assert t.label(name) == int((ref > 0).any())
        assert t.file_name(name) == f"{name}.png" and t.boxes(name) is None and t.image_path(name) is None
    assert t.describe()["truth_source"] == "reference_maps"


def test_reference_png_levels_and_a_bad_value(tmp_path):
    root = tmp_path / "ref"
    root.mkdir()
    Image.fromarray(np.array([[0, 85], [170, 255]], np.uint8)).save(root / "a.png")
    Image.fromarray(np.array([[0, 85], [128, 255]], np.uint8)).save(root / "b.png")
    (root / "image-level-classifications.csv").write_text("fileNamePath,score\na.dcm,1\nb.dcm,1\n")
    t = truth.load_truth(root)
    assert t.codes("a", (2, 2)).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(SubmissionError, match=r"b\.png: value\(s\) 128 are not reference levels"):
        t.codes("b", (2, 2))


def test_reference_wrong_shape_names_the_file(tmp_path):
    root = write_references(tmp_path / "ref", {"a": np.zeros((6, 5)), "b": np.ones((6, 5))})
    t = truth.load_truth(root)
    with pytest.raises(SubmissionError, match=r"a: map shape \(5, 6\) != reference shape \(6, 5\) .*a\.npy"):
        t.codes("a", (5, 6))


def test_reference_nan_is_an_error_naming_the_file(tmp_path):
    ref = np.zeros((4, 4))
    ref[1, 1] = np.nan
    root = write_references(tmp_path / "ref", {"a": ref}, labels={"a": 1})
    with pytest.raises(SubmissionError, match=r"a\.npy: .*NaN"):
        truth.load_truth(root).codes("a", (4, 4))


def test_reference_label_errors(tmp_path):
    root = write_references(tmp_path / "ref", {"a": np.zeros((4, 4)), "b": np.ones((4, 4))}, labels={"a": 0})
    with pytest.raises(SubmissionError, match="no label for 1 reference map.*: b"):
        truth.load_truth(root)
    write_references(root, {"a": np.zeros((4, 4)), "b": np.ones((4, 4))}, labels={"a": 0, "b": 0.5})
    with pytest.raises(SubmissionError, match="label '0.5' is not 0 or 1"):
        truth.load_truth(root)
    write_references(root, {"a": np.zeros((4, 4)), "b": np.ones((4, 4))}, labels={"a": 0, "b": 1, "c": 1})
    with pytest.raises(SubmissionError, match="have no reference map.*: c"):
        truth.load_truth(root)
    (root / "image-level-classifications.csv").unlink()
    with pytest.raises(SubmissionError, match="image-level-classifications.csv"):
        truth.load_truth(root)


def test_load_truth_errors_name_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SubmissionError, match=f"{empty}: not a truth folder"):
        truth.load_truth(empty)
    with pytest.raises(SubmissionError, match="no such truth folder"):
        truth.load_truth(tmp_path / "missing")
    root = write_references(tmp_path / "ref", {"a": np.zeros((4, 4))})
    with pytest.raises(SubmissionError, match="--split 'test' needs an RSNA-format folder"):
        truth.load_truth(root, split="test")


def test_parse_box_level():
    third, two_thirds = metrics.MIDRC_LEVELS[1], metrics.MIDRC_LEVELS[2]
    for text, level in [("1/3", third), ("2/3", two_thirds), ("1", 1.0), ("1.0", 1.0), ("0.33", third),
                        ("0.333", third), ("0.67", two_thirds), ("0.6667", two_thirds), ("2/6", third)]:
        assert truth.parse_box_level(text) == level, text
    assert truth.parse_box_level(1 / 3) == third and truth.parse_box_level(1) == 1.0
    for bad in ("0", "0.5", "0.3", "0.66", "0.34", "abc", "1/0", 0.33):
        with pytest.raises(ValueError, match="1/3, 2/3 or 1"):
            truth.parse_box_level(bad)
