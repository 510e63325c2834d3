"""Inference-only speed-ups of a loaded stage, applied by whoever runs stages for predictions.

On the CPU, tracing a network and freezing the trace folds BatchNorm into the convolutions and
fuses element-wise ops, with outputs equal to the eager network's to float rounding (~1e-7).
Each traced part runs faster on the CPU (benchmarks/RESULTS.md, "Figures behind design choices").
The heavy parts are traced: each
backbone encoder of a classifier/regressor, the whole U-Net of the lung stage, each mapper's
decoder; heads, GeM and a backbone's pre-logits head (`LazyFrozen` passes other attributes through to
the eager module) stay eager. A trace is specialised to the shapes it sees, so the
runner feeds the CPU one image at a time (`pneumomap.device.forward_batch`); other shapes are
still right, only re-optimised. On CUDA nothing changes (AMP + channels_last are the fast
path there). A network that cannot be traced stays eager, with one log line.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)
_TRACING = threading.Lock()  # one trace at a time (the runner's streams make their first calls together)
# torch's advice is torch.compile, measured slower here (RESULTS.md); catch_warnings below does not
# reach a trace made in another thread, hence this one process-wide filter
warnings.filterwarnings("ignore", message=r"`torch\.jit\.freeze` is deprecated", category=FutureWarning)


class LazyFrozen(nn.Module):
    """Runs ``module`` as a frozen trace, made at the first call (from that call's input), so
    loading a pipeline whose outputs are all stored costs no tracing; the eager module when tracing fails."""

    def __init__(self, module: nn.Module, what: str) -> None:
        super().__init__()
        self.module = module.eval()
        self.what = what
        self.compiled: nn.Module | None = None
        self.trace_seconds = 0.0  # one-off cost of the first call

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        if self.compiled is None:
            with _TRACING:  # the runner's streams may make first calls together
                if self.compiled is None:
                    start = time.perf_counter()
                    self.compiled = self._trace(x)
                    self.trace_seconds = time.perf_counter() - start
        return self.compiled(x)

    def __getattr__(self, name: str):
        """Attributes other than the module's own come from the wrapped eager module (e.g. a backbone's
        ``pre_logits``, `pneumomap.stages.encoders.Backbone`: only ``forward`` is traced)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("module", "_modules"):
                raise
            return getattr(super().__getattr__("module"), name)

    def _trace(self, x: torch.Tensor) -> nn.Module:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                example = (x[:1],) if isinstance(x, torch.Tensor) else ([f[:1] for f in x],)
                return torch.jit.freeze(torch.jit.trace(self.module, example, check_trace=False))
        except Exception as exc:  # an untraceable backbone is slower, never wrong
            log.warning("%s: kept eager for inference (tracing failed: %s)", self.what, exc)
            return self.module


def optimize_for_inference(stage: nn.Module, device: torch.device) -> nn.Module:
    """Wrap the heavy eager parts of ``stage`` (already on ``device``, eval; `Stage.inference_parts`) in
    `LazyFrozen` (CPU only). For inference only: the stage should not be trained or saved afterwards.
    """
    if device.type != "cpu":
        return stage
    for owner, name, what in stage.inference_parts():
        setattr(owner, name, LazyFrozen(getattr(owner, name), what))
    return stage.eval()


def trace_seconds(stage: nn.Module) -> float:
    """Seconds ``stage``'s `LazyFrozen` parts spent tracing (a one-off cost per loaded stage)."""
    return sum(m.trace_seconds for m in stage.modules() if isinstance(m, LazyFrozen))
