"""Lung segmentation: an smp U-Net (one input channel, one output) -> lung probability map.

Side convention (as everywhere in pneumomap): the patient's RIGHT lung is on the IMAGE's
LEFT (smaller column index) in a PA/AP view; ``right``/``left`` always name the patient's side.

`Lungs.splits(probs)` turns a probability batch into `LungSplit` objects (clean mask: two
largest components, holes filled; right and left lung; their boxes; ``fallback=True`` with
fixed crops, rows 15-90 % and columns 20-80 % split at the middle, when two lungs are not
found), and `lung_half_inputs` cuts the two lung-half model inputs (512x320 by default)
out of the original image with their boxes in original-image coordinates: the one
implementation used by training and inference alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import nn

from pneumomap.stages import lung_geometry
from pneumomap.stages.base import ConfigError, Stage, StageConfig, check_size, register_stage, size_text, timm_name
from pneumomap.stages.encoders import load_encoder_weights, note_random_weights

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class LungsConfig(StageConfig):
    """encoder: smp encoder name ('tu-<timm name>' for any timm backbone);
    pretrained: local weights file for the encoder (timm or smp checkpoint), null = random;
    input_size: (h, w) of the model input; decoder_channels: one per encoder level (encoder_depth = their number);
    threshold: probability -> mask; crop_size: (h, w) of each lung-half crop."""

    encoder: str = "tu-efficientnet_b4"
    pretrained: str | None = None
    input_size: tuple[int, int] = (512, 512)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    threshold: float = 0.5
    crop_size: tuple[int, int] = (512, 320)

    def validate(self) -> None:
        check_size("input_size", self.input_size)
        check_size("crop_size", self.crop_size)
        if not 3 <= len(self.decoder_channels) <= 5:
            raise ConfigError(f"decoder_channels: {len(self.decoder_channels)} levels; smp's U-Net takes 3 to 5")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold: {self.threshold} is not in (0, 1)")


@register_stage
class Lungs(Stage):
    """``forward(x) -> logits (B,1,h,w)``; ``predict(x) -> probabilities``; ``splits(probs) -> [LungSplit]``."""

    kind: ClassVar[str] = "lungs"
    config_class: ClassVar[type[StageConfig]] = LungsConfig
    tiny: ClassVar[dict[str, Any]] = {"encoder": "tu-test_efficientnet", "input_size": [64, 64],
                                      "decoder_channels": [32, 16, 16, 8, 8], "crop_size": [64, 40]}
    output: ClassVar[str] = "lungs"

    def __init__(self, config: LungsConfig) -> None:
        super().__init__(config)
        self.net = smp.Unet(encoder_name=config.encoder, encoder_weights=None, in_channels=1, classes=1,
                            encoder_depth=len(config.decoder_channels),
                            decoder_channels=list(config.decoder_channels))
        encoder = getattr(self.net.encoder, "model", self.net.encoder)  # the timm model inside smp's 'tu-'
        if config.pretrained:
            load_encoder_weights(encoder, config.pretrained)
        else:
            note_random_weights(config.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Lung probabilities (B, 1, h, w) in [0, 1]."""
        return self.activation(self.net(x))

    def node_output(self, x: torch.Tensor, features: list[torch.Tensor] | None = None,
                    params: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Lung probabilities (B, h, w) (``features`` and ``params``: none used)."""
        return self.predict(x)[:, 0]

    def inference_parts(self) -> list[tuple[nn.Module, str, str]]:
        return [(self, "net", "lungs U-Net")]

    @classmethod
    def describe(cls, config: Mapping[str, Any], inputs: list[str]) -> list[str]:
        return [f"It is a U-Net whose encoder is the timm backbone {timm_name(str(config.get('encoder', '?')))}"
                f" (decoder channels {config.get('decoder_channels', '?')}); the lung probability is thresholded "
                f"at {config.get('threshold', '?')} and the mask is split into the patient's right and left lungs, "
                f"whose crops are resized to {size_text(config.get('crop_size', '?'))} for the per-lung stages."]

    def splits(self, probs: torch.Tensor | np.ndarray) -> list[lung_geometry.LungSplit]:
        """One `LungSplit` per probability map of a (B, 1, h, w) or (B, h, w) batch (masks at the model size)."""
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().float().cpu().numpy()
        probs = probs.reshape(len(probs), *probs.shape[-2:])
        return [lung_geometry.split_lungs(p, self.config.threshold) for p in probs]


def lung_half_inputs(pixels: np.ndarray, split: lung_geometry.LungSplit,
                     size: tuple[int, int] = (512, 320)) -> dict[str, tuple[np.ndarray, Box]]:
    """side -> (model input float32 ``size`` in [-1, 1], box in ``pixels`` coordinates), for 'right' and 'left'.

    ``pixels`` is the original image (`Radiograph.pixels`); ``split`` may come from a mask of
    any size (its boxes are scaled). The whole image is normalized first (so a crop keeps the
    image's intensity scale), then each box is cut and resized.
    """
    from pneumomap.stages.preprocess import intensity_range, rescale, resize

    pixels = np.asarray(pixels, dtype=np.float32)
    scale = intensity_range(pixels)  # `normalize` of the whole image, applied to each box only
    out = {}
    for side, box in (("right", split.right_box), ("left", split.left_box)):
        box = lung_geometry.scale_box(box, split.mask.shape, pixels.shape)
        region = rescale(pixels[box[0]:box[2], box[1]:box[3]], *scale)
        out[side] = (resize(region, size), box)
    return out


def paste_half(half_map: np.ndarray, box: Box, shape: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """A map of one lung half (any size) resized into ``box`` of an image of ``shape``; ``fill`` elsewhere."""
    from pneumomap.stages.preprocess import to_original

    r0, c0, r1, c1 = box
    out = np.full(shape, fill, dtype=np.float32)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = to_original(half_map, r1 - r0, c1 - c0)
    return out
