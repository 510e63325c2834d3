"""The search: the metric along one axis (`sweep`), the step rule (`choose`), and the coordinate descent
that moves one threshold at a time until no step helps (`coordinate_descent`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pneumomap.infer import spec
from pneumomap.infer.tune.evaluator import BaseEvaluator, Progress
from pneumomap.infer.tune.space import Axis, candidates, get_value, with_value

CHOICES = ("argmin", "smoothed")
DEFAULT_CHOICE = "argmin"


@dataclass
class Curve:
    """The metric at each value of one threshold (the values the pipeline accepts)."""

    values: list
    metrics: list[float]


def sweep(evaluator: BaseEvaluator, thresholds: dict, path: Sequence[str], values: Sequence,
          indices: Sequence[int] | None = None, progress: Progress | None = None) -> Curve:
    """The metric at each value of one threshold, the others as in ``thresholds`` (invalid values skipped)."""
    kept, blocks = [], []
    for value in values:
        block = with_value(thresholds, path, value)
        try:
            evaluator.pipeline.with_thresholds(block)
        except spec.PipelineError:
            continue
        kept.append(value)
        blocks.append(block)
    return Curve(kept, evaluator.metrics_of(blocks, indices, progress) if blocks else [])


def choose(curve: Curve, current: Any, rule: str = DEFAULT_CHOICE) -> int | None:
    """The index of the value to move to on ``curve``, or None to stay at ``current``.

    'argmin': the lowest metric, when it is below the current value's. 'smoothed': the lowest mean of a
    value and its grid neighbours (a minimum that its neighbours confirm, not one image's luck), when that
    mean is below the current value's own.
    """
    metrics_ = np.asarray(curve.metrics, dtype=np.float64)
    here = curve.values.index(current) if current in curve.values else None
    if rule == "argmin":
        j = int(np.argmin(metrics_))
        return j if here is None or metrics_[j] < metrics_[here] else None
    if rule != "smoothed":
        raise ValueError(f"unknown choice rule {rule!r}; choose one of {', '.join(CHOICES)}")
    padded = np.concatenate(([metrics_[0]], metrics_, [metrics_[-1]]))  # edges: the end value counts twice
    smooth = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    j = int(np.argmin(smooth))
    return j if here is None or smooth[j] < smooth[here] else None


def coordinate_descent(evaluator: BaseEvaluator, start: dict, axes: Sequence[Axis], rounds: int = 3,
                       progress: bool = True, indices: Sequence[int] | None = None, rule: str = DEFAULT_CHOICE
                       ) -> tuple[dict, float, dict[str, Curve]]:
    """Minimise the metric over ``indices`` (default all images) one axis at a time over its grid, each
    step chosen by ``rule`` (`choose`); returns (thresholds, metric, last curve per axis)."""
    from tqdm import tqdm

    n = evaluator.n_images if indices is None else len(indices)
    current = copy.deepcopy(start)
    best = evaluator.metric(current, indices)
    curves: dict[str, Curve] = {}
    for round_ in range(rounds):
        changed = False
        for axis in axes:
            values = candidates(axis, current)
            with tqdm(total=n * len(values), desc=f"tune round {round_ + 1}: {axis.name}", unit=" image-candidates",
                      unit_scale=True, disable=not progress, leave=False) as bar:
                curve = sweep(evaluator, current, axis.path, values, indices,
                              lambda k, width=len(values): bar.update(k * width))
            curves[axis.name] = curve
            j = choose(curve, get_value(current, axis.path), rule)
            if j is not None and curve.values[j] != get_value(current, axis.path):
                current, best, changed = with_value(current, axis.path, curve.values[j]), curve.metrics[j], True
        if not changed:
            break
    return current, best, curves
