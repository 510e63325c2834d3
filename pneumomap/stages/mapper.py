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

Encoder identity: a decoder only fits the encoder it was trained on. `from_source` records that
encoder's content hash (`encoder_sha256`) in the config (``source_encoder_sha256``), and
`attach_encoder` refuses another encoder (`EncoderMismatchError`) unless ``allow_other_encoder``.
A checkpoint written before the hash was recorded is compared through the encoder copy it stores,
which is its training-time encoder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, ClassVar, Iterator, Mapping

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from pneumomap.stages.base import (FROM_SOURCE, LUNG_HALF, ConfigError, Stage, StageConfig, check_choice, check_size,
                                   register_stage, stage_class, timm_name)
from pneumomap.stages.classifier import refuse_legacy_weights
from pneumomap.stages.encoders import Backbone, weights_follow

SOURCES = ("classifier", "regressor")


def encoder_sha256(encoder: nn.Module) -> str:
    """Content hash of an encoder's weights: sha256 over its state-dict tensors in state-dict order
    (dtype, shape and bytes of each; BatchNorm's ``num_batches_tracked`` counters left out, key names
    too, so a renamed module with the same tensors hashes the same). Its cost:
    benchmarks/RESULTS.md, "Figures behind design choices"."""
    digest = hashlib.sha256()
    for key, tensor in encoder.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{value.dtype}{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class EncoderMismatchError(ValueError):
    """A mapper meets another encoder than the one its decoder was trained on (``trained`` and
    ``found`` are the two `encoder_sha256` values)."""

    def __init__(self, message: str, trained: str, found: str) -> None:
        super().__init__(message)
        self.trained, self.found = trained, found


@dataclasses.dataclass
class MapperConfig(StageConfig):
    """source: the stage whose encoder is decoded ('classifier' or 'regressor');
    side: 'right' or 'left' for a regressor source, null for the classifier;
    encoder: timm name of that stage's member-0 backbone (checked on attach);
    input_size: (h, w), the source's input size; decoder_channels: the first N are used, N = number of
    encoder feature maps (5 for EfficientNet, 4 for ConvNeXt);
    source_encoder_sha256: `encoder_sha256` of the encoder the decoder was trained on (recorded by
    `Mapper.from_source`; null in checkpoints written before it was recorded)."""

    source: str = "classifier"
    side: str | None = None
    encoder: str = "efficientnet_b4"
    input_size: tuple[int, int] = (512, 512)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    source_encoder_sha256: str | None = None

    def validate(self) -> None:
        check_choice("source", self.source, SOURCES)
        if stage_class(self.source).region == LUNG_HALF:
            check_choice("side", self.side, ("right", "left"))
        elif self.side is not None:
            raise ConfigError(f"side: {self.side!r} given for source {self.source!r} (whole image); leave it null")
        check_size("input_size", self.input_size)
        if self.source_encoder_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.source_encoder_sha256):
            raise ConfigError(f"source_encoder_sha256: {self.source_encoder_sha256!r} is not a sha256 hex digest")


