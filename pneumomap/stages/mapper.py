"""Opacity mappers: a U-Net decoder over the multi-scale features of another stage's FROZEN encoder.

``source: classifier`` decodes the classifier's encoder (member 0) on the whole image;
``source: regressor`` with ``side: right|left`` decodes that regressor's encoder on the
lung-half crop. The decoder is smp's ``UnetDecoder`` plus smp's ``SegmentationHead``
(one channel); the output is at the input size.

Sharing: `attach_encoder(stage)` makes ``self.encoder`` the very module of the source stage
(a reference, not a copy) and freezes it (``requires_grad=False``, kept in eval mode even
when the mapper is ``.train()``-ed; this freezes it in the source stage too, which is what
the pipeline wants). So the runner computes the encoder once::

    features = classifier.encode(x)
    p = classifier.predict(x, features=features)
    opacity = mapper.predict(x, features=features)

The features are the source's `encode(x)`: its `Backbone`'s multi-scale maps (finest first)
followed by its feature-head map; the decoder takes the multi-scale maps (``levels`` of them).
`save` stores the encoder tensors too, so `load_stage(dir)` works with no other input (weights
format 2, the encoder as timm's whole model under ``encoder.model.``; a format-1 checkpoint,
whose encoder was a features_only network, is refused with a clear error).
Training: optimise `trainable_parameters()` (the decoder and head).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from pneumomap.stages.base import ConfigError, Stage, StageConfig, check_choice, check_size, register_stage
from pneumomap.stages.classifier import refuse_legacy_weights
from pneumomap.stages.encoders import Backbone, weights_follow

SOURCES = ("classifier", "regressor")


@dataclasses.dataclass
class MapperConfig(StageConfig):
    """source: the stage whose encoder is decoded ('classifier' or 'regressor');
    side: 'right' or 'left' for a regressor source, null for the classifier;
    encoder: timm name of that stage's member-0 backbone (checked on attach);
    input_size: (h, w), the source's input size; decoder_channels: the first N are used, N = number of
    encoder feature maps (5 for EfficientNet, 4 for ConvNeXt)."""

    source: str = "classifier"
    side: str | None = None
    encoder: str = "efficientnet_b4"
    input_size: tuple[int, int] = (512, 512)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)

    def validate(self) -> None:
        check_choice("source", self.source, SOURCES)
        if self.source == "regressor":
            check_choice("side", self.side, ("right", "left"))
        elif self.side is not None:
            raise ConfigError(f"side: {self.side!r} given for source 'classifier' (whole image); leave it null")
        check_size("input_size", self.input_size)


@register_stage
class Mapper(Stage):
    """``decode(features, size=None) -> logits (B,1,h,w)``; ``predict(x, features=None) -> probabilities``."""

    kind: ClassVar[str] = "mapper"
    config_class: ClassVar[type[StageConfig]] = MapperConfig
    tiny: ClassVar[dict[str, Any]] = {"encoder": "test_efficientnet", "input_size": [64, 64],
                                      "decoder_channels": [32, 16, 16, 8, 8]}

    def __init__(self, config: MapperConfig) -> None:
        super().__init__(config)
        with weights_follow():  # replaced by attach_encoder() or by the checkpoint's weights
            self.encoder = Backbone(config.encoder, in_chans=1)
        channels = self.encoder.channels
        self.levels = len(channels)  # the multi-scale maps decoded: features[:levels]
        if len(config.decoder_channels) < len(channels):
            raise ConfigError(f"decoder_channels: {len(config.decoder_channels)} given, the encoder "
                              f"{config.encoder} has {len(channels)} feature maps")
        decoder_channels = list(config.decoder_channels[:len(channels)])
        # UnetDecoder drops its first feature (smp encoders put the input there); a 0-channel stand-in
        self.decoder = UnetDecoder(encoder_channels=[0, *channels], decoder_channels=decoder_channels,
                                   n_blocks=len(channels))
        self.head = SegmentationHead(decoder_channels[-1], 1, kernel_size=3)
        self._freeze_encoder()

    @classmethod
    def from_source(cls, stage: Stage, **overrides: Any) -> "Mapper":
        """A mapper configured for ``stage`` (kind, side, backbone, input size) and attached to its encoder."""
        config = {"source": stage.kind, "side": getattr(stage.config, "side", None),
                  "encoder": stage.config.backbones[0], "input_size": list(stage.input_size), **overrides}
        mapper = cls(MapperConfig.from_dict(config))
        mapper.attach_encoder(stage)
        return mapper

    def attach_encoder(self, stage: Stage) -> None:
        """Use ``stage``'s (member-0) encoder by reference and freeze it; checks kind, side and backbone."""
        cfg = self.config
        if stage.kind != cfg.source:
            raise ValueError(f"mapper source is {cfg.source!r}, got a {stage.kind!r} stage")
        if cfg.source == "regressor" and stage.config.side != cfg.side:
            raise ValueError(f"mapper side is {cfg.side!r}, got the {stage.config.side!r} regressor")
        if stage.config.backbones[0] != cfg.encoder:
            raise ValueError(f"mapper decodes a {cfg.encoder!r} encoder, the {stage.kind} has {stage.config.backbones[0]!r}")
        self.encoder = stage.encoder
        self._freeze_encoder()

    def _freeze_encoder(self) -> None:
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> "Mapper":
        """Train/eval the decoder; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The decoder's and head's parameters (what an optimiser should get)."""
        yield from self.decoder.parameters()
        yield from self.head.parameters()

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's features of ``x`` (no gradients, eval mode)."""
        if self.encoder.training:
            self.encoder.eval()
        with torch.no_grad():
            return self.encoder(x)

    def decode(self, features: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (B, 1, h, w) at ``size`` (default: the config's input size) from the source's `encode` output
        (its multi-scale maps are decoded; the feature-head map after them is not)."""
        size = tuple(size or self.input_size)
        first = features[0]
        stand_in = first.new_empty((first.shape[0], 0, *size))
        logits = self.head(self.decoder([stand_in, *features[:self.levels]]))
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, refusing weights format 1 with a clear error."""
        refuse_legacy_weights(state_dict, r"encoder\.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, h, w) at the size of ``x``."""
        return self.decode(self.encode(x), x.shape[-2:])

    @torch.no_grad()
    def predict(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Opacity probabilities (B, 1, h, w) in [0, 1]; ``features`` = the source's `encode(x)`, reused."""
        if features is None:
            features = self.encode(x)
        return torch.sigmoid(self.decode(features, x.shape[-2:]).float())
