"""Every registered stage kind (`list_stages`), as timm's tests iterate `list_models()`: a new kind is
tested as soon as it registers, with its own tiny config (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch

from pneumomap.checkpoints import CHECKPOINT_FILES
from pneumomap.stages import create_stage, list_stages, load_stage, stage_class, tiny_config

KINDS = list_stages()


def _tiny(kind: str):
    torch.manual_seed(0)
    return create_stage(kind, tiny_config(kind)).eval()


def _batch(stage, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, *stage.input_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_the_registry_holds_the_pipeline_kinds():
    from pneumomap.infer.spec import STAGE_NODES

    assert set(STAGE_NODES) <= set(KINDS)  # every kind a pipeline.yaml may name is registered
    assert KINDS == sorted(KINDS) and len(KINDS) >= 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_is_registered_under_its_own_name_with_a_tiny_variant(kind):
    cls = stage_class(kind)
    assert cls.kind == kind and cls.tiny, f"{cls.__name__}: set tiny (the CPU-test overrides)"
    assert isinstance(tiny_config(kind), cls.config_class)  # its YAML round trip: test_stages.py


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_stage_predicts_probabilities_for_each_image(kind):
    stage = _tiny(kind)
    x = _batch(stage)
    with torch.no_grad():
        logits, probs = stage(x), stage.predict(x)
    assert logits.shape[0] == probs.shape[0] == 2
    assert torch.isfinite(logits).all() and ((0 <= probs) & (probs <= 1)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_stage_survives_its_checkpoint_bit_for_bit(kind, tmp_path):
    stage = _tiny(kind)
    x = _batch(stage)
    stage.save(tmp_path / kind)
    assert sorted(p.name for p in (tmp_path / kind).iterdir()) == sorted(CHECKPOINT_FILES)
    loaded = load_stage(tmp_path / kind)
    assert type(loaded) is type(stage) and loaded.config == stage.config and not loaded.training
    assert torch.equal(loaded.predict(x), stage.predict(x))
