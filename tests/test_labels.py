"""RSNA label parsing and validation, box masks, opacity targets, side extents, splits."""
import numpy as np
import pytest

from pneumomap import labels as L
from pneumomap.labels import Box, LabelError

HEADER = "patientId,x,y,width,height,Target\n"


def write(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_labels_groups_boxes_and_negatives(tmp_path):
    path = write(tmp_path, HEADER + "a,,,,,0\nb,264.0,152.0,213.0,379.0,1\nb,562,152,256,453,1\n")
    boxes = L.read_labels(path)
    assert boxes == {"a": [], "b": [Box(264, 152, 213, 379), Box(562, 152, 256, 453)]}


@pytest.mark.parametrize("rows, message", [
    ("a,,,,,0\nb,1,2,-3,4,1\n", "line 3: box width and height must be positive"),
    ("a,1,2,3,4,0\n", "line 2: Target 0 must have empty box fields"),
    ("a,,,,,1\n", "line 2: Target 1 needs a box"),
    ("a,1,2,3,4,2\n", "line 2: Target must be 0 or 1"),
    ("a,1,x,3,4,1\n", "line 2: y 'x' is not a number"),
    ("a,1,2,3,4,1\na,,,,,0\n", "line 3: a has both a negative row and box rows"),
    ("a,1,2,3,,1\n", "line 2: box fields must be all given or all empty"),
])
def test_bad_rows_name_the_line(tmp_path, rows, message):
    with pytest.raises(LabelError, match=message):
        L.read_labels(write(tmp_path, HEADER + rows))


def test_missing_and_unknown_columns(tmp_path):
    with pytest.raises(LabelError, match="line 1: missing column.*Target"):
        L.read_labels(write(tmp_path, "patientId,x,y,width,height\na,,,,\n"))
    with pytest.warns(UserWarning, match="unknown column.*extra"):
        assert L.read_labels(write(tmp_path, "patientId,x,y,width,height,Target,extra\na,,,,,0,z\n")) == {"a": []}


def test_box_outside_known_image_size(tmp_path):
    path = write(tmp_path, HEADER + "a,,,,,0\nb,900,100,200,50,1\n")
    assert L.read_labels(path)["b"] == [Box(900, 100, 200, 50)]
    with pytest.raises(LabelError, match="line 3: .*beyond the 1024x1024 image"):
        L.read_labels(path, image_size=(1024, 1024))
    with pytest.raises(LabelError, match="line 3"):
        L.read_labels(path, image_size={"b": (1024, 1024)})


def test_duplicate_rows_warn_with_both_lines(tmp_path):
    path = write(tmp_path, HEADER + "b,1,2,3,4,1\nb,5,6,7,8,1\nb,1,2,3,4,1\n")
    with pytest.warns(UserWarning, match="line 4: duplicate of line 2"):
        assert L.read_labels(path) == {"b": [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]}


def test_classes_and_split_files(tmp_path):
    classes = write(tmp_path, "patientId,class\na,Normal\nb,Lung Opacity\nb,Lung Opacity\n", "c.csv")
    assert L.read_classes(classes) == {"a": "Normal", "b": "Lung Opacity"}
    with pytest.raises(LabelError, match="line 2: unknown class 'Sick'"):
        L.read_classes(write(tmp_path, "patientId,class\na,Sick\n", "c.csv"))
    with pytest.raises(LabelError, match="line 3"):
        L.read_split(write(tmp_path, "patientId,split\na,train\na,test\n", "s.csv"))


def test_make_split_is_stratified_and_deterministic():
    ids = [f"p{i}" for i in range(50)]
    target = {pid: int(i % 3 == 0) for i, pid in enumerate(ids)}
    split = L.make_split(ids, target, (0.6, 0.2, 0.2), seed=1)
    assert split == L.make_split(ids, target, (0.6, 0.2, 0.2), seed=1)
    assert list(split) == ids
    counts = {s: sum(v == s for v in split.values()) for s in L.SPLITS}
    assert counts == {"train": 30, "val": 10, "test": 10}
    assert all(any(target[p] for p in ids if split[p] == s) for s in L.SPLITS)


def test_box_mask_rectangles_and_inscribed_ellipses():
    box = Box(x=10, y=20, width=40, height=30)
    rect = L.box_mask([box], (100, 100))
    assert rect.sum() == 40 * 30 and rect[20, 10] and rect[49, 49] and not rect[50, 49]
    ell = L.box_mask([box], (100, 100), ellipse=True)
    assert not (ell & ~rect).any()
    assert ell.sum() == pytest.approx(np.pi * 20 * 15, rel=0.03)
    assert L.box_mask([Box(90, 90, 50, 50)], (100, 100)).sum() == 100  # clipped at the border


def test_opacity_target_and_side_extents_by_hand():
    lungs = np.zeros((100, 100), dtype=np.uint8)
    lungs[20:80, 10:40] = 255      # patient's right lung (image left), 1800 px
    lungs[20:70, 60:90] = 255      # patient's left lung, 1500 px
    boxes = [Box(x=0, y=20, width=40, height=30)]    # the top half of the right lung, and beyond
    target = L.opacity_target(boxes, lungs)
    assert target.sum() == 30 * 30 and not target[:, :10].any()
    assert L.side_extents(boxes, lungs) == (0.5, 0.0)
    right, left = L.side_extents([Box(60, 20, 15, 50)], lungs)
    assert (right, left) == (0.0, 0.5)
