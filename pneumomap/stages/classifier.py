"""Whole-image classifier: timm backbone(s) + GeM + linear head -> p(pneumonia).

``ScoreStage`` is the model code shared with the extent regressors (regressor.py): an
ensemble of `EncoderHead` members (each a timm features_only encoder, GeM on its last map,
a linear head), optional horizontal-flip test-time augmentation, and the encode/predict
split that lets a mapper reuse the encoder pass of member 0::

    features = classifier.encode(x)                  # member 0's multi-scale features
    p = classifier.predict(x, features=features)     # no second pass of member 0's encoder
    m = mapper.predict(x, features=features)         # the mapper decodes the same features

Ensemble rule: the mean of the members' probabilities; flip TTA: the mean of the
probabilities on x and on x flipped left-right (before the ensemble mean).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

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
        """Member 0's multi-scale feature maps of ``x`` (finest first)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_outputs), the mean over members (train one member per stage; predict() is the inference rule)."""
        logits = [member(x) for member in self.members]
        return logits[0] if len(logits) == 1 else torch.stack(logits).mean(0)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities: sigmoid for one output, softmax for several."""
        return torch.sigmoid(logits.float()) if logits.shape[1] == 1 else torch.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Probabilities: (B,) for one output, (B, n) otherwise. ``features``: `encode(x)`, reused for member 0."""
        probs = []
        for i, member in enumerate(self.members):
            p = self.activation(member(x, features if i == 0 else None))
            if self.config.flip_tta:
                p = (p + self.activation(member(torch.flip(x, dims=(-1,))))) / 2
            probs.append(p)
        mean = probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
        return mean[:, 0] if mean.shape[1] == 1 else mean


@register_stage
class Classifier(ScoreStage):
    """Whole-image pneumonia classifier (binary by default; multi-class by ``n_classes``)."""

    kind: ClassVar[str] = "classifier"
    config_class: ClassVar[type[StageConfig]] = ClassifierConfig
    tiny: ClassVar[dict[str, Any]] = {"backbones": ["test_efficientnet"], "input_size": [64, 64]}

    @property
    def n_outputs(self) -> int:
        return self.config.n_classes
