"""pneumomap tune on the tiny random-weight pipeline and a few phantoms (CPU, one network run)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumomap import metrics, score
from pneumomap.cli import main as cli_main
from pneumomap.infer import runner, spec, tune
from pneumomap.infer.tune.evaluator import Evaluator
from pneumomap.labels import load_rsna
from pneumomap.synth import generate

FAST = dict(split=None, target_tnr=0.5, device="cpu", workers=0, progress=False)
# <out stem>.tune.json's keys, in this order (what other tools read)
JSON_KEYS = ["metric_before", "metric_start", "metric_after", "thresholds_before", "thresholds_after",
             "parameters_before", "parameters_after", "searched", "n_images", "n_negatives", "target_tnr",
             "achieved_tnr", "in_sample", "cross_validation", "rounds", "choice", "evaluations", "curves", "n_failed",
             "split", "val_dir", "pipeline", "out", "json", "work", "plots", "ran_networks", "metric", "metric_name",
             "truth", "date", "provenance", "plot_files", "seconds"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_pipeline) -> dict:
    """12 phantoms, the tiny pipeline, one tune (the gate at 50% TNR so that maps matter)."""
    root = tmp_path_factory.mktemp("tune")
    generate(root / "rsna", 12, seed=2, size=64)
    pipeline = tiny_pipeline(root / "pipe")
    out = pipeline.parent / "tuned.yaml"  # beside P: checkpoint paths stay as they are
    result = tune.tune(pipeline, root / "rsna", out, **FAST)
    return {"root": root, "pipeline": pipeline, "out": out, "result": result, "work": Path(result.work)}


def _artifact_files(work: Path) -> set[str]:
    return {str(p.relative_to(work)) for p in (work / ".artifacts").rglob("*") if p.is_file()}


def _no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a network was loaded")

    monkeypatch.setattr(runner, "load_models", refuse)


def test_tuned_yaml_differs_only_in_thresholds_and_has_a_header(tuned):
    result, text = tuned["result"], tuned["out"].read_text()
    header = [line for line in text.splitlines() if line.startswith(tune.HEADER)]
    body = tune.strip_header(text)
    assert len(header) >= 4 and text.startswith(tune.HEADER)
    assert body == spec.replace_thresholds(tuned["pipeline"].read_text(), result.thresholds_after)
    joined = "\n".join(header)
    assert f"{result.metric_before:.5f}" in joined and f"{result.metric_after:.5f}" in joined
    assert "12 images" in joined and "rsna" in joined and "pneumomap tune" in joined
    loaded = spec.load(tuned["out"])
    assert loaded.thresholds == result.thresholds_after
    original = spec.load(tuned["pipeline"])
    assert [n.checkpoint for n in loaded.model_nodes] == [n.checkpoint for n in original.model_nodes]


def test_search_never_worse_and_metric_agrees_with_score(tuned, tmp_path):
    result = tuned["result"]
    assert result.metric_after <= result.metric_start
    assert result.metric_after < result.metric_before  # random maps: clipping/raising always helps
    for name, curve in result.curves.items():
        if name != "classifier":
            assert min(curve.metrics) >= result.metric_after - 1e-12, name
    # the untuned maps the one network run wrote score as the tuner said
    assert score.score_submission(tuned["work"], tuned["root"] / "rsna")["map_log_loss"] == \
        pytest.approx(result.metric_before, rel=1e-12)
    # an inference run with the tuned YAML (from the stored outputs) scores what the tuner reported
    copy = tmp_path / "run"
    shutil.copytree(tuned["work"], copy)
    runner.run(spec.load(tuned["out"]), [p for p in (tuned["root"] / "rsna" / "stage_2_train_images").glob("*.dcm")],
               copy, runner.RunOptions(device="cpu", workers=0, progress=False))
    assert score.score_submission(copy, tuned["root"] / "rsna")["map_log_loss"] == \
        pytest.approx(result.metric_after, rel=1e-12)


def test_classifier_threshold_is_at_the_target_tnr(tuned):
    pipeline = spec.load(tuned["pipeline"])
    dataset = load_rsna(tuned["root"] / "rsna")
    stored = runner.load_outputs(pipeline, tuned["work"], [dataset.image_path(pid) for pid in dataset.ids])
    negatives = [float(s["classifier"]) for s in stored if not dataset.target[s["image_id"]]]
    assert tuned["result"].thresholds_after["classifier"] == metrics.threshold_at_tnr(negatives, 0.5)
    assert tuned["result"].n_negatives == len(negatives) > 0


def test_retune_runs_no_network_and_adds_no_artifact(tuned, monkeypatch, tmp_path):
    before = _artifact_files(tuned["work"])
    _no_network(monkeypatch)
    out = tmp_path / "elsewhere" / "deeper" / "tuned.yaml"  # another folder: checkpoint paths are rewritten
    result = tune.tune(tuned["out"], tuned["root"] / "rsna", out, work=tuned["work"], **FAST)
    assert not result.ran_networks
    assert _artifact_files(tuned["work"]) == before
    assert result.metric_before == pytest.approx(tuned["result"].metric_after, rel=1e-12)
    assert result.metric_after <= result.metric_before
    text = out.read_text()
    assert text.count("# tune: tuned by") == 1  # the previous header was replaced
    original = spec.load(tuned["pipeline"])
    assert [n.checkpoint for n in spec.load(out).model_nodes] == [n.checkpoint for n in original.model_nodes]
    assert "checkpoint: ../../" in text


def test_reference_maps_tune_like_the_same_truth_as_rsna_boxes(tuned, monkeypatch, tmp_path):
    """The organisers' kind of truth (.npy levels + image-level-classifications.csv, images from --images)
    gives the very metric of the same opacity as RSNA boxes at level 1; other levels weigh misses less."""
    from pneumomap.stages.reader import read_image
    from pneumomap.truth import RsnaTruth

    _no_network(monkeypatch)
    dataset = load_rsna(tuned["root"] / "rsna")
    truth, ref = RsnaTruth(dataset), tmp_path / "ref"
    ref.mkdir()
    rows = ["fileNamePath,score"]
    for pid in dataset.ids:
        height, width = read_image(dataset.image_path(pid)).pixels.shape
        np.save(ref / f"{pid}.npy", truth.mask(pid, (height, width)).astype(np.float64))
        rows.append(f"{pid}.dcm,{dataset.target[pid]}")
    (ref / "image-level-classifications.csv").write_text("\n".join(rows) + "\n")
    common = dict(work=tuned["work"], **FAST)
    by_boxes = tune.tune(tuned["pipeline"], tuned["root"] / "rsna", tmp_path / "a.yaml", **common)
    by_maps = tune.tune(tuned["pipeline"], ref, tmp_path / "b.yaml", images=tuned["root"] / "rsna" / "stage_2_train_images",
                        **{**common, "split": "val"})  # the default split is an RSNA folder's: all maps here
    for key in ("metric_before", "metric_after"):
        assert getattr(by_maps, key) == pytest.approx(getattr(by_boxes, key), rel=1e-12), key
    assert by_maps.thresholds_after == by_boxes.thresholds_after
    third = tune.tune(tuned["pipeline"], tuned["root"] / "rsna", tmp_path / "c.yaml", box_level=1 / 3, **common)
    assert third.metric_before < by_boxes.metric_before  # weight 15 instead of 45 on the same misses
    balanced = tune.tune(tuned["pipeline"], tuned["root"] / "rsna", tmp_path / "d.yaml", metric="balanced", **common)
    assert balanced.metric_before == pytest.approx(
        score.score_submission(tuned["work"], tuned["root"] / "rsna", metric="balanced")["map_log_loss"], rel=1e-12)
    for result in (by_boxes, by_maps, third, balanced):
        clip = result.thresholds_after["clip"]
        assert 1 <= clip["outside"] <= 254 and 1 <= clip["low"] <= clip["high"] <= 254


def test_plots_and_json(tuned):
    result = tuned["result"]
    names = set(result.searched) | {"classifier"}
    assert {"right_extent", "level", "overestimate.high.raise", "clip.low", "clip.outside"} <= names
    plots = {Path(p).name for p in result.plot_files}
    assert plots == {f"metric_vs_{n}.png" for n in names}
    for path in result.plot_files:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(tuned["out"].with_suffix(".tune.json").read_text())
    for key in ("metric_before", "metric_after", "thresholds_before", "thresholds_after", "n_images"):
        assert saved[key] == getattr(result, key)
    assert saved["n_images"] == 12
    assert list(saved) == JSON_KEYS and saved == json.loads(json.dumps(result.to_json()))
    assert list(saved["in_sample"]) == ["before", "after", "gain", "gain_ci95"]
    assert list(saved["curves"]["level"]) == ["values", "metrics"] and list(saved["seconds"]) == ["run", "total"]


def test_memoised_maps_equal_postprocess(tuned):
    pipeline = spec.load(tuned["pipeline"])
    dataset = load_rsna(tuned["root"] / "rsna")
    paths = [dataset.image_path(pid) for pid in dataset.ids]
    stored = runner.load_outputs(pipeline, tuned["work"], paths)
    lazy = runner.load_outputs(pipeline, tuned["work"], paths, lazy=True)
    evaluator = Evaluator(pipeline, lazy, lambda i: None, metrics.map_metric("midrc"), budget=1)  # tiny budget: recomputation works too
    variants = [pipeline.thresholds, tuned["result"].thresholds_after,
                {**tuned["result"].thresholds_after, "classifier": 0.0, "level": 0.0}]
    for thresholds in variants * 2:
        candidate = pipeline.with_thresholds(thresholds)
        for i, one in enumerate(stored):
            expected = runner.postprocess(candidate, one)[candidate.outputs.map]
            assert np.array_equal(evaluator.final_map(thresholds, i), expected)


def test_cli(tuned, monkeypatch, tmp_path, capsys):
    _no_network(monkeypatch)
    out = tuned["out"].parent / "cli.yaml"
    args = ["tune", "--pipeline", str(tuned["pipeline"]), "--val", str(tuned["root"] / "rsna"), "--out", str(out),
            "--split", "all", "--target-tnr", "0.5", "--device", "cpu", "--plots", str(tmp_path / "plots"),
            "--work", str(tuned["work"])]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "stored outputs" in printed and str(out.resolve()) in printed
    assert (tmp_path / "plots" / "metric_vs_clip.low.png").is_file()
    assert cli_main(["tune", "--pipeline", str(tuned["pipeline"]), "--val", str(tmp_path / "nothing"),
                     "--out", str(out)]) == 2
    assert "pneumomap tune: error" in capsys.readouterr().err


def _saturated(monkeypatch, tuned) -> list[str]:
    """Stored outputs whose validation negatives all score exactly 1.0 (a saturated classifier); returns their ids."""
    dataset = load_rsna(tuned["root"] / "rsna")
    real = tune.stored_outputs

    def saturated(*args, **kwargs):
        stored, ran = real(*args, **kwargs)
        return [{**s, "classifier": 1.0} if not dataset.target[s["image_id"]] else s for s in stored], ran

    monkeypatch.setattr(tune, "stored_outputs", saturated)
    return [pid for pid in dataset.ids if not dataset.target[pid]]


def test_achieved_tnr_is_reported(tuned):
    result = tuned["result"]
    assert result.achieved_tnr >= result.target_tnr
    assert f"(achieved {result.achieved_tnr:.4g})" in tuned["out"].read_text()


def test_saturated_negatives_miss_the_target_tnr_with_a_warning(tuned, monkeypatch, tmp_path, capsys):
    """The gate threshold cannot exceed 1.0: negatives at 1.0 pass it, and the shortfall is reported, not silent."""
    negatives = _saturated(monkeypatch, tuned)
    _no_network(monkeypatch)
    with pytest.warns(UserWarning, match=r"true-negative rate on the \d+ validation negatives is 0, below the target 0.5"
                      ) as caught:
        result = tune.tune(tuned["pipeline"], tuned["root"] / "rsna", tmp_path / "t.yaml", work=tuned["work"], **FAST)
    assert len([w for w in caught if "validation negatives" in str(w.message)]) == 1
    assert result.thresholds_after["classifier"] == 1.0
    assert result.achieved_tnr == 0.0 and result.n_negatives == len(negatives)
    assert "(achieved 0)" in (tmp_path / "t.yaml").read_text()
    assert json.loads((tmp_path / "t.tune.json").read_text())["achieved_tnr"] == 0.0
    args = ["tune", "--pipeline", str(tuned["pipeline"]), "--val", str(tuned["root"] / "rsna"),
            "--out", str(tmp_path / "cli.yaml"), "--split", "all", "--target-tnr", "0.5", "--device", "cpu",
            "--work", str(tuned["work"])]
    assert cli_main(args) == 0
    printed = capsys.readouterr()
    assert "true-negative rate 0 on the validation negatives (target 0.5)" in printed.out
    assert printed.err.count("pneumomap tune: warning: the classifier gate's true-negative rate") == 1


def test_cross_validation_reports_the_gain_to_expect(tuned, monkeypatch, tmp_path):
    """--folds 3 on 12 images: every image held out once, the held-out losses are the pipeline's own
    (a fold's thresholds scored on its images equal a direct evaluation), the in-sample gain is the
    larger, and the header and JSON say both."""
    from pneumomap.infer.tune import folds as tune_folds

    _no_network(monkeypatch)
    result = tune.tune(tuned["pipeline"], tuned["root"] / "rsna", tmp_path / "cv.yaml", work=tuned["work"],
                       folds=3, **FAST)
    cross, in_sample = result.cross_validation, result.in_sample
    assert cross.folds == 3 and sum(f.n_images for f in cross.per_fold) == 12
    assert in_sample.before == pytest.approx(result.metric_before, rel=1e-12)
    assert in_sample.after == pytest.approx(result.metric_after, rel=1e-12)
    assert cross.summary.before == pytest.approx(result.metric_before, rel=1e-12)  # untuned: the same per image
    assert in_sample.gain >= cross.summary.gain - 1e-12  # the search saw those images
    low, high = cross.summary.gain_ci95
    assert low <= cross.summary.gain <= high
    assert set(cross.chosen) == set(result.parameters_after) and all(len(v) == 3 for v in cross.chosen.values())
    header = (tmp_path / "cv.yaml").read_text()
    assert "cross-validated (3 folds" in header and "in-sample:" in header
    # a fold's held-out losses are what a direct evaluation of its thresholds gives
    folds = tune_folds.fold_indices(12, 3, 0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(12))
    assert tune_folds.default_folds(49) == 0 and tune_folds.default_folds(50) == 5
    with pytest.raises(tune.TuneError, match="--folds 1"):
        tune.tune(tuned["pipeline"], tuned["root"] / "rsna", tmp_path / "x.yaml", work=tuned["work"], folds=1, **FAST)
    saved = json.loads((tmp_path / "cv.tune.json").read_text())["cross_validation"]
    assert list(saved) == ["folds", "seed", "before", "after", "gain", "gain_ci95", "before_spread", "after_spread",
                           "per_fold", "chosen", "stability"]
    assert saved["gain"] == cross.summary.gain and saved["per_fold"][0] == {
        "n_images": cross.per_fold[0].n_images, "before": cross.per_fold[0].before, "after": cross.per_fold[0].after}
    assert all(list(s) == ["min", "max", "distinct"] for s in saved["stability"].values())


def test_options_are_checked_when_made(tmp_path):
    options = tune.TuneOptions(work=str(tmp_path), images="", rounds=0, folds=0)
    assert options.work == tmp_path and options.images is None
    assert options.work_for(tmp_path / "a" / "t.yaml") == tmp_path
    assert tune.TuneOptions().work_for(tmp_path / "t.yaml") == tmp_path / "tune-work"
    assert tune.TuneOptions().plots_for(tmp_path / "t.yaml") == tmp_path / "t-tune-plots"
    assert tune.TuneOptions(metric="balanced", pos_weight=2.0).map_metric().pos_weight == 2.0
    run = tune.TuneOptions(device="cpu", batch_size=3).run_options()
    assert run.ungated and run.device == "cpu" and run.batch_size == 3
    for bad, message in [(dict(target_tnr=1.5), "--target-tnr 1.5"), (dict(rounds=-1), "--rounds -1"),
                         (dict(folds=-2), "--folds -2"), (dict(choice="median"), "--choice median"),
                         (dict(batch_size=0), "--batch-size 0"), (dict(search_workers=-1), "search_workers -1"),
                         (dict(metric="dice"), "--metric dice")]:
        with pytest.raises(tune.TuneError, match=message):
            tune.TuneOptions(**bad)
    with pytest.raises(TypeError, match="rounds_max"):
        tune.tune(tmp_path / "p.yaml", tmp_path, tmp_path / "t.yaml", rounds_max=2)


def test_bootstrap_interval():
    values = np.r_[np.zeros(50), np.ones(50)]
    low, high = metrics.bootstrap_interval(values)
    assert 0.35 < low < 0.5 < high < 0.65
    assert metrics.bootstrap_interval(np.full(10, 2.0)) == (2.0, 2.0)
    assert metrics.bootstrap_interval([]) != metrics.bootstrap_interval([])  # NaN, NaN
