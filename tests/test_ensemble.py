"""`infer --save-probabilities` and `pneumomap ensemble` on two tiny random-weight pipelines."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumomap import cli as top
from pneumomap import ensemble as ens
from pneumomap.infer import runner, spec, writers
from pneumomap.infer.runner import RunOptions

FAST = dict(workers=0, progress=False, batch_size=3)
CLIP = dict(low=10, high=245, outside=1)  # pipeline.yaml's thresholds.clip


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    """Runs A and B (other weights) over 4 phantoms + 1 corrupt file; in B one more image is corrupt."""
    root = tmp_path_factory.mktemp("ensemble")
    images = phantom_inputs(root / "data", n=4, size=64)
    broken = root / "broken"
    shutil.copytree(images, broken)
    good = sorted(p for p in broken.iterdir() if "corrupt" not in p.name)
    good[0].write_bytes(b"\0" * 128 + b"DICM" + b"broken in run B only" * 10)
    paths = {name: tiny_pipeline(root / name, thresholds={"classifier": 0.0}, seed=seed)  # every gate passes
             for name, seed in (("a", 0), ("b", 1))}
    for name, inputs in (("a", images), ("b", broken)):
        summary = runner.run(spec.load(paths[name]), inputs, root / f"out{name}",
                             RunOptions(format="midrc", save_probabilities=True, **FAST))
        assert summary["failures"] == (1 if name == "a" else 2)
    return {"root": root, "images": images, "paths": paths, "ids": [p.stem for p in sorted(images.iterdir())],
            "only_b": good[0].stem, "corrupt": next(p.stem for p in images.iterdir() if "corrupt" in p.name),
            "work": {name: root / f"out{name}-work" for name in ("a", "b")}}


@pytest.fixture(scope="module")
def varied(runs, tmp_path_factory) -> dict:
    """Copies of the runs' tables and saved files with random maps and lung masks (the tiny random networks'
    maps are flat), each run's masks its own; ``float32``: the maps before they were saved as float16."""
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(0)
    work, float32 = {}, {}
    for name, source in runs["work"].items():
        work[name] = root / f"{name}-work"
        shutil.copytree(source, work[name], ignore=shutil.ignore_patterns(".artifacts", ".parts"))
        for path in sorted((work[name] / writers.PROBABILITIES).glob("*.npz")):
            saved = writers.load_probabilities(path)
            values = rng.random(saved.map.shape, dtype=np.float32)
            float32[name, path.stem] = values
            writers.save_probabilities(path, values, rng.random(saved.map.shape) < 0.8, saved.probability,
                                       saved.path, saved.key)
    return {**runs, "work": work, "float32": float32}


