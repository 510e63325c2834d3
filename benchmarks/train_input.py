"""Training input at real size (issue 15, item 3): the loader's images per second, cold and warm, against the
model's training step, at the reference sizes (512x512 whole image, 512x320 lung halves).

  .venv/bin/python benchmarks/train_input.py [--n 24] [--size 1024] [--batch 2] [--steps 2] [--out runs/bench_train_input]

On ``--n`` phantom DICOMs of ``--size`` px (`pneumomap synth`: RSNA's 1024 px; its eight DICOM encodings in turn,
one of them RSNA's JPEG baseline) with a lung mask each, for the classifier (the whole image at 512x512) and
regressor_right (both lung halves at 512x320; the per-lung mappers take the same input):

- cold: `rsna_datasets` building a fresh on-disk cache (decode, resize, crop, targets, float16 rows written), in
  the calling process, one torch thread: images per second per core (DataLoader workers scale it with the cores);
- warm: a new `rsna_datasets` on that cache (fingerprints checked, nothing decoded), then three epochs of the
  training DataLoader (batch 32, the recipe's augmentation: rotation up to 15 degrees, and the flip where the
  recipe has it), one torch thread: images per second per core; also without augmentation (the read alone);
- step: the default recipe's network (`make_task(stage, recipes.resolve(stage))`: EfficientNet-B4, random
  weights), forward + loss + backward + AdamW step on ``--batch`` images from that loader, all torch threads,
  one warm-up step then ``--steps`` timed.
Every rate is given per wall second and per CPU second (this process's user + system time and its children's):
on a shared machine the CPU figure is the one a free core would reach (per core; the step's is per core too,
its threads' CPU time summed).
Also the decode CPU time per DICOM encoding (`read_image` alone; JPEG 2000 is far the slowest), the cold rate per
CPU second had every image been RSNA's JPEG baseline (``cold JPEG``: the cold CPU time per image less the mean
decode plus JPEG's), and the cache's bytes per image.
Prints a table and writes OUT/train_input.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumomap.labels import load_rsna  # noqa: E402
from pneumomap.stages.base import make_config  # noqa: E402
from pneumomap.stages.reader import read_image  # noqa: E402
from pneumomap.synth import generate  # noqa: E402
from pneumomap.train import recipes  # noqa: E402
from pneumomap.train.datasets import collate, rsna_datasets  # noqa: E402
from pneumomap.train.tasks import make_task, trainable_parameters  # noqa: E402

STAGES = ("classifier", "regressor_right")
RSNA_SYNTAX = "JPEG Baseline (Process 1)"  # how the RSNA stage 2 DICOMs are encoded


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its children that ended."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds since it was made."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def rates(images: int, clock: Clock) -> dict[str, float]:
    """Images per wall second and per CPU second (= per core, whatever else the machine runs)."""
    wall, cpu = clock.read()
    return {"per_wall_s": images / wall, "per_cpu_s": images / max(cpu, 1e-9)}


def decode_times(data: Path) -> tuple[dict[str, float], float]:
    """(median CPU seconds of `read_image` per transfer syntax, mean CPU seconds over all the images)."""
    import pydicom

    times: dict[str, list[float]] = {}
    dataset = load_rsna(data)
    for pid in dataset.ids:
        path = dataset.image_path(pid)
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        clock = Clock()
        read_image(path)
        times.setdefault(syntax, []).append(clock.read()[1])
    return {k: float(np.median(v)) for k, v in sorted(times.items())}, float(np.mean(sum(times.values(), [])))


def loader_rates(dataset, batch: int, epochs: int = 3) -> dict[str, float]:
    """Images per second of ``epochs`` passes of the training DataLoader in this process."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0, collate_fn=collate)
    clock, images = Clock(), 0
    for _ in range(epochs):
        for item in loader:
            images += len(item["image"])
    return rates(images, clock)


