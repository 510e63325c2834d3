"""RSNA labels against pixel-centre oracles and exact messages (issue 19: the mutants `test_labels` let live)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pneumomap import labels as L
from pneumomap.labels import Box, LabelError
from pneumomap.stages.lung_geometry import LungSplit
from properties import FAST

HEADER = "patientId,x,y,width,height,Target\n"


def write(tmp_path, text: str, name: str = "labels.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


# ----------------------------------------------------------------------------- masks and extents

def oracle_box_mask(boxes: list[Box], shape: tuple[int, int], ellipse: bool) -> np.ndarray:
    """Pixel by pixel: the centre (r + 0.5, c + 0.5) in [y, y + h) x [x, x + w), and in the inscribed ellipse."""
    mask = np.zeros(shape, bool)
    for r in range(shape[0]):
        for c in range(shape[1]):
            y, x = r + 0.5, c + 0.5
            for b in boxes:
                inside = b.y <= y < b.y + b.height and b.x <= x < b.x + b.width
                if ellipse:
                    inside &= (((y - b.y - b.height / 2) / (b.height / 2)) ** 2
                               + ((x - b.x - b.width / 2) / (b.width / 2)) ** 2) <= 1.0
                mask[r, c] |= inside
    return mask


quarter = st.integers(-24, 72).map(lambda v: v / 4)  # corners on quarter pixels, some outside the image
size = st.integers(1, 48).map(lambda v: v / 4)


@FAST
@given(st.lists(st.builds(Box, quarter, quarter, size, size), min_size=1, max_size=4), st.booleans())
def test_box_mask_is_the_pixel_centre_oracle(boxes, ellipse):
    assert np.array_equal(L.box_mask(boxes, (12, 14), ellipse), oracle_box_mask(boxes, (12, 14), ellipse))


def test_box_mask_edges():
    assert L.box_mask([Box(0.5, 0, 2, 1)], (1, 4), ellipse=True).tolist() == [[True, True, False, False]]  # on it
    overlapping = [Box(0, 0, 8, 8), Box(4, 4, 8, 8)]
    assert np.array_equal(L.box_mask(overlapping, (12, 12), True), oracle_box_mask(overlapping, (12, 12), True))
    assert L.box_mask([Box(0, 0, 2, 2)], (3, 3))[0, 0]  # row and column 0 belong to a box starting at 0


def test_side_extents_pass_the_ellipse_and_any_mask_encoding():
    lungs = np.zeros((40, 40), np.uint8)
    lungs[4:36, 2:16] = 1  # 0/1, not 0/255
    lungs[4:36, 24:38] = 1
    boxes = [Box(2, 4, 14, 16)]
    rect = L.side_extents(boxes, lungs)
    assert rect == (0.5, 0.0)
    ellipse = L.side_extents(boxes, lungs, ellipse=True)
    expected = oracle_box_mask(boxes, lungs.shape, True)[:, :20].sum() / (32 * 14)
    assert ellipse == (pytest.approx(expected), 0.0) and ellipse[0] < rect[0]


def test_split_extents_default_to_boxes_and_one_pixel_sides():
    right, left = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    right[1, 1] = True
    left[1:5, 3:5] = True
    sides = LungSplit(right | left, right, left, (1, 1, 2, 2), (1, 3, 5, 5), False)
    box = [Box(1, 1, 5, 4)]  # covers both lungs; its inscribed ellipse misses right's pixel in the corner
    assert L.split_extents(box, sides) == (1.0, 1.0)
    assert L.split_extents(box, sides, ellipse=True)[0] == 0.0


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("row, message", [
    ("a,1,2,0,4,1", "box width and height must be positive, got 0.0 x 4.0"),
    ("a,1,2,3,0,1", "box width and height must be positive, got 3.0 x 0.0"),
    ("a,-1,2,3,4,1", "box corner (-1.0, 2.0) is outside the image"),
    ("a,1,-2,3,4,1", "box corner (1.0, -2.0) is outside the image"),
    ("a,q,2,3,4,1", "x 'q' is not a number"),
    ("a,1,2,q,4,1", "width 'q' is not a number"),
    ("a,1,2,3,q,1", "height 'q' is not a number"),
    (",1,2,3,4,1", "empty patientId"),
])
def test_bad_values_have_exact_messages(tmp_path, row, message):
    path = write(tmp_path, HEADER + row + "\n")
    with pytest.raises(LabelError) as error:
        L.read_labels(path)
    assert str(error.value) == f"{path}, line 2: {message}"


def test_boxes_on_the_edges_and_small_boxes_are_valid(tmp_path):
    path = write(tmp_path, HEADER + "a,0,0,0.5,0.5,1\nb,0,3,10,7,1\n")
    assert L.read_labels(path, image_size=(10, 10)) == {"a": [Box(0, 0, 0.5, 0.5)], "b": [Box(0, 3, 10, 7)]}
    too_low = write(tmp_path, HEADER + "a,0,9,2,2,1\n", "low.csv")
    with pytest.raises(LabelError, match=r"line 2: box Box\(x=0.0, y=9.0, width=2.0, height=2.0\) extends beyond "
                                         r"the 10x10 image"):
        L.read_labels(too_low, image_size=(10, 10))


def test_reading_goes_on_after_a_duplicate(tmp_path):
    path = write(tmp_path, HEADER + "b,1,2,3,4,1\nb,1,2,3,4,1\nc,,,,,0\n")
    with pytest.warns(UserWarning, match="line 3: duplicate of line 2 ignored"):
        assert L.read_labels(path) == {"b": [Box(1, 2, 3, 4)], "c": []}


def test_files_with_a_byte_order_mark_and_exact_header_messages(tmp_path):
    assert L.read_labels(write(tmp_path, HEADER + "a,,,,,0\n", encoding="utf-8-sig")) == {"a": []}
    missing = write(tmp_path, "patientId,y,width,height\n", "m.csv")
    with pytest.raises(LabelError) as error:
        L.read_labels(missing)
    assert str(error.value) == (f"{missing}, line 1: missing column(s) x, Target; "
                                "expected the header patientId,x,y,width,height,Target")
    extra = write(tmp_path, "patientId,class,a,b\n", "e.csv")
    with pytest.warns(UserWarning) as record:
        L.read_classes(extra)
    assert str(record[0].message) == f"{extra}, line 1: unknown column(s) a, b ignored"
    with pytest.raises(LabelError) as error:
        L.read_labels(tmp_path / "none.csv")
    assert str(error.value) == f"{tmp_path / 'none.csv'}: no such file"
    with pytest.raises(LabelError, match=r"line 2: unknown split 'dev'; expected one of \['train', 'val', 'test'\]"):
        L.read_split(write(tmp_path, "patientId,split\na,dev\n", "s.csv"))


def test_read_lung_mask_thresholds_grey_and_colour_masks(tmp_path):
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert L.read_lung_mask(tmp_path / "grey.png").tolist() == [[False, False, True, True]]
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    assert L.read_lung_mask(tmp_path / "rgb.png").tolist() == [[False, False, True, True]]


# ----------------------------------------------------------------------------- splits and datasets

def oracle_split(ids, target, fractions, seed):
    """Per class (negatives first), a seeded permutation; its first round(f_train n) train, then val, then test."""
    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, float) / np.sum(fractions)
    split = {}
    for value in (0, 1):
        group = [pid for pid in ids if target[pid] == value]
        ends = np.round(np.cumsum(fractions) * len(group))
        for rank, i in enumerate(rng.permutation(len(group))):
            split[group[i]] = L.SPLITS[int(np.sum(rank >= ends[:2]))]
    return {pid: split[pid] for pid in ids}


@FAST
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.sampled_from([(0.6, 0.2, 0.2), (3, 1, 1), (1, 0, 0),
                                                                          (0.5, 0.5, 0), (0.1, 0.3, 0.6)]),
       st.integers(0, 5))
def test_make_split_is_the_seeded_permutation_per_class(positives, fractions, seed):
    ids = [f"p{i}" for i in range(len(positives))]
    target = {pid: int(p) for pid, p in zip(ids, positives)}
    assert L.make_split(ids, target, fractions, seed) == oracle_split(ids, target, fractions, seed)


def test_make_split_defaults_and_bad_fractions():
    ids = [f"p{i}" for i in range(30)]
    target = {pid: i % 2 for i, pid in enumerate(ids)}
    assert L.make_split(ids, target) == oracle_split(ids, target, (0.6, 0.2, 0.2), 0)
    for bad in ((-0.1, 0.6, 0.5), (1, 1), (0, 0, 0)):
        with pytest.raises(ValueError) as error:
            L.make_split(ids, target, bad)
        assert str(error.value) == f"split fractions must be three non-negative numbers, got {bad}"


def test_write_split_round_trips(tmp_path):
    split = {"a": "train", "b": "test", "c": "val"}
    L.write_split(tmp_path / "split.csv", split)
    assert (tmp_path / "split.csv").read_text() == "patientId,split\na,train\nb,test\nc,val\n"
    assert L.read_split(tmp_path / "split.csv") == split


def test_load_rsna_without_class_and_split_files(tmp_path, caplog):
    write(tmp_path, HEADER + "n1,,,,,0\np1,1,2,3,4,1\nn2,,,,,0\np2,5,6,7,8,1\n", L.LABELS_FILE)
    with caplog.at_level(logging.WARNING, logger="pneumomap.labels"):
        data = L.load_rsna(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: no split.csv; using a seeded 60/20/20 split by patient"]
    assert data.cls == {"n1": "Normal", "p1": "Lung Opacity", "n2": "Normal", "p2": "Lung Opacity"}
    assert data.split == L.make_split(data.ids, data.target) and data.target == {"n1": 0, "p1": 1, "n2": 0, "p2": 1}
    assert data.ids_in("train") == [pid for pid in data.ids if data.split[pid] == "train"]
    assert data.image_path("p1") == tmp_path / "stage_2_train_images" / "p1.dcm"
    assert data.mask_path("p1") == tmp_path / "lung_masks" / "p1.png"


@pytest.mark.parametrize("classes, message", [
    ("patientId,class\nn1,Normal\n", "no class for p1"),
    ("patientId,class\nn1,Normal\np1,Normal\n", "p1 is 'Normal' but has Target 1"),
])
def test_load_rsna_class_errors(tmp_path, classes, message):
    write(tmp_path, HEADER + "n1,,,,,0\np1,1,2,3,4,1\n", L.LABELS_FILE)
    write(tmp_path, classes, L.CLASS_FILE)
    with pytest.raises(LabelError) as error:
        L.load_rsna(tmp_path)
    assert str(error.value) == f"{tmp_path / L.CLASS_FILE}: {message}"


# ----------------------------------------------------------------------------- lung masks: drawn, else predicted

@pytest.fixture()
def mask_folder(tmp_path) -> L.RsnaDataset:
    """Drawn masks for d1, d2 (d2 also predicted), predicted for p1, the fill could not read u1, m1..m6 have none;
    a folder named like a mask and the manifest are not masks."""
    ids = ["d1", "d2", "p1", "u1", *[f"m{k}" for k in range(1, 7)]]
    for folder, names in ((L.MASKS_DIR, ["d1", "d2"]), (L.PREDICTED_MASKS_DIR, ["d2", "p1"])):
        (tmp_path / folder).mkdir()
        for name in names:  # drawn masks all lung, predicted ones all background: which one was read shows
            lung = np.full((2, 3), 255 * (folder == L.MASKS_DIR), np.uint8)
            Image.fromarray(lung).save(tmp_path / folder / f"{name}.png")
    (tmp_path / L.MASKS_DIR / "m1.png").mkdir()  # not a file
    (tmp_path / L.MASKS_DIR / "m2.txt").write_text("")  # not a .png
    (tmp_path / L.PREDICTED_MASKS_DIR / L.MASK_MANIFEST).write_text(
        "patientId,source,checkpoint_sha256,reason\np1,predicted,abc,\nu1,unreadable,abc,truncated\n"
        "m3,predicted,abc,\n")
    return L.RsnaDataset(tmp_path, ids, {pid: [] for pid in ids}, {pid: 0 for pid in ids}, {})


def test_mask_sources_and_paths(mask_folder):
    root = mask_folder.root
    assert mask_folder.mask_sources(mask_folder.ids) == {
        "drawn": ["d1", "d2"], "predicted": ["p1"], "unreadable": ["u1"], "missing": [f"m{k}" for k in range(1, 7)]}
    assert mask_folder.predicted_mask_path("p1") == root / "lung_masks_predicted" / "p1.png"
    assert mask_folder.lung_mask_path("d2") == root / L.MASKS_DIR / "d2.png"  # the drawn one wins
    assert mask_folder.lung_mask_path("p1") == root / L.PREDICTED_MASKS_DIR / "p1.png"
    assert mask_folder.lung_mask("d2").all() and not mask_folder.lung_mask("p1").any()
    with pytest.raises(L.MissingLungMaskError) as error:
        mask_folder.lung_mask_path("m1")
    assert str(error.value) == (f"m1: no lung mask ({root / L.MASKS_DIR / 'm1.png'} is not drawn and "
                                f"{root / L.PREDICTED_MASKS_DIR / 'm1.png'} not predicted); {L.fill_hint(root)}")
    assert L.fill_hint(root) == (f"predict the missing ones once with a trained lung stage: pneumomap fill-masks "
                                 f"--data {root} --lungs runs/lungs (see README, 'Real RSNA')")


def test_require_lung_masks_counts_or_names_the_missing(mask_folder):
    root = mask_folder.root
    assert mask_folder.require_lung_masks(["d1", "d2", "p1", "u1"]) == {"drawn": 2, "predicted": 1}
    with pytest.raises(L.MissingLungMaskError) as error:
        mask_folder.require_lung_masks(mask_folder.ids, " of the train split")
    assert str(error.value) == (
        f"{root}: 6 of 10 image(s) of the train split have no lung mask, neither drawn (lung_masks/<patientId>.png) "
        f"nor predicted (lung_masks_predicted/<patientId>.png): m1, m2, m3, m4, m5, ...; {L.fill_hint(root)}")
    with pytest.raises(L.MissingLungMaskError, match=r"2 of 3 image\(s\) have no lung mask.*: m1, m2; predict"):
        mask_folder.require_lung_masks(["d1", "m1", "m2"])


def test_mask_sources_without_the_folders(tmp_path):
    data = L.RsnaDataset(tmp_path, ["a"], {"a": []}, {"a": 0}, {})
    assert data.mask_sources(["a"]) == {"drawn": [], "predicted": [], "unreadable": [], "missing": ["a"]}


def test_five_missing_masks_are_all_shown(mask_folder):
    with pytest.raises(L.MissingLungMaskError, match=r"5 of 5 image\(s\) have no lung mask.*: m1, m2, m3, m4, m5; "):
        mask_folder.require_lung_masks([f"m{k}" for k in range(1, 6)])
