"""The runner on the tiny pipeline: formats, failure isolation, gating, artifacts, re-runs."""
from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumomap.infer import cli, runner, spec
from pneumomap.infer.runner import RunOptions

FAST = dict(workers=0, progress=False, batch_size=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    """Tiny random-weight pipeline whose gate passes about half of 6 phantoms (+1 corrupt file)."""
    root = tmp_path_factory.mktemp("tiny")
    images = phantom_inputs(root / "data", n=6)
    path = tiny_pipeline(root / "pipe")
    pipeline = spec.load(path)
    probe = root / "probe"
    runner.run(pipeline, images, probe, RunOptions(**FAST))
    probs = sorted(float(r["probability"]) for r in _rows(probe / "predictions.csv") if not _failed(probe, r))
    threshold = (probs[2] + probs[3]) / 2
    path.write_text(spec.replace_thresholds(path.read_text(), {**pipeline.thresholds, "classifier": threshold}))
    return {"root": root, "images": images, "pipeline": spec.load(path), "path": path}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _failed(out: Path, row: dict) -> bool:
    return any(r["image_id"] == row["image_id"] for r in _rows(out / "failures.csv"))


def _files(out: Path) -> dict[str, bytes]:
    names = ["predictions.csv", "decisions.csv", "rsna_submission.csv", "failures.csv"]
    files = {n: (out / n).read_bytes() for n in names}
    files.update({f"maps/{p.name}": p.read_bytes() for p in sorted((out / "maps").glob("*.png"))})
    return files


class Counter:
    """Counts Conv2d forwards (any network) and mapper batches."""

    def __init__(self, monkeypatch):
        from pneumomap.stages.mapper import Mapper

        self.convs, self.mapper_images = 0, 0
        conv, predict = torch.nn.Conv2d.forward, Mapper.predict

        def counted_conv(module, x):
            self.convs += 1
            return conv(module, x)

        def counted_predict(module, x, features=None):
            self.mapper_images += x.shape[0]
            return predict(module, x, features)

        monkeypatch.setattr(torch.nn.Conv2d, "forward", counted_conv)
        monkeypatch.setattr(Mapper, "predict", counted_predict)


def _infer_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args([str(a) for a in argv]))


def test_midrc_layout_is_exactly_what_the_organisers_read(tiny, tmp_path):
    """--format midrc (the default): one <name>.png per input, the CSV, the description, nothing else."""
    out, description = tmp_path / "out", tmp_path / "about.txt"
    description.write_text("word " * 300)
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", out, "--batch-size", "4",
                      "--workers", "0", "--quiet", "--description", description) == 1  # one unreadable image
    inputs = sorted(tiny["images"].iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{p.stem}.png" for p in inputs] + ["image-level-classifications.csv", "about.txt"])
    assert (out / "about.txt").read_bytes() == description.read_bytes()
    text = (out / "image-level-classifications.csv").read_text()
    rows = _rows(out / "image-level-classifications.csv")
    assert text.startswith("fileNamePath,score\n") and [r["fileNamePath"] for r in rows] == [p.name for p in inputs]
    corrupt = next(p for p in inputs if "corrupt" in p.name)
    assert next(r for r in rows if r["fileNamePath"] == corrupt.name)["score"] == "0.000000"
    assert np.all(np.asarray(Image.open(out / f"{corrupt.stem}.png")) == 1)
    work = tmp_path / "out-work"  # the run's own files, beside OUT by default
    assert {"decisions.csv", "failures.csv", "rsna_submission.csv", "run_summary.json", ".artifacts"} <= \
        {p.name for p in work.iterdir()}
    assert [f["image_id"] for f in _rows(work / "failures.csv")] == [corrupt.stem]

    # the same files as the pneumomap layout, placed differently
    other = tmp_path / "other"
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", other, "--format", "pneumomap",
                      "--workers", "0", "--quiet") == 1
    for path in inputs:
        assert (out / f"{path.stem}.png").read_bytes() == (other / "maps" / f"{path.stem}.png").read_bytes()
    assert [r["score"] for r in rows] == [r["probability"] for r in _rows(other / "predictions.csv")]

    # a stray PNG or a second description in OUT would mislead the scorer: refused before any image
    (out / "zz_stray.png").write_bytes(b"")
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", out, "--quiet",
                      "--description", description) == 2
    (out / "zz_stray.png").unlink()
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", out, "--quiet") == 2
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", out, "--quiet",
                      "--description", tmp_path / "about.md") == 2
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", out, "--quiet",
                      "--description", description, "--work", out) == 2


