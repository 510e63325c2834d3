"""pneumomap.metrics as properties against independent computations (issue 19: the mutants `test_metrics` let live).

The oracles here are written from the definitions (per-pixel weights and float32 clipping of the organisers'
metric, counts of negatives below a threshold, sorted-order greedy matching), not from the code under test.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn import metrics as skm

from pneumomap import metrics
from properties import FAST
from test_metrics import oracle_image_map, oracle_log_loss

LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)


# ----------------------------------------------------------------------------- the map metrics

def independent_midrc(png: np.ndarray, reference: np.ndarray) -> float:
    """The organisers' weighted log loss from its definition: label reference > 0, weight 1/15/30/45 by level (1 for
    any other value), p = png / 255 in float32, q = p or 1 - p in float32 clipped to float32's [eps, 1 - eps]."""
    eps = np.finfo(np.float32).eps
    total = weight_sum = 0.0
    for value, ref in zip(png.ravel(), reference.ravel()):
        p = np.float32(value) / np.float32(255.0) if png.dtype == np.uint8 else np.float32(value)
        q = p if ref > 0 else np.float32(1) - p
        q = min(max(q, eps), np.float32(1) - eps)
        weight = {0.0: 1, 1 / 3: 15, 2 / 3: 30, 1.0: 45}.get(float(ref), 1)
        total += weight * -math.log(float(q))
        weight_sum += weight
    return total / weight_sum


@st.composite
def map_and_reference(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    reference = np.asarray(LEVELS)[rng.integers(0, 4, shape)]
    if draw(st.booleans()):  # values the organisers weigh 1: another positive level, a negative one
        reference[rng.random(shape) < 0.2] = draw(st.sampled_from([0.5, 2.0, -0.25]))
    png = rng.integers(0, 256, shape, dtype=np.uint8)
    png[rng.random(shape) < 0.2] = draw(st.sampled_from([0, 255]))
    return png, reference


@FAST
@given(map_and_reference())
def test_midrc_metric_equals_the_definition_on_random_maps(case):
    png, reference = case
    codes = metrics.reference_codes(reference)
    expected = independent_midrc(png, reference)
    assert metrics.map_metric("midrc").loss(png, codes) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    as_float = png.astype(np.float32) / np.float32(255.0)
    assert metrics.midrc_log_loss(as_float, codes) == pytest.approx(independent_midrc(as_float, reference), rel=1e-9)


@FAST
@given(map_and_reference(), st.sampled_from([(1.0, 1.0), (3.0, 0.5), (0.5, 4.0)]))
def test_balanced_metric_equals_the_loop_oracle_on_random_maps(case, weights):
    png, reference = case
    expected = oracle_log_loss(png / 255.0, reference > 0, *weights)
    assert metrics.map_metric("balanced", *weights).loss(png, metrics.reference_codes(reference)) == pytest.approx(
        expected, rel=1e-10)
    assert metrics.BalancedMetric(*weights).loss(png, metrics.reference_codes(reference)) == pytest.approx(expected,
                                                                                                           rel=1e-10)


def test_swapping_the_class_weights_scales_each_term_by_its_weight():
    rng = np.random.default_rng(4)
    png = rng.integers(1, 255, (20, 30), dtype=np.uint8)
    truth = rng.random((20, 30)) < 0.3
    opacity = metrics.map_log_loss(png, truth, 1.0, 0.0)
    clear = metrics.map_log_loss(png, truth, 0.0, 1.0)
    assert opacity > 0 and clear > 0 and not math.isclose(opacity, clear)
    assert metrics.map_log_loss(png, truth, 5.0, 2.0) == pytest.approx(5 * opacity + 2 * clear, rel=1e-12)
    assert metrics.map_log_loss(png, truth, 2.0, 5.0) == pytest.approx(2 * opacity + 5 * clear, rel=1e-12)
    assert metrics.BalancedMetric().loss(png, truth.astype(np.uint8)) == pytest.approx(opacity + clear, rel=1e-12)


def test_map_log_loss_takes_any_truth_mask_as_bool():
    rng = np.random.default_rng(8)
    values = rng.random((10, 12))
    truth = rng.random((10, 12)) < 0.4
    expected = oracle_log_loss(values, truth)
    for mask in (truth.astype(np.uint8) * 255, truth.astype(np.int64), truth):
        assert metrics.map_log_loss(values, mask) == pytest.approx(expected, rel=1e-12)
        assert metrics.map_log_loss((values * 255).astype(np.uint8), mask) == pytest.approx(
            oracle_log_loss((values * 255).astype(np.uint8) / 255.0, truth), rel=1e-12)


def test_map_metric_errors_name_the_problem():
    png = np.zeros((2, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^reference codes above 5$"):
        metrics.midrc_log_loss(png, np.full((2, 3), 6, np.uint8))
    with pytest.raises(ValueError, match=r"^reference codes above 5$"):
        metrics.midrc_log_loss(png.astype(np.float32), np.full((2, 3), 6, np.uint8))
    with pytest.raises(ValueError, match=r"^reference map of dtype <U1: expected numbers$"):
        metrics.reference_codes(np.array(["a"]))
    with pytest.raises(ValueError, match=r"^reference map contains NaN$"):
        metrics.reference_codes(np.array([np.nan]))


def test_metric_descriptions_and_defaults():
    assert metrics.MidrcMetric().describe() == \
        "midrc: the organisers' weighted log loss (weights 1/15/30/45 by reference level)"
    assert repr(metrics.MidrcMetric()) == f"MidrcMetric({metrics.MidrcMetric().describe()})"
    balanced = metrics.BalancedMetric()
    assert (balanced.pos_weight, balanced.neg_weight) == (1.0, 1.0)
    assert balanced.describe() == "balanced: class-balanced log loss, pos weight 1, neg weight 1"


# ----------------------------------------------------------------------------- thresholds and curves

@FAST
@given(st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 1.0]) | st.floats(0, 1), min_size=1,
                max_size=40),
       st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0]) | st.floats(0, 1))
