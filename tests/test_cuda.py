"""What only a GPU exercises (issue 16): fp16 AMP against fp32 through the runner, channels_last,
pinned non-blocking copies, two torchrun ranks on one GPU, one DDP training under NCCL.

Every test here is marked ``cuda`` and skipped, with its reason, where torch sees no CUDA device
(``pytest -m cuda`` runs only these; benchmarks/gpu_check.sh runs them on a GPU machine). They
call pneumomap's own code (`pneumomap.infer.runner`, `pneumomap.device`, ``pneumomap train``),
never a re-implementation of it, with tiny random-weight models on generated images.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumomap.device import images_to_device, pin_memory, to_device
from pneumomap.infer import artifacts as art
from pneumomap.infer import runner, spec
from pneumomap.infer.runner import RunOptions

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() "
                                 "is False): run on a GPU machine, e.g. benchmarks/gpu_check.sh")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    """A tiny random-weight pipeline with the gate open (every model node runs for every image)."""
    root = tmp_path_factory.mktemp("cuda")
    images = phantom_inputs(root / "data", n=8, size=128, corrupt=False)
    path = tiny_pipeline(root / "pipe", thresholds={"classifier": 0.0})
    return {"root": root, "images": images, "path": path, "pipeline": spec.load(path)}


def _run(tiny: dict, out: Path, **options) -> dict:
    settings = {"device": "cuda", "workers": 1, "progress": False, "batch_size": 4, **options}
    return runner.run(tiny["pipeline"], tiny["images"], out, RunOptions(**settings))


def _stored(tiny: dict, work: Path, precision: str) -> dict[tuple[str, str], np.ndarray]:
    """(node, image id) -> the stored model output of a run at ``precision``, dequantized."""
    pipeline = tiny["pipeline"]
    store, keys = art.ArtifactStore(work / art.ARTIFACTS), art.node_keys(pipeline, precision)
    found = {}
    for item in runner.list_items(tiny["images"]):
        for node in pipeline.model_nodes:
            value = store.load(art.model_folder(node.name, keys[node.name]), item.image_id, item.signature)
            assert value is not None, f"{node.name}: nothing stored for {item.image_id} at {precision}"
            found[node.name, item.image_id] = np.asarray(art.dequantize(value), dtype=np.float64)
    return found


def test_fp16_amp_is_close_to_fp32_for_every_stage_kind(tiny, tmp_path):
    """The runner's fp16 autocast (the CUDA default) against full float32, node by node."""
    out = tmp_path / "out"
    assert _run(tiny, out, precision="fp32")["precision"] == "fp32"
    assert _run(tiny, out)["precision"] == "fp16"  # auto on CUDA; stored beside the fp32 outputs
    fp32, fp16 = _stored(tiny, out, "fp32"), _stored(tiny, out, "fp16")
    kinds = {tiny["pipeline"].nodes[name].kind for name, _ in fp32}
    assert kinds == {"lungs", "classifier", "regressor", "mapper"}
    for key, reference in fp32.items():
        difference = np.abs(fp16[key] - reference).max()
        # maps are stored as 8-bit (p * 255): one rounding step is 0.004
        assert difference <= 0.02, f"{key}: fp16 differs from fp32 by {difference:.4f}"


def test_the_runner_computes_in_fp16_and_channels_last(tiny, tmp_path, monkeypatch):
    """Every convolution the runner calls on CUDA: channels_last weights and inputs, fp16 outputs."""
    calls: list[tuple[bool, bool, torch.dtype]] = []
    original = torch.nn.Conv2d.forward

    def recorded(module, x):
        y = original(module, x)
        if x.shape[1] > 1 and x.shape[-1] * x.shape[-2] > 1:  # layout is ambiguous for one channel or pixel
            calls.append((module.weight.is_contiguous(memory_format=torch.channels_last),
                          x.is_contiguous(memory_format=torch.channels_last), y.dtype))
        return y

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recorded)
    _run(tiny, tmp_path / "out", artifacts=False)
    assert len(calls) > 50
    assert all(weight for weight, _, _ in calls), "a convolution's weights are not channels_last"
    assert all(dtype == torch.float16 for _, _, dtype in calls), {str(d) for _, _, d in calls}
    nhwc = sum(x for _, x, _ in calls) / len(calls)
    # (on the CPU, where it can be checked in bf16, every input is: mapper features included)
    assert nhwc >= 0.95, f"only {nhwc:.0%} of the convolutions' inputs are channels_last"


