"""pneumomap infer against a naive per-image loop, on the same images and weights (issue 4, item 9).

  .venv/bin/python benchmarks/infer_speed.py [--n 72] [--n-small 24] [--size 1024] [--repeats 3]
                                             [--memory 100,1000] [--skip-speed] [--out runs/bench_infer]

(a) `pneumomap.infer.runner.run` with the default pipeline.yaml's architecture (random weights,
    EfficientNet-B4 everywhere), the gate's threshold at the median classifier probability so
    that about half of the images pass (the fraction is printed), no stored artifacts, batch 8,
    the default decode workers (none on the CPU): exactly what `pneumomap infer --no-artifacts`
    does, at each ``--precision`` (default: auto, i.e. fp32 on the CPU, and bf16, which also
    computes two images at once in two one-thread streams, `device.cpu_streams`);
(b) a naive loop as a notebook would write it: each image read in the main process, every
    network run separately at batch size 1 in NCHW, eager, each mapper with its own encoder,
    no gate. Both write the same kind of maps.
Also timed: the sum of the pure forward times of the networks (a) needs, run as (a) runs them
(same network calls, channels_last, frozen traces, tensors ready, each encoder once, mappers on
the gate's positives only), hence (a)'s overhead = t(a) / t(pure) - 1. Where (a) computes two
images at once in two one-thread streams (the CPU's default in bf16, `device.cpu_streams`), the
pure forwards are also timed that way (``overhead_vs_streams``): the networks' own share of the
streams' gain shows there.

Per-image cost, one-off costs excluded on every side: (a) runs over the first ``--n-small``
images and over all ``--n``, and each run's measured one-off costs (setup: listing, hashing,
model loading; the first-call tracing) are subtracted from its wall time; (a)'s cost is the
difference of the two over the difference of the counts, so whatever else happens once per
run (the JIT's first optimising calls; with decode workers, the images decoded while the
models load) cancels too. (b) and the pure forwards run on exactly those extra images, with
their models loaded before the clock starts.
One warm-up of each, then ``--repeats`` rounds of (a), (b), pure in turn, so that a change of
the machine's load hits all three alike; the medians and each round's ratios are printed with
/proc/loadavg. The whole-command wall times of (a), setup and tracing included, are printed too.

Memory: the peak RSS (VmHWM) of one `pneumomap infer` process with the tiny pipeline at each
--memory image count (decode workers excluded).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pneumomap.device import cpu_streams, inference_precision  # noqa: E402
from pneumomap.infer import runner, spec  # noqa: E402
from pneumomap.infer.ops import LungRegions  # noqa: E402
from pneumomap.infer.tiny import write_inputs, write_pipeline  # noqa: E402


def loadavg() -> str:
    """The first three fields of /proc/loadavg (1, 5, 15 minutes): how busy the shared machine was."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def naive_models(pipeline: spec.Pipeline) -> dict:
    """The notebook's models: each stage loaded on its own (mappers keep their own encoder copy), NCHW."""
    from pneumomap.stages.base import load_stage

    return {n.name: load_stage(n.checkpoint).eval() for n in pipeline.model_nodes}


def naive(pipeline: spec.Pipeline, models: dict, paths: list[Path], out: Path) -> float:
    """Per image, per network, batch 1, NCHW, no shared encoders, no gate, no workers (models already loaded)."""
    from pneumomap.fileio import write_png
    from pneumomap.stages.lungs import lung_half_inputs
    from pneumomap.stages.preprocess import to_model_input
    from pneumomap.stages.reader import read_image

    start = time.perf_counter()
    for path in paths:
        image = read_image(path)
        whole = torch.from_numpy(to_model_input(image.pixels, (512, 512)))[None, None]
        with torch.no_grad():
            split = models["lungs"].splits(models["lungs"].predict(whole))[0]
            values = {"image": runner.ImageSize(image.meta.height, image.meta.width), "lungs": LungRegions(split),
                      "classifier": float(models["classifier"].predict(whole)[0])}
            halves = lung_half_inputs(image.pixels, split, (512, 320))
            for side in ("right", "left"):
                x = torch.from_numpy(halves[side][0])[None, None]
                values[f"regressor_{side}"] = float(models[f"regressor_{side}"].predict(x)[0])
                values[f"mapper_{side}"] = models[f"mapper_{side}"].predict(x)[0, 0].numpy()
            values["mapper_whole"] = models["mapper_whole"].predict(whole)[0, 0].numpy()
        for node in pipeline.op_nodes:
            values[node.name] = runner.evaluate_op(node, values)
        write_png(out / f"{path.stem}.png", values[pipeline.outputs.map])
    return time.perf_counter() - start


def per_image_part(summary: dict) -> float:
    """A run's wall seconds less its measured one-off costs (setup: listing, hashing, model loading;
    the first-call tracing of the frozen graphs)."""
    return summary["wall_seconds"] - summary["setup_seconds"] - summary["trace_seconds"]


