"""Whole-image classifier: timm backbone(s) + GeM + linear head -> p(pneumonia).

``ScoreStage`` is the model code shared with the extent regressors (regressor.py): an
ensemble of `EncoderHead` members (each timm's whole model of its backbone without the
classifier: ``forward_features``, i.e. the backbone's own feature head (EfficientNet's
``conv_head`` + BN + SiLU), then GeM, timm's pre-logits head (ConvNeXt's norm) and a new
linear head), optional horizontal-flip test-time augmentation, and the encode/predict split
that lets a mapper reuse the encoder pass of member 0::

    features = classifier.encode(x)                  # member 0's maps: multi-scale ones + the head map (last)
    p = classifier.predict(x, features=features)     # no second pass of member 0's encoder
    m = mapper.predict(x, features=features)         # the mapper decodes the same features

Ensemble rule, the same in training, validation and inference: the ensemble's probability is
the mean of the members' probabilities (sigmoid or softmax of each member's logits).
``forward`` returns the logits of that mean (binary: ``log(mean p) - log(mean(1 - p))``,
multi-class: ``log(mean softmax)``), so a loss on ``forward`` (training) and ``activation(forward)``
(validation) see exactly the probability `predict` gives. Flip TTA (inference only): the mean
of the probabilities on x and on x flipped left-right, per member, before the ensemble mean.

Multi-class heads (``n_classes > 1``): `predict` gives every class's probability; a pipeline
takes one of them as p(pneumonia), the class its node names (`probability_of`, ``class_index``),
which must be one of the checkpoint's ``class_names``.

Weights format: 2 (the member is timm's whole model, keys ``members.N.encoder.model.*``).
Format 1 (a timm features_only encoder, keys ``members.N.encoder.conv_stem.*`` etc., head on
the last block's projection) cannot be loaded: `load_state_dict` refuses it, saying so.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pneumomap.labels import POSITIVE_CLASS
from pneumomap.stages.base import ConfigError, Stage, StageConfig, check_size, register_stage
from pneumomap.stages.encoders import EncoderHead


@dataclasses.dataclass
class BackboneConfig(StageConfig):
    """Fields shared by the classifier and the regressors.

    backbones:  timm model names, one per ensemble member (member 0's encoder is the one a mapper shares)
    pretrained: local weight files, empty or one per backbone (null = random for that member)
    input_size: (h, w) of the model input
    flip_tta:   average with the prediction on the left-right flipped image
    gem_p:      initial GeM exponent; dropout: before the linear head
    """

    backbones: tuple[str, ...] = ("efficientnet_b4",)
    pretrained: tuple[str | None, ...] = ()
    input_size: tuple[int, int] = (512, 512)
    flip_tta: bool = False
    gem_p: float = 3.0
    dropout: float = 0.0

    def validate(self) -> None:
        if not self.backbones:
            raise ConfigError("backbones: give at least one timm model name")
        if self.pretrained and len(self.pretrained) != len(self.backbones):
            raise ConfigError(f"pretrained: {len(self.pretrained)} file(s) for {len(self.backbones)} backbone(s); "
                              "give one per backbone (null for none) or leave it empty")
        check_size("input_size", self.input_size)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: {self.dropout} is not in [0, 1)")


@dataclasses.dataclass
class ClassifierConfig(BackboneConfig):
    """n_classes: 1 = binary (sigmoid, predict -> (B,)), >1 = softmax over classes (predict -> (B, n));
    class_names: optional names of the classes (empty or n_classes long; binary: the positive class)."""

    n_classes: int = 1
    class_names: tuple[str, ...] = ()

    def validate(self) -> None:
        super().validate()
        if self.n_classes < 1:
            raise ConfigError(f"n_classes: {self.n_classes} < 1")
        if self.class_names and len(self.class_names) != self.n_classes:
            raise ConfigError(f"class_names: {len(self.class_names)} names for n_classes={self.n_classes}")


WEIGHTS_FORMAT = 2


def refuse_legacy_weights(keys, encoder_prefix: str) -> None:
    """Raise RuntimeError when ``keys`` hold a weights-format-1 encoder (timm features_only) under
    ``encoder_prefix`` (a regex, e.g. ``members\\.\\d+\\.encoder\\.``): those weights cannot be used."""
    legacy = [k for k in keys if re.match(encoder_prefix, k) and not re.match(encoder_prefix + r"model\.", k)]
    if legacy:
        raise RuntimeError(
            f"weights format 1 (e.g. key {legacy[0]!r}): saved by a pneumomap whose classifier/regressor head sat on "
            "timm's features_only last map (before the backbone's own feature head, e.g. EfficientNet's conv_head, "
            f"was used); this version reads weights format {WEIGHTS_FORMAT} only. Retrain this stage (and the "
            "mappers that decode its encoder) with this version")


class ScoreStage(Stage):
    """An ensemble of backbone+GeM+head members producing one score vector per image."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        files = config.pretrained or (None,) * len(config.backbones)
        self.members = nn.ModuleList(
            EncoderHead(name, self.n_outputs, 1, file, config.gem_p, config.dropout)
            for name, file in zip(config.backbones, files))

    @property
    def n_outputs(self) -> int:
        return 1

    @property
    def encoder(self) -> nn.Module:
        """Member 0's encoder: the one a mapper attaches to."""
        return self.members[0].encoder

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Member 0's maps of ``x``: the multi-scale maps (finest first), then the feature-head map (`Backbone`)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_outputs) of the ensemble's probability (`ensemble_logits`; one member: its logits)."""
        return self.ensemble_logits([member(x) for member in self.members])

    @staticmethod
    def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
        """The logits whose `activation` is the mean of the members' probabilities (the ensemble rule)."""
        if len(logits) == 1:
            return logits[0]
        stacked = torch.stack([l.float() for l in logits])
        if stacked.shape[-1] == 1:  # sigmoid: log(mean p) - log(mean (1 - p)), the log(n) cancels
            return (torch.logsumexp(F.logsigmoid(stacked), 0) - torch.logsumexp(F.logsigmoid(-stacked), 0))
        return torch.logsumexp(torch.log_softmax(stacked, dim=-1), 0) - math.log(len(logits))

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities: sigmoid for one output, softmax for several."""
        return torch.sigmoid(logits.float()) if logits.shape[1] == 1 else torch.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Probabilities: (B,) for one output, (B, n) otherwise. ``features``: `encode(x)`, reused for member 0.

        The mean of the members' probabilities (with flip TTA: of each member's on x and on x flipped)."""
        probs = []
        for i, member in enumerate(self.members):
            p = self.activation(member(x, features if i == 0 else None))
            if self.config.flip_tta:
                p = (p + self.activation(member(torch.flip(x, dims=(-1,))))) / 2
            probs.append(p)
        mean = probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
        return mean[:, 0] if mean.shape[1] == 1 else mean

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, refusing weights format 1 with a clear error (`refuse_legacy_weights`)."""
        refuse_legacy_weights(state_dict, r"members\.\d+\.encoder\.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def node_output(self, x: torch.Tensor, features: list[torch.Tensor] | None = None,
                    params: Mapping[str, Any] | None = None) -> torch.Tensor:
        """`predict` (``features``: `encode(x)`, reused for member 0)."""
        return self.predict(x, features)

    def inference_parts(self) -> list[tuple[nn.Module, str, str]]:
        """Each member's backbone encoder (GeM, heads and the pre-logits head stay eager)."""
        return [(member, "encoder", f"{self.kind} encoder {member.name}") for member in self.members]

    @classmethod
    def describe(cls, config: Mapping[str, Any], inputs: list[str]) -> list[str]:
        parts = []
        backbones = [str(b) for b in config.get("backbones") or []]
        if len(backbones) > 1:
            parts.append(f"It is an ensemble of {len(backbones)} networks averaged: " + ", ".join(backbones) + ".")
        elif backbones:
            parts.append(f"Its network is the timm backbone {backbones[0]} with generalised-mean (GeM) pooling and "
                         "a linear head.")
        parts += cls.describe_output(config)
        if config.get("flip_tta"):
            parts.append("Its prediction is averaged with the prediction on the left-right flipped image.")
        return parts

    @classmethod
    def describe_output(cls, config: Mapping[str, Any]) -> list[str]:
        """The sentences of `describe` on what the head predicts (none by default)."""
        return []


@register_stage
class Classifier(ScoreStage):
    """Whole-image pneumonia classifier (binary by default; multi-class by ``n_classes``)."""

    kind: ClassVar[str] = "classifier"
    config_class: ClassVar[type[StageConfig]] = ClassifierConfig
    tiny: ClassVar[dict[str, Any]] = {"backbones": ["test_efficientnet"], "input_size": [64, 64]}
    output: ClassVar[str] = "probability"

    @property
    def n_outputs(self) -> int:
        return self.config.n_classes

    def class_index(self, name: str | None = None) -> int | None:
        """The column of class ``name`` (None: 'Lung Opacity', `pneumomap.labels.POSITIVE_CLASS`) in `predict`'s
        (B, n) output; None for a binary head (its one output is p of the positive class, whatever ``name``).
        ValueError, naming both, when ``name`` is not among the checkpoint's ``class_names``."""
        if self.config.n_classes == 1:
            return None
        name = name or POSITIVE_CLASS
        names = list(self.config.class_names)
        if not names:
            raise ValueError(f"a {self.config.n_classes}-class head without class_names: cannot tell which output is "
                             f"{name!r}; add class_names (one per output, in order) to its config.yaml")
        if name not in names:
            raise ValueError(f"class {name!r} (the node's params.positive) is not among the checkpoint's classes {names}")
        return names.index(name)

    def probability_of(self, probs: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """(B,) p of class ``name`` from `predict`'s output (a binary head's output as it is)."""
        index = self.class_index(name)
        return probs if index is None else probs[:, index]

    def node_output(self, x: torch.Tensor, features: list[torch.Tensor] | None = None,
                    params: Mapping[str, Any] | None = None) -> torch.Tensor:
        """(B,) p(pneumonia): a multi-class head's probability of the class ``params['positive']`` names."""
        return self.probability_of(self.predict(x, features), (params or {}).get("positive"))

    def check_node_params(self, params: Mapping[str, Any]) -> None:
        """``positive`` must be one of a multi-class head's class_names (`class_index`)."""
        self.class_index(params.get("positive"))

    @classmethod
    def describe_output(cls, config: Mapping[str, Any]) -> list[str]:
        if int(config.get("n_classes", 1) or 1) > 1:
            return [f"It predicts {config.get('n_classes')} classes {config.get('class_names') or ''}; the pneumonia "
                    "probability is taken from them."]
        return []
