"""One tiny training run per stage on a few phantom images (CPU, 64 px, seconds each)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pneumomap.stages import load_stage
from pneumomap.synth import generate
from pneumomap.train import recipes
from pneumomap.train.cli import train

FAST = ["workers=0", "batch_size=4", "rotate=0", "epochs=3"]
SIZE = {"lungs": [64, 64], "classifier": [64, 64], "regressor_right": [64, 40], "regressor_left": [64, 40]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    generate(root, 12, seed=3, size=64)
    return root


def run(stage: str, data: Path, out: Path, *overrides: str, resume: bool = False) -> dict:
    sets = [*FAST, *overrides]
    if stage in SIZE:
        sets.append(f"model.input_size={SIZE[stage]}")
    summary = train(stage, data, out, recipes.resolve(stage, "tiny", sets), resume=resume, device="cpu")
    summary["history"] = json.loads((out / "history.json").read_text())
    return summary


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict[str, dict]:
    """classifier and both regressors (the mappers' encoder sources), trained once."""
    root = tmp_path_factory.mktemp("runs")
    return {stage: run(stage, data, root / stage) for stage in ("classifier", "regressor_right", "regressor_left")}


def _check_run(summary: dict, kind: str) -> None:
    out = Path(summary["out"])
    losses = [r["train_loss"] for r in summary["history"]]
    assert losses[-1] < losses[0], losses
    for name in ("history.json", "history.csv", "loss_curve.png", "recipe.yaml", "last/train_state.pt"):
        assert (out / name).is_file(), name
    assert load_stage(out / "best").kind == kind
    assert load_stage(out).kind == kind  # a run directory means its best checkpoint


@pytest.mark.parametrize("stage", ["classifier", "regressor_right", "regressor_left"])
def test_score_stages_learn_and_save(trained, stage):
    summary = trained[stage]
    _check_run(summary, recipes.STAGES[stage].kind)
    record = summary["history"][-1]
    if stage == "classifier":
        assert {"val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_confusion_matrix"} <= set(record)
    else:
        assert "val_mae" in record
        assert load_stage(Path(summary["out"]) / "best").config.side == recipes.STAGES[stage].side


def test_lungs_learn_and_save(data, tmp_path):
    summary = run("lungs", data, tmp_path / "lungs", "lr=1e-2")
    _check_run(summary, "lungs")
    assert 0.0 <= summary["history"][-1]["val_dice"] <= 1.0


def _bytes(module: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.cpu().numpy().tobytes() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage", ["mapper_whole", "mapper_right", "mapper_left"])
def test_mapper_trains_only_its_decoder(trained, data, tmp_path, stage):
    source = Path(trained[recipes.STAGES[stage].source]["out"]) / "best"
    before = _bytes(load_stage(source).encoder)
    summary = run(stage, data, tmp_path / stage, f"encoder_from={source}")
    _check_run(summary, "mapper")
    mapper = load_stage(Path(summary["out"]) / "last")
    assert _bytes(mapper.encoder) == before  # frozen: byte-identical after training
    assert _bytes(load_stage(source).encoder) == before  # and the source checkpoint is untouched


def test_mapper_refuses_the_wrong_source(trained, data, tmp_path):
    source = Path(trained["regressor_left"]["out"]) / "best"
    with pytest.raises(ValueError, match="decodes the encoder of regressor_right"):
        run("mapper_right", data, tmp_path / "m", f"encoder_from={source}")


def test_resume_continues_epochs_and_schedule(data, tmp_path):
    straight = run("classifier", data, tmp_path / "straight", "epochs=3")
    run("classifier", data, tmp_path / "split", "epochs=2")
    resumed = run("classifier", data, tmp_path / "split", "epochs=3", resume=True)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    assert [r["lr"] for r in resumed["history"]] == pytest.approx([r["lr"] for r in straight["history"]])
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], rel=1e-4)
    with pytest.raises(FileNotFoundError, match="train once without --resume"):
        run("classifier", data, tmp_path / "never", resume=True)


def test_corrupt_image_is_skipped_and_counted(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    from pneumomap.labels import load_rsna

    ds = load_rsna(copy)
    victim = ds.ids_in("train")[0]
    ds.image_path(victim).write_bytes(b"DICM but not really an image")
    with pytest.warns(UserWarning, match="skipping unreadable training image"):
        summary = run("classifier", copy, tmp_path / "out", "epochs=1")
    assert summary["skipped"] == 1 and summary["history"][-1]["skipped"] == 1
    with pytest.warns(UserWarning, match="skipping unreadable"):  # also when not cached (loaded per batch)
        summary = run("classifier", copy, tmp_path / "lazy", "epochs=1", "cache=false")
    assert summary["history"][-1]["skipped"] == 1


def test_training_runs_plug_into_a_pipeline(trained, data, tmp_path, tiny_pipeline):
    from pneumomap.infer import spec

    path = tiny_pipeline(tmp_path)
    for stage in ("classifier", "regressor_right", "regressor_left"):
        target = tmp_path / "checkpoints" / stage
        shutil.rmtree(target)
        shutil.copytree(trained[stage]["out"], target)  # a training run directory: means DIR/best
    pipeline = spec.load(path, check_checkpoints=True)
    nodes = {node.name: node for node in pipeline.model_nodes}
    for stage in ("classifier", "regressor_right", "regressor_left"):
        assert load_stage(nodes[stage].checkpoint).kind == recipes.STAGES[stage].kind

    # and it runs: the tiny mappers were trained on other encoders, so the pipeline refuses them ...
    import yaml

    from pneumomap.infer import runner

    images = sorted((data / "stage_2_train_images").glob("*.dcm"))[:3]
    options = runner.RunOptions(device="cpu", workers=0, progress=False, artifacts=False)
    with pytest.raises(runner.RunError, match="trained on another encoder"):
        runner.run(pipeline, images, tmp_path / "refused", options)
    # ... unless the mapper nodes opt in; then every image gets a finite probability and a map
    raw = yaml.safe_load(path.read_text())
    for name in ("mapper_whole", "mapper_right", "mapper_left"):
        raw["nodes"][name]["params"] = {"allow_other_encoder": True}
    raw["thresholds"]["classifier"] = 0.0  # every mapper runs
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.warns(UserWarning, match="allow_other_encoder"):
        summary = runner.run(spec.load(path), images, tmp_path / "out", options)
    assert summary["failures"] == 0 and summary["computed"]["mapper_whole"] == 3
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(0.0 <= float(r.split(",")[1]) <= 1.0 for r in rows)


def test_three_class_target(data, tmp_path):
    summary = run("classifier", data, tmp_path / "three", "epochs=1", "target=three_class", "loss=focal")
    model = load_stage(Path(summary["out"]) / "best")
    assert model.config.n_classes == 3
    assert "val_auc" in summary["history"][-1]  # AUC of p(Lung Opacity) against Target


def test_early_stopping(data, tmp_path, monkeypatch):
    """The validation MAE worsens after epoch 1 (set here, not left to BatchNorm's drift at lr 0)."""
    from pneumomap.train import loop

    evaluate, calls = loop.evaluate, []

    def worsening(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        calls.append(1)
        result["mae"] = 0.1 * len(calls)
        return result

    monkeypatch.setattr(loop, "evaluate", worsening)
    summary = run("regressor_right", data, tmp_path / "stop", "epochs=5", "patience=1")
    assert summary["epochs"] == 2 and summary["best_epoch"] == 1 and len(calls) == 2