def pure_forward(models: dict, n: int, positives: int, batch: int, precision: str = "auto", streams: int = 1) -> float:
    """Seconds of the forward passes alone for the work (a) does: each encoder once, mappers on positives.

    ``models``: `runner.load_models` (channels_last, shared encoders, frozen traces), tensors ready in
    memory, in network calls of as many images as (a) makes (`pneumomap.device.forward_batch`).
    ``streams`` > 1: the work shared out among that many threads with a share of torch's threads
    each, as (a) runs images on the CPU in bfloat16 (`device.cpu_streams`); the wall time.
    """
    import threading

    from pneumomap.device import autocast, forward_batch

    cpu = torch.device("cpu")
    batch = forward_batch(cpu, batch)

    def work(count_all: int, count_positive: int) -> float:
        total = 0.0

        def timed(fn, *args):
            nonlocal total
            start = time.perf_counter()
            with torch.inference_mode(), autocast(cpu, precision=precision):
                result = fn(*args)
            total += time.perf_counter() - start
            return result

        for count, todo_mappers in ((count_all, False), (count_positive, True)):
            for start in range(0, count, batch):
                b = min(batch, count - start)
                whole = torch.randn(b, 1, 512, 512).contiguous(memory_format=torch.channels_last)
                half = torch.randn(b, 1, 512, 320).contiguous(memory_format=torch.channels_last)
                if not todo_mappers:
                    timed(models["lungs"].predict, whole)
                    for name, x in (("classifier", whole), ("regressor_right", half), ("regressor_left", half)):
                        features = timed(models[name].encode, x)
                        timed(models[name].predict, x, features)
                else:  # the encoders' features are already there in (a): only the decoders
                    for name, source, x in (("mapper_whole", "classifier", whole),
                                            ("mapper_right", "regressor_right", half),
                                            ("mapper_left", "regressor_left", half)):
                        with torch.inference_mode(), autocast(cpu, precision=precision):
                            features = models[source].encode(x)
                        timed(models[name].predict, x, features)
        return total

    if streams <= 1:
        return work(n, positives)
    shares = [(n * (i + 1) // streams - n * i // streams, positives * (i + 1) // streams - positives * i // streams)
              for i in range(streams)]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))
    try:
        workers = [threading.Thread(target=work, args=share) for share in shares]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def peak_rss(pipeline: Path, images: Path, out: Path) -> float:
    """Peak RSS (MiB, VmHWM) of one `pneumomap infer` process (decode workers excluded)."""
    code = ("import sys; from pneumomap.cli import main; rc = main(sys.argv[1:]); "
            "print('RSS', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code, "infer", "--pipeline", str(pipeline), "--input", str(images),
                           "--out", str(out), "--quiet", "--batch-size", "8"], capture_output=True, text=True,
                          cwd=ROOT)
    line = [l for l in done.stdout.splitlines() if l.startswith("RSS")]
    if not line:
        raise RuntimeError(done.stderr[-2000:])
    return int(line[0].split()[1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=72, help="images for the speed comparison (default: %(default)s)")
    parser.add_argument("--n-small", type=int, default=24, help="(a) also runs over this many, and the difference "
                        "is measured: more than the 18 images decoded while the models load (default: %(default)s)")
    parser.add_argument("--size", type=int, default=1024, help="phantom image size (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, each (a), (b), pure forward in turn; "
                        "the medians are reported (default: %(default)s)")
    parser.add_argument("--precision", default="auto,bf16", help="(a) and its pure forwards at each of these "
                        "--precision values (default: %(default)s; auto is fp32 on the CPU; bf16 needs native bfloat16)")
    parser.add_argument("--memory", default="100,1000", help="image counts for the peak-RSS check ('' to skip)")
    parser.add_argument("--skip-speed", action="store_true", help="only the peak-RSS check")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_infer"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    result: dict = {"loadavg_start": loadavg(), "torch_threads": torch.get_num_threads()}
    if not args.skip_speed:
        result.update(speed(args, out))
    counts = [int(c) for c in args.memory.split(",") if c]
    if counts:
        tiny_pipe = write_pipeline(out / "tiny", tiny=True, thresholds={"classifier": 0.0})
        base = write_inputs(out / "mem_data", n=50, size=256, corrupt=False)
        rss = {}
        for count in counts:
            folder = out / f"mem_{count}"
            folder.mkdir()
            sources = sorted(base.iterdir())
            for i in range(count):  # copies under new names: distinct ids, same decoding work
                shutil.copy(sources[i % len(sources)], folder / f"{i:05d}.dcm")
            rss[count] = round(peak_rss(tiny_pipe, folder, out / f"mem_out_{count}"), 1)
        result["peak_rss_mib"] = rss
        if len(counts) >= 2:
            result["rss_growth"] = round(rss[counts[-1]] / rss[counts[0]] - 1, 3)
    result["loadavg_end"] = loadavg()
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def speed(args: argparse.Namespace, out: Path) -> dict:
    """(a) vs (b) vs pure forward per image, interleaved ``--repeats`` times after a warm-up of each."""
    if not 0 < args.n_small < args.n:
        raise SystemExit("--n-small must be between 0 and --n")
    images = write_inputs(out / "data", n=args.n, size=args.size, corrupt=False)
    paths = sorted(images.iterdir())
    extra = paths[args.n_small:]  # the images whose cost is measured
    path = write_pipeline(out / "full", tiny=False)
    pipeline = spec.load(path)
    options = runner.RunOptions(artifacts=False, progress=False, batch_size=args.batch_size)  # infer's defaults
    precisions = [p for p in args.precision.split(",") if p]
    resolved = {p: inference_precision(torch.device("cpu"), p) for p in precisions}  # what (a) runs at
    # gate at the median probability: about half of the images pass
    probe = runner.run(pipeline.with_thresholds({**pipeline.thresholds, "classifier": 1.0}), images,
                       out / "probe", options)
    probs = [float(l.split(",")[1]) for l in (out / "probe" / "predictions.csv").read_text().splitlines()[1:]]
    threshold = float(np.median(probs))
    pipeline = pipeline.with_thresholds({**pipeline.thresholds, "classifier": threshold})

    # (b)'s and the pure forwards' models are loaded once, outside every timed region (the pure
    # forwards' frozen traces are made by the warm-up, under each precision)
    models_b = naive_models(pipeline)
    models_pure = {p: runner.load_models(pipeline, {m.name for m in pipeline.model_nodes}, torch.device("cpu"))
                   for p in precisions}
    streams = {p: cpu_streams(torch.device("cpu"), resolved[p]) for p in precisions}  # (a)'s default
    warm = paths[:args.batch_size]  # warm-up: one batch through (a), one image through (b), one batch of pure
    for p in precisions:
        runner.run(pipeline, warm, out / "warm_a", dataclasses.replace(options, precision=p))
        pure_forward(models_pure[p], len(warm), len(warm), args.batch_size, resolved[p])
        pure_forward(models_pure[p], len(warm), len(warm), args.batch_size, resolved[p], streams[p])
    naive(pipeline, models_b, warm[:1], (out / "warm_b").resolve())

    rounds = []
    for r in range(args.repeats):
        row: dict = {"loadavg": loadavg()}
        for p in precisions:
            small, full = (runner.run(pipeline, paths[:count], out / f"pneumomap_{count}",
                                      dataclasses.replace(options, precision=p)) for count in (args.n_small, args.n))
            positives = full["computed"]["mapper_whole"] - small["computed"]["mapper_whole"]
            row[p] = {"pneumomap_seconds": round(per_image_part(full) - per_image_part(small), 2),
                      "pure_forward_seconds": round(pure_forward(models_pure[p], len(extra), positives,
                                                                 args.batch_size, resolved[p]), 2),
                      "pure_forward_streams_seconds": round(pure_forward(
                          models_pure[p], len(extra), positives, args.batch_size, resolved[p], streams[p]), 2),
                      "precision": full["precision"], "streams": full["streams"],
                      "gate_pass_fraction": round(positives / len(extra), 3),
                      "whole_command_seconds": {str(args.n_small): small["wall_seconds"], str(args.n): full["wall_seconds"]},
                      "setup_seconds": full["setup_seconds"], "trace_seconds": full["trace_seconds"],
                      "seconds_per_node": full["seconds"]}
        row["naive_seconds"] = round(naive(pipeline, models_b, extra, out / "naive"), 2)
        for p in precisions:
            row[p]["speedup"] = round(row["naive_seconds"] / row[p]["pneumomap_seconds"], 2)
            row[p]["overhead"] = round(row[p]["pneumomap_seconds"] / row[p]["pure_forward_seconds"] - 1, 3)
            row[p]["overhead_vs_streams"] = round(row[p]["pneumomap_seconds"] / row[p]["pure_forward_streams_seconds"] - 1, 3)
        rounds.append(row)
        shutil.rmtree(out / "naive", ignore_errors=True)
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "seconds_per_node"} if isinstance(v, dict) else v)
                          for k, v in row.items()}), flush=True)

    def median(*keys: str) -> float:
        values = []
        for row in rounds:
            value = row
            for key in keys:
                value = value[key]
            values.append(value)
        return float(np.median(values))

    t_naive = median("naive_seconds")
    per_precision = {p: {"pneumomap_seconds": median(p, "pneumomap_seconds"),
                         "pneumomap_images_per_second": round(len(extra) / median(p, "pneumomap_seconds"), 3),
                         "pure_forward_seconds": median(p, "pure_forward_seconds"),
                         "pure_forward_streams_seconds": median(p, "pure_forward_streams_seconds"),
                         "speedup_median": median(p, "speedup"), "overhead_median": median(p, "overhead"),
                         "overhead_vs_streams_median": median(p, "overhead_vs_streams"), "streams": streams[p],
                         "gate_pass_fraction": rounds[-1][p]["gate_pass_fraction"],
                         "precision": resolved[p]} for p in precisions}
    return {
        "images": len(paths), "measured_images": len(extra), "size": args.size, "batch_size": args.batch_size,
        "repeats": args.repeats, "gate_threshold": threshold, "probe_seconds": probe["wall_seconds"],
        "naive_seconds": t_naive, "naive_images_per_second": round(len(extra) / t_naive, 3),
        "pneumomap": per_precision, "rounds": rounds,
    }


if __name__ == "__main__":
    sys.exit(main())
