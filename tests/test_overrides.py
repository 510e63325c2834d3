"""--set KEY=VALUE on infer, tune, stage and package, validated like the file, and the provenance every
run folder records (issue 17)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pneumomap import cli, overrides, provenance
from pneumomap.infer import spec
from pneumomap.infer.tiny import DEFAULT_PIPELINE
from pneumomap.synth import generate

REAL_PNG = Path(__file__).resolve().parent / "data" / "real" / "png"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_values_are_yaml():
    parsed = dict(overrides.parse(["thresholds.classifier=0.8", "a=[1, 2]", "b=1e-3", "c=true", "d=", "e=runs/x"]))
    assert parsed == {("thresholds", "classifier"): 0.8, ("a",): [1, 2], ("b",): 1e-3, ("c",): True, ("d",): None,
                      ("e",): "runs/x"}
    for bad in ("thresholds.classifier", "=1", "a..b=1"):
        with pytest.raises(overrides.OverrideError, match="expected key=value"):
            overrides.parse([bad])


def test_pipeline_overrides_are_validated_like_the_file():
    raw = yaml.safe_load(DEFAULT_PIPELINE.read_text())
    pipeline = spec.parse(spec.apply_overrides(raw, ["thresholds.classifier=0.8", "nodes.final.params.low=12"]),
                          DEFAULT_PIPELINE, check_checkpoints=False)
    assert pipeline.nodes["gate"].params["threshold"] == 0.8 and pipeline.nodes["final"].params["low"] == 12
    assert raw["thresholds"]["classifier"] == 0.9  # the loaded document itself is untouched
    with pytest.raises(spec.PipelineError, match=r"no key 'thresholds.classifer'.*did you mean 'thresholds.classifier'"):
        spec.apply_overrides(raw, ["thresholds.classifer=0.8"])
    with pytest.raises(spec.PipelineError, match=r"no key 'nodes.clasifier'.*'nodes.classifier'"):
        spec.apply_overrides(raw, ["nodes.clasifier.checkpoint=x"])
    with pytest.raises(spec.PipelineError, match="out of range"):  # the file's own validation
        spec.parse(spec.apply_overrides(raw, ["thresholds.classifier=2"]), DEFAULT_PIPELINE, check_checkpoints=False)
    with pytest.raises(spec.PipelineError, match=r"unknown parameter 'lowest'"):
        spec.parse(spec.apply_overrides(raw, ["nodes.final.params.lowest=2"]), DEFAULT_PIPELINE, check_checkpoints=False)


def test_text_keeps_comments_and_loads_as_the_overridden_document():
    text = DEFAULT_PIPELINE.read_text()
    items = ["thresholds.classifier=0.8", "thresholds.clip.low=12", "nodes.classifier.checkpoint=runs/cls 2",
             "nodes.gate.params.threshold=0.7"]
    new = overrides.apply_text(text, items)
    assert yaml.safe_load(new) == overrides.apply(yaml.safe_load(text), items)
    assert new.count("\n") == text.count("\n") and "# gate: p(pneumonia) below this" in new
    # a key the file lacks: written anew (comments dropped), still the same document
    added = overrides.apply_text(text, ["nodes.classifier.params={positive: Normal}"])
    assert yaml.safe_load(added)["nodes"]["classifier"]["params"] == {"positive": "Normal"}
    assert yaml.safe_load(added)["thresholds"] == yaml.safe_load(text)["thresholds"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    root = tmp_path_factory.mktemp("overrides")
    path = tiny_pipeline(root / "pipe")
    images = phantom_inputs(root / "data", n=2, size=64, corrupt=False)
    return {"root": root, "path": path, "images": images}


def test_infer_set_is_applied_and_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["infer", "--pipeline", str(tiny["path"]), "--input", str(tiny["images"]), "--out", str(out),
            "--device", "cpu", "--quiet", "--set", "thresholds.classifier=0.0", "--set", "thresholds.clip.outside=3"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "out-work" / "run_summary.json").read_text())
    assert summary["thresholds"]["classifier"] == 0.0 and summary["threshold"] == 0.0
    record = summary["provenance"]
    assert record["overrides"] == ["thresholds.classifier=0.0", "thresholds.clip.outside=3"]
    assert record["pipeline"] == {"path": str(tiny["path"].resolve()), "sha256": sha256(tiny["path"])}
    weights = tiny["path"].parent / "checkpoints" / "classifier" / "weights.safetensors"
    assert record["checkpoints"]["classifier"]["weights.safetensors"] == sha256(weights)
    assert set(record["checkpoints"]) == {n.name for n in spec.load(tiny["path"]).model_nodes}
    assert record["device"] == "cpu" and record["precision"] == "fp32" and record["command"]
    assert set(record["versions"]) == {"torch", "timm", "segmentation_models_pytorch", "pydicom", "numpy"}
    assert all(record["versions"].values()) and record["pneumomap"]
    capsys.readouterr()
    assert cli.main([*argv[:-4], "--set", "thresholds.clasifier=0.5"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'thresholds.classifier'" in err and "Traceback" not in err
    assert cli.main([*argv[:-4], "--set", "thresholds.classifier=high"]) == 2
    assert "wrong type" in capsys.readouterr().err


def test_tune_set_and_out_folder(tiny, tmp_path, capsys):
    generate(tmp_path / "rsna", 8, seed=3, size=64)
    out = tmp_path / "tuned"
    argv = ["tune", "--pipeline", str(tiny["path"]), "--val", str(tmp_path / "rsna"), "--split", "all",
            "--target-tnr", "0.5", "--device", "cpu", "--folds", "0", "--rounds", "1", "--quiet",
            "--set", "nodes.choice_right.params.above=max"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "deprecated" not in capsys.readouterr().err
    tuned = spec.load(out / "pipeline.yaml")
    assert tuned.nodes["choice_right"].params["above"] == "max"  # the override is part of what was tuned
    assert [n.checkpoint for n in tuned.model_nodes] == [n.checkpoint for n in spec.load(tiny["path"]).model_nodes]
    assert (out / "pipeline.given.yaml").is_file() and (out / "pipeline.tune.json").is_file()
    record = json.loads((out / "pipeline.tune.json").read_text())["provenance"]
    assert record["overrides"] == ["nodes.choice_right.params.above=max"]
    assert record["pipeline"]["path"] == str(tiny["path"].resolve())  # the user's file, not the copy
    assert record["checkpoints"]["lungs"]["weights.safetensors"] == \
        sha256(tiny["path"].parent / "checkpoints" / "lungs" / "weights.safetensors")
    # a .yaml --out still works, with a deprecation note
    assert cli.main([*argv[:-2], "--out", str(tmp_path / "old" / "t.yaml"), "--work", str(out / "tune-work")]) == 0
    assert "--out FILE.yaml is deprecated" in capsys.readouterr().err and (tmp_path / "old" / "t.yaml").is_file()


def test_stage_set_and_provenance(tiny, tmp_path, capsys):
    checkpoint = tiny["path"].parent / "checkpoints" / "classifier"
    base = ["stage", "classifier", "--checkpoint", str(checkpoint), "--input", str(REAL_PNG), "--device", "cpu",
            "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--set", "flip_tta=true"]) == 0
    plain, flipped = ((tmp_path / d / "classifier.csv").read_text() for d in "ab")
    assert plain != flipped  # the override took effect
    record = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert record["overrides"] == ["flip_tta=true"]
    assert record["checkpoints"]["classifier"]["weights.safetensors"] == sha256(checkpoint / "weights.safetensors")
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "c"), "--set", "flip_ta=true"]) == 2
    assert "did you mean 'flip_tta'" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "c"), "--set", "backbones=[test_efficientnet, test_efficientnet]"]) == 2
    assert "changes the network" in capsys.readouterr().err


def test_package_set_and_provenance(tiny, tmp_path, monkeypatch):
    from pneumomap import package

    def no_image(docker, *args):  # the Docker side (wheel downloads) is package's own tests' business
        docker.mkdir(parents=True, exist_ok=True)
        (docker / "Dockerfile").write_text("FROM scratch\n")
        return {"wheels": 1, "version": "0", "warnings": []}

    monkeypatch.setattr(package, "build_image", no_image)
    out = tmp_path / "submission"
    assert cli.main(["package", "--pipeline", str(tiny["path"]), "--out", str(out),
                     "--set", "thresholds.classifier=0.25"]) == 0
    packaged = spec.load(out / "program" / "pipeline.yaml")
    assert packaged.thresholds["classifier"] == 0.25
    assert all(n.checkpoint == out / "program" / "checkpoints" / n.name for n in packaged.model_nodes)
    record = json.loads((out / "provenance.json").read_text())
    assert record["overrides"] == ["thresholds.classifier=0.25"] and record["pipeline"]["sha256"] == sha256(tiny["path"])


def test_provenance_without_a_pipeline(tmp_path):
    record = provenance.build()
    assert record["pipeline"] is None and record["checkpoints"] == {} and record["overrides"] == []
    with provenance.invoked(DEFAULT_PIPELINE, ["thresholds.box=0.4"]):
        inside = provenance.build(pipeline_path=tmp_path / "copy.yaml")
    assert inside["pipeline"]["path"] == str(DEFAULT_PIPELINE) and inside["overrides"] == ["thresholds.box=0.4"]
