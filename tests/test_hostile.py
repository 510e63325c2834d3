"""A batch never dies and never lies: bad inputs and faults against `pneumomap infer` (issue 14).

Each case asserts the exit status, a message that names the file and the problem, one row and
one map per input (an unreadable image gets probability 0 and the floor map), and that nothing
half-written is left behind.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumomap.fileio import TEMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]
CSV = "image-level-classifications.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    images = phantom_inputs(root / "data", n=3, size=64, corrupt=False)
    pipeline = tiny_pipeline(root / "pipe", thresholds={"classifier": 0.0})  # every node runs
    return {"root": root, "images": images, "pipeline": pipeline,
            "good": sorted(images.glob("*.dcm"))}


@dataclass
class Done:
    returncode: int
    stderr: str


def infer(tiny: dict, inputs: Path, out: Path, *extra: str, pipeline: Path | None = None,
          wait: bool = True) -> Done | subprocess.Popen:
    """`pneumomap infer` in this process (``wait=False``: in another one, running on)."""
    argv = ["infer", "--pipeline", str(pipeline or tiny["pipeline"]), "--input", str(inputs), "--out", str(out),
            "--quiet", "--workers", "0", *map(str, extra)]
    if not wait:
        return subprocess.Popen([sys.executable, "-m", "pneumomap", *argv], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    from pneumomap.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return Done(status, err.getvalue())


def case(tiny: dict, tmp_path: Path, *extra_files: Path) -> Path:
    """An input folder: the good images plus ``extra_files``."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in [*tiny["good"], *extra_files]:
        shutil.copy2(path, folder / path.name)
    return folder