@register_stage
class Mapper(Stage):
    """``decode(features, size=None) -> logits (B,1,h,w)``; ``predict(x, features=None) -> probabilities``."""

    kind: ClassVar[str] = "mapper"
    config_class: ClassVar[type[StageConfig]] = MapperConfig
    tiny: ClassVar[dict[str, Any]] = {"encoder": "test_efficientnet", "input_size": [64, 64],
                                      "decoder_channels": [32, 16, 16, 8, 8]}
    region: ClassVar[str] = FROM_SOURCE
    output: ClassVar[str] = "map"

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
        """A mapper configured for ``stage`` (kind, side, backbone, input size) and attached to its
        encoder, whose `encoder_sha256` it records as the one its decoder is trained on."""
        config = {"source": stage.kind, "side": getattr(stage.config, "side", None),
                  "encoder": stage.config.backbones[0], "input_size": list(stage.input_size), **overrides,
                  "source_encoder_sha256": encoder_sha256(stage.encoder)}
        mapper = cls(MapperConfig.from_dict(config))
        mapper._share(stage)
        return mapper

    @property
    def input_region(self) -> str:
        """The region of the source kind (``config.source``): a mapper takes its source's input."""
        return stage_class(self.config.source).region

    @property
    def side(self) -> str | None:
        return self.config.side

    @property
    def output_type(self) -> str:
        """'lungmap' for a mapper on a lung half (a map of that half), 'map' for the whole image."""
        return "lungmap" if self.on_lung_half else self.output

    def trained_encoder_sha256(self) -> str:
        """`encoder_sha256` of the encoder the decoder was trained on: the config's record or, for a
        checkpoint written before it was recorded, the hash of the encoder copy the checkpoint stores
        (`attach_encoder` records it before it replaces that copy)."""
        return self.config.source_encoder_sha256 or encoder_sha256(self.encoder)

    def attach_encoder(self, stage: Stage, *, allow_other_encoder: bool = False,
                       source_sha256: str | None = None) -> bool:
        """Use ``stage``'s (member-0) encoder by reference and freeze it; checks kind, side, backbone and
        that it is the encoder the decoder was trained on (`trained_encoder_sha256`).

        Another encoder raises `EncoderMismatchError`, unless ``allow_other_encoder`` (then it is used
        and False is returned; True when it is the trained one). ``source_sha256``: the
        `encoder_sha256` of ``stage.encoder`` when the caller has it already.
        """
        self._check_source(stage)
        trained = self.trained_encoder_sha256()
        found = source_sha256 or encoder_sha256(stage.encoder)
        if found != trained and not allow_other_encoder:
            raise EncoderMismatchError(
                f"the decoder was trained on encoder sha256 {trained[:12]}, the {stage.kind}'s encoder is "
                f"{found[:12]}", trained, found)
        self.config = dataclasses.replace(self.config, source_encoder_sha256=trained)
        self._share(stage)
        return found == trained

    def verify_stored_encoder(self) -> None:
        """Raise `EncoderMismatchError` when the encoder this mapper holds (e.g. the copy stored in its
        checkpoint, which `pneumomap stage mapper` runs) is not the one its decoder was trained on."""
        trained, found = self.trained_encoder_sha256(), encoder_sha256(self.encoder)
        if found != trained:
            raise EncoderMismatchError(f"the decoder was trained on encoder sha256 {trained[:12]}, the encoder it "
                                       f"holds is {found[:12]}", trained, found)

    def _check_source(self, stage: Stage) -> None:
        cfg = self.config
        if stage.kind != cfg.source:
            raise ValueError(f"mapper source is {cfg.source!r}, got a {stage.kind!r} stage")
        if stage.side != cfg.side:
            raise ValueError(f"mapper side is {cfg.side!r}, got the {stage.side!r} {stage.kind}")
        if stage.config.backbones[0] != cfg.encoder:
            raise ValueError(f"mapper decodes a {cfg.encoder!r} encoder, the {stage.kind} has {stage.config.backbones[0]!r}")

    def _share(self, stage: Stage) -> None:
        self._check_source(stage)
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
        return self.activation(self.decode(features, x.shape[-2:]))

    def node_output(self, x: torch.Tensor, features: list[torch.Tensor] | None = None,
                    params: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Opacity probabilities (B, h, w); ``x`` is the source's input, ``features`` its `encode(x)`."""
        return self.predict(x, features)[:, 0]

    def inference_parts(self) -> list[tuple[nn.Module, str, str]]:
        """The decoder (the encoder is the source stage's: in a pipeline run the features come from there)."""
        return [(self, "decoder", "mapper decoder")]

    @classmethod
    def describe(cls, config: Mapping[str, Any], inputs: list[str]) -> list[str]:
        source = inputs[0] if inputs else "?"
        return [f"It decodes an opacity map from the frozen encoder ({timm_name(str(config.get('encoder', '?')))}) "
                f"of node '{source}', with a U-Net-style decoder (channels {config.get('decoder_channels', '?')}), "
                "so the map is computed from the same features that produce that node's score."]

    @classmethod
    def explanation(cls) -> str:
        return (" The maps are decoded from the encoders of the scoring networks themselves, which were frozen while "
                "the decoders were trained, so the localisation comes from the same features as the score rather "
                "than from a separate post-hoc method.")
