"""Lung masks drawn for a fifth of the images (issue 15): train lungs on those, fill the rest, train a regressor on
every image, score, tune; drawn masks are never touched; the fill resumes; a missing mask is one clear error."""
from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from pneumomap import fillmasks
from pneumomap.cli import main as cli_main
from pneumomap.labels import MASKS_DIR, PREDICTED_MASKS_DIR, MissingLungMaskError, load_rsna, read_lung_mask
from pneumomap.synth import generate
from pneumomap.train import recipes
from pneumomap.train.cli import train

FAST = ["workers=0", "batch_size=4", "rotate=0", "epochs=1"]
SIZE = {"lungs": [64, 64], "regressor_right": [64, 40]}


def run(stage: str, data: Path, out: Path) -> dict:
    return train(stage, data, out, recipes.resolve(stage, "tiny", [*FAST, f"model.input_size={SIZE[stage]}"]),
                 device="cpu")


def fill(data: Path, lungs: Path, *extra: str) -> int:
    return cli_main(["fill-masks", "--data", str(data), "--lungs", str(lungs), "--device", "cpu", "--workers", "0",
                     *extra])


def manifest(data: Path) -> dict[str, dict]:
    with open(data / PREDICTED_MASKS_DIR / "manifest.csv", newline="") as handle:
        return {row["patientId"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> dict:
    """25 phantoms with drawn masks for a fifth of each split; the lung stage trained on them (1 epoch)."""
    root = tmp_path_factory.mktemp("subset")
    data = root / "rsna"
    generate(data, 25, seed=4, size=64)
    dataset = load_rsna(data)
    keep = {pid for split in ("train", "val", "test") for pid in dataset.ids_in(split)[::5]}
    for pid in dataset.ids:
        if pid not in keep:
            dataset.mask_path(pid).unlink()
    drawn = {pid: dataset.mask_path(pid).read_bytes() for pid in sorted(keep)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lungs = run("lungs", data, root / "lungs")
    return {"root": root, "data": data, "drawn": drawn, "lungs": lungs, "warnings": [str(w.message) for w in caught]}


@pytest.fixture(scope="module")
def filled(subset) -> dict:
    """A copy of the folder with the missing masks predicted by `pneumomap fill-masks`."""
    data = subset["root"] / "filled"
    shutil.copytree(subset["data"], data)
    assert fill(data, subset["root"] / "lungs") == 0
    return {**subset, "data": data}


def test_lung_stage_trains_on_the_drawn_subset(subset):
    summary, dataset = subset["lungs"], load_rsna(subset["data"])
    n_train_val = len(dataset.ids_in("train")) + len(dataset.ids_in("val"))
    drawn_train_val = sum(dataset.split[pid] != "test" for pid in subset["drawn"])
    assert summary["train_images"] + summary["val_images"] == drawn_train_val == 4
    assert summary["lung_masks"] == {"drawn": 4, "predicted": 0, "without_drawn": n_train_val - 4}
    assert summary["skipped"] == 0  # images without a drawn mask are left out, not counted as unreadable
    assert not [w for w in subset["warnings"] if "skipping" in w]  # and no warning per image


def test_missing_masks_are_one_clear_error_everywhere(subset, capsys):
    data = subset["data"]
    with pytest.raises(MissingLungMaskError, match=r"12 of 15 image\(s\) in split 'train' have no lung mask") as error:
        run("regressor_right", data, subset["root"] / "never")
    assert "pneumomap fill-masks" in str(error.value) and "no lung mask" in str(error.value)
    assert cli_main(["train", "regressor_right", "--data", str(data), "--out", str(subset["root"] / "never"),
                     "--recipe", "tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pneumomap fill-masks" in err[0]
    from pneumomap.truth import load_truth

    with pytest.raises(MissingLungMaskError, match=r"of the truth \(split val\).*fill-masks"):
        load_truth(data, split="val")
    load_truth(data, split="val", truth_def="boxes")  # boxes alone need no lungs
    dataset = load_rsna(data)
    undrawn = next(pid for pid in dataset.ids if pid not in subset["drawn"])
    with pytest.raises(MissingLungMaskError, match=f"{undrawn}: no lung mask.*fill-masks"):
        dataset.lung_mask(undrawn)


def test_fill_writes_beside_the_drawn_masks_and_never_over_them(filled):
    data, dataset = filled["data"], load_rsna(filled["data"])
    for pid, content in filled["drawn"].items():
        assert dataset.mask_path(pid).read_bytes() == content  # byte for byte
        assert not dataset.predicted_mask_path(pid).exists()
        assert dataset.lung_mask_path(pid) == dataset.mask_path(pid)
    sources = dataset.mask_sources(dataset.ids)
    assert len(sources["drawn"]) == 5 and len(sources["predicted"]) == 20 and not sources["missing"]
    rows = manifest(data)
    assert [rows[pid]["source"] for pid in dataset.ids] == \
        ["drawn" if pid in filled["drawn"] else "predicted" for pid in dataset.ids]
    sha = fillmasks.checkpoint_sha256(filled["root"] / "lungs" / "best")
    assert {rows[pid]["checkpoint_sha256"] for pid in sources["predicted"]} == {sha}
    predicted = read_lung_mask(dataset.predicted_mask_path(sources["predicted"][0]))
    assert predicted.shape == (64, 64) and predicted.dtype == bool  # at the image's size


def test_fill_resumes_and_refuses_another_checkpoint(filled, tmp_path):
    data = tmp_path / "rsna"
    shutil.copytree(filled["data"], data)
    dataset = load_rsna(data)
    predicted = dataset.mask_sources(dataset.ids)["predicted"]
    stamps = {pid: dataset.predicted_mask_path(pid).stat().st_mtime_ns for pid in predicted}
    for pid in predicted[:3]:  # as if killed before these were written
        dataset.predicted_mask_path(pid).unlink()
    result = fillmasks.fill_masks(data, filled["root"] / "lungs", device="cpu", workers=0, progress=False)
    assert result["newly_predicted"] == 3 and result["predicted"] == 20 and result["drawn"] == 5
    assert all(dataset.predicted_mask_path(pid).stat().st_mtime_ns == stamps[pid] for pid in predicted[3:])
    other = tmp_path / "other"
    shutil.copytree(filled["root"] / "lungs" / "best", other)
    from pneumomap.stages.base import load_stage

    stage = load_stage(other)
    next(stage.parameters()).data.add_(1.0)
    stage.save(other)
    with pytest.raises(fillmasks.FillError, match="another lung checkpoint.*--replace"):
        fillmasks.fill_masks(data, other, device="cpu", workers=0, progress=False)
    result = fillmasks.fill_masks(data, other, device="cpu", workers=0, progress=False, replace=True)
    assert result["removed"] == 20 and result["newly_predicted"] == 20
    for pid, content in filled["drawn"].items():
        assert dataset.mask_path(pid).read_bytes() == content


def test_one_broken_image_does_not_stop_the_fill(subset, tmp_path):
    data = tmp_path / "rsna"
    shutil.copytree(subset["data"], data)
    dataset = load_rsna(data)
    victim = next(pid for pid in dataset.ids_in("train") if pid not in subset["drawn"])
    dataset.image_path(victim).write_bytes(b"DICM but not really an image")
    assert fill(data, subset["root"] / "lungs") == 1
    sources = dataset.mask_sources(dataset.ids)
    assert sources["unreadable"] == [victim] and len(sources["predicted"]) == 19 and not sources["missing"]
    assert manifest(data)[victim]["source"] == "unreadable"
    with pytest.warns(UserWarning, match="skipping unreadable training image"):
        summary = run("regressor_right", data, tmp_path / "reg")
    assert summary["skipped"] == 1  # the unreadable image is skipped as before, the others train


def test_a_lung_stage_failure_on_one_image_is_recorded_and_the_rest_written(subset, tmp_path, monkeypatch):
    data = tmp_path / "rsna"
    shutil.copytree(subset["data"], data)
    dataset = load_rsna(data)
    victim = next(pid for pid in dataset.ids if pid not in subset["drawn"])
    predict = fillmasks._predict

    def failing(model, images, device, precision):
        if any(Path(image.meta.path).stem == victim for image in images):
            raise RuntimeError("the network failed")
        return predict(model, images, device, precision)

    monkeypatch.setattr(fillmasks, "_predict", failing)
    result = fillmasks.fill_masks(data, subset["root"] / "lungs", device="cpu", workers=0, progress=False)
    assert list(result["failures"]) == [victim] and "the network failed" in result["failures"][victim]
    assert result["predicted"] == 19 and manifest(data)[victim]["source"] == "unreadable"


def test_every_stage_after_the_fill_uses_every_image(filled, tmp_path, tiny_pipeline):
    """regressor on every image, then tune and score on the validation split with predicted masks."""
    from pneumomap import score
    from pneumomap.infer import tune
    data, dataset = filled["data"], load_rsna(filled["data"])
    summary = run("regressor_right", data, tmp_path / "regressor_right")
    assert summary["train_images"] == len(dataset.ids_in("train")) and summary["skipped"] == 0
    assert summary["val_images"] == len(dataset.ids_in("val"))
    drawn = sum(dataset.split[pid] != "test" for pid in filled["drawn"])
    assert summary["lung_masks"] == {"drawn": drawn, "predicted": 20 - drawn}
    assert '"predicted": 16' in (tmp_path / "regressor_right" / "summary.json").read_text()

    pipeline = tiny_pipeline(tmp_path / "pipe")
    result = tune.tune(pipeline, data, pipeline.parent / "tuned.yaml", split="val", target_tnr=0.5, device="cpu",
                       workers=0, progress=False, folds=0)
    assert result.n_images == len(dataset.ids_in("val")) and result.n_failed == 0
    assert result.metric_after <= result.metric_before
    scored = score.score_submission(result.work, data, split="val")
    assert scored["map_log_loss"] == pytest.approx(result.metric_before, rel=1e-12)
    # the truth uses the predicted masks: the opacity region lies inside them
    truth = score.load_truth(data, split="val")
    pid = next(p for p in truth.ids if p not in filled["drawn"] and dataset.boxes[p])
    codes = truth.codes(pid, (64, 64))
    lungs = read_lung_mask(dataset.predicted_mask_path(pid))
    assert not (codes[~lungs] > 0).any()
    assert cli_main(["score", "--pred", result.work, "--truth", str(data), "--split", "val"]) == 0


def test_a_drawn_mask_wins_over_a_predicted_one(filled, tmp_path):
    data = tmp_path / "rsna"
    shutil.copytree(filled["data"], data)
    dataset = load_rsna(data)
    pid = dataset.mask_sources(dataset.ids)["predicted"][0]
    drawn = np.zeros((64, 64), np.uint8)
    drawn[10:50, 8:28] = 255
    from PIL import Image

    Image.fromarray(drawn).save(dataset.mask_path(pid))  # drawn later
    assert dataset.lung_mask_path(pid) == dataset.mask_path(pid)
    np.testing.assert_array_equal(dataset.lung_mask(pid), drawn > 127)
    assert (data / MASKS_DIR / f"{pid}.png").is_file() and dataset.predicted_mask_path(pid).is_file()


def test_readme_real_rsna_sequence_parses_with_the_real_cli():
    """Every `pneumomap` line of the README's real-RSNA walk-through is accepted by that command's parser."""
    import argparse
    import importlib
    import re
    import shlex

    from pneumomap.cli import COMMANDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Real RSNA, end to end")[1].split("\n### ")[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split(" # ")[0].strip() for line in block.splitlines() if line.startswith("pneumomap ")]
    assert [line.split()[1] for line in lines] == ["inspect", "train", "fill-masks", *["train"] * 6, "tune", "infer",
                                                   "score", "package"]
    for line in lines:
        argv = shlex.split(line.replace("$R", "/data/rsna").split(" > ")[0])[1:]  # without a redirection
        parser = argparse.ArgumentParser(prog=f"pneumomap {argv[0]}")
        importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(parser)
        parser.parse_args(argv[1:])  # SystemExit on an unknown or missing option
