"""CPU inference speed-up (frozen traces): the same outputs as the eager stage, a safe fallback."""
from __future__ import annotations

import copy

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


def test_untraceable_module_stays_eager(caplog):
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            return {"not": x} if x.sum() > -1e9 else x  # a dict output cannot be traced

    wrapper = LazyFrozen(Untraceable(), "toy")
    x = torch.ones(2, 1, 4, 4)
    assert wrapper(x)["not"] is x
    assert wrapper.compiled is wrapper.module and "kept eager" in caplog.text


def test_mappers_and_cuda_are_left_alone():
    stage = create_stage("lungs", tiny_config("lungs"))
    assert optimize_for_inference(stage, torch.device("cuda")).net is stage.net
