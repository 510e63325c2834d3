"""Every metric of the project, as pure numpy functions (train, tune, score and demo all call these).

Conventions:
- A score ``s`` is called positive at threshold ``t`` when ``s >= t`` (the gate: below the threshold -> negative).
- Ratios whose denominator is zero (e.g. precision with no predicted positives) are 0.0, as scikit-learn does.
- AUC with a single class in the truth is undefined and returned as NaN.
- Probability maps are either uint8 (p = value / 255, the submission PNGs) or floats in [0, 1].
- Reference maps (the organisers' truth: levels 0, 1/3, 2/3, 1) enter the map metrics as uint8 codes
  (`reference_codes`); `map_metric(name)` is the per-image loss score and tune share.
- Boxes are ``(x, y, width, height)`` rows, x/y the top-left corner in pixels (RSNA layout).

Length (about 470 lines): every metric in one place on purpose, so that train, tune, score and demo
cannot disagree; each function is small and pure.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RSNA_IOU_THRESHOLDS: tuple[float, ...] = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)
DEFAULT_EPS = 1e-7  # p is clipped to [eps, 1 - eps] before the log


# ----------------------------------------------------------------------------- classification

def _binary(y_true) -> np.ndarray:
    """Truth labels as a bool vector (anything non-zero is positive)."""
    return np.asarray(y_true).ravel() != 0


def _scores(scores, n: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size != n:
        raise ValueError(f"{scores.size} scores for {n} labels")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values``, ties given the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(values).ravel(), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def roc_auc(y_true, scores) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count one half); NaN when one class is absent."""
    truth = _binary(y_true)
    scores = _scores(scores, truth.size)
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(scores)[truth].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """2x2 int matrix ``[[tn, fp], [fn, tp]]`` (rows truth 0/1, columns prediction 0/1, scikit-learn layout)."""
    truth, pred = _binary(y_true), _binary(y_pred)
    if truth.size != pred.size:
        raise ValueError(f"{pred.size} predictions for {truth.size} labels")
    return np.bincount(truth.astype(np.intp) * 2 + pred, minlength=4).reshape(2, 2)


