"""Resume after SIGKILL, sharding (--shard and torchrun): byte-identical to one uninterrupted run."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = ["decisions.csv", "rsna_submission.csv", "failures.csv"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    root = tmp_path_factory.mktemp("resume")
    images = phantom_inputs(root / "data", n=10)
    # gate open for all: every node runs for every image
    pipeline = tiny_pipeline(root / "pipe", thresholds={"classifier": 0.0})
    return {"images": images, "pipeline": pipeline}


@pytest.fixture(scope="module", params=["midrc", "pneumomap"])
def layout(request) -> str:
    return request.param


def work_of(out: Path, layout: str) -> Path:
    return out.parent / f"{out.name}-work" if layout == "midrc" else out


def infer(tiny: dict, out: Path, layout: str, *extra: str, launcher: tuple[str, ...] = (sys.executable,), wait: bool = True,
          status: tuple[int, ...] = (1,)):
    cmd = [*launcher, "-m", "pneumomap.cli", "infer", "--pipeline", str(tiny["pipeline"]), "--input",
           str(tiny["images"]), "--out", str(out), "--quiet", "--workers", "1", "--format", layout, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode in status, done.stderr  # the corrupt input -> exit status 1
    return done


def table(out: Path, layout: str) -> Path:
    return out / ("image-level-classifications.csv" if layout == "midrc" else "predictions.csv")


def files(out: Path, layout: str) -> dict[str, bytes]:
    """Every submission file of a run into ``out`` (the scorer's and the run's own)."""
    work = work_of(out, layout)
    found = {n: (work / n).read_bytes() for n in RUN_FILES}
    found[table(out, layout).name] = table(out, layout).read_bytes()
    maps = out if layout == "midrc" else out / "maps"
    found.update({p.name: p.read_bytes() for p in sorted(maps.glob("*.png"))})
    if layout == "midrc":
        assert sorted(p.name for p in out.iterdir()) == sorted(n for n in found if n not in RUN_FILES)
    return found


@pytest.fixture(scope="module")
def reference(tiny, layout, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    infer(tiny, out, layout, "--batch-size", "4")
    return files(out, layout)


def test_resume_after_sigkill_is_byte_identical(tiny, layout, reference, tmp_path):
    out = tmp_path / "out"
    process = infer(tiny, out, layout, "--batch-size", "1", wait=False)
    posts = work_of(out, layout) / ".artifacts"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        done = list(posts.glob("post-*/*.json")) if posts.exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not table(out, layout).exists()
    finished = len(list(posts.glob("post-*/*.json")))
    assert 3 <= finished < 10
    infer(tiny, out, layout, "--batch-size", "3")
    assert files(out, layout) == reference
    assert not list(out.rglob("*.tmp")) and not list(work_of(out, layout).rglob("*.tmp"))


def test_shards_merge_to_the_single_run(tiny, layout, reference, tmp_path):
    out = tmp_path / "out"
    for i, batch in ((1, "2"), (0, "5")):
        cmd_out = infer_shard(tiny, out, layout, f"{i}/2", batch)
        assert ('"merged": true' in cmd_out) == (i == 0)
    assert files(out, layout) == reference
    table(out, layout).unlink()
    assert '"merged": true' in infer_shard(tiny, out, layout, "0/2", "5", "--merge")
    assert files(out, layout) == reference


def infer_shard(tiny: dict, out: Path, layout: str, shard: str, batch: str, *extra: str) -> str:
    return infer(tiny, out, layout, "--shard", shard, "--batch-size", batch, *extra, status=(0, 1)).stdout


@pytest.mark.slow
def test_torchrun_two_processes_equal_the_single_run(tiny, layout, reference, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "out"
    done = infer(tiny, out, layout, "--batch-size", "3", "--device", "cpu",
                 launcher=(str(torchrun), "--nproc_per_node", "2", "--master_port", "29517"))
    assert '"shards": 2' in done.stdout
    assert files(out, layout) == reference
    shutil.rmtree(out)