def test_a_threshold_at_the_target_tnr_keeps_that_tnr_on_the_data(negatives, target):
    negatives = np.array(negatives)
    t = metrics.threshold_at_tnr(negatives, target)
    assert np.mean(negatives < t) >= target - 1e-9  # the target TNR holds on the data
    if target > 0:  # and no smaller threshold reaches it
        assert np.mean(negatives < np.nextafter(t, -np.inf)) < target - 1e-9 or t == negatives.min()
    else:
        assert t == negatives.min()


def test_threshold_at_tnr_edges():
    negatives = np.arange(10) / 10
    assert metrics.threshold_at_tnr(negatives, 0.1) == np.nextafter(0.0, 1.0)  # k = 1: above the smallest
    assert metrics.threshold_at_tnr(negatives, 0.0) == 0.0
    assert metrics.threshold_at_tnr(negatives) == metrics.threshold_at_tnr(negatives, 0.99) == np.nextafter(0.9, 1)
    scores32 = np.array([0.3, 0.6], np.float32)  # the next float64 above the score, whatever the input dtype
    assert metrics.threshold_at_tnr(scores32, 0.5) == np.nextafter(np.float64(np.float32(0.3)), np.inf)
    with pytest.raises(ValueError, match=r"^threshold_at_tnr needs at least one negative score$"):
        metrics.threshold_at_tnr([], 0.9)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^target_tnr must be in \[0, 1\], got {bad}$"):
            metrics.threshold_at_tnr(negatives, bad)


@pytest.mark.parametrize("label", [0, 1])
def test_roc_and_precision_recall_curves_with_one_class(label):
    scores = [0.2, 0.5, 0.5, 0.9]
    fpr, tpr, thresholds = metrics.roc_curve([label] * 4, scores)
    assert len(fpr) == len(tpr) == len(thresholds) == 4 and thresholds[0] == np.inf
    assert np.array_equal(tpr if label == 0 else fpr, np.zeros(4))
    assert np.array_equal(fpr if label == 0 else tpr, [0.0, 1 / 4, 3 / 4, 1.0])
    precision, recall, _ = metrics.precision_recall_curve([label] * 4, scores)
    assert np.array_equal(recall, [0.0] * 3 if label == 0 else [1 / 4, 3 / 4, 1.0])
    assert np.array_equal(precision, [float(label)] * 3)


@FAST
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0])), min_size=2, max_size=30),
       st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0, 1.1]))