def classification_metrics(y_true, scores, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, specificity, F1 and the confusion matrix with ``positive = score >= threshold``."""
    truth = _binary(y_true)
    pred = _scores(scores, truth.size) >= threshold
    (tn, fp), (fn, tp) = confusion_matrix(truth, pred).tolist()
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, truth.size),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def threshold_at_tnr(scores_of_negatives, target_tnr: float = 0.99) -> float:
    """The smallest threshold ``t`` at which at least ``target_tnr`` of the negatives score below ``t``.

    With negatives sorted ``s[0] <= ... <= s[n-1]`` and ``k = ceil(target_tnr * n)``, that is the next float
    above ``s[k-1]`` (ties at ``s[k-1]`` fall below it too). ``target_tnr == 0`` gives ``s[0]``.
    """
    negatives = np.sort(np.asarray(scores_of_negatives, dtype=np.float64).ravel())
    if negatives.size == 0:
        raise ValueError("threshold_at_tnr needs at least one negative score")
    if not 0.0 <= target_tnr <= 1.0:
        raise ValueError(f"target_tnr must be in [0, 1], got {target_tnr}")
    k = int(np.ceil(target_tnr * negatives.size - 1e-9))
    if k == 0:
        return float(negatives[0])
    return float(np.nextafter(negatives[k - 1], np.inf))


def _counts_by_threshold(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Distinct thresholds (descending) with the true/false positive counts at ``score >= threshold``."""
    truth = _binary(y_true)
    scores = _scores(scores, truth.size)
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(truth)[last_of_group]
    fps = (last_of_group + 1) - tps
    n_pos = int(truth.sum())
    return scores[last_of_group], tps, fps, n_pos, truth.size - n_pos


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: one point per distinct score (descending) after a first point (0, 0) at +inf."""
    thresholds, tps, fps, n_pos, n_neg = _counts_by_threshold(y_true, scores)
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.zeros(tps.size + 1)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.zeros(fps.size + 1)
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)``, one point per distinct score, thresholds descending."""
    thresholds, tps, fps, n_pos, _ = _counts_by_threshold(y_true, scores)
    precision = tps / (tps + fps)  # tps + fps >= 1 at every distinct threshold
    recall = tps / n_pos if n_pos else np.zeros(tps.size)
    return precision, recall, thresholds


def mae(y_true, y_pred) -> float:
    """Mean absolute error (regression, e.g. the lung extents)."""
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    if y_true.size != y_pred.size:
        raise ValueError(f"{y_pred.size} predictions for {y_true.size} targets")
    return float(np.abs(y_true - y_pred).mean()) if y_true.size else float("nan")


def bootstrap_interval(values: Sequence, statistic=None, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 42) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over resamples of ``values``
    (rows, drawn with replacement), computed as the organisers' scorer computes its AUC interval:
    1,000 resamples of ``RandomState(42).randint``, a resample whose statistic is undefined (NaN, e.g.
    an AUC with one class) left out, the bounds at positions ``int(0.025 n)`` and ``int(0.975 n)`` of
    the sorted values."""
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    statistic = statistic or (lambda v: float(np.mean(v)))
    rng = np.random.RandomState(seed)
    results = []
    for _ in range(n_boot):
        value = statistic(values[rng.randint(0, len(values), len(values))])
        if np.isfinite(value):
            results.append(value)
    if not results:
        return float("nan"), float("nan")
    results.sort()
    tail = (1.0 - level) / 2.0
    return float(results[int(tail * len(results))]), float(results[min(int((1.0 - tail) * len(results)),
                                                                          len(results) - 1)])


# ----------------------------------------------------------------------------- maps

def _check_shapes(prob_map: np.ndarray, truth_mask: np.ndarray) -> None:
    if prob_map.shape != truth_mask.shape:
        raise ValueError(f"map shape {prob_map.shape} != truth shape {truth_mask.shape}")


def to_probability(prob_map) -> np.ndarray:
    """A map as float probabilities: uint8 -> value / 255, floats unchanged."""
    prob_map = np.asarray(prob_map)
    if prob_map.dtype == np.uint8:
        return prob_map.astype(np.float64) / 255.0
    return prob_map.astype(np.float64, copy=False)


def _log_loss_sums(prob_map: np.ndarray, truth: np.ndarray, eps: float) -> tuple[float, float]:
    """Sums of -log p over opacity pixels and -log(1 - p) over clear pixels."""
    if prob_map.dtype == np.uint8:  # 256-entry lookup tables: one bincount pass, no per-pixel log
        p = np.clip(np.arange(256) / 255.0, eps, 1.0 - eps)
        counts = np.bincount((prob_map.ravel().astype(np.intp) << 1) | truth.ravel(), minlength=512)
        clear, opacity = counts[0::2], counts[1::2]
        return float(opacity @ -np.log(p)), float(clear @ -np.log1p(-p))
    p = np.clip(to_probability(prob_map), eps, 1.0 - eps)
    return float(-np.log(p[truth]).sum()), float(-np.log1p(-p[~truth]).sum())


def map_log_loss(prob_map, truth_mask, pos_weight: float = 1.0, neg_weight: float = 1.0,
                 eps: float = DEFAULT_EPS) -> float:
    """Weighted pixel log loss of one map (class-balanced by default).

    ``pos_weight * mean(-log p | opacity) + neg_weight * mean(-log(1 - p) | clear)``, p clipped to
    ``[eps, 1 - eps]``; a term whose pixel set is empty is left out (an image without opacity scores the
    clear term only).
    """
    prob_map = np.asarray(prob_map)
    truth = np.asarray(truth_mask, dtype=bool)
    _check_shapes(prob_map, truth)
    n_opacity = int(np.count_nonzero(truth))
    n_clear = truth.size - n_opacity
    opacity_sum, clear_sum = _log_loss_sums(prob_map, truth, eps)
    loss = 0.0
    if n_opacity:
        loss += pos_weight * opacity_sum / n_opacity
    if n_clear:
        loss += neg_weight * clear_sum / n_clear
    return float(loss)


def dice(prob_map, truth_mask, threshold: float = 0.5) -> float:
    """Dice of ``p >= threshold`` against the truth mask; 1.0 when both are empty."""
    prob_map = np.asarray(prob_map)
    truth = np.asarray(truth_mask, dtype=bool)
    _check_shapes(prob_map, truth)
    pred = to_probability(prob_map) >= threshold
    den = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    return 1.0 if den == 0 else 2.0 * int(np.count_nonzero(pred & truth)) / den


# ----------------------------------------------------------------------------- the organisers' map metric

MIDRC_LEVELS: tuple[float, ...] = (0, 1 / 3, 2 / 3, 1)  # reference levels: share of the 3 readers marking a pixel
MIDRC_WEIGHTS: tuple[int, ...] = (1, 15, 30, 45)       # the organisers' sample weight of each level
# Reference codes (`reference_codes`): 0-3 the four levels, 4 any other value > 0, 5 any other value < 0
# (the organisers' weighting falls back to 1 for both; the label is ``reference > 0``).
CODE_LABELS = np.array([0, 1, 1, 1, 1, 0], dtype=np.intp)
CODE_WEIGHTS = np.array([*MIDRC_WEIGHTS, 1, 1], dtype=np.float64)
N_CODES = len(CODE_LABELS)


def reference_codes(reference) -> np.ndarray:
    """uint8 code per pixel of a reference map, by the organisers' exact comparisons on its own dtype.

    0: ``== 0``, 1: ``== 1/3``, 2: ``== 2/3``, 3: ``== 1`` (weights 1, 15, 30, 45); 4: any other value
    ``> 0`` (label 1, weight 1); 5: any value ``< 0`` (label 0, weight 1). NaN is an error.
    """
    reference = np.asarray(reference)
    if reference.dtype.kind not in "biuf":
        raise ValueError(f"reference map of dtype {reference.dtype}: expected numbers")
    if reference.dtype.kind == "f" and np.isnan(reference).any():
        raise ValueError("reference map contains NaN")
    codes = np.where(reference > 0, np.uint8(4), np.uint8(5))
    for code, level in enumerate(MIDRC_LEVELS):  # the organisers' comparisons (== 0, == 1/3, == 2/3, == 1)
        codes[reference == level] = code
    return codes.astype(np.uint8, copy=False)


def _check_codes(prob_map: np.ndarray, codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if prob_map.shape != codes.shape:
        raise ValueError(f"map shape {prob_map.shape} != reference shape {codes.shape}")
    if codes.dtype != np.uint8:
        raise ValueError(f"reference codes must be uint8 (metrics.reference_codes), got {codes.dtype}")
    if prob_map.size == 0:
        raise ValueError("empty map")
    return codes


def _float32_losses(p32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(-log(1 - p), -log p) as scikit-learn 1.5.1's log_loss computes them from float32 ``p``.

    ``[1 - p, p]`` in float32 from the unclipped p, each clipped to ``[eps, 1 - eps]`` with float32's eps,
    then the log in float64 of those float32 values (``xlogy`` with integer labels).
    """
    p32 = np.asarray(p32, dtype=np.float32)
    eps = np.finfo(np.float32).eps
    clear = np.clip(np.float32(1) - p32, eps, np.float32(1) - eps)
    opacity = np.clip(p32, eps, np.float32(1) - eps)
    return -np.log(clear.astype(np.float64)), -np.log(opacity.astype(np.float64))


_BYTE_P32 = np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0  # the organisers' PNG -> p
_BYTE_LOSS = np.stack(_float32_losses(_BYTE_P32))  # (2, 256): row = label 0 / 1
_CODE_BYTE_LOSS = CODE_WEIGHTS[:, None] * _BYTE_LOSS[CODE_LABELS]  # (6, 256): weight * loss per code and byte


def midrc_log_loss(prob_map, codes) -> float:
    """The organisers' weighted log loss of one map (their per-image number, scikit-learn 1.5.1's log_loss).

    ``prob_map``: the submitted uint8 PNG values (p = value / 255 in float32); a float map in [0, 1] is taken
    as that float32 p. ``codes``: `reference_codes` of the reference map, the same shape. The loss is
    ``sum(w * -log q) / sum(w)`` over pixels, q = p on label-1 pixels and 1 - p on label-0 pixels, clipped
    to float32's ``[eps, 1 - eps]``; w and the label follow the code (MIDRC_WEIGHTS; 1 for codes 4 and 5).
    """
    prob_map = np.asarray(prob_map)
    codes = _check_codes(prob_map, codes)
    if prob_map.dtype == np.uint8:  # 256-entry tables: one bincount, no per-pixel log
        return midrc_loss_of_counts(joint_counts(prob_map, codes))
    if np.any(codes >= N_CODES):
        raise ValueError(f"reference codes above {N_CODES - 1}")
    clear, opacity = _float32_losses(prob_map.astype(np.float32))
    flat = codes.ravel().astype(np.intp)
    loss = np.where(CODE_LABELS[flat] == 1, opacity.ravel(), clear.ravel())
    weights = CODE_WEIGHTS[flat]
    return float(np.sum(loss * weights) / np.sum(weights))


def joint_counts(map8, codes) -> np.ndarray:
    """int64 (N_CODES, 256): how many pixels of each reference code hold each byte value of the uint8 map."""
    map8 = np.asarray(map8)
    codes = _check_codes(map8, codes)
    if map8.dtype != np.uint8:
        raise ValueError(f"joint_counts needs a uint8 map, got {map8.dtype}")
    counts = np.bincount(codes.ravel().astype(np.intp) * 256 + map8.ravel(), minlength=N_CODES * 256)
    if counts.size > N_CODES * 256:
        raise ValueError(f"reference codes above {N_CODES - 1}")
    return counts.reshape(N_CODES, 256)


def midrc_loss_of_counts(counts: np.ndarray) -> float:
    """`midrc_log_loss` of a uint8 map from its `joint_counts`: the same sum, so the same number."""
    total = float(np.sum(counts * _CODE_BYTE_LOSS))
    weight = float(counts.sum(axis=1) @ CODE_WEIGHTS)
    return total / weight


def codes_to_truth(codes) -> np.ndarray:
    """bool opacity truth of reference codes: the organisers' label (reference > 0), codes 1-4."""
    codes = np.asarray(codes)
    if codes.size and int(codes.max()) >= N_CODES:
        raise ValueError(f"reference codes above {N_CODES - 1}")
    return CODE_LABELS[codes.astype(np.intp)].astype(bool)


class MapMetric:
    """A per-image map loss that `pneumomap score` and `pneumomap tune` share (lower is better)."""

    name = ""

    def loss(self, map8: np.ndarray, codes: np.ndarray) -> float:
        """The loss of one uint8 map against the uint8 reference codes of its image (same shape)."""
        return self.loss_of_counts(joint_counts(map8, codes))

    def loss_of_counts(self, counts: np.ndarray) -> float:
        """The loss from the map's `joint_counts` with its codes (all a uint8 map's loss depends on)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class MidrcMetric(MapMetric):
    """The MIDRC XAI organisers' weighted log loss (`midrc_log_loss`)."""

    name = "midrc"

    def loss_of_counts(self, counts: np.ndarray) -> float:
        return midrc_loss_of_counts(counts)

    def describe(self) -> str:
        return "midrc: the organisers' weighted log loss (weights 1/15/30/45 by reference level)"


class BalancedMetric(MapMetric):
    """`map_log_loss` (class-balanced, p clipped to 1e-7) with truth = the reference's positive pixels."""

    name = "balanced"

    def __init__(self, pos_weight: float = 1.0, neg_weight: float = 1.0):
        self.pos_weight, self.neg_weight = float(pos_weight), float(neg_weight)

    def loss_of_counts(self, counts: np.ndarray) -> float:
        """`map_log_loss` from the counts: the same per-byte tables and integer counts as its uint8 path."""
        labels = CODE_LABELS[:counts.shape[0]] == 1
        opacity, clear = counts[labels].sum(axis=0), counts[~labels].sum(axis=0)
        p = np.clip(np.arange(256) / 255.0, DEFAULT_EPS, 1.0 - DEFAULT_EPS)
        n_opacity, n_clear = int(opacity.sum()), int(clear.sum())
        loss = 0.0
        if n_opacity:
            loss += self.pos_weight * float(opacity @ -np.log(p)) / n_opacity
        if n_clear:
            loss += self.neg_weight * float(clear @ -np.log1p(-p)) / n_clear
        return float(loss)

    def describe(self) -> str:
        return f"balanced: class-balanced log loss, pos weight {self.pos_weight:g}, neg weight {self.neg_weight:g}"


MAP_METRICS: tuple[str, ...] = ("midrc", "balanced")
DEFAULT_MAP_METRIC = "midrc"


def map_metric(name: str, pos_weight: float = 1.0, neg_weight: float = 1.0) -> MapMetric:
    """The map metric called ``name`` (MAP_METRICS); the weights apply to ``balanced`` only."""
    if name == "midrc":
        return MidrcMetric()
    if name == "balanced":
        return BalancedMetric(pos_weight, neg_weight)
    raise ValueError(f"unknown map metric {name!r}; choose one of {', '.join(MAP_METRICS)}")


# ----------------------------------------------------------------------------- RSNA boxes

def _as_boxes(boxes) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of ``(x, y, width, height)`` boxes (continuous coordinates)."""
    a, b = _as_boxes(boxes_a), _as_boxes(boxes_b)
    ax1, ay1, bx1, by1 = a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1]
    ax2, ay2 = ax1 + a[:, None, 2], ay1 + a[:, None, 3]
    bx2, by2 = bx1 + b[None, :, 2], by1 + b[None, :, 3]
    inter = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None) * \
        np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    union = (a[:, None, 2] * a[:, None, 3]) + (b[None, :, 2] * b[None, :, 3]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy_true_positives(iou: np.ndarray, threshold: float) -> int:
    """Predictions (rows, already in descending confidence) each take the unmatched truth of highest IoU > t."""
    free = np.ones(iou.shape[1], dtype=bool)
    tp = 0
    for row in iou:
        candidates = np.where(free & (row > threshold), row, -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] > threshold:
            free[best] = False
            tp += 1
    return tp


def rsna_image_precision(truth_boxes, pred_boxes, confidences=None,
                         thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS) -> float | None:
    """Kaggle RSNA score of one image: mean over IoU thresholds of TP / (TP + FP + FN).

    Predictions are taken in descending confidence; each matches the still unmatched truth box of highest
    IoU when that IoU is greater than the threshold. Returns None when the image has neither truth nor
    predictions (Kaggle skipped those); predictions without truth, or truth without predictions, give 0.
    """
    truth, pred = _as_boxes(truth_boxes), _as_boxes(pred_boxes)
    if len(truth) == 0 and len(pred) == 0:
        return None
    if len(truth) == 0 or len(pred) == 0:
        return 0.0
    if confidences is not None:
        conf = np.asarray(confidences, dtype=np.float64).ravel()
        if conf.size != len(pred):
            raise ValueError(f"{conf.size} confidences for {len(pred)} boxes")
        pred = pred[np.argsort(-conf, kind="mergesort")]
    iou = box_iou(pred, truth)
    scores = []
    for t in thresholds:
        tp = _greedy_true_positives(iou, t)
        scores.append(tp / (len(pred) + len(truth) - tp))  # TP + FP + FN
    return float(np.mean(scores))


def rsna_map(truth: Mapping[str, object], predictions: Mapping[str, tuple[object, object]],
             ids: Sequence[str] | None = None,
             thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS) -> float:
    """Kaggle RSNA mAP: mean of ``rsna_image_precision`` over the images it does not skip (NaN if all skipped).

    ``truth[id]`` is an (n, 4) box array; ``predictions[id] = (confidences, boxes)``; a missing id has none.
    """
    ids = list(truth) if ids is None else list(ids)
    values = []
    for image_id in ids:
        confidences, boxes = predictions.get(image_id, ((), ()))
        value = rsna_image_precision(truth.get(image_id, ()), boxes, confidences, thresholds)
        if value is not None:
            values.append(value)
    return float(np.mean(values)) if values else float("nan")