def train_step_rates(stage: str, batches: list[dict], steps: int, threads: int) -> dict[str, float]:
    """Images per second of the default recipe's network training on ``batches`` (one warm-up step first)."""
    torch.set_num_threads(threads)
    recipe = recipes.resolve(stage)
    task = make_task(stage, recipe)
    task.set_train_mode(True)
    optimizer = torch.optim.AdamW(trainable_parameters(task.model), lr=recipe["lr"])

    def step(batch: dict) -> None:
        loss = task.loss(task.outputs(task.model, batch["image"]), batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    clock = Clock()
    for batch in batches[1: steps + 1]:
        step(batch)
    return rates(sum(len(b["image"]) for b in batches[1: steps + 1]), clock)


def measure(stage: str, data: Path, work: Path, args: argparse.Namespace, decode: dict[str, float],
            mean_decode: float) -> dict:
    """The cold, warm and step figures of one stage (``decode``: CPU seconds per syntax, ``mean_decode``: of all)."""
    recipe = recipes.resolve(stage, None, ["workers=0"])
    spec = recipes.STAGES[stage]
    size = tuple(make_config(spec.kind, recipes.model_config(stage, recipe)).input_size)
    cache_dir = work / f"cache-{stage}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    torch.set_num_threads(1)
    clock = Clock()
    train_set, val_set = rsna_datasets(data, spec, recipe, size, cache_dir)
    n = len(train_set) + len(val_set)
    cold = rates(n, clock)
    cold_cpu_per_image = 1.0 / cold["per_cpu_s"]
    clock = Clock()
    train_set, val_set = rsna_datasets(data, spec, recipe, size, cache_dir)
    reopen = clock.read()[0]
    warm = loader_rates(train_set, 32)
    plain_aug = train_set.aug
    train_set.aug = type(plain_aug)()
    read_only = loader_rates(train_set, 32)
    train_set.aug = plain_aug
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch, shuffle=True, collate_fn=collate)
    batches = [b for _, b in zip(range(args.steps + 1), loader)]
    step = train_step_rates(stage, batches, args.steps, args.threads)
    cache_bytes = sum(p.stat().st_size for p in cache_dir.rglob("values.bin"))
    return {"stage": stage, "input": list(size), "images": n, "cold": cold,
            "cold_rsna_jpeg_per_cpu_s": 1.0 / (cold_cpu_per_image - mean_decode + decode.get(RSNA_SYNTAX, mean_decode)),
            "warm_reopen_seconds": reopen, "warm": warm, "warm_read_only": read_only,
            "augmentation": {"rotate": recipe["rotate"], "hflip": recipe["hflip"]},
            "train_step": step, "train_step_threads": args.threads, "train_step_batch": args.batch,
            "cache_bytes_per_image": cache_bytes / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="phantom images (default 24)")
    parser.add_argument("--size", type=int, default=1024, help="their size in pixels (default 1024, RSNA's)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step (default 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps (default 2, after one warm-up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the step")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_train_input")
    args = parser.parse_args()
    data = args.out / f"rsna-{args.n}x{args.size}"
    if not (data / "split.csv").is_file():
        generate(data, args.n, seed=0, size=args.size, fractions=(0.8, 0.2, 0.0))
    print(f"load before: {loadavg()}")
    torch.set_num_threads(1)
    decode, mean_decode = decode_times(data)
    results = {"n": args.n, "size": args.size, "decode_seconds_by_syntax": decode, "decode_seconds_mean": mean_decode,
               "stages": [measure(stage, data, args.out, args, decode, mean_decode) for stage in STAGES],
               "load_after": loadavg()}
    print(f"decode (read_image, median CPU s per {args.size} px DICOM): "
          + ", ".join(f"{k} {v:.3f}" for k, v in decode.items()))
    print("images per second: per CPU second (= per core) / per wall second of this busy machine")
    print(f"{'stage':16} {'input':>8} {'cold':>13} {'cold JPEG':>10} {'warm':>13} {'read only':>13} "
          f"{'train step':>13} {'MB/img':>7}")
    for r in results["stages"]:
        pair = lambda d: f"{d['per_cpu_s']:.2f}/{d['per_wall_s']:.2f}"  # noqa: E731
        print(f"{r['stage']:16} {'x'.join(map(str, r['input'])):>8} {pair(r['cold']):>13} "
              f"{r['cold_rsna_jpeg_per_cpu_s']:10.1f} {pair(r['warm']):>13} {pair(r['warm_read_only']):>13} "
              f"{pair(r['train_step']):>13} {r['cache_bytes_per_image'] / 2**20:7.2f}")
    print(f"load after: {results['load_after']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_input.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
