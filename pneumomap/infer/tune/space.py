"""What `pneumomap tune` searches: the thresholds it moves (`AXES`), their grids, and reading and setting
one value at its path in a nested thresholds block."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pneumomap.infer.ops import MAP8_RANGE


@dataclass(frozen=True)
class Axis:
    """One searched threshold: its path in the thresholds block and its candidate grid."""

    path: tuple[str, ...]
    grid: tuple[float, ...]
    integer: bool = False

    @property
    def name(self) -> str:
        return ".".join(self.path)


_UNIT = tuple(round(float(v), 2) for v in np.linspace(0.0, 1.0, 21))
_DILATE = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24)
_RAISE = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8)
AXES: tuple[Axis, ...] = (
    Axis(("right_extent",), _UNIT),
    Axis(("left_extent",), _UNIT),
    Axis(("level",), _UNIT),
    Axis(("overestimate", "low", "dilate"), _DILATE, True),
    Axis(("overestimate", "low", "raise"), _RAISE),
    Axis(("overestimate", "high", "dilate"), _DILATE, True),
    Axis(("overestimate", "high", "raise"), _RAISE),
    Axis(("clip", "low"), (1, 2, 3, 5, 7, 10, 15, 20, 30, 45, 64, 90, 128), True),
    Axis(("clip", "high"), (128, 160, 192, 215, 230, 240, 245, 250, 252, 254), True),
    Axis(("clip", "outside"), (1, 2, 3, 5, 10, 20), True),
)
assert all(MAP8_RANGE[0] <= v <= MAP8_RANGE[1] for a in AXES if a.path[0] == "clip" for v in a.grid)
CLASSIFIER = ("classifier",)  # set at the target true-negative rate (a policy), not searched


def get_value(thresholds: dict, path: Sequence[str]) -> Any:
    """The value at ``path`` in a nested thresholds block (KeyError when absent)."""
    value: Any = thresholds
    for key in path:
        value = value[key]
    return value


def with_value(thresholds: dict, path: Sequence[str], value: Any) -> dict:
    """A copy of ``thresholds`` with ``path`` set to ``value``."""
    out = copy.deepcopy(thresholds)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def has_path(thresholds: dict, path: Sequence[str]) -> bool:
    """Whether the thresholds block holds a value at ``path``."""
    try:
        get_value(thresholds, path)
        return True
    except (KeyError, TypeError):
        return False


def flat(thresholds: dict, paths: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The values at ``paths`` by dotted name ('clip.low': 10), in the order of ``paths``."""
    return {".".join(p): get_value(thresholds, p) for p in paths}


def candidates(axis: Axis, thresholds: dict) -> list:
    """The grid plus the current value, sorted; clip.low never above clip.high and vice versa."""
    cast = int if axis.integer else float
    values = sorted({cast(v) for v in axis.grid} | {cast(get_value(thresholds, axis.path))})
    if axis.path[0] == "clip" and has_path(thresholds, ("clip", "low")) and has_path(thresholds, ("clip", "high")):
        if axis.path[1] == "low":
            values = [v for v in values if v <= thresholds["clip"]["high"]]
        elif axis.path[1] == "high":
            values = [v for v in values if v >= thresholds["clip"]["low"]]
    return values
