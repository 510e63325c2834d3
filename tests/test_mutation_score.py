"""`pneumomap score` in the corners `test_score` leaves open (issue 19): options that must reach the scorer,
exact messages, the console table, the JSON text, and the figures' data."""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumomap import metrics, score
from pneumomap.cli import main as cli_main
from pneumomap.labels import load_rsna
import test_score
from test_score import BOXES, make_midrc_pred, make_pred, make_truth

case = test_score.case  # the fixture: truth and submission folders of eight images


def run_cli(case_, tmp_path, *options: str) -> dict:
    out_json = tmp_path / "cli.json"
    assert cli_main(["score", "--pred", str(case_["pred"]), "--truth", str(case_["truth"]), "--json", str(out_json),
                     *options]) == 0
    return json.loads(out_json.read_text())


# ----------------------------------------------------------------------------- options reach the scorer

def test_every_cli_option_reaches_the_scorer(case, tmp_path, capsys):
    direct = score.score_submission(case["pred"], case["truth"], threshold=0.7, split="test", metric="balanced",
                                    pos_weight=3.0, neg_weight=0.5)
    data = run_cli(case, tmp_path, "--threshold", "0.7", "--split", "test", "--metric", "balanced",
                   "--pos-weight", "3", "--neg-weight", "0.5")
    assert data["threshold"] == 0.7 and data["threshold_source"] == "argument" and data["split"] == "test"
    assert (data["pos_weight"], data["neg_weight"]) == (3.0, 0.5)
    assert data["map_log_loss"] == pytest.approx(direct["map_log_loss"], rel=1e-12)
    assert f"wrote {tmp_path / 'cli.json'}" in capsys.readouterr().out


def test_split_on_the_command_line_selects_the_truth(tmp_path):
    truth = make_truth(tmp_path / "truth", {"a": [(6, 10, 10, 12)], "b": [], "c": []},
                       split={"a": "test", "b": "test", "c": "train"})
    pred = make_pred(tmp_path / "pred", {"a": 0.9, "b": 0.1})  # no prediction for c: only the test split works
    data = run_cli({"pred": pred, "truth": truth}, tmp_path, "--split", "test")
    assert data["n_images"] == 2 and data["split"] == "test"


def test_the_work_folder_option_and_plot_paths(tmp_path, capsys):
    truth = make_truth(tmp_path / "truth", {"a": [(6, 10, 10, 12)], "b": []})
    maps = {pid: np.full((64, 48), 128, np.uint8) for pid in ("a", "b")}
    work = tmp_path / "elsewhere"
    pred = make_midrc_pred(tmp_path / "out", {"a": 0.9, "b": 0.2}, maps, threshold=0.95, work=work)
    data = run_cli({"pred": pred, "truth": truth}, tmp_path, "--work", str(work), "--plots", str(tmp_path / "p"))
    assert data["threshold"] == 0.95 and data["work"] == str(work)
    out = capsys.readouterr().out
    assert all(f"wrote {tmp_path / 'p' / name}" in out for name in ("roc.png", "precision_recall.png",
                                                                     "confusion_matrix.png"))
    assert score.read_run_threshold(pred, work) == 0.95 and score.read_run_threshold(pred) is None


