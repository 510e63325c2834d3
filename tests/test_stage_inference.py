"""CPU inference speed-up (frozen traces): the same outputs as the eager stage, a safe fallback."""
from __future__ import annotations

import copy

import pytest
import torch

from pneumomap.stages import create_stage
from pneumomap.stages.base import tiny_config
from pneumomap.stages.inference import LazyFrozen, optimize_for_inference


def _input(stage, batch=3):
    torch.manual_seed(0)
    h, w = stage.input_size
    return torch.randn(batch, 1, h, w).contiguous(memory_format=torch.channels_last)


def test_frozen_stages_give_the_eager_outputs():
    for kind in ("lungs", "classifier", "regressor"):
        eager = create_stage(kind, tiny_config(kind)).eval()
        fast = optimize_for_inference(copy.deepcopy(eager), torch.device("cpu"))
        x = _input(eager)
        with torch.inference_mode():
            torch.testing.assert_close(fast.predict(x), eager.predict(x), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast.predict(x[:1]), eager.predict(x[:1]), rtol=1e-4, atol=1e-5)
        wrapped = fast.net if kind == "lungs" else fast.members[0].encoder
        assert isinstance(wrapped, LazyFrozen) and isinstance(wrapped.compiled, torch.jit.ScriptModule)


def test_frozen_mapper_decoder_gives_the_eager_maps():
    from pneumomap.stages.mapper import Mapper

    source = create_stage("classifier", tiny_config("classifier")).eval()
    eager = Mapper.from_source(source).eval()
    fast = optimize_for_inference(copy.deepcopy(eager), torch.device("cpu"))
    x = _input(eager)
    with torch.inference_mode():
        features = source.encode(x)
        torch.testing.assert_close(fast.predict(x, features), eager.predict(x, features), rtol=1e-4, atol=1e-5)
        one = [f[:1] for f in features]
        torch.testing.assert_close(fast.predict(x[:1], one), eager.predict(x[:1], one), rtol=1e-4, atol=1e-5)
    assert isinstance(fast.decoder.compiled, torch.jit.ScriptModule)


def test_untraceable_module_stays_eager(caplog):
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return {"not": x} if x.sum() > -1e9 else x  # a dict output cannot be traced

    wrapper = LazyFrozen(Untraceable(), "toy")
    x = torch.ones(2, 1, 4, 4)
    assert wrapper(x)["not"] is x
    assert wrapper.compiled is wrapper.module and "kept eager" in caplog.text


def test_cuda_is_left_alone():
    stage = create_stage("lungs", tiny_config("lungs"))
    assert optimize_for_inference(stage, torch.device("cuda")).net is stage.net


def test_cpu_networks_see_one_image_at_a_time():
    from pneumomap.device import forward_batch

    assert forward_batch(torch.device("cpu"), 8) == 1
    assert forward_batch(torch.device("cuda"), 8) == 8
    assert forward_batch(torch.device("cuda"), 0) == 1


def test_heads_stay_float32_under_autocast():
    from pneumomap.device import autocast

    stage = create_stage("classifier", tiny_config("classifier")).eval()
    x = _input(stage)
    with torch.inference_mode():
        reference = stage.predict(x)
        with autocast(torch.device("cpu"), precision="bf16"):
            features = stage.encode(x)
            logits = stage.members[0].head_logits(features[-1])
            p = stage.predict(x, features)
    assert features[-1].dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(p, reference, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), precision="int8")
