"""pneumomap export: a stage checkpoint as a torch.export program or ONNX, loaded without pneumomap and
checked against the eager network (issue 17)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from pneumomap import cli
from pneumomap.stages.base import create_stage, load_stage, tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    create_stage("classifier", tiny_config("classifier", flip_tta=True)).save(root / "classifier")
    create_stage("lungs", tiny_config("lungs")).save(root / "lungs")
    return {"root": root, "classifier": root / "classifier", "lungs": root / "lungs"}


def test_exported_program_loads_without_pneumomap_and_matches(checkpoints, tmp_path, capsys):
    out = tmp_path / "lungs.pt2"
    assert cli.main(["export", str(checkpoints["lungs"]), "--format", "exported-program", "--out", str(out),
                     "--dynamic-batch"]) == 0
    printed = capsys.readouterr().out
    assert "largest difference from the eager network" in printed and "torch.export.load" in printed
    record = json.loads((tmp_path / "lungs.pt2.json").read_text())
    assert record["matches"] and record["max_abs_difference"] <= 1e-4
    assert record["input"]["shape"] == ["B", 1, 64, 64] and record["output"]["shape"] == ["B", 1, 64, 64]
    assert record["provenance"]["checkpoints"]["lungs"]["weights.safetensors"]
    module = torch.export.load(str(out)).module()  # what a user without pneumomap runs
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    expected = load_stage(checkpoints["lungs"]).predict(x)
    assert torch.allclose(module(x), expected, atol=1e-5)


def test_onnx(checkpoints, tmp_path, capsys):
    if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript")):
        pytest.skip("onnx export needs the export extra: pip install 'pneumomap[export]'")
    out = tmp_path / "classifier.onnx"
    assert cli.main(["export", str(checkpoints["classifier"]), "--format", "onnx", "--out", str(out),
                     "--dynamic-batch"]) == 0
    assert out.is_file()
    if importlib.util.find_spec("onnxruntime") is None:
        assert "not checked" in capsys.readouterr().err
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32) * 2 - 1)
    got = session.run(None, {"image": x})[0]
    expected = load_stage(checkpoints["classifier"]).predict(torch.from_numpy(x)).numpy()  # flip TTA inside
    assert got.shape == (3,) and np.abs(got - expected).max() < 1e-5
    assert json.loads((tmp_path / "classifier.onnx.json").read_text())["max_abs_difference"] < 1e-4


def test_fixed_batch_default_path_and_a_mismatch(checkpoints, capsys):
    """A tolerance below what the export reaches (-1: below even a bit-exact one) fails the check: status 1."""
    assert cli.main(["export", str(checkpoints["classifier"]), "--format", "exported-program", "--batch", "2",
                     "--tolerance", "-1"]) == 1
    assert "differs from the eager network" in capsys.readouterr().err
    record = json.loads((checkpoints["root"] / "classifier.pt2.json").read_text())  # beside the checkpoint folder
    assert record["input"]["shape"] == [2, 1, 64, 64] and record["output"]["shape"] == [2]  # one p per image
    assert record["matches"] is False and record["max_abs_difference"] < 1e-4