def test_formats_and_failure_isolation(tiny, tmp_path):
    out = tmp_path / "out"
    assert _infer_cli("--pipeline", tiny["path"], "--input", tiny["images"], "--out", out, "--format", "pneumomap",
                      "--batch-size", "4", "--workers", "2", "--quiet") == 1  # one unreadable image -> non-zero exit

    inputs = sorted(p for p in tiny["images"].iterdir())
    ids = [p.stem for p in inputs]
    predictions = _rows(out / "predictions.csv")
    assert list(predictions[0]) == ["image_id", "probability"] and [r["image_id"] for r in predictions] == ids
    decisions = _rows(out / "decisions.csv")
    assert list(decisions[0]) == ["image_id", "probability", "gate", "right_extent", "left_extent",
                                  "right_choice", "left_choice", "level"] and len(decisions) == len(ids)
    rsna = _rows(out / "rsna_submission.csv")
    assert list(rsna[0]) == ["patientId", "PredictionString"] and [r["patientId"] for r in rsna] == ids
    for row in rsna:
        values = row["PredictionString"].split()
        assert len(values) % 5 == 0 and all(0 <= float(v) <= 1 for v in values[::5])

    failures = _rows(out / "failures.csv")
    corrupt = next(p for p in inputs if "corrupt" in p.name)
    assert [(f["image_id"], f["path"]) for f in failures] == [(corrupt.stem, str(corrupt))] and failures[0]["reason"]
    bad = np.asarray(Image.open(out / "maps" / f"{corrupt.stem}.png"))
    assert bad.dtype == np.uint8 and np.all(bad == 1)
    assert next(r for r in predictions if r["image_id"] == corrupt.stem)["probability"] == "0.000000"

    from pneumomap.stages.reader import read_image

    stored = {s["image_id"]: s for s in runner.load_outputs(tiny["pipeline"], out, tiny["images"])}
    assert len(stored) == len(ids) - 1
    for path in inputs:
        if path == corrupt:
            continue
        image = Image.open(out / "maps" / f"{path.stem}.png")
        meta = read_image(path).meta
        assert image.mode == "L" and image.size == (meta.width, meta.height)
        map8 = np.asarray(image)
        inside = stored[path.stem]["lungs"].mask_at(map8.shape)
        assert np.all(map8[~inside] == 1) and map8[inside].min() >= 10 and map8[inside].max() <= 245
    assert {r["gate"] for r in decisions if r["image_id"] != corrupt.stem} == {"0", "1"}
    summary = __import__("json").loads((out / "run_summary.json").read_text())
    assert summary["images"] == len(ids) and summary["failures"] == 1 and summary["images_per_second"] > 0
    assert {"lungs", "classifier", "mapper_whole", "final", "read", "write"} <= set(summary["seconds"])
    assert summary["threshold"] == tiny["pipeline"].nodes["gate"].params["threshold"]


@pytest.mark.parametrize("threshold, expect", [(1.0, 0), (0.0, 3 * 6)])
def test_gate_skips_every_mapper(tiny, tmp_path, monkeypatch, threshold, expect):
    pipeline = tiny["pipeline"]
    pipeline = pipeline.with_thresholds({**pipeline.thresholds, "classifier": threshold})
    counter = Counter(monkeypatch)
    summary = runner.run(pipeline, tiny["images"], tmp_path / "out", RunOptions(**FAST, artifacts=False))
    assert counter.mapper_images == expect
    assert summary["computed"]["mapper_whole"] == expect // 3 and summary["computed"]["classifier"] == 6