def rows(out: Path) -> list[dict]:
    with open(out / CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def failures(out: Path) -> list[dict]:
    with open(out.parent / f"{out.name}-work" / "failures.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def assert_complete(inputs: Path, out: Path) -> None:
    """One row and one map per input, in input order, nothing else in OUT, no temporary anywhere."""
    names = sorted(p.name for p in inputs.iterdir() if p.is_file())
    assert [r["fileNamePath"] for r in rows(out)] == names
    assert sorted(p.name for p in out.iterdir()) == sorted([CSV, *(f"{Path(n).stem}.png" for n in names)])
    for name in names:
        png = Image.open(out / f"{Path(name).stem}.png")
        assert png.mode == "L" and min(png.size) > 0
    work = out.parent / f"{out.name}-work"
    assert not list(out.rglob(f"{TEMP_PREFIX}*.tmp")) and not list(work.rglob(f"{TEMP_PREFIX}*.tmp"))


def assert_failed(out: Path, path: Path, *words: str) -> None:
    """``path`` is a failure row whose reason holds ``words``; its row scores 0 and its map is the floor."""
    found = [f for f in failures(out) if f["image_id"] == path.stem]
    assert len(found) == 1, failures(out)
    for word in words:
        assert word.lower() in found[0]["reason"].lower(), found[0]["reason"]
    assert next(r for r in rows(out) if r["fileNamePath"] == path.name)["score"] == "0.000000"
    assert np.all(np.asarray(Image.open(out / f"{path.stem}.png")) == 1)


def edited_dicom(source: Path, target: Path, **changes) -> Path:
    """A copy of ``source`` with header fields changed (the pixels stay)."""
    ds = pydicom.dcmread(source)
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(target)
    return target


# ----------------------------------------------------------------------------- bad images


def test_non_finite_pixels_are_failures_not_nan_rows(tiny, tmp_path):
    nan = edited_dicom(tiny["good"][0], tmp_path / "nan_intercept.dcm", RescaleIntercept="NaN", RescaleSlope="1")
    huge = edited_dicom(tiny["good"][1], tmp_path / "huge_slope.dcm", RescaleSlope="1e38", RescaleIntercept="0")
    inputs = case(tiny, tmp_path, nan, huge)
    done = infer(tiny, inputs, tmp_path / "out")
    assert done.returncode == 1, done.stderr
    assert_complete(inputs, tmp_path / "out")
    for path in (nan, huge):
        assert_failed(tmp_path / "out", path, "not finite")
    assert all(np.isfinite(float(r["score"])) for r in rows(tmp_path / "out"))


def test_a_decoder_that_panics_fails_one_image(tiny, tmp_path, monkeypatch):
    """Whatever a decoder raises (pylibjpeg-rle's Rust panic is a BaseException), one image fails."""
    from pneumomap.stages import reader

    class Panic(BaseException):
        pass

    bad = shutil.copy2(tiny["good"][0], tmp_path / "panics.dcm")
    original = reader._read_dicom

    def read(path):
        if Path(path).name == "panics.dcm":
            raise Panic("called `Result::unwrap()` on an `Err` value")
        return original(path)

    monkeypatch.setattr(reader, "_read_dicom", read)
    error = reader.read_or_error(bad)
    assert isinstance(error, reader.UnreadableImageError) and "panics.dcm" in str(error) and "unwrap" in str(error)


def test_zero_rows_gets_a_fallback_map(tiny, tmp_path):
    zero = edited_dicom(tiny["good"][0], tmp_path / "zero_rows.dcm", Rows=0)
    inputs = case(tiny, tmp_path, zero)
    done = infer(tiny, inputs, tmp_path / "out")
    assert done.returncode == 1, done.stderr
    assert_complete(inputs, tmp_path / "out")
    assert_failed(tmp_path / "out", zero)
    assert np.asarray(Image.open(tmp_path / "out" / "zero_rows.png")).shape == (1024, 1024)


def test_a_very_long_file_name(tiny, tmp_path):
    long = shutil.copy2(tiny["good"][0], tmp_path / ("a" * 240 + ".dcm"))
    inputs = case(tiny, tmp_path, Path(long))
    done = infer(tiny, inputs, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert_complete(inputs, tmp_path / "out")


def test_an_input_changed_after_a_run_is_computed_again(tiny, tmp_path):
    inputs = case(tiny, tmp_path)
    assert infer(tiny, inputs, tmp_path / "out").returncode == 0
    changed = inputs / tiny["good"][1].name
    shutil.copy2(tiny["good"][0], changed)  # other pixels under the same name
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    done = infer(tiny, inputs, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    fresh = infer(tiny, inputs, tmp_path / "fresh", "--no-artifacts")
    assert fresh.returncode == 0
    assert_complete(inputs, tmp_path / "out")
    for path in sorted((tmp_path / "fresh").iterdir()):
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


# ----------------------------------------------------------------------------- bad pipelines, checkpoints, devices


@pytest.mark.parametrize("change, words", [
    ({"classifier": float("nan")}, ["thresholds.classifier", "not a finite number"]),
    ({"clip": {"low": 200, "high": 100, "outside": 1}}, ["nodes.final.params", "low (200) is above high (100)"]),
    ({"clip": {"low": 10, "high": 255, "outside": 1}}, ["thresholds.clip.high", "out of range"]),
])
def test_bad_thresholds_are_refused_before_any_image(tiny, tmp_path, change, words):
    import yaml

    raw = yaml.safe_load(tiny["pipeline"].read_text())
    raw["thresholds"].update(change)
    bad = tiny["pipeline"].parent / f"bad-{len(list(tiny['pipeline'].parent.glob('bad-*')))}.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = infer(tiny, case(tiny, tmp_path), tmp_path / "out", pipeline=bad)
    assert done.returncode == 2 and str(bad.name) in done.stderr
    for word in words:
        assert word in done.stderr
    assert not (tmp_path / "out" / CSV).exists()


def test_a_checkpoint_with_nan_weights_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny["pipeline"].parent, pipe)
    weights = pipe / "checkpoints" / "classifier" / "weights.safetensors"
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name][...] = float("nan")
    save_file(state, str(weights))
    done = infer(tiny, case(tiny, tmp_path), tmp_path / "out", pipeline=pipe / "pipeline.yaml")
    assert done.returncode == 2
    assert "weights.safetensors" in done.stderr and "NaN" in done.stderr and name in done.stderr


def test_cuda_without_a_gpu_is_a_one_line_refusal(tiny, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = infer(tiny, case(tiny, tmp_path), tmp_path / "out", "--device", "cuda")
    assert done.returncode == 2 and "CUDA is not available" in done.stderr


# ----------------------------------------------------------------------------- folders and concurrency


def test_output_inside_the_input_is_refused(tiny, tmp_path):
    inputs = case(tiny, tmp_path)
    for out in (inputs, inputs / "sub"):
        done = infer(tiny, inputs, out)
        assert done.returncode == 2 and "inside the input folder" in done.stderr
    assert sorted(p.name for p in inputs.iterdir()) == sorted(p.name for p in tiny["good"])


def test_a_second_run_into_the_same_folder_is_refused(tiny, tmp_path):
    inputs = case(tiny, tmp_path)
    first = infer(tiny, inputs, tmp_path / "out", "--batch-size", "1", wait=False)
    lock = tmp_path / "out-work" / ".pneumomap-0-of-1.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
        time.sleep(0.02)
    second = infer(tiny, inputs, tmp_path / "out")
    first.wait(timeout=300)
    assert first.returncode == 0, first.stderr.read()
    if second.returncode == 0:
        pytest.skip("the first run ended before the second started")
    assert second.returncode == 2 and "another pneumomap run" in second.stderr and str(first.pid) in second.stderr
    assert_complete(inputs, tmp_path / "out")


def test_user_temporary_files_survive(tiny, tmp_path):
    inputs = case(tiny, tmp_path)
    (tmp_path / "out-work").mkdir()
    mine = tmp_path / "out-work" / ".notes.txt.draft.tmp"
    mine.write_text("the user's")
    assert infer(tiny, inputs, tmp_path / "out").returncode == 0
    assert mine.read_text() == "the user's"


def test_disk_full_stops_with_a_message_and_resumes_identically(tiny, tmp_path):
    """ENOSPC on the third write: exit 2 naming the problem and how to go on; the same command later
    finishes with the files of an uninterrupted run."""
    import errno

    from pneumomap import fileio
    from pneumomap.infer import artifacts

    inputs = case(tiny, tmp_path)
    calls = [0]
    original = fileio.atomic_write_bytes

    def full(path, data):
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fileio, "atomic_write_bytes", full)
        patch.setattr(artifacts, "atomic_write_bytes", full)
        done = infer(tiny, inputs, tmp_path / "out", "--batch-size", "1")
    assert done.returncode == 2, done.stderr
    assert "No space left on device" in done.stderr and "run the same command again" in done.stderr
    assert infer(tiny, inputs, tmp_path / "out").returncode == 0
    assert infer(tiny, inputs, tmp_path / "fresh", "--no-artifacts").returncode == 0
    assert_complete(inputs, tmp_path / "out")
    for path in sorted((tmp_path / "fresh").iterdir()):
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


# ----------------------------------------------------------------------------- many bad files in one batch


def _png_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bad_files(tiny: dict, folder: Path) -> dict[str, tuple[str, ...]]:
    """Write one file per kind of bad input; return name -> words its failure reason must hold."""
    good = tiny["good"][0]
    dicom = good.read_bytes()
    grey = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)
    raw = {
        "empty.dcm": (b"", ("empty file",)),
        "empty_png.png": (b"", ("empty file",)),
        "text_named.png": (b"hello, not an image\n" * 10, ("not a dicom, png or jpeg",)),
        "jpeg_header_only.jpg": (b"\xff\xd8\xff" + b"\0" * 20, ("not a dicom, png or jpeg",)),
        "truncated_header.dcm": (dicom[:200], ("truncated",)),
        "truncated_pixels.dcm": (dicom[: len(dicom) * 2 // 3], ("truncated",)),
        "preamble_only.dcm": (b"\0" * 128 + b"DICM", ("truncated",)),
        "random_bytes.dcm": (np.random.default_rng(1).bytes(3000), ()),
        "truncated.png": (_png_bytes(grey)[:60], ("truncated or corrupt",)),
        "truncated_jpeg.jpg": (_jpeg_bytes(grey)[:100], ()),
        "png_header_only.png": (_png_bytes(grey)[:33], ()),
        "zero_size.png": (b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + b"\0" * 8 + b"\x08\0\0\0\0", ()),
    }
    expected = {}
    for name, (data, words) in raw.items():
        (folder / name).write_bytes(data)
        expected[name] = words
    (folder / "broken_link.dcm").symlink_to(folder / "nowhere.dcm")
    expected["broken_link.dcm"] = ("no such file",)
    edits = {
        "no_pixels.dcm": ({"PixelData": None}, ("no pixel data",)),
        "no_photometric.dcm": ({"PhotometricInterpretation": None}, ("photometricinterpretation",)),
        "palette.dcm": ({"PhotometricInterpretation": "PALETTE COLOR"}, ("photometric",)),
        "huge_claim.dcm": ({"Rows": 60000, "Columns": 60000}, ("more than",)),
        "zero_columns.dcm": ({"Columns": 0}, ("empty image",)),
        "nan_window.dcm": ({"WindowCenter": "NaN", "WindowWidth": "NaN"}, ()),
        "inf_slope.dcm": ({"RescaleSlope": "inf", "RescaleIntercept": "0"}, ("not finite",)),
        "bits_allocated_3.dcm": ({"BitsAllocated": 3}, ()),
        "samples_2.dcm": ({"SamplesPerPixel": 2}, ()),
    }
    for name, (changes, words) in edits.items():
        ds = pydicom.dcmread(good)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
        ds.save_as(folder / name, enforce_file_format=False)
        expected[name] = words
    return expected


def test_every_kind_of_bad_file_in_one_batch(tiny, tmp_path):
    """Two good images among 22 kinds of broken ones: each broken one is a failure row naming the problem,
    with probability 0 and the floor map; the good ones are untouched; exit 1."""
    inputs = case(tiny, tmp_path)
    expected = _bad_files(tiny, inputs)
    done = infer(tiny, inputs, tmp_path / "out")
    assert done.returncode == 1, done.stderr
    out = tmp_path / "out"
    reasons = {f["image_id"]: f["reason"] for f in failures(out)}
    readable = {"nan_window", "bits_allocated_3", "samples_2"}  # may decode (then a finite image) or fail
    for name, words in expected.items():
        stem = Path(name).stem
        if stem in readable and stem not in reasons:
            continue
        assert stem in reasons, f"{name} did not fail: {sorted(reasons)}"
        for word in words:
            assert word in reasons[stem].lower(), (name, reasons[stem])
        assert np.all(np.asarray(Image.open(out / f"{stem}.png")) == 1), name
    for path in tiny["good"]:
        assert path.stem not in reasons
    names = sorted(p.name for p in inputs.iterdir())
    table = [r["fileNamePath"] for r in rows(out)]
    assert table == names
    assert all(np.isfinite(float(r["score"])) for r in rows(out))
    assert len(list(out.glob("*.png"))) == len(table)


# ----------------------------------------------------------------------------- refusals: status 2 before any image


def _refusals(tiny: dict, tmp_path: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    inputs = case(tiny, tmp_path)
    pipe = tiny["pipeline"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "dupes").mkdir()
    shutil.copy2(tiny["good"][0], tmp_path / "dupes" / "x.dcm")
    (tmp_path / "dupes" / "sub").mkdir()
    shutil.copy2(tiny["good"][1], tmp_path / "dupes" / "sub" / "x.dcm")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.dcm\n".encode("latin-1"))
    (tmp_path / "bad.yaml").write_bytes(b"version: 1\nnodes: {a: \xff\xfe}\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "a_file").write_text("x")
    broken = tmp_path / "broken_pipe"
    shutil.copytree(pipe.parent, broken)
    (broken / "checkpoints" / "lungs" / "weights.safetensors").write_bytes(b"garbage")
    (broken / "checkpoints" / "classifier" / "config.yaml").write_text("kind: [unclosed\n")
    out = tmp_path / "out"
    return {
        "empty input folder": ([f"--input={tmp_path / 'empty'}", f"--out={out}"], ("contains no images",)),
        "missing input": ([f"--input={tmp_path / 'nowhere'}", f"--out={out}"], ("no such file",)),
        "two images with one id": ([f"--input={tmp_path / 'dupes'}", f"--out={out}"], ("the id 'x'",)),
        "non-UTF-8 list file": ([f"--input={tmp_path / 'latin1.txt'}", f"--out={out}"], ("latin1.txt",)),
        "non-UTF-8 pipeline": ([f"--input={inputs}", f"--out={out}", f"--pipeline={tmp_path / 'bad.yaml'}"],
                               ("bad.yaml",)),
        "pipeline not a mapping": ([f"--input={inputs}", f"--out={out}", f"--pipeline={tmp_path / 'list.yaml'}"],
                                   ("list.yaml", "expected a mapping")),
        "missing pipeline": ([f"--input={inputs}", f"--out={out}", f"--pipeline={tmp_path / 'no.yaml'}"],
                             ("no.yaml", "cannot read")),
        "corrupt checkpoints": ([f"--input={inputs}", f"--out={out}", f"--pipeline={broken / 'pipeline.yaml'}"],
                                ("checkpoint",)),
        "output is a file": ([f"--input={inputs}", f"--out={tmp_path / 'a_file'}"], ("a_file",)),
        "description of another type": ([f"--input={inputs}", f"--out={out}", f"--description={tmp_path / 'bad.yaml'}"],
                                        (".pdf, .docx or .txt",)),
        "missing description": ([f"--input={inputs}", f"--out={out}", f"--description={tmp_path / 'no.txt'}"],
                                ("no such file",)),
        "bad shard": ([f"--input={inputs}", f"--out={out}", "--shard=3/2"], ("--shard",)),
        "bad precision for the device": ([f"--input={inputs}", f"--out={out}", "--precision=fp16", "--device=cpu"],
                                         ("fp16",)),
    }


def test_refusals_name_the_file_and_the_problem(tiny, tmp_path):
    """Unusable inputs, pipelines, checkpoints and options: status 2, one message naming what is wrong,
    nothing written into --out."""
    for label, (argv, words) in _refusals(tiny, tmp_path).items():
        from pneumomap.cli import main

        err = io.StringIO()
        pipeline = [a for a in argv if a.startswith("--pipeline=")] or [f"--pipeline={tiny['pipeline']}"]
        args = ["infer", *pipeline, *[a for a in argv if not a.startswith("--pipeline=")], "--quiet", "--workers=0"]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(args)
        message = err.getvalue()
        assert status == 2, (label, status, message)
        for word in words:
            assert word.lower() in message.lower(), (label, message)
        assert not (tmp_path / "out" / CSV).exists(), label


def test_an_interrupted_rerun_leaves_no_stale_table(tiny, tmp_path, monkeypatch):
    """New thresholds, the run killed midway: the old CSV must not stand beside the new maps."""
    from pneumomap.infer import runner, spec

    inputs = case(tiny, tmp_path)
    assert infer(tiny, inputs, tmp_path / "out").returncode == 0
    other = spec.load(tiny["pipeline"])
    other = other.with_thresholds({**other.thresholds, "clip": {"low": 30, "high": 200, "outside": 3}})
    finish, calls = runner.PipelineJob.finish, []

    def killed(self, st):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(self, st)

    monkeypatch.setattr(runner.PipelineJob, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run(other, inputs, tmp_path / "out", runner.RunOptions(format="midrc", workers=0, progress=False))
    assert not (tmp_path / "out" / CSV).exists()
    monkeypatch.undo()
    runner.run(other, inputs, tmp_path / "out", runner.RunOptions(format="midrc", workers=0, progress=False))
    assert_complete(inputs, tmp_path / "out")


def test_hidden_files_and_symlinked_folders_are_counted(tiny, tmp_path, caplog):
    from pneumomap.stages.reader import list_images

    inputs = case(tiny, tmp_path)
    shutil.copy2(tiny["good"][0], inputs / ".hidden.dcm")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy2(tiny["good"][1], tmp_path / "elsewhere" / "linked.dcm")
    (inputs / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with caplog.at_level("WARNING", logger="pneumomap"):
        found = list_images(inputs)
    assert [p.name for p in found] == sorted(p.name for p in tiny["good"])
    assert "skipped 1 hidden" in caplog.text and "1 symlinked folder" in caplog.text


def test_a_colour_header_on_grey_data_reads_as_grey(tiny, tmp_path):
    from pneumomap.stages.reader import read_image

    path = edited_dicom(tiny["good"][0], tmp_path / "rgb_header.dcm", PhotometricInterpretation="RGB")
    image = read_image(path)
    grey = read_image(tiny["good"][0])
    assert image.pixels.shape == grey.pixels.shape and np.array_equal(image.pixels, grey.pixels)
    assert any("colour header on grey data" in f for f in image.meta.flags)


def test_score_refuses_duplicate_rows(tiny, tmp_path):
    from pneumomap.submission import SubmissionError, read_submission

    (tmp_path / CSV).write_text("fileNamePath,score\na.dcm,0.5\nb.dcm,0.2\na.dcm,0.7\n")
    with pytest.raises(SubmissionError, match=r":4: a second row for 'a.dcm'"):
        read_submission(tmp_path)