def test_parser_types_defaults_and_required_options(tmp_path):
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args = parser.parse_args(["--pred", "p", "--truth", "t", "--work", "w", "--json", "j", "--plots", "q",
                              "--threshold", "0.3", "--pos-weight", "2", "--neg-weight", "4"])
    assert all(isinstance(v, Path) for v in (args.pred, args.truth, args.work, args.json, args.plots))
    assert (args.threshold, args.pos_weight, args.neg_weight) == (0.3, 2.0, 4.0)
    defaults = parser.parse_args(["--pred", "p", "--truth", "t"])
    assert (defaults.work, defaults.json, defaults.plots, defaults.threshold, defaults.split) == (None,) * 5
    assert (defaults.metric, defaults.truth_def, defaults.box_level) == (
        score.DEFAULT_METRIC, score.DEFAULT_TRUTH_DEF, score.DEFAULT_BOX_LEVEL)
    assert (defaults.pos_weight, defaults.neg_weight) == (1.0, 1.0)
    for missing in (["--pred", "p"], ["--truth", "t"]):
        with pytest.raises(SystemExit):
            parser.parse_args(missing)
    for bad in (["--metric", "dice"], ["--truth-def", "circles"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--pred", "p", "--truth", "t", *bad])
    with pytest.raises(argparse.ArgumentTypeError) as error:
        score.box_level_argument("0.5")
    with pytest.raises(ValueError) as plain:
        score.parse_box_level("0.5")
    assert str(error.value) == str(plain.value) != ""


def test_ignored_options_are_all_noted(tmp_path):
    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args = parser.parse_args(["--pred", "p", "--truth", "t", "--pos-weight", "2", "--neg-weight", "3",
                              "--truth-def", "boxes", "--box-level", "1/3"])

    class MapTruth:  # any truth that is not an RSNA folder
        root = tmp_path

    assert score.ignored_options(args, MapTruth()) == [
        "--pos-weight applies to --metric balanced only; ignored",
        "--neg-weight applies to --metric balanced only; ignored",
        f"--box-level applies to RSNA truth folders only ({tmp_path} holds reference maps); ignored",
        f"--truth-def applies to RSNA truth folders only ({tmp_path} holds reference maps); ignored"]


def test_a_loaded_dataset_and_a_metric_object_score_as_the_folder(case):
    options = dict(split="test", truth_def="ellipses", box_level="2/3")
    by_folder = score.score_submission(case["pred"], case["truth"], **options)
    by_dataset = score.score_submission(case["pred"], case["truth"], dataset=load_rsna(case["truth"]), **options)
    assert by_dataset["map_log_loss"] == by_folder["map_log_loss"] and by_dataset["truth_def"] == "ellipses"
    assert by_dataset["split"] == "test" and by_dataset["box_level"] == pytest.approx(2 / 3)
    balanced = metrics.BalancedMetric(2.0, 0.5)
    by_object = score.score_submission(case["pred"], case["truth"], metric=balanced)
    assert by_object["metric"] == "balanced" and by_object["map_log_loss"] == pytest.approx(
        score.score_submission(case["pred"], case["truth"], metric="balanced", pos_weight=2.0,
                               neg_weight=0.5)["map_log_loss"], rel=1e-12)
    assert (by_folder["pos_weight"], by_folder["neg_weight"]) == (1.0, 1.0)
    assert set(by_folder["per_image"][0]) == {"image_id", "target", "probability", "opacity_pixels", "map_log_loss",
                                              "dice"}
    assert "map_log_loss_ci95" in by_folder and len(by_folder["map_log_loss_ci95"]) == 2
    with pytest.raises(ValueError) as error:
        score.score_submission(case["pred"], case["truth"], truth_def="circles")
    assert str(error.value) == f"unknown truth definition 'circles'; choose one of {score.TRUTH_DEFS}"


# ----------------------------------------------------------------------------- reading a submission

def test_prediction_strings_and_rsna_csv_errors(tmp_path):
    confidences, boxes = score.parse_prediction_string("0.9 1 2 3 4 0.5 5 6 7 8")
    assert confidences.dtype == boxes.dtype == np.float64
    assert confidences.tolist() == [0.9, 0.5] and boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match=r"^4 numbers, not a multiple of 5$"):
        score.parse_prediction_string("1 2 3 4")
    path = tmp_path / "rsna.csv"
    path.write_text("patientId,PredictionString\na,0.5 1 2 3 4\nb,0.5 1 2\n")
    with pytest.raises(score.SubmissionError) as error:
        score.read_rsna_submission(path)
    assert str(error.value) == f"{path}:3: PredictionString: 3 numbers, not a multiple of 5"


def test_read_map_and_decisions(tmp_path):
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(score.SubmissionError) as error:
        score.read_map(tmp_path / "rgb.png")
    assert str(error.value) == f"{tmp_path / 'rgb.png'}: expected an 8-bit greyscale PNG, got mode RGB"
    pred = make_pred(tmp_path / "pred", {"a": 0.5})
    assert score.read_decisions(pred) == {}
    (pred / "decisions.csv").write_text("image_id,gate\na,1\n")
    assert score.read_decisions(pred) == {"a": {"image_id": "a", "gate": "1"}}
    assert score.read_decisions(score.read_submission(pred)) == {"a": {"image_id": "a", "gate": "1"}}
    work = tmp_path / "work"
    work.mkdir()
    (work / "decisions.csv").write_text("image_id,gate\nb,0\n")
    assert score.read_decisions(pred, work) == {"b": {"image_id": "b", "gate": "0"}}


# ----------------------------------------------------------------------------- messages and text

def test_sorted_pairing_messages(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(b"")
    with pytest.raises(score.SubmissionError) as error:
        score.check_sorted_pairing(folder, ["a", "b"])
    assert str(error.value) == (
        f"{folder}: 1 PNG(s) of no truth image: c.png. The organisers' scorer pairs the PNGs of this folder with its "
        "reference maps by sorted file order, so it would pair 3 map(s) with 2 reference(s), stopping at the shorter "
        "list. Leave exactly one <name>.png per truth image in the folder")
    with pytest.raises(score.SubmissionError) as error:
        score.check_sorted_pairing(folder, ["a", "b", "c", "d"])
    assert "it would pair 3 map(s) with 4 reference(s)" in str(error.value)
    with pytest.raises(score.SubmissionError) as error:
        score.check_sorted_pairing(folder, ["a", "bb", "c"])
    assert str(error.value) == (
        f"{folder}: 1 PNG(s) of no truth image: b.png; 1 truth image(s) without a PNG: bb.png. The organisers' scorer "
        "pairs the PNGs of this folder with its reference maps by sorted file order, so it would score b.png against "
        "the reference of bb (image 2 of 3) and misalign every later image. Leave exactly one <name>.png per truth "
        "image in the folder")
    score.check_sorted_pairing(folder, ["c", "a", "b"])  # exactly one per id: no error


def test_first_lists_at_most_n():
    assert score._first(range(10)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    assert score._first(range(11)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (11 in all)"
    assert score._first(["a", "b", "c"], 2) == "a, b, ... (3 in all)"


def test_join_warning_shows_three_pairs(tmp_path):
    class Sub:
        names = {f"i{k}": f"i{k}.dcm" for k in range(4)}
        layout = argparse.Namespace(table_path=tmp_path / "image-level-classifications.csv")

    class Truth:
        @staticmethod
        def file_name(image_id):
            return f"{image_id}.png"

    (warning,) = score.join_warnings(Sub(), Truth(), list(Sub.names))
    assert warning.startswith("4 fileNamePath(s) of ") and warning.count(" vs ") == 3
    assert "('i0.dcm' vs 'i0.png', 'i1.dcm' vs 'i1.png', 'i2.dcm' vs 'i2.png')" in warning
    assert warning.endswith("the organisers join the two CSVs on fileNamePath, so their AUC would leave those "
                            "images out")


def test_format_table_exactly():
    result = {"metric": "midrc", "box_level_name": "2/3", "n_images": 8, "auc": 0.75, "auc_ci95": [0.5, 0.9],
              "map_log_loss": 0.123456, "map_log_loss_ci95": [float("nan"), 0.2], "rsna_map": None,
              "confusion_matrix": [[3, 1], [2, 4]]}
    assert score.format_table(result) == "\n".join([
        "metric                  midrc",
        "box_level               2/3",
        "n_images                8",
        "auc                     0.7500   95% bootstrap interval [0.5000, 0.9000]",
        "map_log_loss            0.1235",
        "confusion matrix        pred 0  pred 1",
        "  truth 0                   3       1",
        "  truth 1                   2       4"])


def test_json_text_has_nulls_for_nan_everywhere():
    result = {"a": [float("nan"), 1.0, (np.float64(2.5), np.int64(3))], "b": np.float32("nan"), "c": {"d": math.inf}}
    assert score.to_json(result) == ('{\n  "a": [\n    null,\n    1.0,\n    [\n      2.5,\n      3\n    ]\n  ],\n'
                                     '  "b": null,\n  "c": {\n    "d": null\n  }\n}\n')


def test_nanmean_of_nothing_is_nan_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(score._nanmean([])) and score._nanmean([1.0, 2.0]) == 1.5


# ----------------------------------------------------------------------------- the figures' data

def test_plots_show_the_curves_and_the_operating_point(case, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    figures = {}
    monkeypatch.setattr(score, "_save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    result = score.score_submission(case["pred"], case["truth"])
    result["confusion_matrix"] = [[4, 2], [1, 3]]  # a cell at exactly half the largest: black, not white
    paths = score.write_plots(result, tmp_path)
    assert paths == [tmp_path / "roc.png", tmp_path / "precision_recall.png", tmp_path / "confusion_matrix.png"]
    y = [r["target"] for r in result["per_image"]]
    s = [r["probability"] for r in result["per_image"]]
    point = f"threshold {result['threshold']:.4g}"

    def lines(ax):
        return [(line.get_xydata().tolist(), line.get_linestyle(), line.get_marker(), to_hex(line.get_color()),
                 line.get_label()) for line in ax.lines]

    roc = figures["roc.png"].axes[0]
    fpr, tpr, _ = metrics.roc_curve(y, s)
    assert lines(roc) == [
        (np.column_stack([fpr, tpr]).tolist(), "-", "None", "#1f77b4", f"ROC (AUC {result['auc']:.3f})"),
        ([[0.0, 0.0], [1.0, 1.0]], ":", "None", "#808080", "_child1"),
        ([[1 - result["specificity"], result["recall"]]], "None", "o", "#ff0000", point)]
    assert (roc.get_title(), roc.get_xlabel(), roc.get_ylabel()) == ("ROC", "false positive rate", "true positive rate")
    assert roc.get_xlim() == (0, 1) and roc.get_ylim() == (0, 1.02)
    assert [t.get_text() for t in roc.get_legend().get_texts()] == [f"ROC (AUC {result['auc']:.3f})", point]
    assert roc.get_legend()._loc == 4  # lower right

    pr = figures["precision_recall.png"].axes[0]
    precision, recall, _ = metrics.precision_recall_curve(y, s)
    assert lines(pr) == [(np.column_stack([recall, precision]).tolist(), "-", "None", "#1f77b4", "precision-recall"),
                         ([[result["recall"], result["precision"]]], "None", "o", "#ff0000", point)]
    assert (pr.get_title(), pr.get_xlabel(), pr.get_ylabel()) == ("Precision-recall", "recall", "precision")
    assert pr.get_xlim() == (0, 1) and pr.get_ylim() == (0, 1.02) and pr.get_legend()._loc == 3  # lower left

    cm = figures["confusion_matrix.png"].axes[0]
    matrix = np.array(result["confusion_matrix"])
    assert np.array_equal(cm.images[0].get_array(), matrix) and cm.images[0].get_cmap().name == "Blues"
    assert [(t.get_position(), t.get_text(), t.get_color(), t.get_ha(), t.get_va()) for t in cm.texts] == [
        ((j, i), str(v), "white" if v > matrix.max() / 2 else "black", "center", "center")
        for (i, j), v in np.ndenumerate(matrix)]
    assert (cm.get_title(), cm.get_xlabel(), cm.get_ylabel()) == (f"Confusion matrix ({point})", "predicted", "truth")
    assert list(cm.get_xticks()) == list(cm.get_yticks()) == [0, 1]
    assert [tuple(f.get_size_inches()) for f in figures.values()] == [(5, 5), (5, 5), (4, 4)]
    for fig in figures.values():
        plt.close(fig)


def test_saved_figures_are_png_at_100_dpi(tmp_path):
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots(figsize=(3, 2))
    score._save_figure(fig, tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as image:
        assert image.format == "PNG" and image.size == (300, 200)
    assert not plt.get_fignums() or fig.number not in plt.get_fignums()  # closed


# ----------------------------------------------------------------------------- the result's keys and chosen ids

RESULT_KEYS = {
    "accuracy", "auc", "auc_ci95", "box_level", "box_level_name", "confusion_matrix", "dice", "dice_positive", "f1",
    "fn", "fp", "layout", "map_log_loss", "map_log_loss_ci95", "map_log_loss_negative", "map_log_loss_positive",
    "metric", "metric_description", "n_ignored_predictions", "n_images", "n_maps", "n_positive", "neg_weight",
    "per_image", "pos_weight", "precision", "recall", "rsna_map", "specificity", "split", "threshold",
    "threshold_source", "tn", "tp", "truth", "truth_def", "truth_source", "warnings", "work"}


def test_the_result_has_exactly_its_keys_and_the_auc_interval(case):
    result = score.score_submission(case["pred"], case["truth"])
    assert set(result) == RESULT_KEYS  # score.json's fields: a field added on purpose is added here too
    assert result["n_positive"] == sum(bool(b) for b in BOXES.values())
    assert result["metric_description"] == metrics.map_metric("midrc").describe()
    y = np.array([r["target"] for r in result["per_image"]])
    s = np.array([r["probability"] for r in result["per_image"]])
    assert result["auc_ci95"] == list(metrics.bootstrap_interval(
        np.column_stack([y, s]), lambda rows: metrics.roc_auc(rows[:, 0], rows[:, 1])))


def test_chosen_ids_are_scored_alone(case):
    result = score.score_submission(case["pred"], case["truth"], ids=["p4"])  # one id, with boxes
    assert result["n_images"] == 1 and [r["image_id"] for r in result["per_image"]] == ["p4"]
    assert result["rsna_map"] == metrics.rsna_map({"p4": np.array([[28, 40, 16, 14]])},
                                                  {"p4": ([0.7], [[26, 42, 16, 14]])})
    with pytest.raises(score.SubmissionError) as error:
        score.score_submission(case["pred"], case["truth"], ids=["nobody"])
    assert str(error.value) == f"{case['truth']}: no truth image to score"


def test_missing_predictions_and_boxes_are_named_exactly(case):
    (case["pred"] / "predictions.csv").write_text("image_id,probability\np0,0.5\n")
    with pytest.raises(score.SubmissionError) as error:
        score.score_submission(case["pred"], case["truth"], ids=["p0", "p1"])
    assert str(error.value) == f"{case['pred'] / 'predictions.csv'} has no prediction for 1 truth id(s): p1"
    (case["pred"] / "predictions.csv").write_text("image_id,probability\np0,0.5\np1,0.5\n")
    (case["pred"] / "rsna_submission.csv").write_text("patientId,PredictionString\np0,\n")
    with pytest.raises(score.SubmissionError) as error:
        score.score_submission(case["pred"], case["truth"], ids=["p0", "p1"])
    assert str(error.value) == f"{case['pred'] / 'rsna_submission.csv'} has no prediction for 1 truth id(s): p1"
