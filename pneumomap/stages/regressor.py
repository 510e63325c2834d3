"""Extent regressors: the fraction of one lung covered by opacity, in [0, 1].

One stage per side (``side: right`` or ``left``, the patient's side: the right lung is on
the image's LEFT in a PA/AP view), run on that side's lung-half crop (512x320 by default,
cut by `pneumomap.stages.lungs.lung_half_inputs`). Same model code as the classifier
(`ScoreStage`: backbone(s) + GeM + head, ensembles, flip TTA); the output is a sigmoid.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from pneumomap.stages.base import LUNG_HALF, StageConfig, check_choice, register_stage
from pneumomap.stages.classifier import BackboneConfig, ScoreStage

SIDES = ("right", "left")


@dataclasses.dataclass
class RegressorConfig(BackboneConfig):
    """side: 'right' or 'left' (patient's side); input_size: the lung-half crop (h, w)."""

    side: str = "right"
    input_size: tuple[int, int] = (512, 320)

    def validate(self) -> None:
        super().validate()
        check_choice("side", self.side, SIDES)


@register_stage
class Regressor(ScoreStage):
    """``predict(x, features=None) -> (B,)`` extent of the configured lung in [0, 1]."""

    kind: ClassVar[str] = "regressor"
    config_class: ClassVar[type[StageConfig]] = RegressorConfig
    tiny: ClassVar[dict[str, Any]] = {"backbones": ["test_efficientnet"], "input_size": [64, 40]}
    region: ClassVar[str] = LUNG_HALF
    output: ClassVar[str] = "extent"

    @property
    def side(self) -> str:
        return self.config.side

    def check_node_params(self, params: Mapping[str, Any]) -> None:
        """``side``, when given, must be this checkpoint's side."""
        if params.get("side", self.side) != self.side:
            raise ValueError(f"params.side is {params['side']!r} but the checkpoint is the {self.side!r} regressor")

    @classmethod
    def describe_output(cls, config: Mapping[str, Any]) -> list[str]:
        return [f"It regresses the fraction of the patient's {config.get('side', '?')} lung covered by opacity "
                "from that lung's crop."]
