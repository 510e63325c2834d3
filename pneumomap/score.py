"""Score a submission folder against an RSNA-format truth folder.

The submission (written by `pneumomap infer`):
  OUT/predictions.csv        image_id,probability     -> ROC AUC; accuracy, precision, recall, specificity,
                                                         F1 and the confusion matrix at the threshold
  OUT/maps/<image_id>.png    8-bit map, p = value/255 -> weighted pixel log loss and Dice at 0.5
  OUT/rsna_submission.csv    (optional)               -> Kaggle RSNA mAP over IoU 0.40..0.75
  OUT/run_summary.json       (optional) its `threshold` is the operating point unless --threshold is given

Map log loss per image (class-balanced by default; the challenge's exact weighting was not published):
  pos_weight * mean(-log p over opacity pixels) + neg_weight * mean(-log(1-p) over clear pixels),
  p clipped to [1e-7, 1-1e-7]; an image without opacity scores the clear term only; then the mean over images.
The opacity truth is --truth-def: the label boxes, the boxes inside the lung mask (default), or the ellipses
inscribed in the boxes inside the lung mask.

Only ids of the truth set are scored (optionally one split of split.csv); a truth id without a prediction
is an error that names it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.fileio import atomic_write_bytes, atomic_write_text

TRUTH_DEFS = ("boxes", "boxes_in_lungs", "ellipses")
DEFAULT_TRUTH_DEF = "boxes_in_lungs"
DEFAULT_THRESHOLD = 0.5


class SubmissionError(ValueError):
    """A submission folder that cannot be scored; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- reading a submission

def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SubmissionError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def read_predictions(path: str | Path) -> dict[str, float]:
    """``image_id -> probability`` from predictions.csv."""
    path = Path(path)
    out: dict[str, float] = {}
    for line, row in enumerate(_read_csv(path, ("image_id", "probability")), start=2):
        try:
            out[row["image_id"]] = float(row["probability"])
        except (TypeError, ValueError):
            raise SubmissionError(f"{path}:{line}: probability {row['probability']!r} is not a number") from None
    return out


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
    for line, row in enumerate(_read_csv(path, ("patientId", "PredictionString")), start=2):
        try:
            out[row["patientId"]] = parse_prediction_string(row["PredictionString"] or "")
        except ValueError as error:
            raise SubmissionError(f"{path}:{line}: PredictionString: {error}") from None
    return out


def read_decisions(pred_dir: str | Path) -> dict[str, dict[str, str]]:
    """``image_id -> row`` of OUT/decisions.csv, empty when the file is absent."""
    path = Path(pred_dir) / "decisions.csv"
    if not path.is_file():
        return {}
    return {row["image_id"]: row for row in _read_csv(path, ("image_id",))}