def _clip(values: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """`clip` written out here."""
    inside = np.clip(np.rint(values.astype(np.float64) * 255.0), CLIP["low"], CLIP["high"]).astype(np.uint8)
    return np.where(lungs, inside, np.uint8(CLIP["outside"]))


def test_float16_keeping_bytes_keeps_every_8_bit_value():
    values = np.random.default_rng(1).random((256, 256), dtype=np.float32)
    values[0, :4] = [0.0, 1.0, 0.5, 10.5 / 255]  # the ends and ties
    half = writers.float16_keeping_bytes(values)
    assert half.dtype == np.float16
    assert np.array_equal(np.rint(half.astype(np.float64) * 255), np.rint(values.astype(np.float64) * 255))
    assert np.abs(half.astype(np.float32) - values).max() <= 2.0 ** -11  # one float16 step at most
    plain = values.astype(np.float16)  # what plain rounding would change: about 2% of the pixels
    assert np.mean(np.rint(plain.astype(np.float64) * 255) != np.rint(values.astype(np.float64) * 255)) > 0.01


def test_an_ensemble_of_one_run_reclips_its_float32_maps(varied, tmp_path):
    out = tmp_path / "one"
    ens.ensemble([varied["work"]["a"]], varied["paths"]["a"], out, format="pneumomap")
    for image_id in varied["ids"]:
        if image_id != varied["corrupt"]:
            lungs = writers.load_probabilities(writers.probability_path(varied["work"]["a"], image_id)).lungs
            expected = _clip(varied["float32"]["a", image_id], lungs)
            assert np.array_equal(_png(out / "maps" / f"{image_id}.png"), expected)


def _by_hand(runs: dict, image_id: str, weights: dict[str, float]) -> tuple[np.ndarray, float]:
    """The weighted mean of the saved maps and probabilities, then clip (the first run's lungs), written out here."""
    saved = {n: np.load(writers.probability_path(runs["work"][n], image_id)) for n in weights}
    total = sum(weights.values())
    mean = sum(weights[n] / total * saved[n]["map"].astype(np.float64) for n in weights)
    probability = sum(weights[n] / total * float(saved[n]["probability"]) for n in weights)
    return _clip(mean, saved[next(iter(weights))]["lungs"]), probability


def test_saved_probabilities_reclip_to_the_run_s_own_maps(runs):
    work = runs["work"]["a"]
    for image_id in runs["ids"]:
        path = writers.probability_path(work, image_id)
        if image_id == runs["corrupt"]:
            assert not path.exists()
            continue
        saved = writers.load_probabilities(path)
        assert saved.map.dtype == np.float16 and saved.lungs.dtype == bool and saved.lungs.any()
        assert saved.map.max() > 0  # the gate passed: a real map, not the floor
        written = _png(runs["root"] / "outa" / f"{image_id}.png")
        assert saved.map.shape == written.shape
        values = np.clip(np.rint(saved.map.astype(np.float64) * 255.0), CLIP["low"], CLIP["high"])
        assert np.array_equal(np.where(saved.lungs, values, CLIP["outside"]), written)


@pytest.mark.parametrize("layout", ["midrc", "pneumomap"])
def test_an_ensemble_of_one_run_is_that_run_byte_for_byte(runs, tmp_path, layout):
    root, work = runs["root"], runs["work"]["a"]
    if layout == "midrc":
        reference, tables = root / "outa", ["image-level-classifications.csv"]
        maps = lambda out: {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}  # noqa: E731
    else:  # the same run in the other layout: its stored outputs are reused, only the ops run
        reference, tables = tmp_path / "reference", ["predictions.csv"]
        runner.run(spec.load(runs["paths"]["a"]), runs["images"], reference,
                   RunOptions(format="pneumomap", work=work, save_probabilities=True, **FAST))
        maps = lambda out: {p.name: p.read_bytes() for p in sorted((out / "maps").glob("*.png"))}  # noqa: E731
    out = tmp_path / "ensemble"
    summary = ens.ensemble([work], runs["paths"]["a"], out, format=layout, weights=[3.0])
    assert summary["images"] == len(runs["ids"]) and summary["failures"] == 1
    assert maps(out) == maps(reference) and len(maps(out)) == len(runs["ids"])
    for name in tables:
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    ens_work = Path(summary["work"])
    for name in ("failures.csv", "rsna_submission.csv"):
        assert (ens_work / name).read_bytes() == (work / name).read_bytes()


def test_two_runs_are_the_weighted_mean_then_clip(varied, tmp_path):
    runs = varied
    works = [runs["work"]["a"], runs["work"]["b"]]
    for weights in ({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 3.0}):
        out = tmp_path / f"out{weights['b']:g}"
        summary = ens.ensemble(works, runs["paths"]["a"], out, weights=list(weights.values()), format="pneumomap")
        assert summary["failures"] == 1  # the corrupt file; the image B failed on is taken from A
        rows = {r["image_id"]: r["probability"] for r in _rows(out / "predictions.csv")}
        assert list(rows) == runs["ids"]
        for image_id in runs["ids"]:
            if image_id in (runs["corrupt"], runs["only_b"]):
                continue
            expected, probability = _by_hand(runs, image_id, weights)
            assert np.array_equal(_png(out / "maps" / f"{image_id}.png"), expected)
            assert rows[image_id] == f"{probability:.6f}"
        b_failed = runs["only_b"]  # A's alone
        expected, probability = _by_hand(runs, b_failed, {"a": 1.0})
        assert np.array_equal(_png(out / "maps" / f"{b_failed}.png"), expected)
        assert rows[b_failed] == f"{probability:.6f}" == next(
            r["score"] for r in _rows(runs["root"] / "outa" / "image-level-classifications.csv")
            if Path(r["fileNamePath"]).stem == b_failed)
        assert rows[runs["corrupt"]] == "0.000000" and np.all(_png(out / "maps" / f"{runs['corrupt']}.png") == 1)
        assert [r["image_id"] for r in _rows(out / "failures.csv")] == [runs["corrupt"]]
    equal, weighted = ((tmp_path / name / "maps" / f"{runs['ids'][-1]}.png").read_bytes() for name in ("out1", "out3"))
    assert equal != weighted  # the weights change the result


def test_cli_exit_codes(runs, tmp_path, capsys):
    works = [str(runs["work"]["a"]), str(runs["work"]["b"])]
    pipeline = str(runs["paths"]["a"])
    assert top.main(["ensemble", *works, "--pipeline", pipeline, "--out", str(tmp_path / "o")]) == 1  # corrupt file
    assert "failed in every run" in capsys.readouterr().err
    assert (tmp_path / "o" / "image-level-classifications.csv").is_file() and (tmp_path / "o-work").is_dir()
    assert top.main(["ensemble", *works, "--pipeline", pipeline, "--out", str(tmp_path / "p"), "--weights", "1"]) == 2
    assert "--weights: 1 weight(s) for 2 run(s)" in capsys.readouterr().err
    assert top.main(["ensemble", str(tmp_path), "--pipeline", pipeline, "--out", str(tmp_path / "q")]) == 2
    assert "no decisions.csv" in capsys.readouterr().err


def test_mismatched_runs_are_refused(runs, tmp_path):
    pipeline = runs["paths"]["a"]
    # another input list
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted(runs["images"].iterdir())[:2]:
        shutil.copy2(path, subset / path.name)
    runner.run(spec.load(pipeline), subset, tmp_path / "s", RunOptions(format="midrc", save_probabilities=True, **FAST))
    with pytest.raises(ens.EnsembleError, match=r"s-work/decisions.csv: not the images of .*ids in one but not"):
        ens.ensemble([runs["work"]["a"], tmp_path / "s-work"], pipeline, tmp_path / "o1")
    # a map of another size
    copy = tmp_path / "copy-work"
    shutil.copytree(runs["work"]["b"], copy, ignore=shutil.ignore_patterns(".artifacts", ".parts"))
    image_id = next(i for i in runs["ids"] if i not in (runs["corrupt"], runs["only_b"]))
    saved = writers.load_probabilities(writers.probability_path(copy, image_id))
    writers.save_probabilities(writers.probability_path(copy, image_id), np.zeros((5, 7), np.float32),
                               np.ones((5, 7), bool), saved.probability, saved.path, saved.key)
    with pytest.raises(ens.EnsembleError, match=rf"{image_id}: the runs' maps differ in size .*copy-work.* is 5x7"):
        ens.ensemble([runs["work"]["a"], copy], pipeline, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()  # refused before anything was written
    # a run without --save-probabilities
    runner.run(spec.load(pipeline), subset, tmp_path / "plain", RunOptions(format="midrc", **FAST))
    with pytest.raises(ens.EnsembleError, match=r"plain-work/probabilities/.*\.npz: missing .*--save-probabilities"):
        ens.ensemble([tmp_path / "plain-work"], pipeline, tmp_path / "o3")


def test_a_resumed_run_fills_in_the_probability_files(runs, tmp_path, monkeypatch):
    pipeline = spec.load(runs["paths"]["a"])
    out, work = tmp_path / "out", tmp_path / "out-work"
    runner.run(pipeline, runs["images"], out, RunOptions(format="midrc", **FAST))  # without the flag
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert not (work / writers.PROBABILITIES).exists()

    def no_network(*args, **kwargs):
        raise AssertionError("a network ran: the stored outputs should have been reused")

    monkeypatch.setattr(runner.PipelineJob, "compute", no_network)
    options = RunOptions(format="midrc", save_probabilities=True, **FAST)
    runner.run(pipeline, runs["images"], out, options)
    done = sorted(p.stem for p in (work / writers.PROBABILITIES).glob("*.npz"))
    assert done == sorted(i for i in runs["ids"] if i != runs["corrupt"])
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    for image_id in done:  # the same files as the run that saved them from the start
        mine = writers.load_probabilities(writers.probability_path(work, image_id))
        theirs = writers.load_probabilities(writers.probability_path(runs["work"]["a"], image_id))
        assert np.array_equal(mine.map, theirs.map) and np.array_equal(mine.lungs, theirs.lungs)
    # one lost, and one left by another configuration: both made again, the others kept
    lost, stale = writers.probability_path(work, done[0]), writers.probability_path(work, done[1])
    lost.unlink()
    saved = writers.load_probabilities(stale)
    writers.save_probabilities(stale, saved.map.astype(np.float32), saved.lungs, 0.123, saved.path, "other-config")
    kept = writers.probability_path(work, done[2]).stat().st_mtime_ns
    runner.run(pipeline, runs["images"], out, options)
    assert lost.is_file() and writers.load_probabilities(stale).probability != 0.123
    assert writers.probability_path(work, done[2]).stat().st_mtime_ns == kept
