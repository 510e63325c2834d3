"""The shared fixtures of conftest.py give what a fresh build gives: the same files, the same random state."""
from __future__ import annotations

import torch

from pneumomap.infer.tiny import write_pipeline


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_tiny_pipeline_is_a_fresh_build(tiny_pipeline, tmp_path):
    first = tiny_pipeline(tmp_path / "a", thresholds={"classifier": 0.25})
    after_copy = torch.get_rng_state()
    torch.manual_seed(123)  # a copy sets the state again, whatever came between
    second = tiny_pipeline(tmp_path / "b", thresholds={"classifier": 0.25})
    assert torch.equal(torch.get_rng_state(), after_copy)
    fresh = write_pipeline(tmp_path / "fresh", thresholds={"classifier": 0.25})
    assert torch.equal(torch.get_rng_state(), after_copy)
    assert first == tmp_path / "a" / "pipeline.yaml" and second == tmp_path / "b" / "pipeline.yaml"
    assert _files(tmp_path / "a") == _files(tmp_path / "b") == _files(fresh.parent)
    assert "classifier: 0.25" in first.read_text()
    (tmp_path / "a" / "pipeline.yaml").write_text("changed")  # a copy is the module's own
    assert tiny_pipeline(tmp_path / "c", thresholds={"classifier": 0.25}).read_text() != "changed"


def test_phantom_inputs_are_built_once_per_arguments(phantom_inputs, tmp_path):
    images = phantom_inputs(tmp_path / "a", n=2, size=64, corrupt=False)
    again = phantom_inputs(tmp_path / "b", n=2, size=64, corrupt=False)
    other = phantom_inputs(tmp_path / "c", n=3, size=64)
    assert images == tmp_path / "a" / "images" and again == tmp_path / "b" / "images"
    assert _files(images) == _files(again)
    assert len(list(images.glob("*.dcm"))) == 2 and len(list(other.glob("*.dcm"))) == 4  # 3 + the corrupt one
    assert len(phantom_inputs.built) >= 2
