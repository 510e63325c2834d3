"""Score a submission folder against a truth folder.

The submission (written by `pneumomap infer`, either layout of `pneumomap.submission`):
  probabilities        midrc: OUT/image-level-classifications.csv (fileNamePath,score); pneumomap:
                       OUT/predictions.csv (image_id,probability) -> ROC AUC; accuracy, precision, recall,
                       specificity, F1 and the confusion matrix at the threshold
  maps                 midrc: OUT/<name>.png; pneumomap: OUT/maps/<image_id>.png; 8-bit, p = value/255
                       -> the map metric and Dice at 0.5
  rsna_submission.csv  (optional, in the run's work folder) -> Kaggle RSNA mAP over IoU 0.40..0.75
  run_summary.json     (optional, in the run's work folder) its `threshold` is the operating point unless
                       --threshold is given
The midrc layout keeps the run's files in a work folder, `<OUT>-work` unless --work says otherwise.

The truth (`pneumomap.truth`): an RSNA-format folder, whose opacity region (--truth-def: the label boxes, the
boxes inside the lung mask (default), or the ellipses inscribed in those) counts as one reference level
(--box-level 1/3, 2/3 or 1, default 1); or a folder of the organisers' kind of reference maps (<name>.npy or
8-bit <name>.png levels 0, 1/3, 2/3, 1) with image-level-classifications.csv for the labels.

Map metric (--metric):
  midrc (default)  the MIDRC XAI organisers' number: per image scikit-learn's log_loss of p (float32) against
                   reference > 0, weighted 1 / 15 / 30 / 45 by the reference level 0 / 1/3 / 2/3 / 1; then the
                   mean over images (`metrics.midrc_log_loss`)
  balanced         pos_weight * mean(-log p over opacity pixels) + neg_weight * mean(-log(1-p) over clear
                   pixels), p clipped to [1e-7, 1-1e-7]; an image without opacity scores the clear term only

Only ids of the truth set are scored (optionally one split of split.csv); a truth id without a prediction
is an error that names it. With the midrc layout and every truth id scored, the PNGs of OUT must be exactly one
per truth image: the organisers' scorer pairs them with its reference maps by sorted file order.

Length (about 440 lines): one concern, scoring a submission, with its command line and plots; the metric
math itself lives in `pneumomap.metrics`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.fileio import atomic_write_bytes, atomic_write_text
from pneumomap.submission import Submission, SubmissionError, read_csv, read_submission
from pneumomap.truth import (DEFAULT_BOX_LEVEL, DEFAULT_TRUTH_DEF, TRUTH_DEFS, RsnaTruth, Truth, box_array,
                             load_truth, parse_box_level, select_ids, truth_mask)

__all__ = ["SubmissionError", "DEFAULT_TRUTH_DEF", "TRUTH_DEFS", "box_array", "select_ids", "truth_mask",
           "score_submission", "main", "add_arguments"]

DEFAULT_THRESHOLD = 0.5
DEFAULT_METRIC = metrics.DEFAULT_MAP_METRIC


# ----------------------------------------------------------------------------- reading a submission

def parse_prediction_string(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``'conf x y w h conf x y w h ...'`` -> (confidences (n,), boxes (n, 4))."""
    values = np.array(text.split(), dtype=np.float64)
    if values.size % 5:
        raise ValueError(f"{values.size} numbers, not a multiple of 5")
    values = values.reshape(-1, 5)
    return values[:, 0], values[:, 1:]


