"""Backbones: timm models run once per image for every output, GeM pooling, local pretrained weights.

`Backbone(name, in_chans, pretrained)` is timm's whole classification model of ``name`` without its
classifier (``num_classes=0``, no global pool). One call returns everything the stages use, from
ONE pass (timm's ``forward_intermediates``)::

    features = backbone(x)   # [multi-scale maps, finest first (= timm features_only's: strides 2..32
                             #  for EfficientNet, 4..32 for ConvNeXt), the feature-head map]
    features[-1]             # = model.forward_features(x): EfficientNet's conv_head + BN + SiLU output,
                             #   ConvNeXt's last stage (+ norm_pre)
    backbone.pre_logits(v)   # timm's own forward_head(pre_logits=True) on a pooled (B, C) vector:
                             #   ConvNeXt's head norm, nothing for EfficientNet

so a classifier/regressor head (`EncoderHead`: GeM on the feature-head map, the backbone's
pre-logits, dropout, a new linear layer) and a mapper (the multi-scale maps) share one encoder
pass. Pretrained weights only ever come from a local file (nothing is downloaded):

* a timm checkpoint (``model.safetensors`` / ``pytorch_model.bin`` / ``*.pth`` of the full
  classification model), an smp checkpoint (keys under ``encoder.model.`` or ``encoder.``),
  a pneumomap stage's ``weights.safetensors`` or the user's own state dict: the key prefix
  is found by matching against the model's own keys; the file's classifier (timm's
  ``classifier`` / ``head.fc``) and decoder keys are ignored;
* a 3-channel input convolution is adapted to one channel with timm's ``adapt_input_conv``
  (the channel sum, as ``timm.create_model(..., pretrained=True, in_chans=1)`` does);
* every model tensor must be found in the file, else an error names the missing keys
  (timm's own ``pretrained_cfg_overlay=dict(file=...)`` path only warns about missing keys,
  so a wrong file would silently leave random weights). A features_only checkpoint (smp's,
  or a pneumomap stage saved before weights format 2) lacks the feature head (EfficientNet's
  ``conv_head``/``bn2``) and is refused for a classifier or regressor.

With no file the weights are random and the log says so once per process.
"""
from __future__ import annotations

import contextlib
import dataclasses
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


class Backbone(nn.Module):
    """timm's classification model ``name`` without its classifier, as one pass for head and mappers.

    ``forward(x)`` -> ``[*maps, head_map]``: the multi-scale maps of timm's ``feature_info`` (the
    maps ``features_only`` returns, finest first) and ``forward_features(x)``, all from one
    ``forward_intermediates`` call. ``channels``: the maps' channels (what a mapper decodes);
    ``num_features``: the head map's; ``pre_logits(pooled)``: timm's own head before its classifier
    (``forward_head(pre_logits=True)``) on pooled (B, C) features, (B, ``head_features``) out.
    State-dict keys: ``model.`` + timm's keys (the classifier's excepted).
    """

    def __init__(self, name: str, in_chans: int = 1, pretrained: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.name = name
        model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0, global_pool="")
        if not callable(getattr(model, "forward_intermediates", None)) or not getattr(model, "feature_info", None):
            raise ValueError(f"backbone {name!r}: timm's {type(model).__name__} has no forward_intermediates / "
                             "feature_info, which the stages need (one encoder pass for the head and the mappers); "
                             "choose another timm model")
        self.model = model
        self.indices = list(range(len(model.feature_info)))
        self.channels = [int(info["num_chs"]) for info in model.feature_info]
        self.num_features = int(model.num_features)
        self.head_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        if pretrained:
            load_encoder_weights(model, pretrained)
        else:
            note_random_weights(name)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[*maps, head_map]`` of ``x`` (see the class docstring), one pass."""
        head_map, maps = self.model.forward_intermediates(x, indices=self.indices)
        return [*maps, head_map]

    def pre_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """timm's head of this model up to its classifier, on pooled (B, num_features) features."""
        return self.model.forward_head(pooled[:, :, None, None], pre_logits=True).flatten(1)


def _norm(key: str) -> str:
    # timm's FeatureListNet flattens 'stages.0' into 'stages_0'; compare keys modulo '_' vs '.'
    return key.replace("_", ".")


@dataclasses.dataclass
class LoadedWeights:
    """What `load_encoder_weights` took from a file: model keys loaded, file keys unused, inputs adapted."""

    path: str
    prefix: str
    loaded: list[str]
    unused: list[str]
    adapted: list[str]


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike) -> LoadedWeights:
    """Load a local checkpoint into ``encoder`` (every tensor of it; see the module docstring); errors name the file."""
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
    adapted, unused = [], []
    for key, value in source.items():
        if prefix and not key.startswith(prefix + "."):
            unused.append(key)
            continue
        name = by_norm.get(_norm(key[strip:]))
        if name is None or not isinstance(value, torch.Tensor):
            unused.append(key)
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
                         f"(e.g. {missing[:3]}); is it a checkpoint of the same backbone? (a features_only "
                         "checkpoint, smp's or a pneumomap stage's of weights format 1, lacks the feature head)")
    encoder.load_state_dict(state, strict=False)
    log.info("loaded %d encoder tensors from %s (key prefix %r%s; %d file tensors unused%s)", len(state), path,
             prefix, f", input conv adapted to {len(adapted)} channel(s)" if adapted else "",
             len(unused), f": {unused[:4]}{' ...' if len(unused) > 4 else ''}" if unused else "")
    return LoadedWeights(path, prefix, list(state), unused, adapted)


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
    """One ensemble member: ``encoder`` (a `Backbone`) + GeM on its feature-head map + the backbone's
    own pre-logits head (ConvNeXt: its norm) + dropout + a new linear ``head``."""

    def __init__(self, name: str, n_outputs: int, in_chans: int = 1, pretrained: str | None = None,
                 gem_p: float = 3.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.encoder = Backbone(name, in_chans, pretrained)
        self.pool = GeM(gem_p)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.head_features, n_outputs)

    def head_logits(self, head_map: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_outputs) from the encoder's feature-head map (``features[-1]``), in float32 under any autocast."""
        with torch.autocast(head_map.device.type, enabled=False):
            pooled = self.pool(head_map).to(self.head.weight.dtype)
            return self.head(self.dropout(self.encoder.pre_logits(pooled)))

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, n_outputs); ``features`` (this encoder's output for ``x``) skips the encoder."""
        if features is None:
            features = self.encoder(x)
        return self.head_logits(features[-1])