def test_pinned_non_blocking_copies_are_exact():
    """`device.to_device` (pinned staging, non_blocking) and `images_to_device` move the exact values,
    also when many copies are in flight before the first is read."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 1, 256, 192, generator=generator) for _ in range(20)]
    moved = [to_device(b, CUDA) for b in batches]  # each pins a temporary copy of its batch
    assert all(m.device == CUDA and m.is_contiguous(memory_format=torch.channels_last) for m in moved)
    torch.cuda.synchronize()
    assert all(torch.equal(m.cpu(), b) for m, b in zip(moved, batches))

    pinned = batches[0].pin_memory()
    assert torch.equal(to_device(pinned, CUDA, channels_last=False).cpu(), batches[0])
    arrays = [b[0, 0].numpy() for b in batches[:4]]
    assert np.array_equal(images_to_device(arrays, CUDA).cpu().numpy()[:, 0], np.stack(arrays))

    assert pin_memory(CUDA) and not pin_memory(torch.device("cpu"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.stack(batches)), batch_size=4,
                                         pin_memory=pin_memory(CUDA))
    for (batch,) in loader:
        assert batch.is_pinned()
        assert torch.equal(to_device(batch, CUDA).cpu(), batch)


def _submission(out: Path) -> dict[str, bytes]:
    """Every file of a run in pneumomap's layout, less its bookkeeping (hidden folders, the summary)."""
    files = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_file() and not relative.name == "run_summary.json" \
                and not any(part.startswith(".") for part in relative.parts):
            files[str(relative)] = path.read_bytes()
    return files


@pytest.mark.parametrize("batch", ["1", "4"])
def test_two_torchrun_ranks_on_one_gpu_equal_one_process(tiny, tmp_path, batch):
    """``torchrun --nproc_per_node 2 -m pneumomap infer`` with both ranks on the one GPU: the same
    bytes as one process (batch 1: the same network calls; batch 4: other batch compositions)."""
    outs = {}
    for name, launcher in (("single", [sys.executable]),
                           ("ranks", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node", "2"])):
        outs[name] = tmp_path / name
        cmd = [*launcher, "-m", "pneumomap.cli", "infer", "--pipeline", str(tiny["path"]), "--input",
               str(tiny["images"]), "--out", str(outs[name]), "--format", "pneumomap", "--device", "cuda",
               "--batch-size", batch, "--workers", "1", "--quiet"]
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((outs["ranks"] / "run_summary.json").read_text())["shards"] == 2
    single, ranks = _submission(outs["single"]), _submission(outs["ranks"])
    assert len([n for n in single if n.endswith(".png")]) == 8
    assert ranks == single, sorted(n for n in single if single[n] != ranks.get(n))


def test_one_rank_ddp_training_under_nccl(tmp_path):
    """``torchrun --nproc_per_node 1 -m pneumomap train classifier`` on CUDA: DDP over an NCCL process
    group of one rank (its collectives run: NCCL reports itself), a finite loss and a checkpoint."""
    from pneumomap.synth import generate

    data, out = tmp_path / "data", tmp_path / "run"
    generate(data, 12, seed=4, size=64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "pneumomap.cli", "train", "classifier", "--data", str(data), "--out", str(out), "--recipe", "tiny",
           "--device", "cuda", "--set", "epochs=1", "--set", "batch_size=2", "--set", "workers=1",
           "--set", "model.input_size=[64, 64]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_DEBUG": "INFO"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "NCCL INFO" in output, "no NCCL communicator was set up: training did not run under NCCL"
    assert "device cuda:0, 1 process(es)" in output
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert (out / "best" / "weights.safetensors").is_file()