def test_post_processing_change_runs_no_network(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    runner.run(tiny["pipeline"], tiny["images"], out, RunOptions(**FAST))
    thresholds = {**tiny["pipeline"].thresholds, "level": 0.0, "right_extent": 0.0,
                  "overestimate": {"low": {"dilate": 1, "raise": 0.0}, "high": {"dilate": 2, "raise": 0.3}},
                  "clip": {"low": 30, "high": 200, "outside": 2}, "box": 0.6}
    changed = tiny["pipeline"].with_thresholds(thresholds)
    counter = Counter(monkeypatch)
    summary = runner.run(changed, tiny["images"], out, RunOptions(**FAST))
    assert counter.convs == 0 and not any(summary["computed"].values())
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    runner.run(changed, tiny["images"], fresh, RunOptions(**FAST, artifacts=False))
    assert _files(out) == _files(fresh)

    # the tuner's path: stored outputs -> postprocess(), the same maps, no network
    counter = Counter(monkeypatch)
    for stored in runner.load_outputs(changed, out, tiny["images"]):
        values = runner.postprocess(changed, stored)
        png = np.asarray(Image.open(out / "maps" / f"{stored['image_id']}.png"))
        assert np.array_equal(values[changed.outputs.map], png)
    assert counter.convs == 0


def test_thresholds_a_then_b_then_a_again_gives_a_files(tiny, tmp_path, monkeypatch):
    """A stored record counts as finished only with the map its post-processing wrote (no stale maps)."""
    a = tiny["pipeline"]
    b = a.with_thresholds({**a.thresholds, "clip": {"low": 30, "high": 200, "outside": 5}})
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    runner.run(a, tiny["images"], fresh, RunOptions(**FAST, artifacts=False))
    for pipeline in (a, b):
        runner.run(pipeline, tiny["images"], out, RunOptions(**FAST))
    counter = Counter(monkeypatch)
    runner.run(a, tiny["images"], out, RunOptions(**FAST))
    assert counter.convs == 0  # post-processed again from the stored outputs: no network
    assert _files(out) == _files(fresh)


def test_the_gate_decides_on_the_number_the_csv_shows(tiny, tmp_path):
    """Thresholds at the CSV's own (6-decimal) values: every gate decision equals `csv value >= threshold`."""
    probe = tmp_path / "probe"
    runner.run(tiny["pipeline"], tiny["images"], probe, RunOptions(**FAST))
    shown = sorted({float(r["probability"]) for r in _rows(probe / "decisions.csv") if r["gate"]})
    for threshold in shown[1:4]:
        for delta in (0.0, 4e-7, -4e-7):  # within the rounding of the printed value
            pipeline = tiny["pipeline"].with_thresholds({**tiny["pipeline"].thresholds, "classifier": threshold + delta})
            out = tmp_path / f"out-{threshold}-{delta}"
            shutil.copytree(probe / ".artifacts", out / ".artifacts")  # post-processing only: no network
            runner.run(pipeline, tiny["images"], out, RunOptions(**FAST))
            for row in _rows(out / "decisions.csv"):
                if row["gate"]:
                    assert row["gate"] == ("1" if float(row["probability"]) >= threshold + delta else "0"), row


def test_ungated_outputs_let_the_tuner_move_the_gate(tiny, tmp_path):
    closed = tiny["pipeline"].with_thresholds({**tiny["pipeline"].thresholds, "classifier": 1.0})
    out = tmp_path / "out"
    summary = runner.run(closed, tiny["images"], out, RunOptions(**FAST, ungated=True))
    assert summary["computed"]["mapper_whole"] == 6
    assert {r["gate"] for r in _rows(out / "decisions.csv") if r["gate"]} == {"0"}
    opened = closed.with_thresholds({**closed.thresholds, "classifier": 0.0})
    direct = tmp_path / "direct"
    runner.run(opened, tiny["images"], direct, RunOptions(**FAST, artifacts=False))
    for stored in runner.load_outputs(opened, out, tiny["images"]):
        values = runner.postprocess(opened, stored)
        png = np.asarray(Image.open(direct / "maps" / f"{stored['image_id']}.png"))
        assert values["gate"] and np.array_equal(values[opened.outputs.map], png)


def test_swapping_one_checkpoint_reruns_only_it_and_its_dependants(tiny, tmp_path):
    from pneumomap.stages.base import create_stage, load_stage, tiny_config

    out = tmp_path / "out"
    runner.run(tiny["pipeline"], tiny["images"], out, RunOptions(**FAST))
    old = tiny["pipeline"].nodes["regressor_right"].checkpoint
    torch.manual_seed(123)
    new = create_stage("regressor", tiny_config("regressor", side="right"))
    new.load_state_dict(load_stage(old).state_dict())  # same encoder (the mapper decodes it) ...
    with torch.no_grad():
        new.members[0].head.fc.bias.add_(0.5) if hasattr(new.members[0].head, "fc") else \
            next(p for n, p in new.named_parameters() if "head" in n and n.endswith("bias")).add_(0.5)  # ... new head
    new.save(tmp_path / "regressor_right")
    raw = dict(tiny["pipeline"].raw)
    raw["nodes"] = {**raw["nodes"], "regressor_right": {**raw["nodes"]["regressor_right"],
                                                        "checkpoint": str(tmp_path / "regressor_right")}}
    swapped = spec.parse(raw, tiny["path"])
    summary = runner.run(swapped, tiny["images"], out, RunOptions(**FAST))
    positives = sum(r["gate"] == "1" for r in _rows(out / "decisions.csv"))
    assert summary["computed"] == {"lungs": 0, "classifier": 0, "regressor_right": 6, "regressor_left": 0,
                                   "mapper_whole": 0, "mapper_right": positives, "mapper_left": 0}


def test_bad_checkpoint_or_output_fails_before_any_image(tiny, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(tiny["path"].parent, broken)
    (broken / "checkpoints" / "mapper_left" / "weights.safetensors").write_bytes(b"garbage")
    pipeline = spec.load(broken / "pipeline.yaml")
    with pytest.raises(runner.RunError, match="nodes.mapper_left.checkpoint: cannot load"):
        runner.run(pipeline, tiny["images"], tmp_path / "out", RunOptions(**FAST))
    assert not (tmp_path / "out" / "maps").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(runner.RunError, match="cannot write there"):
        runner.run(tiny["pipeline"], tiny["images"], tmp_path / "file" / "out", RunOptions(**FAST))


class _CountingList(list):
    """A path list that counts how many of its entries have been taken (submitted to a worker)."""

    taken = 0

    def __iter__(self):
        for item in super().__iter__():
            self.taken += 1
            yield item


def test_decode_ahead_is_bounded_ordered_and_isolates_errors(tiny):
    """Workers never run more than `ahead` images ahead of the consumer (memory stays flat)."""
    paths = sorted(str(p) for p in tiny["images"].iterdir())
    counting = _CountingList(paths * 3)  # 21 entries, the corrupt file among them
    decoded = runner.decode_ahead(counting, ((64, 64),), workers=2, ahead=4)
    got = []
    for _ in range(5):
        got.append(next(decoded))
        assert counting.taken <= len(got) + 4
    got.extend(decoded)
    assert counting.taken == len(counting) == len(got)
    from pneumomap.stages.reader import UnreadableImageError

    for path, (image, inputs) in zip(counting, got):
        if "corrupt" in path:
            assert isinstance(image, UnreadableImageError) and inputs == {}
        else:
            assert image.meta.path == path and inputs[("whole", (64, 64))].shape == (64, 64)


def test_decoding_starts_before_the_first_image_is_asked_for(tiny):
    """The first `ahead` images are submitted at once (they decode while the models load);
    closing the iterator cancels what is still queued."""
    counting = _CountingList(sorted(str(p) for p in tiny["images"].iterdir()) * 2)
    decoded = runner.decode_ahead(counting, ((64, 64),), workers=2, ahead=4)
    assert counting.taken == 4
    next(decoded)
    assert counting.taken == 5
    decoded.close()
    assert not decoded.pending


def _worker_niceness(_image) -> int:
    import os

    return os.nice(0)


def test_decode_workers_run_at_the_lowest_priority_and_the_caller_does_not():
    import os

    from pneumomap.stages.reader import map_images

    paths = [str(Path(__file__).parent / "data" / "real" / "missing.dcm")] * 3  # errors are fine: fn runs anyway
    assert set(map_images(_worker_niceness, paths, n_jobs=2)) == {19}
    assert os.nice(0) < 19
    assert list(map_images(_worker_niceness, paths[:1], n_jobs=0)) == [os.nice(0)]  # in-process: untouched


def test_cpu_defaults_and_precisions(tiny, tmp_path):
    """On the CPU: no decode workers, one image per network call, one stream, fp32; bf16 (two
    streams) gives nearly the same outputs; fp16 (CUDA only) is refused before any image."""
    from pneumomap.device import native_bf16

    fp32 = runner.run(tiny["pipeline"], tiny["images"], tmp_path / "fp32", RunOptions(progress=False, batch_size=3))
    assert (fp32["workers"], fp32["device"], fp32["precision"], fp32["streams"]) == (0, "cpu", "fp32", 1)
    cpu_bf16 = native_bf16(torch.device("cpu"))
    with pytest.raises(runner.RunError, match="fp16 needs CUDA"):
        runner.run(tiny["pipeline"], tiny["images"], tmp_path / "fp16", RunOptions(precision="fp16", **FAST))
    assert not (tmp_path / "fp16" / "maps").exists()
    if not cpu_bf16:
        with pytest.raises(runner.RunError, match="no native"):
            runner.run(tiny["pipeline"], tiny["images"], tmp_path / "bf16", RunOptions(precision="bf16", **FAST))
        pytest.skip("this processor has no native bfloat16: refused, as it should be")
    bf16 = runner.run(tiny["pipeline"], tiny["images"], tmp_path / "bf16", RunOptions(precision="bf16", **FAST))
    assert (bf16["precision"], bf16["streams"]) == ("bf16", 2)
    a, b = _rows(tmp_path / "fp32" / "predictions.csv"), _rows(tmp_path / "bf16" / "predictions.csv")
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    diffs = [abs(float(x["probability"]) - float(y["probability"])) for x, y in zip(a, b)]
    assert max(diffs) < 0.02
    for name in (tmp_path / "fp32" / "maps").iterdir():
        m32 = np.asarray(Image.open(name), dtype=np.int16)
        m16 = np.asarray(Image.open(tmp_path / "bf16" / "maps" / name.name), dtype=np.int16)
        assert np.mean(np.abs(m32 - m16) <= 2) > 0.98  # a few pixels may cross a lung-mask edge
    # stored outputs are keyed by precision: bf16 over the fp32 run's folder computes every network again
    again = runner.run(tiny["pipeline"], tiny["images"], tmp_path / "fp32", RunOptions(precision="bf16", **FAST))
    assert again["computed"]["lungs"] == fp32["computed"]["lungs"] > 0


def test_one_image_per_network_call_equals_whole_batches(tiny, tmp_path, monkeypatch):
    """The CPU's one-image network calls give the outputs whole-batch calls give (to float rounding)."""
    from pneumomap import device

    runner.run(tiny["pipeline"], tiny["images"], tmp_path / "one", RunOptions(streams=1, **FAST))
    monkeypatch.setattr(device, "forward_batch", lambda dev, batch_size: batch_size)
    runner.run(tiny["pipeline"], tiny["images"], tmp_path / "batched", RunOptions(streams=1, **FAST))
    a, b = _rows(tmp_path / "one" / "predictions.csv"), _rows(tmp_path / "batched" / "predictions.csv")
    assert [float(r["probability"]) for r in a] == pytest.approx([float(r["probability"]) for r in b], abs=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streams_give_the_files_one_stream_gives(tiny, tmp_path, precision):
    """Two images at once in two threads (the CPU's default in bf16): byte-identical files, the corrupt
    image isolated alike, torch's thread count restored, every network computed once per image."""
    from pneumomap.device import native_bf16

    if precision == "bf16" and not native_bf16(torch.device("cpu")):
        pytest.skip("this processor has no native bfloat16")
    threads = torch.get_num_threads()
    one = runner.run(tiny["pipeline"], tiny["images"], tmp_path / "one",
                     RunOptions(precision=precision, streams=1, **FAST))
    two = runner.run(tiny["pipeline"], tiny["images"], tmp_path / "two",
                     RunOptions(precision=precision, streams=2, **FAST))
    assert (one["streams"], two["streams"]) == (1, 2) and torch.get_num_threads() == threads
    assert one["computed"] == two["computed"] and one["failures"] == two["failures"] == 1
    for name in ("predictions.csv", "decisions.csv", "failures.csv", "rsna_submission.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    maps = sorted(p.name for p in (tmp_path / "one" / "maps").iterdir())
    assert maps == sorted(p.name for p in (tmp_path / "two" / "maps").iterdir()) and maps
    for name in maps:
        assert (tmp_path / "one" / "maps" / name).read_bytes() == (tmp_path / "two" / "maps" / name).read_bytes()