def test_classification_metrics_count_every_cell(rows, threshold):
    y = np.array([t for t, _ in rows], dtype=int)
    s = np.array([v for _, v in rows])
    got = metrics.classification_metrics(y, s, threshold)
    pred = s >= threshold
    tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
    fn, tn = int(np.sum(~pred & (y == 1))), int(np.sum(~pred & (y == 0)))
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
    assert got["confusion_matrix"] == [[tn, fp], [fn, tp]] and got["threshold"] == threshold
    assert got["accuracy"] == pytest.approx((tp + tn) / len(y))
    assert got["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
    assert got["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 0.0)
    assert got["specificity"] == pytest.approx(tn / (tn + fp) if tn + fp else 0.0)
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred.astype(int), zero_division=0))


def test_mae_of_integers_and_of_nothing():
    assert metrics.mae(np.array([0, 200], np.uint8), np.array([1, 100], np.uint8)) == 50.5  # no uint8 wrap-around
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.mae([], []))  # no 'mean of empty slice' warning
    with pytest.raises(ValueError, match=r"^1 predictions for 2 targets$"):
        metrics.mae([0.1, 0.2], [0.3])


# ----------------------------------------------------------------------------- RSNA boxes

def test_box_iou_of_tiny_and_empty_boxes():
    iou = metrics.box_iou([[0, 0, 0.5, 0.5], [3, 3, 0, 0]], [[0, 0, 0.5, 0.25], [3, 3, 0, 0]])
    assert iou[0, 0] == pytest.approx(0.5) and iou[1, 1] == 0.0 and iou[0, 1] == 0.0 and iou[1, 0] == 0.0
    empty = [[3 + k, 4 + k, 0, 0] for k in range(30)]  # no union anywhere: 0, never uninitialised memory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not metrics.box_iou(empty, empty).any()


def test_tied_confidences_keep_the_submission_order():
    truth = [[0, 0, 100, 100], [50, 0, 100, 100]]
    wide, exact = [20, 0, 100, 100], [0, 0, 100, 100]  # wide first: it takes truth 0 and exact is left over
    far = [[1000 + 20 * k, 1000, 5, 5] for k in range(28)]
    boxes = [far[0], wide, exact, *far[1:]] + [[2000 + 20 * k, 2000, 5, 5] for k in range(10)]
    confidences = [0.5] * 30 + list(np.random.default_rng(0).random(10))  # numpy's quicksort swaps 1 and 2 here
    expected = oracle_image_map(truth, list(zip(confidences, boxes)))  # a stable sort by confidence
    assert expected == pytest.approx(1 / 41)  # wide first: one hit at every threshold, 39 false positives, 1 miss
    assert metrics.rsna_image_precision(truth, boxes, confidences) == pytest.approx(expected)
    uint8 = np.array([1, 0], np.uint8)  # integer confidences sort as numbers (-0 is not above -1)
    assert metrics.rsna_image_precision(truth, [wide, exact], uint8) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"^1 confidences for 2 boxes$"):
        metrics.rsna_image_precision(truth, [wide, exact], [0.5])


def test_rsna_map_over_chosen_ids_and_thresholds():
    truth = {"a": np.array([[0, 0, 10, 10]]), "b": np.array([[0, 0, 10, 10]])}
    predictions = {"a": ([0.9], [[0, 0, 10, 10]]), "b": ([0.9], [[0, 0, 10, 6]]), "c": ([0.9], [[0, 0, 5, 5]])}
    assert metrics.rsna_map(truth, predictions, ids=["a"]) == 1.0
    two = {"t": np.array([[0, 0, 100, 100], [50, 0, 100, 100]])}
    ordered = {"t": ([0.1, 0.9], [[20, 0, 100, 100], [0, 0, 100, 100]])}  # the exact box first, by confidence
    assert metrics.rsna_map(two, ordered) == pytest.approx((3 * 1.0 + 5 / 3) / 8)
    assert metrics.rsna_map(truth, predictions, ids=["b"]) == 4 / 8  # IoU 0.6: hits at 0.40-0.55
    assert metrics.rsna_map(truth, predictions, ids=["b"], thresholds=(0.5,)) == 1.0
    assert metrics.rsna_map(truth, predictions, ids=["b"], thresholds=(0.7,)) == 0.0
    assert metrics.rsna_map(truth, predictions, ids=["c"]) == 0.0  # an id without truth boxes: its boxes are false
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.rsna_map(truth, {}, ids=["z"]))  # nothing to score: NaN, no warning


