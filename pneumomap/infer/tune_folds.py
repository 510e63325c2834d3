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

from typing import Any, Callable, Sequence

import numpy as np

from pneumomap import metrics

DEFAULT_FOLDS = 5
MIN_IMAGES_PER_FOLD = 10


def default_folds(n_images: int) -> int:
    """5 when every fold holds at least MIN_IMAGES_PER_FOLD images, else 0 (no cross-validation)."""
    return DEFAULT_FOLDS if n_images >= DEFAULT_FOLDS * MIN_IMAGES_PER_FOLD else 0


def fold_indices(n_images: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint, sorted index sets covering range(n_images), from a seeded permutation."""
    order = np.random.RandomState(seed).permutation(n_images)
    return [np.sort(part) for part in np.array_split(order, k)]


def gain_summary(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """Mean losses before/after and the gain (before - after) with its 95% bootstrap interval over images."""
    gain = before - after
    low, high = metrics.bootstrap_interval(gain)
    return {"before": float(before.mean()), "after": float(after.mean()), "gain": float(gain.mean()),
            "gain_ci95": [low, high]}


def cross_validate(evaluator: Any, before: dict, start_of: Callable[[Sequence[int]], dict],
                   search: Callable[[Sequence[int], dict], dict], k: int, parameters: Callable[[dict], dict],
                   seed: int = 0) -> dict[str, Any]:
    """The cross-validated metric before and after tuning (module doc).

    ``evaluator``: an `evaluator.BaseEvaluator`; ``start_of(train_indices)``: the search's start (the gate
    at the target TNR of those images); ``search(train_indices, start)``: the thresholds tuned on those
    images; ``parameters(thresholds)``: the flat values reported.
    """
    n = evaluator.n_images
    folds = fold_indices(n, k, seed)
    cv_before, cv_after = np.zeros(n), np.zeros(n)
    per_fold, chosen = [], []
    for fold in folds:
        train = np.setdiff1d(np.arange(n), fold)
        tuned = search(train, start_of(train))
        cv_before[fold], cv_after[fold] = evaluator.losses_of([before, tuned], fold)
        per_fold.append({"n_images": len(fold), "before": float(cv_before[fold].mean()),
                         "after": float(cv_after[fold].mean())})
        chosen.append(parameters(tuned))
    after_by_fold = np.array([f["after"] for f in per_fold])
    before_by_fold = np.array([f["before"] for f in per_fold])
    values = {name: [c[name] for c in chosen] for name in chosen[0]}
    return {
        "folds": k, "seed": seed, **gain_summary(cv_before, cv_after),
        "before_spread": float(before_by_fold.std()), "after_spread": float(after_by_fold.std()),
        "per_fold": per_fold,
        "chosen": values,
        "stability": {name: {"min": min(v), "max": max(v), "distinct": len(set(v))}
                      for name, v in values.items() if all(isinstance(x, (int, float)) for x in v)},
    }


def clearly_positive(summary: dict[str, Any]) -> bool:
    """Whether the gain's 95% interval lies above zero."""
    low = summary["gain_ci95"][0]
    return bool(np.isfinite(low) and low > 0)