def read_rsna_submission(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``patientId -> (confidences, boxes)`` from an RSNA Kaggle submission CSV."""
    path = Path(path)
    out = {}
    for line, row in enumerate(read_csv(path, ("patientId", "PredictionString")), start=2):
        try:
            out[row["patientId"]] = parse_prediction_string(row["PredictionString"] or "")
        except ValueError as error:
            raise SubmissionError(f"{path}:{line}: PredictionString: {error}") from None
    return out


def read_decisions(pred_dir: str | Path | Submission, work: str | Path | None = None) -> dict[str, dict[str, str]]:
    """``image_id -> row`` of the run's decisions.csv (in the work folder of either layout), empty when absent."""
    sub = pred_dir if isinstance(pred_dir, Submission) else read_submission(pred_dir, work)
    path = sub.work_file("decisions.csv")
    if path is None:
        return {}
    return {row["image_id"]: row for row in read_csv(path, ("image_id",))}


def read_map(path: str | Path) -> np.ndarray:
    """An 8-bit greyscale map PNG as a uint8 (H, W) array."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "L":
            raise SubmissionError(f"{path}: expected an 8-bit greyscale PNG, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8)


def read_run_threshold(pred_dir: str | Path, work: str | Path | None = None) -> float | None:
    """The ``threshold`` of the run's run_summary.json (in the work folder of either layout), if there is one."""
    return read_submission(pred_dir, work).threshold()


def maps_folder(sub: Submission) -> Path:
    """The folder of a submission's map PNGs (OUT itself for midrc, OUT/maps for pneumomap)."""
    return sub.map_path("x").parent


# ----------------------------------------------------------------------------- checks

def _first(items: Sequence, n: int = 10) -> str:
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _require(ids: Sequence[str], available, what: str) -> None:
    missing = [pid for pid in ids if pid not in available]
    if missing:
        raise SubmissionError(f"{what} has no prediction for {len(missing)} truth id(s): {_first(missing)}")


def organisers_png_names(folder: str | Path) -> list[str]:
    """The names the organisers' scorer takes for the submitted maps: every entry of the folder whose name
    contains ``.png``, sorted (it pairs the i-th of them with the i-th sorted reference ``.npy``)."""
    return sorted(name for name in os.listdir(folder) if ".png" in name)


def check_sorted_pairing(folder: str | Path, truth_ids: Iterable[str]) -> None:
    """SubmissionError unless the organisers' sorted PNG list of ``folder`` is exactly one ``<id>.png`` per truth
    id: their scorer pairs PNGs and reference maps by sorted order, so one extra or missing PNG shifts the rest."""
    names = organisers_png_names(folder)
    expected = sorted(f"{i}.png" for i in truth_ids)
    if names == expected:
        return
    name_set, expected_set = set(names), set(expected)
    extra = [n for n in names if n not in expected_set]
    missing = [n for n in expected if n not in name_set]
    at = next((k for k, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
    parts = []
    if extra:
        parts.append(f"{len(extra)} PNG(s) of no truth image: {_first(extra)}")
    if missing:
        parts.append(f"{len(missing)} truth image(s) without a PNG: {_first(missing)}")
    if at < min(len(names), len(expected)):
        effect = (f"it would score {names[at]} against the reference of {Path(expected[at]).stem} (image {at + 1} "
                  f"of {len(expected)}) and misalign every later image")
    else:
        effect = (f"it would pair {len(names)} map(s) with {len(expected)} reference(s), stopping at the shorter "
                  "list")
    raise SubmissionError(f"{Path(folder)}: {'; '.join(parts)}. The organisers' scorer pairs the PNGs of this "
                          f"folder with its reference maps by sorted file order, so {effect}. Leave exactly one "
                          "<name>.png per truth image in the folder")


def join_warnings(sub: Submission, truth: Truth, ids: Sequence[str]) -> list[str]:
    """The organisers join the two image-level CSVs on fileNamePath exactly: names that differ drop out."""
    differ = [(sub.names[i], truth.file_name(i)) for i in ids
              if i in sub.names and truth.file_name(i) is not None and sub.names[i] != truth.file_name(i)]
    if not differ:
        return []
    shown = ", ".join(f"{a!r} vs {b!r}" for a, b in differ[:3])
    return [f"{len(differ)} fileNamePath(s) of {sub.layout.table_path} differ from the reference's ({shown}): "
            "the organisers join the two CSVs on fileNamePath, so their AUC would leave those images out"]


# ----------------------------------------------------------------------------- scoring

def _nanmean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_maps(truth: Truth, ids: Sequence[str], sub: Submission, metric: metrics.MapMetric) -> list[dict]:
    """Per-image map metric and Dice for ``ids`` (every map must exist)."""
    from tqdm import tqdm

    _require(ids, set(sub.map_ids()), str(maps_folder(sub)))
    rows = []
    for pid in tqdm(ids, desc="score maps", unit="map", leave=False, disable=len(ids) < 50):
        prob_map = read_map(sub.map_path(pid))
        codes = truth.codes(pid, prob_map.shape)
        opacity = metrics.codes_to_truth(codes)
        rows.append({"image_id": pid, "opacity_pixels": int(np.count_nonzero(opacity)),
                     "map_log_loss": metric.loss(prob_map, codes),
                     "dice": metrics.dice(prob_map, opacity)})
    return rows


def _map_summary(rows: list[dict]) -> dict:
    positive = [r for r in rows if r["opacity_pixels"]]
    negative = [r for r in rows if not r["opacity_pixels"]]
    return {
        "map_log_loss": _nanmean([r["map_log_loss"] for r in rows]),
        "map_log_loss_ci95": list(metrics.bootstrap_interval([r["map_log_loss"] for r in rows])),
        "map_log_loss_positive": _nanmean([r["map_log_loss"] for r in positive]),
        "map_log_loss_negative": _nanmean([r["map_log_loss"] for r in negative]),
        "dice": _nanmean([r["dice"] for r in rows]),
        "dice_positive": _nanmean([r["dice"] for r in positive]),
        "n_maps": len(rows),
    }


def score_submission(pred_dir: str | Path, truth_dir: str | Path | Truth, *, threshold: float | None = None,
                     truth_def: str = DEFAULT_TRUTH_DEF, pos_weight: float = 1.0, neg_weight: float = 1.0,
                     split: str | None = None, ids: Iterable[str] | None = None, dataset=None,
                     metric: str | metrics.MapMetric = DEFAULT_METRIC, box_level: float | str = DEFAULT_BOX_LEVEL,
                     work: str | Path | None = None) -> dict:
    """Score the submission ``pred_dir`` against ``truth_dir``; returns the metrics and per-image rows.

    ``truth_dir``: a truth folder (`truth.load_truth` with ``split``, ``truth_def``, ``box_level``) or a Truth.
    ``dataset``: an already loaded ``load_rsna(truth_dir)``. ``metric``: a name of metrics.MAP_METRICS (the
    weights apply to ``balanced``) or a MapMetric. ``threshold``: the operating point; None reads the run's
    run_summary.json, else 0.5. ``ids`` restricts scoring to those truth ids. ``work``: the run's work folder
    (midrc layout; default ``<pred_dir>-work``). Maps are scored when the submission has a map folder (always
    with midrc), boxes when the run's rsna_submission.csv exists and the truth has boxes.
    """
    if truth_def not in TRUTH_DEFS:
        raise ValueError(f"unknown truth definition {truth_def!r}; choose one of {TRUTH_DEFS}")
    map_metric = metric if isinstance(metric, metrics.MapMetric) else metrics.map_metric(metric, pos_weight,
                                                                                         neg_weight)
    if isinstance(truth_dir, Truth):
        truth = truth_dir
    elif dataset is not None:
        truth = RsnaTruth(dataset, split=split, truth_def=truth_def, box_level=box_level)
    else:
        truth = load_truth(truth_dir, split=split, truth_def=truth_def, box_level=box_level)
    sub = read_submission(pred_dir, work)

    restricted = ids is not None
    wanted = set(ids) if restricted else None
    chosen = [pid for pid in truth.ids if wanted is None or pid in wanted]
    if not chosen:
        raise SubmissionError(f"{truth.root}: no truth image to score")
    _require(chosen, sub.probabilities, str(sub.layout.table_path))
    if sub.layout.scorer_folder and not restricted and not truth.selected:
        check_sorted_pairing(sub.folder, chosen)

    run_threshold = sub.threshold()
    source = "argument" if threshold is not None else "run_summary.json" if run_threshold is not None else "default"
    threshold = threshold if threshold is not None else run_threshold if run_threshold is not None \
        else DEFAULT_THRESHOLD

    y_true = np.array([truth.label(pid) for pid in chosen])
    y_score = np.array([sub.probabilities[pid] for pid in chosen])
    result: dict = {"n_images": len(chosen), "n_positive": int(y_true.sum()),
                    "n_ignored_predictions": len(set(sub.probabilities) - set(chosen)),
                    "threshold_source": source, "metric": map_metric.name, "metric_description": map_metric.describe(),
                    "split": split, **truth.describe(), "layout": sub.layout.name, "work": str(sub.layout.work),
                    "pos_weight": pos_weight, "neg_weight": neg_weight,
                    "auc": metrics.roc_auc(y_true, y_score),
                    "auc_ci95": list(metrics.bootstrap_interval(
                        np.column_stack([y_true, y_score]), lambda rows: metrics.roc_auc(rows[:, 0], rows[:, 1])))}
    result.update(metrics.classification_metrics(y_true, y_score, threshold))
    per_image = [{"image_id": pid, "target": int(t), "probability": float(s)}
                 for pid, t, s in zip(chosen, y_true, y_score)]

    if maps_folder(sub).is_dir():
        rows = score_maps(truth, chosen, sub, map_metric)
        result.update(_map_summary(rows))
        for record, row in zip(per_image, rows):
            record.update(row)

    rsna_csv = sub.work_file("rsna_submission.csv")
    if rsna_csv is not None and truth.boxes(chosen[0]) is not None:
        boxes = read_rsna_submission(rsna_csv)
        _require(chosen, boxes, str(rsna_csv))
        truth_boxes = {pid: truth.boxes(pid) for pid in chosen}
        result["rsna_map"] = metrics.rsna_map(truth_boxes, boxes, chosen)

    result["warnings"] = join_warnings(sub, truth, chosen)
    result["per_image"] = per_image
    return result


# ----------------------------------------------------------------------------- output

def to_json(result: dict) -> str:
    """JSON text of a result, NaN written as null."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value
    return json.dumps(clean(result), indent=2) + "\n"


TABLE_KEYS = ("metric", "truth_def", "box_level_name", "n_images", "n_positive", "threshold", "auc", "accuracy",
              "precision", "recall", "specificity", "f1", "map_log_loss", "map_log_loss_positive",
              "map_log_loss_negative", "dice", "dice_positive", "rsna_map")
TABLE_NAMES = {"box_level_name": "box_level"}


def format_table(result: dict) -> str:
    """The console table: one metric per line, then the confusion matrix."""
    lines = []
    for key in TABLE_KEYS:
        if result.get(key) is not None:
            value = result[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            interval = result.get(f"{key}_ci95")
            if interval and all(np.isfinite(interval)):
                text += f"   95% bootstrap interval [{interval[0]:.4f}, {interval[1]:.4f}]"
            lines.append(f"{TABLE_NAMES.get(key, key):<24}{text}")
    (tn, fp), (fn, tp) = result["confusion_matrix"]
    lines += ["confusion matrix        pred 0  pred 1",
              f"  truth 0             {tn:>7} {fp:>7}",
              f"  truth 1             {fn:>7} {tp:>7}"]
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_plots(result: dict, plots_dir: str | Path) -> list[Path]:
    """roc.png, precision_recall.png and confusion_matrix.png, the operating point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    y = [r["target"] for r in result["per_image"]]
    s = [r["probability"] for r in result["per_image"]]
    point = f"threshold {result['threshold']:.4g}"
    paths = [plots_dir / "roc.png", plots_dir / "precision_recall.png", plots_dir / "confusion_matrix.png"]

    fpr, tpr, _ = metrics.roc_curve(y, s)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"ROC (AUC {result['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.plot(1 - result["specificity"], result["recall"], "o", c="red", label=point)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    _save_figure(fig, paths[0])

    precision, recall, _ = metrics.precision_recall_curve(y, s)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label="precision-recall")
    ax.plot(result["recall"], result["precision"], "o", c="red", label=point)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    _save_figure(fig, paths[1])

    matrix = np.array(result["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="truth", title=f"Confusion matrix ({point})")
    _save_figure(fig, paths[2])
    return paths


# ----------------------------------------------------------------------------- command line

def box_level_argument(text: str) -> float:
    """argparse type of --box-level: 1/3, 2/3, 1 or a decimal equal to one of them."""
    try:
        return parse_box_level(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the map metric and of the truth it is computed against (score, tune and report share them)."""
    parser.add_argument("--metric", choices=metrics.MAP_METRICS, default=DEFAULT_METRIC,
                        help=f"map metric (default {DEFAULT_METRIC}: the MIDRC organisers' weighted log loss; "
                             "balanced: class-balanced log loss weighted by --pos-weight/--neg-weight)")
    parser.add_argument("--box-level", type=box_level_argument, default=DEFAULT_BOX_LEVEL, metavar="1/3|2/3|1",
                        help="RSNA truth: the reference level its opacity region counts as, i.e. the share of the "
                             "organisers' three readers (default 1: weight 45; 2/3: 30; 1/3: 15)")
    parser.add_argument("--truth-def", choices=TRUTH_DEFS, default=DEFAULT_TRUTH_DEF,
                        help=f"RSNA truth: the opacity region (default {DEFAULT_TRUTH_DEF})")
    parser.add_argument("--pos-weight", type=float, default=1.0,
                        help="--metric balanced: weight of the opacity-pixel term (default 1)")
    parser.add_argument("--neg-weight", type=float, default=1.0,
                        help="--metric balanced: weight of the clear-pixel term (default 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path,
                        help="submission folder of either layout (MIDRC: <name>.png + image-level-classifications.csv;"
                             " pneumomap: predictions.csv + maps/)")
    parser.add_argument("--truth", required=True, type=Path,
                        help="RSNA-format folder (label CSVs, lung_masks/) or a folder of reference maps "
                             "(<name>.npy or 8-bit <name>.png levels, image-level-classifications.csv)")
    parser.add_argument("--work", type=Path, default=None,
                        help="the run's work folder (run_summary.json, decisions.csv, rsna_submission.csv) of a "
                             "MIDRC-layout submission (default <pred>-work)")
    add_metric_arguments(parser)
    parser.add_argument("--json", type=Path, help="write the metrics (and per-image rows) to this JSON file")
    parser.add_argument("--plots", type=Path, help="write ROC, precision-recall and confusion-matrix PNGs here")
    parser.add_argument("--threshold", type=float, default=None,
                        help="classification threshold (default: `threshold` of the run's run_summary.json, else 0.5)")
    parser.add_argument("--split", default=None, help="RSNA truth: score only this split of split.csv (e.g. test)")


def ignored_options(args: argparse.Namespace, truth: Truth) -> list[str]:
    """Notes on metric options set away from their defaults that do not apply to this metric or truth."""
    notes = []
    if args.metric != "balanced":
        notes += [f"{flag} applies to --metric balanced only; ignored"
                  for flag, value in (("--pos-weight", args.pos_weight), ("--neg-weight", args.neg_weight))
                  if value != 1.0]
    if not isinstance(truth, RsnaTruth):
        notes += [f"{flag} applies to RSNA truth folders only ({truth.root} holds reference maps); ignored"
                  for flag, value, default in (("--box-level", args.box_level, DEFAULT_BOX_LEVEL),
                                               ("--truth-def", args.truth_def, DEFAULT_TRUTH_DEF))
                  if value != default]
    return notes


def main(args: argparse.Namespace) -> int:
    try:
        truth = load_truth(args.truth, split=args.split, truth_def=args.truth_def, box_level=args.box_level)
        notes = ignored_options(args, truth)
        result = score_submission(args.pred, truth, threshold=args.threshold, truth_def=args.truth_def,
                                  pos_weight=args.pos_weight, neg_weight=args.neg_weight, split=args.split,
                                  metric=args.metric, work=args.work)
    except (ValueError, OSError) as error:  # SubmissionError, label errors, missing files: unusable input
        print(f"pneumomap score: error: {error}", file=sys.stderr)
        return 2
    for note in notes + result["warnings"]:
        print(f"pneumomap score: warning: {note}", file=sys.stderr)
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, to_json(result))
        print(f"wrote {args.json}")
    if args.plots:
        for path in write_plots(result, args.plots):
            print(f"wrote {path}")
    return 0