# ----------------------------------------------------------------------------- helpers every metric relies on

def oracle_bootstrap(values: np.ndarray, statistic, n_boot: int, level: float) -> tuple[float, float]:
    """The organisers' recipe: RandomState(42) resamples, undefined statistics left out, sorted, two positions."""
    rng = np.random.RandomState(42)
    stats = [statistic(values[rng.randint(0, len(values), len(values))]) for _ in range(n_boot)]
    stats = sorted(s for s in stats if np.isfinite(s))
    tail = (1 - level) / 2
    return stats[int(tail * len(stats))], stats[min(int((1 - tail) * len(stats)), len(stats) - 1)]


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.sampled_from([0.5, 0.9, 0.95, 1.0]))
def test_bootstrap_interval_is_the_organisers_recipe(values, level):
    values = np.array(values)
    got = metrics.bootstrap_interval(values, n_boot=40, level=level)
    assert got == pytest.approx(oracle_bootstrap(values, np.mean, 40, level), abs=1e-12)
    assert got == metrics.bootstrap_interval(values, lambda v: float(np.mean(v)), 40, level, 42)


def test_bootstrap_interval_edges():
    assert metrics.bootstrap_interval([0.3], n_boot=10) == (0.3, 0.3)
    assert all(math.isnan(v) for v in metrics.bootstrap_interval([], n_boot=10))
    one_class = np.column_stack([np.zeros(5), np.arange(5)])  # every resample's AUC is undefined
    assert all(math.isnan(v) for v in metrics.bootstrap_interval(
        one_class, lambda r: metrics.roc_auc(r[:, 0], r[:, 1]), n_boot=10))


def test_scores_of_any_dtype_and_their_errors():
    y = np.array([0, 1, 0, 1, 1])
    uint8 = np.array([10, 200, 0, 255, 30], np.uint8)  # no wrap-around when negated for sorting
    for got, expected in zip(metrics.roc_curve(y, uint8), metrics.roc_curve(y, uint8.astype(float))):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match=r"^2 scores for 3 labels$"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"^scores contain NaN$"):
        metrics.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match=r"^2 predictions for 3 labels$"):
        metrics.confusion_matrix([0, 1, 1], [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))  # one class: NaN, no division warning
    assert metrics.classification_metrics([0, 1, 1], [0.5, 0.49, 0.9]) == \
        metrics.classification_metrics([0, 1, 1], [0.5, 0.49, 0.9], 0.5)


def test_codes_maps_and_probabilities_edges():
    codes = np.array([0, 1, 2, 3, 4, 5], np.uint8)
    truth = metrics.codes_to_truth(codes)
    assert truth.dtype == bool and truth.tolist() == [False, True, True, True, True, False]
    with pytest.raises(ValueError, match=r"^reference codes above 5$"):
        metrics.codes_to_truth(np.array([6], np.uint8))
    png = np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"^reference codes must be uint8 \(metrics.reference_codes\), got int64$"):
        metrics.midrc_log_loss(png, np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"^empty map$"):
        metrics.midrc_log_loss(np.zeros((0, 2), np.uint8), np.zeros((0, 2), np.uint8))
    with pytest.raises(ValueError, match=r"^joint_counts needs a uint8 map, got float32$"):
        metrics.joint_counts(png.astype(np.float32), np.zeros((2, 2), np.uint8))
    assert metrics.to_probability(np.array([255, 51], np.uint8)).tolist() == [1.0, 0.2]
    assert metrics.to_probability(np.array([0.25], np.float32)).dtype == np.float64
    balanced = metrics.map_metric("balanced")
    assert (balanced.pos_weight, balanced.neg_weight) == (1.0, 1.0)


def test_dice_threshold_is_inclusive_and_truth_is_any_nonzero():
    prob = np.array([[128, 127, 200, 0]], np.uint8)
    truth = np.array([[2, 2, 0, 0]], np.uint8)  # 2, not 1 or 255: non-zero is opacity
    assert metrics.dice(prob, truth, threshold=128 / 255) == pytest.approx(2 * 1 / (2 + 2))
    assert metrics.dice(prob, truth, threshold=0.6) == 0.0
