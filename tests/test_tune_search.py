"""The tuner's search space and search (`tune.space`, `tune.search`) on a made-up metric: fast unit tests,
also run against every mutant of those modules (`make mutate`)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from pneumomap.infer import spec, tune
from pneumomap.infer.ops import MAP8_RANGE
from pneumomap.infer.tune import search, space
from pneumomap.infer.tune.evaluator import BaseEvaluator

DEFAULT_PIPELINE = Path(__file__).resolve().parents[1] / "pipeline.yaml"
START = {"level": 0.25, "right_extent": 0.5, "clip": {"low": 10, "high": 245, "outside": 1}}
AXES = [a for a in space.AXES if space.has_path(START, a.path)]


class _Checker:
    """What the search asks of a pipeline: whether a thresholds block is valid (clip.low <= clip.high)."""

    def with_thresholds(self, block: dict) -> "_Checker":
        if block["clip"]["low"] > block["clip"]["high"]:
            raise spec.PipelineError("made-up.yaml", ["clip.low above clip.high"])
        return self


class Bowl(BaseEvaluator):
    """A made-up metric: per image ``i``, the squared distance of each searched value to its target
    plus ``i`` times a shift (so that which images are tuned on matters)."""

    TARGET = {"level": 0.6, "right_extent": 0.15, "clip.low": 30, "clip.high": 200, "clip.outside": 5}
    SCALE = {"level": 1.0, "right_extent": 1.0, "clip.low": 1e-3, "clip.high": 1e-3, "clip.outside": 1e-2}

    def __init__(self, n: int = 4):
        self.pipeline, self.n = _Checker(), n

    @property
    def n_images(self) -> int:
        return self.n

    def losses_of(self, candidates, indices=None, progress=None) -> np.ndarray:
        chosen = range(self.n) if indices is None else indices
        rows = []
        for block in candidates:
            values = space.flat(block, [a.path for a in AXES])
            rows.append([sum(self.SCALE[k] * (v - self.TARGET[k] - 0.04 * i * (k == "level")) ** 2
                             for k, v in values.items()) for i in chosen])
        if progress is not None:
            progress(len(list(chosen)))
        return np.array(rows, dtype=np.float64)


def test_values_by_path():
    thresholds = copy.deepcopy(START)
    assert space.get_value(thresholds, ("clip", "low")) == 10 and space.get_value(thresholds, ("level",)) == 0.25
    with pytest.raises(KeyError):
        space.get_value(thresholds, ("clip", "middle"))
    moved = space.with_value(thresholds, ("clip", "low"), 20)
    assert moved["clip"]["low"] == 20 and thresholds == START  # a copy: the original is unchanged
    assert moved["clip"] is not thresholds["clip"] and moved["level"] == 0.25
    assert space.has_path(thresholds, ("clip", "outside")) and not space.has_path(thresholds, ("clip", "middle"))
    assert not space.has_path(thresholds, ("level", "low"))  # through a number: not a path either
    assert not space.has_path(thresholds, ("gate",))
    assert space.flat(thresholds, [("level",), ("clip", "low")]) == {"level": 0.25, "clip.low": 10}
    assert list(space.flat(thresholds, [("clip", "low"), ("level",)])) == ["clip.low", "level"]


def test_axes_cover_the_pipeline_thresholds_with_valid_grids():
    names = [a.name for a in space.AXES]
    assert names == ["right_extent", "left_extent", "level", "overestimate.low.dilate", "overestimate.low.raise",
                     "overestimate.high.dilate", "overestimate.high.raise", "clip.low", "clip.high", "clip.outside"]
    assert space.CLASSIFIER == ("classifier",) and space.CLASSIFIER not in [a.path for a in space.AXES]
    unit = next(a for a in space.AXES if a.name == "level").grid
    assert unit == tuple(round(0.05 * k, 2) for k in range(21))
    for axis in space.AXES:
        assert list(axis.grid) == sorted(set(axis.grid)) and len(axis.grid) >= 6, axis.name
        assert axis.integer == (axis.path[0] == "clip" or axis.path[-1] == "dilate"), axis.name
        assert all(float(v).is_integer() for v in axis.grid) or not axis.integer, axis.name
        if axis.path[0] == "clip":
            assert MAP8_RANGE[0] <= min(axis.grid) and max(axis.grid) <= MAP8_RANGE[1], axis.name
    # every grid value is a valid threshold of the default pipeline (the others as they are)
    pipeline = spec.load(DEFAULT_PIPELINE, check_checkpoints=False)
    for axis in space.AXES:
        for value in axis.grid:
            pipeline.with_thresholds(space.with_value(pipeline.thresholds, axis.path, value))


def test_candidates_keep_the_current_value_and_clip_order():
    thresholds = {"clip": {"low": 13, "high": 200, "outside": 1}, "level": 0.33}
    axes = {a.name: a for a in tune.AXES}
    assert 0.33 in tune.candidates(axes["level"], thresholds)
    assert max(tune.candidates(axes["clip.low"], thresholds)) <= 200 and 13 in tune.candidates(axes["clip.low"], thresholds)
    assert min(tune.candidates(axes["clip.high"], thresholds)) >= 13


def test_candidates_are_the_sorted_grid_plus_the_current_value_cast():
    axes = {a.name: a for a in space.AXES}
    values = space.candidates(axes["clip.outside"], {"clip": {"low": 10, "high": 245, "outside": 4.0}})
    assert values == [1, 2, 3, 4, 5, 10, 20] and all(type(v) is int for v in values)
    values = space.candidates(axes["level"], {"level": 1})
    assert values == sorted(values) and len(values) == 21 and all(type(v) is float for v in values)
    high = space.candidates(axes["clip.high"], {"clip": {"low": 200, "high": 245, "outside": 1}})
    assert high == [215, 230, 240, 245, 250, 252, 254]  # the grid at or above clip.low
    low = space.candidates(axes["clip.low"], {"clip": {"low": 10, "high": 20, "outside": 1}})
    assert low == [1, 2, 3, 5, 7, 10, 15, 20]  # the grid at or below clip.high
    assert space.candidates(axes["clip.low"], {"clip": {"low": 10}}) == [1, 2, 3, 5, 7, 10, 15, 20, 30, 45, 64, 90, 128]


def test_choice_rules_lone_dip_against_a_broad_valley():
    # a lone dip at 0.2 (one image's luck) and a broad valley around 0.7
    curve = tune.Curve([0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9],
                       [1.0, 1.0, 0.50, 1.0, 0.9, 0.62, 0.60, 0.62, 0.9])
    assert curve.values[tune.choose(curve, 0.0, "argmin")] == 0.2
    assert curve.values[tune.choose(curve, 0.0, "smoothed")] == 0.7
    assert tune.choose(curve, 0.2, "argmin") is None  # already at the lowest
    assert tune.choose(curve, 0.7, "smoothed") is None  # already at the smoothed lowest
    flat = tune.Curve([1, 2, 3], [0.5, 0.5, 0.5])
    assert tune.choose(flat, 2, "argmin") is None and tune.choose(flat, 2, "smoothed") is None
    with pytest.raises(ValueError, match="unknown choice rule"):
        tune.choose(curve, 0.0, "median")


def test_choice_rules_at_the_edges_and_off_the_grid():
    edge = search.Curve([1, 2, 3, 4], [0.1, 0.5, 0.9, 0.9])
    assert search.choose(edge, 9, "argmin") == 0  # the current value is not on the curve: the lowest
    assert search.choose(edge, 9, "smoothed") == 0  # the end value counts twice: (0.1 + 0.1 + 0.5) / 3
    assert search.choose(edge, 2, "smoothed") == 0 and search.choose(edge, 1, "smoothed") is None
    right = search.Curve([1, 2, 3, 4], [0.9, 0.9, 0.5, 0.1])
    assert search.choose(right, 1, "smoothed") == 3 and search.choose(right, 1) == 3
    assert search.DEFAULT_CHOICE == "argmin" and search.CHOICES == ("argmin", "smoothed")


def test_sweep_skips_invalid_values_and_averages_the_chosen_images():
    evaluator = Bowl()
    start = copy.deepcopy(START)
    curve = search.sweep(evaluator, {**start, "clip": {"low": 10, "high": 30, "outside": 1}}, ("clip", "low"),
                         [5, 30, 64])
    assert curve.values == [5, 30]  # 64 above clip.high: not a pipeline
    assert curve.metrics == pytest.approx([evaluator.metric(space.with_value(
        {**start, "clip": {"low": 10, "high": 30, "outside": 1}}, ("clip", "low"), v)) for v in (5, 30)])
    seen = []
    subset = search.sweep(evaluator, start, ("level",), [0.5, 0.6], indices=[3], progress=seen.append)
    on_3 = [evaluator.metric(space.with_value(start, ("level",), v), [3]) for v in (0.5, 0.6)]
    assert subset.metrics == on_3 and on_3 != [evaluator.metric(space.with_value(start, ("level",), v)) for v in (0.5, 0.6)]
    assert seen == [1]
    assert search.sweep(evaluator, start, ("level",), []).values == []


def test_coordinate_descent_reaches_the_grid_minimum_and_stops_when_nothing_moves():
    evaluator = Bowl()
    start = copy.deepcopy(START)
    thresholds, metric, curves = search.coordinate_descent(evaluator, start, AXES, rounds=5, progress=False)
    assert thresholds == {"level": 0.65, "right_extent": 0.15, "clip": {"low": 30, "high": 192, "outside": 5}}
    assert metric == pytest.approx(evaluator.metric(thresholds)) and metric < evaluator.metric(start)
    assert start == START  # the start is not modified
    assert set(curves) == {a.name for a in AXES}
    assert curves["level"].metrics[curves["level"].values.index(0.65)] == pytest.approx(metric)
    # round 1 reaches the minimum (the metric is separable), round 2 moves nothing and ends the search
    evaluations = {}
    for rounds in (1, 2, 5):
        counting = Bowl()
        assert search.coordinate_descent(counting, start, AXES, rounds=rounds, progress=False)[0] == thresholds
        evaluations[rounds] = counting.evaluations
    last_round = sum(len(space.candidates(a, thresholds)) for a in AXES)
    assert evaluations[5] == evaluations[2] == evaluations[1] + last_round


def test_coordinate_descent_on_some_images_with_either_rule():
    evaluator = Bowl()
    on_last, _, _ = search.coordinate_descent(evaluator, START, AXES, rounds=3, progress=False, indices=[3])
    on_first, _, _ = search.coordinate_descent(evaluator, START, AXES, rounds=3, progress=False, indices=[0])
    assert on_first["level"] == 0.6 and on_last["level"] == 0.7  # each image's own target (0.72 for image 3)
    smoothed, metric, _ = search.coordinate_descent(evaluator, START, AXES, rounds=3, progress=False, rule="smoothed")
    assert metric <= evaluator.metric(START) and metric == pytest.approx(evaluator.metric(smoothed))
    same, metric0, curves0 = search.coordinate_descent(evaluator, START, AXES, rounds=0, progress=False)
    assert same == START and metric0 == evaluator.metric(START) and curves0 == {}
    with pytest.raises(ValueError, match="unknown choice rule"):
        search.coordinate_descent(evaluator, START, AXES, rounds=1, progress=False, rule="median")


class Flat(Bowl):
    """Every candidate scores the same: no step lowers the metric, so the search never moves."""

    def losses_of(self, candidates, indices=None, progress=None) -> np.ndarray:
        chosen = range(self.n) if indices is None else indices
        return np.full((len(candidates), len(list(chosen))), 0.25)


def test_smoothed_edges_count_the_end_value_twice():
    left = search.Curve([1, 2, 3, 4], [0.0, 0.6, 0.1, 0.5])  # padded with its own end value: (0 + 0 + 0.6) / 3
    assert search.choose(left, 4, "smoothed") == 0
    right = search.Curve([1, 2, 3, 4], [0.5, 0.1, 0.6, 0.0])
    assert search.choose(right, 1, "smoothed") == 3


def test_a_tie_keeps_the_current_value_and_the_metric_is_over_the_chosen_images():
    start = copy.deepcopy(START)
    thresholds, metric, curves = search.coordinate_descent(Flat(), start, AXES, rounds=2, progress=False)
    assert thresholds == START and metric == 0.25 and curves  # equal metrics everywhere: nothing moves
    evaluator = Bowl()
    on_last, _, _ = search.coordinate_descent(evaluator, START, AXES, rounds=3, progress=False, indices=[3])
    again, metric, _ = search.coordinate_descent(evaluator, on_last, AXES, rounds=1, progress=False, indices=[3])
    assert again == on_last  # already the minimum on image 3: the returned metric is the start's, on image 3
    assert metric == evaluator.metric(on_last, [3]) != evaluator.metric(on_last)


def test_sweep_goes_on_past_an_invalid_value_and_clip_high_may_equal_clip_low():
    evaluator = Bowl()
    block = {**copy.deepcopy(START), "clip": {"low": 10, "high": 30, "outside": 1}}
    assert search.sweep(evaluator, block, ("clip", "low"), [5, 64, 30]).values == [5, 30]
    axes = {a.name: a for a in space.AXES}
    assert space.candidates(axes["clip.high"], {"clip": {"low": 215, "high": 245, "outside": 1}})[0] == 215


class Drift(Bowl):
    """The level's target moves on at every sweep, so that every round moves a value: only the number of
    rounds ends the search."""

    def losses_of(self, candidates, indices=None, progress=None) -> np.ndarray:
        self.sweeps = getattr(self, "sweeps", 0) + 1
        self.TARGET = {**Bowl.TARGET, "level": 0.05 * (self.sweeps % 20)}
        return super().losses_of(candidates, indices, progress)


def test_the_search_default_rounds_are_the_command_s():
    import dataclasses

    from pneumomap.infer.tune.options import TuneOptions

    rounds = next(f.default for f in dataclasses.fields(TuneOptions) if f.name == "rounds")
    level = [a for a in AXES if a.name == "level"]
    drift = Drift()
    search.coordinate_descent(drift, START, level, progress=False)
    assert drift.sweeps == 1 + rounds == 4  # the start's metric, then one sweep per round: 3 rounds
