"""`pneumomap score` against independent computations on hand-built truth and submission folders."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from pneumomap import metrics, score
from pneumomap.cli import main as cli_main
from test_metrics import oracle_image_map, oracle_log_loss, organisers_wll

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
    result = score.score_submission(case["pred"], case["truth"], truth_def=definition, metric="balanced",
                                    pos_weight=weights[0], neg_weight=weights[1])
    assert result["metric"] == "balanced"
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
    assert status == 2 and "predictions.csv" in capsys.readouterr().err


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
                   "--neg-weight", "--split", "--metric", "--box-level", "--work"):
        assert option in text


# ----------------------------------------------------------------------------- the organisers' metric, MIDRC layout

def make_midrc_pred(root: Path, probabilities: dict[str, float], maps: dict[str, np.ndarray],
                    names: dict[str, str] | None = None, threshold: float | None = None, work: Path | None = None,
                    rsna: dict[str, list] | None = None) -> Path:
    """A MIDRC-layout submission: OUT/<id>.png, OUT/image-level-classifications.csv; run files in OUT-work."""
    root.mkdir(parents=True, exist_ok=True)
    for pid, values in maps.items():
        Image.fromarray(values).save(root / f"{pid}.png")
    names = names or {pid: f"{pid}.dcm" for pid in probabilities}
    (root / "image-level-classifications.csv").write_text(
        "fileNamePath,score\n" + "".join(f"{names[k]},{v!r}\n" for k, v in probabilities.items()))
    work = work or root.parent / f"{root.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    if threshold is not None:
        (work / "run_summary.json").write_text(json.dumps({"threshold": threshold}))
    if rsna is not None:
        lines = ["patientId,PredictionString"]
        lines += [f"{pid},{' '.join(' '.join(map(str, b)) for b in boxes)}" for pid, boxes in rsna.items()]
        (work / "rsna_submission.csv").write_text("\n".join(lines) + "\n")
    return root


def organisers_scorer(reference_dir: Path, prediction_dir: Path) -> dict:
    """The organisers' scoring loop (QTIM-Lab/Challenges XAI/app_scoring/program/scoring.py), copied as is but
    for the description-file check; pandas is not installed here, so their ``pd.merge(ref, pred,
    on="fileNamePath")`` is the same inner join written with csv and a dict."""
    import csv
    import os

    from sklearn.metrics import log_loss, roc_auc_score

    ref_img_list = [i for i in os.listdir(reference_dir) if i.find(".npy") != -1]
    pred_img_list = [i for i in os.listdir(prediction_dir) if i.find(".png") != -1]
    ref_img_list.sort()
    pred_img_list.sort()
    wll_list = {}
    for i, (ref_img, pred_img) in enumerate(zip(ref_img_list, pred_img_list)):
        ref_np = np.load(os.path.join(reference_dir, ref_img))
        loaded_image_255 = np.array(Image.open(os.path.join(prediction_dir, pred_img)))
        loaded_image_0_1 = loaded_image_255.astype(np.float32) / 255.0
        pred_np = loaded_image_0_1
        assert ref_np.shape == pred_np.shape, f"Shape mismatch: {ref_np.shape} vs {pred_np.shape}"
        ref_binarized = np.where(ref_np > 0, 1, 0)
        ref_pmap_to_weights = np.where(ref_np == 0, 1,
                              np.where((ref_np == 1/3), 15,  # noqa: E128
                              np.where((ref_np == 2/3), 30,
                              np.where((ref_np == 1), 45, 1))))
        wll = log_loss(ref_binarized.flatten(), pred_np.flatten(), sample_weight=ref_pmap_to_weights.flatten(),
                       labels=[0, 1])
        wll_list[pred_img] = wll

    def rows(folder):
        with open(os.path.join(folder, "image-level-classifications.csv"), newline="") as handle:
            return list(csv.DictReader(handle))
    predicted = {}
    for row in rows(prediction_dir):
        predicted.setdefault(row["fileNamePath"], []).append(float(row["score"]))
    join = [(float(r["score"]), s) for r in rows(reference_dir) for s in predicted.get(r["fileNamePath"], [])]
    y_true, y_score = np.array([j[0] for j in join]), np.array([j[1] for j in join])
    return {"average_wll": np.mean(list(wll_list.values())), "auc_roc": roc_auc_score(y_true, y_score),
            "wll": wll_list}


# ids whose name order differs from their stem order ('-' < '.' < '_'), one float32 reference, two negatives
REFERENCE_IDS = ("case", "case-1", "case_2", "b10", "b9", "neg", "neg0")


@pytest.fixture()
def organisers_case(tmp_path):
    from test_metrics import random_prediction, random_reference

    rng = np.random.default_rng(42)
    refs, maps, probabilities = {}, {}, {}
    for k, pid in enumerate(REFERENCE_IDS):
        shape = (int(rng.integers(24, 60)), int(rng.integers(24, 60)))  # each image its own size
        refs[pid] = random_reference(rng, shape, positive=not pid.startswith("neg"))
        maps[pid] = random_prediction(rng, shape)
        probabilities[pid] = float(np.round(rng.random(), 3))
    refs["b9"] = refs["b9"].astype(np.float32)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for pid, ref in refs.items():
        np.save(ref_dir / f"{pid}.npy", ref)
    (ref_dir / "image-level-classifications.csv").write_text(
        "fileNamePath,score\n" + "".join(f"{pid}.dcm,{int((ref > 0).any())}\n" for pid, ref in refs.items()))
    pred = make_midrc_pred(tmp_path / "out", probabilities, maps, threshold=0.5)
    return {"ref": ref_dir, "pred": pred, "refs": refs, "maps": maps, "probabilities": probabilities}


def test_score_reproduces_the_organisers_scorer_end_to_end(organisers_case, tmp_path, capsys):
    expected = organisers_scorer(organisers_case["ref"], organisers_case["pred"])
    result = score.score_submission(organisers_case["pred"], organisers_case["ref"])
    assert result["metric"] == "midrc" and result["layout"] == "midrc" and result["truth_source"] == "reference_maps"
    assert abs(result["map_log_loss"] - expected["average_wll"]) <= 1e-9
    per_image = {f"{r['image_id']}.png": r["map_log_loss"] for r in result["per_image"]}
    assert per_image.keys() == expected["wll"].keys()
    for name, value in expected["wll"].items():
        assert abs(per_image[name] - value) <= 1e-9, name
    assert result["auc"] == pytest.approx(expected["auc_roc"], abs=1e-12)
    assert result["warnings"] == []
    # the command line and its JSON say the same
    out_json = tmp_path / "score.json"
    status = cli_main(["score", "--pred", str(organisers_case["pred"]), "--truth", str(organisers_case["ref"]),
                       "--json", str(out_json)])
    assert status == 0 and "midrc" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["metric"] == "midrc" and abs(data["map_log_loss"] - expected["average_wll"]) <= 1e-9
    assert data["truth_def"] == "reference_maps" and data["box_level"] is None


def test_reference_pngs_score_as_the_npy_references(organisers_case, tmp_path):
    png_dir = tmp_path / "ref_png"
    png_dir.mkdir()
    for pid, ref in organisers_case["refs"].items():
        Image.fromarray(np.rint(ref.astype(np.float64) * 255).astype(np.uint8)).save(png_dir / f"{pid}.png")
    (png_dir / "image-level-classifications.csv").write_text(
        (organisers_case["ref"] / "image-level-classifications.csv").read_text())
    from_npy = score.score_submission(organisers_case["pred"], organisers_case["ref"])
    from_png = score.score_submission(organisers_case["pred"], png_dir)
    assert from_png["map_log_loss"] == from_npy["map_log_loss"] and from_png["auc"] == from_npy["auc"]


def test_stray_png_in_a_midrc_submission_is_reported(organisers_case, capsys):
    pred = organisers_case["pred"]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(pred / "a_stray.png")  # sorts before every id
    with pytest.raises(score.SubmissionError, match=r"1 PNG\(s\) of no truth image: a_stray\.png.*"
                                                    r"would score a_stray\.png against the reference of b10 "):
        score.score_submission(pred, organisers_case["ref"])
    status = cli_main(["score", "--pred", str(pred), "--truth", str(organisers_case["ref"])])
    err = capsys.readouterr().err
    assert status == 2 and "a_stray.png" in err and "misalign every later image" in err and "sorted" in err


def test_missing_png_in_a_midrc_submission_is_reported(organisers_case):
    (organisers_case["pred"] / "case-1.png").unlink()
    with pytest.raises(score.SubmissionError, match=r"1 truth image\(s\) without a PNG: case-1\.png"):
        score.score_submission(organisers_case["pred"], organisers_case["ref"])


def test_reference_of_the_wrong_shape_names_the_file(organisers_case):
    np.save(organisers_case["ref"] / "b9.npy", np.zeros((7, 7)))
    with pytest.raises(score.SubmissionError, match=r"b9: map shape .* != reference shape \(7, 7\) .*b9\.npy"):
        score.score_submission(organisers_case["pred"], organisers_case["ref"])


def test_file_names_the_organisers_would_not_join_are_warned(organisers_case, capsys):
    csv_path = organisers_case["ref"] / "image-level-classifications.csv"
    csv_path.write_text(csv_path.read_text().replace("case.dcm", "case.png"))
    result = score.score_submission(organisers_case["pred"], organisers_case["ref"])
    assert len(result["warnings"]) == 1 and "'case.dcm' vs 'case.png'" in result["warnings"][0]
    assert cli_main(["score", "--pred", str(organisers_case["pred"]), "--truth", str(organisers_case["ref"])]) == 0
    assert "warning: 1 fileNamePath(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- RSNA truth with the midrc metric

@pytest.mark.parametrize("level, value", [("1/3", 1 / 3), ("2/3", 2 / 3), ("1", 1.0)])
def test_box_level_is_the_reference_level_of_the_rsna_region(case, level, value):
    result = score.score_submission(case["pred"], case["truth"], box_level=level)
    expected = [organisers_wll(hand_truth(BOXES[pid], "boxes_in_lungs") * value, case["maps"][pid])
                for pid in case["ids"]]
    assert [r["map_log_loss"] for r in result["per_image"]] == pytest.approx(expected, rel=1e-12)
    assert result["box_level"] == value and result["box_level_name"] == level


def test_box_level_on_the_command_line(case, tmp_path):
    values = {}
    for level in ("1/3", "2/3", "0.667", "1"):
        out_json = tmp_path / f"{level.replace('/', '_')}.json"
        assert cli_main(["score", "--pred", str(case["pred"]), "--truth", str(case["truth"]),
                         "--box-level", level, "--json", str(out_json)]) == 0
        data = json.loads(out_json.read_text())
        assert data["metric"] == "midrc" and data["truth_def"] == "boxes_in_lungs"
        values[level] = (data["box_level"], data["map_log_loss"], data["map_log_loss_negative"])
    assert values["0.667"] == values["2/3"]
    assert values["1/3"][0] == pytest.approx(1 / 3) and values["1"][0] == 1.0
    losses = [values[k][1] for k in ("1/3", "2/3", "1")]
    assert losses[0] != losses[1] != losses[2]  # the weight of the opacity pixels changes the loss
    assert values["1/3"][2] == values["1"][2]  # images without opacity do not depend on the level
    with pytest.raises(SystemExit):
        cli_main(["score", "--pred", str(case["pred"]), "--truth", str(case["truth"]), "--box-level", "0.5"])


def test_both_layouts_score_alike(case, tmp_path):
    maps = {pid: case["maps"][pid] for pid in case["ids"]}
    work = tmp_path / "elsewhere"
    midrc = make_midrc_pred(tmp_path / "midrc", {**case["probabilities"]}, maps, threshold=0.4, work=work,
                            rsna=case["rsna"])
    (midrc / "notes.txt").write_text("not a map")
    ours = score.score_submission(case["pred"], case["truth"])
    theirs = score.score_submission(midrc, case["truth"], work=work)
    assert ours["layout"] == "pneumomap" and theirs["layout"] == "midrc"
    for key in ("map_log_loss", "map_log_loss_positive", "dice", "auc", "rsna_map", "threshold", "f1",
                "confusion_matrix", "n_images"):
        assert ours[key] == theirs[key], key
    assert theirs["threshold_source"] == "run_summary.json"
    # without --work the run files are looked for in <out>-work, absent here: the default threshold, no mAP
    default = score.score_submission(midrc, case["truth"])
    assert default["threshold_source"] == "default" and "rsna_map" not in default


def test_midrc_layout_with_a_split_needs_only_the_chosen_maps(tmp_path):
    split = {"a": "val", "b": "test", "c": "test", "d": "val"}
    boxes = {"a": [(5, 10, 8, 8)], "b": [(5, 10, 8, 8)], "c": [], "d": []}
    truth = make_truth(tmp_path / "t", boxes, split)
    maps = {pid: np.full(SHAPE, 40, np.uint8) for pid in ("b", "c", "z")}  # z: no truth image; a, d: not chosen
    pred = make_midrc_pred(tmp_path / "out", {"a": 0.7, "b": 0.9, "c": 0.2, "d": 0.1, "z": 0.5}, maps)
    result = score.score_submission(pred, truth, split="test")
    assert result["n_images"] == 2 and result["auc"] == 1.0 and result["n_maps"] == 2
    with pytest.raises(score.SubmissionError, match=r"z\.png.*without a PNG: a\.png, d\.png"):  # all ids: pairing
        score.score_submission(pred, truth)
    (pred / "c.png").unlink()
    with pytest.raises(score.SubmissionError, match=r"has no prediction for 1 truth id\(s\): c"):
        score.score_submission(pred, truth, split="test")


def test_metric_option_and_options_that_do_not_apply(case, organisers_case, tmp_path, capsys):
    out_json = tmp_path / "balanced.json"
    assert cli_main(["score", "--pred", str(case["pred"]), "--truth", str(case["truth"]), "--metric", "balanced",
                     "--pos-weight", "4", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    expected = score.score_submission(case["pred"], case["truth"], metric="balanced", pos_weight=4.0)
    assert data["metric"] == "balanced" and data["map_log_loss"] == pytest.approx(expected["map_log_loss"], rel=1e-15)
    assert "warning" not in capsys.readouterr().err
    assert cli_main(["score", "--pred", str(case["pred"]), "--truth", str(case["truth"]), "--pos-weight", "4"]) == 0
    assert "--pos-weight applies to --metric balanced only" in capsys.readouterr().err
    assert cli_main(["score", "--pred", str(organisers_case["pred"]), "--truth", str(organisers_case["ref"]),
                     "--box-level", "1/3"]) == 0
    assert "--box-level applies to RSNA truth folders only" in capsys.readouterr().err


def test_auc_interval_is_the_organisers():
    """Their confidence_interval_generation (scoring.py), copied, against metrics.bootstrap_interval."""
    from sklearn.metrics import roc_auc_score

    def organisers(y, x):
        bootstrapped_scores = []
        rng = np.random.RandomState(42)
        for _ in range(1000):
            indices = rng.randint(0, len(x), len(x))
            if len(np.unique(y[indices])) < 2:
                continue
            bootstrapped_scores.append(roc_auc_score(y[indices], x[indices]))
        sorted_scores = np.array(bootstrapped_scores)
        sorted_scores.sort()
        return sorted_scores[int(0.025 * len(sorted_scores))], sorted_scores[int(0.975 * len(sorted_scores))]

    rng = np.random.default_rng(5)
    for n in (12, 60):
        y = (rng.random(n) < 0.3).astype(int)
        x = np.round(rng.random(n) + 0.4 * y, 2)  # ties too
        ours = metrics.bootstrap_interval(np.column_stack([y, x]), lambda r: metrics.roc_auc(r[:, 0], r[:, 1]))
        assert ours == pytest.approx(organisers(y, x), abs=1e-12)
