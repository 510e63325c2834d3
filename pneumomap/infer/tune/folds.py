"""Cross-validated tuning: how much of a tuned gain holds on images the search did not see.

``K`` folds of the tuning images (a seeded permutation): for each, the classifier gate is set at
the target true-negative rate of the other folds' negatives and the coordinate descent runs on the
other folds; the held-out fold is scored with the pipeline's own ops, before (the untuned
thresholds) and after. Every image is held out once, so each has a cross-validated loss before and
after; their differences give the cross-validated gain, with a bootstrap interval over images
(`metrics.bootstrap_interval`). The same on all images gives the in-sample gain, which is always
larger. The evaluator's per-image memo is shared by every fold: a fold re-computes nothing another
fold or the final search already computed.

Default: 5 folds when there are at least `MIN_IMAGES_PER_FOLD` images per fold, else none.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.infer.tune.evaluator import BaseEvaluator

DEFAULT_FOLDS = 5
MIN_IMAGES_PER_FOLD = 10


@dataclass
class Gain:
    """Mean losses before/after over some images and the gain (before - after) with its 95% bootstrap
    interval over those images."""

    before: float
    after: float
    gain: float
    gain_ci95: tuple[float, float]

    @classmethod
    def of(cls, before: np.ndarray, after: np.ndarray) -> "Gain":
        """The gain from per-image losses before and after."""
        gain = before - after
        return cls(float(before.mean()), float(after.mean()), float(gain.mean()), metrics.bootstrap_interval(gain))

    def clearly_positive(self) -> bool:
        """Whether the gain's 95% interval lies above zero."""
        low = self.gain_ci95[0]
        return bool(np.isfinite(low) and low > 0)

    def line(self, name: str) -> str:
        """'NAME: before -> after, gain +g (95% interval over images [low, high])'."""
        low, high = self.gain_ci95
        return (f"{name}: {self.before:.5f} -> {self.after:.5f}, gain {self.gain:+.5f} "
                f"(95% interval over images [{low:+.5f}, {high:+.5f}])")


@dataclass
class FoldScore:
    """One held-out fold: its size and its mean loss before and after (tuned on the other folds)."""

    n_images: int
    before: float
    after: float


@dataclass
class Spread:
    """The values one parameter took across the folds."""

    min: float
    max: float
    distinct: int


@dataclass
class CrossValidation:
    """What `cross_validate` gives: the cross-validated `Gain` (every image held out once), the spread of the
    folds' means, each fold's score, and the values each fold's search chose."""

    folds: int
    seed: int
    summary: Gain
    before_spread: float
    after_spread: float
    per_fold: list[FoldScore]
    chosen: dict[str, list]  # parameter -> its value in each fold
    stability: dict[str, Spread]  # the numeric parameters' spreads

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the summary's keys at the top level, after folds and seed)."""
        out = asdict(self)
        return {"folds": self.folds, "seed": self.seed, **out.pop("summary"),
                **{k: v for k, v in out.items() if k not in ("folds", "seed")}}


def default_folds(n_images: int) -> int:
    """5 when every fold holds at least MIN_IMAGES_PER_FOLD images, else 0 (no cross-validation)."""
    return DEFAULT_FOLDS if n_images >= DEFAULT_FOLDS * MIN_IMAGES_PER_FOLD else 0


def fold_indices(n_images: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint, sorted index sets covering range(n_images), from a seeded permutation."""
    order = np.random.RandomState(seed).permutation(n_images)
    return [np.sort(part) for part in np.array_split(order, k)]


def cross_validate(evaluator: BaseEvaluator, before: dict, start_of: Callable[[Sequence[int]], dict],
                   search: Callable[[Sequence[int], dict], dict], k: int, parameters: Callable[[dict], dict],
                   seed: int = 0) -> CrossValidation:
    """The cross-validated metric before and after tuning (module doc).

    ``start_of(train_indices)``: the search's start (the gate at the target TNR of those images);
    ``search(train_indices, start)``: the thresholds tuned on those images; ``parameters(thresholds)``:
    the flat values reported.
    """
    n = evaluator.n_images
    folds = fold_indices(n, k, seed)
    cv_before, cv_after = np.zeros(n), np.zeros(n)
    per_fold, chosen = [], []
    for fold in folds:
        train = np.setdiff1d(np.arange(n), fold)
        tuned = search(train, start_of(train))
        cv_before[fold], cv_after[fold] = evaluator.losses_of([before, tuned], fold)
        per_fold.append(FoldScore(len(fold), float(cv_before[fold].mean()), float(cv_after[fold].mean())))
        chosen.append(parameters(tuned))
    values = {name: [c[name] for c in chosen] for name in chosen[0]}
    return CrossValidation(
        folds=k, seed=seed, summary=Gain.of(cv_before, cv_after),
        before_spread=float(np.array([f.before for f in per_fold]).std()),
        after_spread=float(np.array([f.after for f in per_fold]).std()),
        per_fold=per_fold, chosen=values,
        stability={name: Spread(min(v), max(v), len(set(v)))
                   for name, v in values.items() if all(isinstance(x, (int, float)) for x in v)},
    )
