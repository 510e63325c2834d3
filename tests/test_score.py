"""`pneumomap score` against independent computations on hand-built truth and submission folders."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from pneumomap import score
from pneumomap.cli import main as cli_main
from test_metrics import oracle_image_map, oracle_log_loss

SHAPE = (64, 48)  # (H, W)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- hand-built folders

def lung_mask(shape=SHAPE) -> np.ndarray:
    """Two rectangular 'lungs'."""
    mask = np.zeros(shape, bool)
    mask[8:56, 4:20] = True
    mask[8:56, 28:44] = True
    return mask


def make_truth(root: Path, boxes: dict[str, list[tuple[int, int, int, int]]], split: dict[str, str] | None = None,
               shape=SHAPE) -> Path:
    """An RSNA-format truth folder: labels CSV, class CSV, lung masks, split.csv (no images needed)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, classes = ["patientId,x,y,width,height,Target"], ["patientId,class"]
    for pid, pid_boxes in boxes.items():
        rows += [f"{pid},{x},{y},{w},{h},1" for x, y, w, h in pid_boxes] or [f"{pid},,,,,0"]
        classes.append(f"{pid},{'Lung Opacity' if pid_boxes else 'Normal'}")
        (root / "lung_masks").mkdir(exist_ok=True)
        Image.fromarray((lung_mask(shape) * 255).astype(np.uint8)).save(root / "lung_masks" / f"{pid}.png")
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    (root / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    split = split or {pid: "test" for pid in boxes}
    (root / "split.csv").write_text("patientId,split\n" + "".join(f"{p},{s}\n" for p, s in split.items()))
    return root


def make_pred(root: Path, probabilities: dict[str, float], maps: dict[str, np.ndarray] | None = None,
              rsna: dict[str, list[tuple[float, float, float, float, float]]] | None = None,
              threshold: float | None = None) -> Path:
    """A submission folder: predictions.csv, maps/*.png, rsna_submission.csv, run_summary.json (each optional)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "predictions.csv").write_text(
        "image_id,probability\n" + "".join(f"{k},{v!r}\n" for k, v in probabilities.items()))
    for pid, values in (maps or {}).items():
        (root / "maps").mkdir(exist_ok=True)
        Image.fromarray(values).save(root / "maps" / f"{pid}.png")
    if rsna is not None:
        lines = ["patientId,PredictionString"]
        lines += [f"{pid},{' '.join(' '.join(map(str, b)) for b in boxes)}" for pid, boxes in rsna.items()]
        (root / "rsna_submission.csv").write_text("\n".join(lines) + "\n")
    if threshold is not None:
        (root / "run_summary.json").write_text(json.dumps({"images": len(probabilities), "threshold": threshold}))
    return root


def hand_truth(boxes, definition: str) -> np.ndarray:
    """The opacity truth computed independently: integer boxes as slices, ellipses by pixel centres."""
    mask = np.zeros(SHAPE, bool)
    rows, cols = np.mgrid[0:SHAPE[0], 0:SHAPE[1]] + 0.5
    for x, y, w, h in boxes:
        if definition == "ellipses":
            mask |= ((rows - y - h / 2) / (h / 2)) ** 2 + ((cols - x - w / 2) / (w / 2)) ** 2 <= 1
        else:
            mask[y:y + h, x:x + w] = True
    return mask if definition == "boxes" else mask & lung_mask()


BOXES = {
    "p0": [(6, 10, 12, 20)],                    # sticks out of the left lung
    "p1": [(30, 12, 10, 10), (5, 30, 10, 15)],
    "p2": [],
    "p3": [],
    "p4": [(28, 40, 16, 14)],
    "p5": [],
    "p6": [(2, 2, 20, 20)],
    "p7": [],
}


@pytest.fixture()
def case(tmp_path):
    rng = np.random.default_rng(7)
    ids = list(BOXES)
    probabilities = {pid: float(np.round(rng.random(), 2)) for pid in ids}
    maps = {pid: rng.integers(0, 256, SHAPE, dtype=np.uint8) for pid in ids}
    rsna = {"p0": [(0.9, 6, 10, 12, 18), (0.3, 30, 30, 5, 5)], "p1": [(0.8, 30, 12, 10, 10)], "p2": [],
            "p3": [(0.4, 10, 10, 10, 10)], "p4": [(0.7, 26, 42, 16, 14)], "p5": [], "p6": [], "p7": []}
    truth = make_truth(tmp_path / "truth", BOXES)
    pred = make_pred(tmp_path / "pred", {**probabilities, "extra": 0.5}, maps, rsna, threshold=0.4)
    return {"truth": truth, "pred": pred, "ids": ids, "probabilities": probabilities, "maps": maps, "rsna": rsna}


# ----------------------------------------------------------------------------- numbers

def test_classification_agrees_with_sklearn(case):
    result = score.score_submission(case["pred"], case["truth"])
    y = np.array([int(bool(BOXES[p])) for p in case["ids"]])
    s = np.array([case["probabilities"][p] for p in case["ids"]])
    pred = (s >= 0.4).astype(int)  # threshold from run_summary.json
    assert result["threshold"] == 0.4 and result["threshold_source"] == "run_summary.json"
    assert result["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert result["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert result["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert result["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert result["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
    assert result["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert result["n_images"] == 8 and result["n_ignored_predictions"] == 1


@pytest.mark.parametrize("definition", ["boxes", "boxes_in_lungs", "ellipses"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (4.0, 0.5)])
def test_map_metrics_agree_with_loop_oracle(case, definition, weights):
    result = score.score_submission(case["pred"], case["truth"], truth_def=definition,
                                    pos_weight=weights[0], neg_weight=weights[1])
    losses, dices = [], []
    for pid in case["ids"]:
        truth = hand_truth(BOXES[pid], definition)
        p = case["maps"][pid] / 255.0
        losses.append(oracle_log_loss(p, truth, *weights))
        pred = p >= 0.5
        dices.append(1.0 if not pred.any() and not truth.any() else 2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert result["map_log_loss"] == pytest.approx(np.mean(losses), rel=1e-9)
    assert result["dice"] == pytest.approx(np.mean(dices))
    assert [r["map_log_loss"] for r in result["per_image"]] == pytest.approx(losses, rel=1e-9)


def test_rsna_map_agrees_with_oracle(case):
    result = score.score_submission(case["pred"], case["truth"])
    values = [oracle_image_map([list(b) for b in BOXES[p]], [(b[0], list(b[1:])) for b in case["rsna"][p]])
              for p in case["ids"]]
    assert result["rsna_map"] == pytest.approx(np.mean([v for v in values if v is not None]))


def test_threshold_argument_overrides_run_summary(case):
    result = score.score_submission(case["pred"], case["truth"], threshold=0.9)
    assert result["threshold"] == 0.9 and result["threshold_source"] == "argument"


def test_split_restricts_the_scored_ids(tmp_path):
    split = {"a": "val", "b": "test", "c": "test", "d": "val"}
    truth = make_truth(tmp_path / "t", {"a": [(5, 10, 8, 8)], "b": [(5, 10, 8, 8)], "c": [], "d": []}, split)
    pred = make_pred(tmp_path / "p", {"b": 0.9, "c": 0.2})  # no val predictions: fine for --split test
    result = score.score_submission(pred, truth, split="test")
    assert result["n_images"] == 2 and result["auc"] == 1.0 and result["threshold_source"] == "default"
    assert "map_log_loss" not in result and "rsna_map" not in result


# ----------------------------------------------------------------------------- edge cases

def test_all_negative_truth_gives_nan_auc_and_null_json(tmp_path):
    truth = make_truth(tmp_path / "t", {"a": [], "b": []})
    maps = {"a": np.full(SHAPE, 10, np.uint8), "b": np.full(SHAPE, 10, np.uint8)}
    pred = make_pred(tmp_path / "p", {"a": 0.1, "b": 0.7}, maps)
    result = score.score_submission(pred, truth)
    assert math.isnan(result["auc"])
    assert result["map_log_loss"] == pytest.approx(-math.log(1 - 10 / 255))
    assert result["dice"] == 1.0 and math.isnan(result["dice_positive"])
    assert json.loads(score.to_json(result))["auc"] is None


def test_perfect_maps(tmp_path):
    truth = make_truth(tmp_path / "t", {"a": [(6, 10, 10, 12)], "b": []})
    maps = {pid: np.where(hand_truth(b, "boxes_in_lungs"), 255, 0).astype(np.uint8)
            for pid, b in {"a": [(6, 10, 10, 12)], "b": []}.items()}
    pred = make_pred(tmp_path / "p", {"a": 0.9, "b": 0.1}, maps,
                     rsna={"a": [(0.9, 6, 10, 10, 12)], "b": []})
    result = score.score_submission(pred, truth)
    assert result["map_log_loss"] < 1e-6 and result["dice"] == 1.0 and result["rsna_map"] == 1.0


def test_missing_predictions_are_named(case):
    (case["pred"] / "predictions.csv").write_text("image_id,probability\np0,0.5\np1,0.5\n")
    with pytest.raises(score.SubmissionError, match="p2, p3, p4"):
        score.score_submission(case["pred"], case["truth"])


def test_missing_map_is_named(case):
    (case["pred"] / "maps" / "p5.png").unlink()
    with pytest.raises(score.SubmissionError, match=r"maps has no prediction for 1 truth id\(s\): p5"):
        score.score_submission(case["pred"], case["truth"])


def test_map_of_wrong_size_is_an_error(case):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(case["pred"] / "maps" / "p3.png")
    with pytest.raises(score.SubmissionError, match="p3: map shape"):
        score.score_submission(case["pred"], case["truth"])


def test_no_predictions_at_all(tmp_path, capsys):
    truth = make_truth(tmp_path / "t", {"a": [(6, 10, 10, 12)], "b": []})
    pred = tmp_path / "empty"
    pred.mkdir()
    status = cli_main(["score", "--pred", str(pred), "--truth", str(truth)])
    assert status == 1 and "predictions.csv" in capsys.readouterr().err


# ----------------------------------------------------------------------------- command line and files

def test_cli_writes_table_json_and_plots(case, tmp_path, capsys):
    out_json, plots = tmp_path / "out" / "score.json", tmp_path / "plots"
    status = cli_main(["score", "--pred", str(case["pred"]), "--truth", str(case["truth"]),
                       "--json", str(out_json), "--plots", str(plots), "--truth-def", "boxes"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "auc" in printed and "map_log_loss" in printed and "confusion matrix" in printed
    data = json.loads(out_json.read_text())
    for key in ("auc", "accuracy", "precision", "recall", "specificity", "f1", "confusion_matrix",
                "map_log_loss", "dice", "rsna_map", "n_images"):
        assert key in data, key
    assert data["truth_def"] == "boxes" and len(data["per_image"]) == 8
    for name in ("roc.png", "precision_recall.png", "confusion_matrix.png"):
        path = plots / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert Image.open(path).size[0] > 100


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["score", "--help"])
    text = capsys.readouterr().out
    for option in ("--pred", "--truth", "--json", "--plots", "--threshold", "--truth-def", "--pos-weight",
                   "--neg-weight", "--split"):
        assert option in text