def read_map(path: str | Path) -> np.ndarray:
    """An 8-bit greyscale map PNG as a uint8 (H, W) array."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "L":
            raise SubmissionError(f"{path}: expected an 8-bit greyscale PNG, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8)


def read_run_threshold(pred_dir: str | Path) -> float | None:
    """The ``threshold`` field of OUT/run_summary.json, if there is one."""
    path = Path(pred_dir) / "run_summary.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("threshold")
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- truth

def box_array(boxes: Iterable) -> np.ndarray:
    """RSNA ``Box`` objects -> (n, 4) float array of x, y, width, height."""
    return np.array([[b.x, b.y, b.width, b.height] for b in boxes], dtype=np.float64).reshape(-1, 4)


def truth_mask(dataset, pid: str, shape: tuple[int, int], truth_def: str = DEFAULT_TRUTH_DEF) -> np.ndarray:
    """The opacity truth of one image as bool ``shape``, by ``truth_def`` (see TRUTH_DEFS)."""
    from pneumomap.labels import box_mask, opacity_target, read_lung_mask

    boxes = dataset.boxes.get(pid, [])
    if truth_def == "boxes":
        return box_mask(boxes, shape)
    if truth_def not in TRUTH_DEFS:
        raise ValueError(f"unknown truth definition {truth_def!r}; choose one of {TRUTH_DEFS}")
    lungs = read_lung_mask(dataset.mask_path(pid))
    if lungs.shape != tuple(shape):
        raise SubmissionError(f"{pid}: map shape {tuple(shape)} != lung mask shape {lungs.shape} "
                              f"({dataset.mask_path(pid)}); maps must be at the original image size")
    return opacity_target(boxes, lungs, ellipse=truth_def == "ellipses")


def select_ids(dataset, split: str | None = None, ids: Iterable[str] | None = None) -> list[str]:
    """The truth ids to score: all, or one split of split.csv, optionally intersected with ``ids``."""
    chosen = list(dataset.ids)
    if split is not None:
        chosen = [pid for pid in chosen if dataset.split.get(pid) == split]
        if not chosen:
            raise SubmissionError(f"{dataset.root}: no image in split {split!r}")
    if ids is not None:
        wanted = set(ids)
        chosen = [pid for pid in chosen if pid in wanted]
    return chosen


def _require(ids: Sequence[str], available, what: str) -> None:
    missing = [pid for pid in ids if pid not in available]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise SubmissionError(f"{what} has no prediction for {len(missing)} truth id(s): {shown}")


# ----------------------------------------------------------------------------- scoring

def _nanmean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_maps(dataset, ids: Sequence[str], maps_dir: Path, truth_def: str, pos_weight: float,
               neg_weight: float) -> list[dict]:
    """Per-image map log loss and Dice for ``ids`` (every map must exist)."""
    from tqdm import tqdm

    _require(ids, {p.stem for p in maps_dir.glob("*.png")}, str(maps_dir))
    rows = []
    for pid in tqdm(ids, desc="score maps", unit="map", leave=False, disable=len(ids) < 50):
        prob_map = read_map(maps_dir / f"{pid}.png")
        truth = truth_mask(dataset, pid, prob_map.shape, truth_def)
        rows.append({"image_id": pid, "opacity_pixels": int(np.count_nonzero(truth)),
                     "map_log_loss": metrics.map_log_loss(prob_map, truth, pos_weight, neg_weight),
                     "dice": metrics.dice(prob_map, truth)})
    return rows


def _map_summary(rows: list[dict]) -> dict:
    positive = [r for r in rows if r["opacity_pixels"]]
    negative = [r for r in rows if not r["opacity_pixels"]]
    return {
        "map_log_loss": _nanmean([r["map_log_loss"] for r in rows]),
        "map_log_loss_positive": _nanmean([r["map_log_loss"] for r in positive]),
        "map_log_loss_negative": _nanmean([r["map_log_loss"] for r in negative]),
        "dice": _nanmean([r["dice"] for r in rows]),
        "dice_positive": _nanmean([r["dice"] for r in positive]),
        "n_maps": len(rows),
    }


def score_submission(pred_dir: str | Path, truth_dir: str | Path, *, threshold: float | None = None,
                     truth_def: str = DEFAULT_TRUTH_DEF, pos_weight: float = 1.0, neg_weight: float = 1.0,
                     split: str | None = None, ids: Iterable[str] | None = None,
                     dataset=None) -> dict:
    """Score ``pred_dir`` against the RSNA-format ``truth_dir``; returns the metrics and per-image rows.

    ``threshold``: the operating point; None reads OUT/run_summary.json's ``threshold``, else 0.5.
    ``ids`` restricts scoring to those truth ids; ``dataset`` is an already loaded ``load_rsna(truth_dir)``.
    Maps are scored when OUT/maps exists, boxes when OUT/rsna_submission.csv exists.
    """
    from pneumomap.labels import load_rsna

    pred_dir = Path(pred_dir)
    if truth_def not in TRUTH_DEFS:
        raise ValueError(f"unknown truth definition {truth_def!r}; choose one of {TRUTH_DEFS}")
    dataset = load_rsna(truth_dir) if dataset is None else dataset
    chosen = select_ids(dataset, split, ids)
    if not chosen:
        raise SubmissionError(f"{truth_dir}: no truth image to score")
    probabilities = read_predictions(pred_dir / "predictions.csv")
    _require(chosen, probabilities, str(pred_dir / "predictions.csv"))

    run_threshold = read_run_threshold(pred_dir)
    source = "argument" if threshold is not None else "run_summary.json" if run_threshold is not None else "default"
    threshold = threshold if threshold is not None else run_threshold if run_threshold is not None \
        else DEFAULT_THRESHOLD

    y_true = np.array([int(dataset.target.get(pid, 0)) for pid in chosen])
    y_score = np.array([probabilities[pid] for pid in chosen])
    result: dict = {"n_images": len(chosen), "n_positive": int(y_true.sum()),
                    "n_ignored_predictions": len(set(probabilities) - set(chosen)),
                    "threshold_source": source, "truth_def": truth_def,
                    "pos_weight": pos_weight, "neg_weight": neg_weight, "split": split,
                    "auc": metrics.roc_auc(y_true, y_score)}
    result.update(metrics.classification_metrics(y_true, y_score, threshold))
    per_image = [{"image_id": pid, "target": int(t), "probability": float(s)}
                 for pid, t, s in zip(chosen, y_true, y_score)]

    maps_dir = pred_dir / "maps"
    if maps_dir.is_dir():
        rows = score_maps(dataset, chosen, maps_dir, truth_def, pos_weight, neg_weight)
        result.update(_map_summary(rows))
        for record, row in zip(per_image, rows):
            record.update(row)

    rsna_csv = pred_dir / "rsna_submission.csv"
    if rsna_csv.is_file():
        boxes = read_rsna_submission(rsna_csv)
        _require(chosen, boxes, str(rsna_csv))
        truth_boxes = {pid: box_array(dataset.boxes.get(pid, [])) for pid in chosen}
        result["rsna_map"] = metrics.rsna_map(truth_boxes, boxes, chosen)

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


TABLE_KEYS = ("n_images", "n_positive", "threshold", "auc", "accuracy", "precision", "recall", "specificity",
              "f1", "map_log_loss", "map_log_loss_positive", "map_log_loss_negative", "dice", "dice_positive",
              "rsna_map")


def format_table(result: dict) -> str:
    """The console table: one metric per line, then the confusion matrix."""
    lines = []
    for key in TABLE_KEYS:
        if key in result:
            value = result[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{key:<24}{text}")
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

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="submission folder (predictions.csv, maps/, ...)")
    parser.add_argument("--truth", required=True, type=Path, help="RSNA-format folder (label CSVs, lung_masks/)")
    parser.add_argument("--json", type=Path, help="write the metrics (and per-image rows) to this JSON file")
    parser.add_argument("--plots", type=Path, help="write ROC, precision-recall and confusion-matrix PNGs here")
    parser.add_argument("--threshold", type=float, default=None,
                        help="classification threshold (default: `threshold` of OUT/run_summary.json, else 0.5)")
    parser.add_argument("--truth-def", choices=TRUTH_DEFS, default=DEFAULT_TRUTH_DEF,
                        help=f"opacity ground truth for the maps (default {DEFAULT_TRUTH_DEF})")
    parser.add_argument("--pos-weight", type=float, default=1.0, help="weight of the opacity-pixel term")
    parser.add_argument("--neg-weight", type=float, default=1.0, help="weight of the clear-pixel term")
    parser.add_argument("--split", default=None, help="score only this split of split.csv (e.g. test)")


def main(args: argparse.Namespace) -> int:
    try:
        result = score_submission(args.pred, args.truth, threshold=args.threshold, truth_def=args.truth_def,
                                  pos_weight=args.pos_weight, neg_weight=args.neg_weight, split=args.split)
    except (ValueError, OSError) as error:  # SubmissionError, label errors, missing files
        print(f"pneumomap score: error: {error}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, to_json(result))
        print(f"wrote {args.json}")
    if args.plots:
        for path in write_plots(result, args.plots):
            print(f"wrote {path}")
    return 0
