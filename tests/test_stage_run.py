"""`pneumomap stage KIND ...` on a few tiny generated PNGs (CPU, tiny stages)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from pneumomap.cli import main
from pneumomap.stages import create_stage, tiny_config
from pneumomap.stages.mapper import Mapper

SHAPES = {"a": (90, 70), "b": (64, 64), "c": (50, 81)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_run")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"not a png")
    clf = create_stage("classifier", tiny_config("classifier"))
    reg = create_stage("regressor", tiny_config("regressor", side="left"))
    checkpoints = {
        "lungs": create_stage("lungs", tiny_config("lungs")),
        "classifier": clf,
        "multiclass": create_stage("classifier", tiny_config("classifier", n_classes=3)),
        "regressor": reg,
        "mapper": Mapper.from_source(clf, decoder_channels=[16, 16, 8, 8, 8]),
        "mapper-left": Mapper.from_source(reg, decoder_channels=[16, 16, 8, 8, 8]),
    }
    for name, stage in checkpoints.items():
        stage.save(root / "ckpt" / name)
    return root


def run(setup, kind, checkpoint, out, *extra, images="images"):
    return main(["stage", kind, "--checkpoint", str(setup / "ckpt" / checkpoint), "--input", str(setup / images),
                 "--out", str(setup / out), "--device", "cpu", "--batch-size", "2", "--workers", "1", *extra])


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_classifier_writes_one_row_per_readable_image_and_lists_failures(setup):
    assert run(setup, "classifier", "classifier", "out_clf") == 1  # one unreadable image
    table = rows(setup / "out_clf" / "classifier.csv")
    assert table[0] == ["image_id", "probability"] and [r[0] for r in table[1:]] == ["a", "b", "c"]
    assert all(0 <= float(r[1]) <= 1 for r in table[1:])
    failures = rows(setup / "out_clf" / "failures.csv")
    assert failures[0] == ["image_id", "path", "reason"] and [r[0] for r in failures[1:]] == ["broken"]


def test_multiclass_columns(setup):
    run(setup, "classifier", "multiclass", "out_multi")
    table = rows(setup / "out_multi" / "classifier.csv")
    assert table[0] == ["image_id", "p_0", "p_1", "p_2"]
    assert all(abs(sum(map(float, r[1:])) - 1) < 1e-4 for r in table[1:])


def test_lungs_masks_at_original_size(setup):
    run(setup, "lungs", "lungs", "out_lungs", "--npy")
    for name, shape in SHAPES.items():
        mask = np.asarray(Image.open(setup / "out_lungs" / "masks" / f"{name}.png"))
        assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.load(setup / "out_lungs" / "masks" / f"{name}.npy").shape == (64, 64)
    table = rows(setup / "out_lungs" / "lungs.csv")
    assert table[0] == ["image_id", "fallback", "right_box", "left_box"] and len(table) == 4


@pytest.mark.parametrize("kind,checkpoint", [("mapper", "mapper"), ("gradcam", "classifier"),
                                             ("gradcam++", "classifier")])
def test_maps_at_original_size(setup, kind, checkpoint):
    out = f"out_{kind}"
    run(setup, kind, checkpoint, out)
    for name, shape in SHAPES.items():
        png = np.asarray(Image.open(setup / out / "maps" / f"{name}.png"))
        assert png.shape == shape and png.dtype == np.uint8
    assert not (setup / out / "maps" / "a.npy").exists()


def test_lung_half_stages_need_lungs(setup, capsys):
    assert run(setup, "regressor", "regressor", "out_reg") == 2
    assert "--lungs" in capsys.readouterr().err
    run(setup, "regressor", "regressor", "out_reg", "--fixed-crops")
    table = rows(setup / "out_reg" / "regressor.csv")
    assert table[0] == ["image_id", "left_extent", "fallback", "box"]
    assert all(0 <= float(r[1]) <= 1 and r[2] == "1" for r in table[1:])
    run(setup, "regressor", "regressor", "out_reg_lungs", "--lungs", str(setup / "ckpt" / "lungs"))
    assert len(rows(setup / "out_reg_lungs" / "regressor.csv")) == 4


def test_lung_half_mapper_is_pasted_into_its_box(setup):
    from pneumomap.stages.lung_geometry import fixed_split

    run(setup, "mapper", "mapper-left", "out_map_left", "--fixed-crops")
    for name, shape in SHAPES.items():
        png = np.asarray(Image.open(setup / "out_map_left" / "maps" / f"{name}.png"))
        assert png.shape == shape
        r0, c0, r1, c1 = fixed_split(shape).left_box  # the patient's left lung: the image's right half
        assert c0 >= shape[1] // 2 - 1
        outside = png.copy()
        outside[r0:r1, c0:c1] = 0
        assert outside.max() == 0 and png[r0:r1, c0:c1].max() > 0


def test_wrong_checkpoint_kind_is_a_clear_error(setup, capsys):
    assert run(setup, "mapper", "classifier", "out_wrong") == 2
    assert "holds a 'classifier' stage" in capsys.readouterr().err


def test_stage_gives_the_numbers_infer_gives(tmp_path, tiny_pipeline, phantom_inputs):
    """`pneumomap stage` runs through the engine of `pneumomap infer`: the classifier's probabilities are
    the very numbers of infer's predictions.csv, the unreadable image a failure in both."""
    from pneumomap.infer import runner, spec

    images = phantom_inputs(tmp_path / "data", n=4)
    path = tiny_pipeline(tmp_path / "pipe")
    runner.run(spec.load(path), images, tmp_path / "infer",
               runner.RunOptions(workers=0, progress=False, artifacts=False, format="pneumomap"))
    assert main(["stage", "classifier", "--checkpoint", str(path.parent / "checkpoints" / "classifier"), "--input",
                 str(images), "--out", str(tmp_path / "stage"), "--device", "cpu", "--quiet"]) == 1
    with open(tmp_path / "infer" / "predictions.csv", newline="") as handle:
        inferred = {r["image_id"]: r["probability"] for r in csv.DictReader(handle)}
    failed = [r[0] for r in rows(tmp_path / "stage" / "failures.csv")[1:]]
    assert failed == [r[0] for r in rows(tmp_path / "infer" / "failures.csv")[1:]] and len(failed) == 1
    staged = {r[0]: r[1] for r in rows(tmp_path / "stage" / "classifier.csv")[1:]}
    assert len(staged) == 4 and staged == {k: v for k, v in inferred.items() if k not in failed}
