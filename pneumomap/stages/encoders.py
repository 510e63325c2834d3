"""Backbones: timm ``features_only`` encoders, GeM pooling, local pretrained weights.

`create_encoder(name, in_chans, pretrained)` builds a timm encoder that returns its
multi-scale feature maps (strides 2..32 for EfficientNet, 4..32 for ConvNeXt). Pretrained
weights only ever come from a local file (nothing is downloaded):

* a timm checkpoint (``model.safetensors`` / ``pytorch_model.bin`` / ``*.pth`` of the full
  classification model), an smp checkpoint (keys under ``encoder.model.`` or ``encoder.``),
  a pneumomap stage's ``weights.safetensors`` or the user's own state dict: the key prefix
  is found by matching against the encoder's own keys; classifier/decoder keys are ignored;
* a 3-channel input convolution is adapted to one channel with timm's ``adapt_input_conv``
  (the channel sum, as ``timm.create_model(..., pretrained=True, in_chans=1)`` does);
* every encoder tensor must be found in the file, else an error names the missing keys
  (timm's own ``pretrained_cfg_overlay=dict(file=...)`` path only warns about missing keys,
  so a wrong file would silently leave random weights).

With no file the weights are random and the log says so once per process.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from typing import Iterator

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

_random_logged = False
_quiet = 0


@contextlib.contextmanager
def weights_follow() -> Iterator[None]:
    """Inside: no 'random weights' log line (the caller loads a full checkpoint next)."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1


def note_random_weights(name: str) -> None:
    """Log once per process that a backbone starts from random weights."""
    global _random_logged
    if _quiet or _random_logged:
        return
    _random_logged = True
    log.warning("no pretrained weights file configured (first: %s): backbone weights are random. "
                "Set 'pretrained' in the stage config to a local timm/smp checkpoint to start from "
                "pretrained weights; nothing is downloaded.", name)


def create_encoder(name: str, in_chans: int = 1, pretrained: str | os.PathLike | None = None) -> nn.Module:
    """A timm ``features_only`` encoder of ``name`` with ``in_chans`` inputs; weights from a local file or random."""
    encoder = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_chans)
    if pretrained:
        load_encoder_weights(encoder, pretrained)
    else:
        note_random_weights(name)
    return encoder


def feature_channels(encoder: nn.Module) -> list[int]:
    """Channels of each feature map of a timm features_only encoder."""
    return list(encoder.feature_info.channels())


def _norm(key: str) -> str:
    # timm's FeatureListNet flattens 'stages.0' into 'stages_0'; compare keys modulo '_' vs '.'
    return key.replace("_", ".")


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike) -> None:
    """Load a local checkpoint into ``encoder`` (see the module docstring); errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pretrained weights file not found (the stage config's 'pretrained')")
    source = timm.models.load_state_dict(path, weights_only=True)
    target = encoder.state_dict()
    by_norm = {_norm(k): k for k in target}

    prefixes: Counter[str] = Counter()
    for key in source:
        parts = key.split(".")
        for i in range(len(parts)):
            if _norm(".".join(parts[i:])) in by_norm:
                prefixes[".".join(parts[:i])] += 1
                break
    if not prefixes:
        raise ValueError(f"{path}: no tensor of this file matches the encoder "
                         f"(file keys look like {list(source)[:3]}, encoder keys like {list(target)[:3]})")
    prefix = prefixes.most_common(1)[0][0]
    strip = len(prefix) + 1 if prefix else 0

    state: dict[str, torch.Tensor] = {}
    adapted = []
    for key, value in source.items():
        if prefix and not key.startswith(prefix + "."):
            continue
        name = by_norm.get(_norm(key[strip:]))
        if name is None or not isinstance(value, torch.Tensor):
            continue
        want = target[name].shape
        if value.shape != want and value.dim() == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            value = timm.models.adapt_input_conv(want[1], value)
            adapted.append(name)
        if value.shape != want:
            raise ValueError(f"{path}: tensor {key} has shape {list(value.shape)}, "
                             f"the encoder's {name} needs {list(want)} (a different model variant?)")
        state[name] = value
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the encoder's {len(target)} tensors are not in this file "
                         f"(e.g. {missing[:3]}); is it a checkpoint of the same backbone?")
    encoder.load_state_dict(state, strict=False)
    log.info("loaded %d encoder tensors from %s (key prefix %r%s; %d file tensors unused)", len(state), path,
             prefix, f", input conv adapted to {len(adapted)} channel(s)" if adapted else "",
             len(source) - len(state))


class GeM(nn.Module):
    """Generalized-mean pooling (Radenovic et al.) with a learnable exponent ``p``: (B, C, H, W) -> (B, C).

    Computed in float32 (x**p overflows float16 under AMP); p=1 is average, p->inf max pooling.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, eps={self.eps}"


class EncoderHead(nn.Module):
    """One backbone: ``encoder`` (timm features_only) + GeM on its last map + dropout + linear head."""

    def __init__(self, name: str, n_outputs: int, in_chans: int = 1, pretrained: str | None = None,
                 gem_p: float = 3.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.encoder = create_encoder(name, in_chans, pretrained)
        self.pool = GeM(gem_p)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_channels(self.encoder)[-1], n_outputs)

    def head_logits(self, last_map: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_outputs) from the encoder's last feature map, in float32 under any autocast."""
        with torch.autocast(last_map.device.type, enabled=False):
            return self.head(self.dropout(self.pool(last_map)).to(self.head.weight.dtype))

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, n_outputs); ``features`` (this encoder's output for ``x``) skips the encoder."""
        if features is None:
            features = self.encoder(x)
        return self.head_logits(features[-1])
