"""The GPU path in one go (issue 16): cuda tests, decode / forward / end-to-end throughput, AMP against
fp32, torchrun training under NCCL and two torchrun ranks on one GPU against one process.

  benchmarks/gpu_check.sh [--smoke [--torchrun]] [--n N] [--work DIR] [--budget SECONDS]
  (the shell script sets up the imports, then runs this)

With a GPU (the default architecture: EfficientNet-B4 everywhere at 512 px, random weights, the gate
at the median probability of a probe run so that about half of the images pass):
- ``--n`` generated 1024-px phantom DICOMs (`pneumomap.synth`: JPEG Baseline, uncompressed, RLE,
  JPEG 2000; MONOCHROME1/2, 8-16 bits);
- (a) decoding and preprocessing alone (`runner.decode_ahead`, what ``infer`` runs in its workers)
  with 4, 8 and 16 worker processes, images per second;
- (b) the pipeline's networks alone on ready tensors (`runner.load_models`: shared encoders, channels_last;
  fp16 autocast), each encoder once, the mappers on half of each batch, at batch 8, 16 and 32;
- (c) ``pneumomap infer`` end to end at those batch sizes with the best worker count of (a), GPU
  utilisation sampled by nvidia-smi; the target: (c) at least 80% of min((a), (b)) and the GPU busy at
  least 90% of the steady state (the last 90% of the run after its setup); the run's own seconds per
  step say where the rest goes;
- fp16 AMP against fp32 on the same images: largest probability difference, change of the MIDRC map metric;
- ``torchrun --nproc_per_node 1 -m pneumomap train classifier``, one short epoch (NCCL: NCCL_DEBUG=INFO
  must show its communicator);
- ``torchrun --nproc_per_node 2 -m pneumomap infer`` on the one GPU against one process: byte-identical files;
- last, the ``cuda`` tests (tests/test_cuda.py), so that a hanging test costs no figure.
Steps still to run when ``--budget`` seconds have passed are skipped (named in the table).
Without a GPU (or with ``--smoke``) the same steps run CPU-sized (tiny timm test models at 64 px, 8
128-px images, 1-2 workers, batch 4) in under a minute on 2 cores; the table names what was skipped and
why (fp16, GPU utilisation and the cuda tests need CUDA; the torchrun steps run with ``--torchrun``).
One table is printed; the same rows go as JSON to ``$OUT/gpu_check.json`` (when OUT is set) and
``WORK/gpu_check.json``; each child's output is in WORK/logs. Exit status 1 when a step failed (an error,
a failing test, files that differ); a figure below its target is reported, not fatal.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """What one run measures, at which sizes."""

    gpu: bool
    n: int  # generated images
    size: int  # their height and width
    workers: tuple[int, ...]  # (a)
    batches: tuple[int, ...]  # (b), (c)
    compare: int  # images of the fp32 comparison and of the torchrun equality check
    train_images: int  # max_images of the training epoch
    timeout: int  # seconds per subprocess
    torchrun: bool  # run the two torchrun steps

    @classmethod
    def make(cls, gpu: bool, n: int | None, torchrun: bool = False) -> "Plan":
        if gpu:
            return cls(True, n or 1000, 1024, (4, 8, 16), (8, 16, 32), 128, 256, 300, True)
        return cls(False, n or 8, 128, (1, 2), (4,), n or 8, 8, 120, torchrun)


@dataclass
class Row:
    check: str
    value: float | None
    unit: str
    status: str  # ok | below target | failed | skipped
    note: str = ""


@dataclass
class Report:
    plan: Plan
    work: Path
    deadline: float
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, value: float | None, unit: str, status: str, note: str = "") -> Row:
        row = Row(check, None if value is None else round(float(value), 4), unit, status, note)
        self.rows.append(row)
        print(f"[gpu_check] {check}: {row.value} {unit} {status} {note}".rstrip(), flush=True)
        return row

    def step(self, name: str, fn: Callable[[], None]) -> None:
        """Run one step; an error becomes a failed row (the other steps still run), time out of budget a skipped one."""
        if time.monotonic() > self.deadline:
            self.add(name, None, "", "skipped", "the time budget (--budget) is spent")
            return
        try:
            fn()
        except Exception as exc:  # one broken step must not cost the rest of a device run
            self.add(name, None, "", "failed", f"{type(exc).__name__}: {str(exc)[-600:]}")

    def table(self) -> str:
        header = ("check", "value", "unit", "status", "note")
        body = [(r.check, "" if r.value is None else f"{r.value:g}", r.unit, r.status, r.note) for r in self.rows]
        widths = [max(len(x[i]) for x in [header, *body]) for i in range(4)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(line[:4], widths)) + " | " + line[4]
                 for line in [header, *body]]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def write(self) -> list[Path]:
        data = {"mode": "gpu" if self.plan.gpu else "smoke", "plan": asdict(self.plan),
                "rows": [asdict(r) for r in self.rows], "details": self.details}
        targets = [self.work / "gpu_check.json"] + ([Path(os.environ["OUT"]) / "gpu_check.json"]
                                                    if os.environ.get("OUT") else [])
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
        return targets


# ----------------------------------------------------------------------------- subprocesses


def _env(**extra: str) -> dict[str, str]:
    """The environment of every child: this checkout's pneumomap first on the path."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT), **extra}


def _call(report: Report, name: str, argv: list[str], ranks: int = 0, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m ARGV`` (under torchrun with ``ranks`` processes when > 0), log in WORK/logs/NAME.log;
    a non-zero exit status raises with the end of its output."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks else [sys.executable]
    done = subprocess.run([*launcher, "-m", *argv], env=_env(**env), capture_output=True, text=True,
                          timeout=report.plan.timeout, cwd=ROOT)
    log = report.work / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(done.args)}\n{done.stdout}\n{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"exit status {done.returncode} ({log}): {(done.stdout + done.stderr)[-500:]}")
    return done


def _infer(report: Report, name: str, pipeline: Path, inputs: Path, batch: int, workers: int,
           *extra: str, ranks: int = 0) -> tuple[Path, dict, float, float]:
    """``pneumomap infer`` (pneumomap's layout, no stored outputs) into WORK/NAME:
    (out, run summary, process start, process end) on the monotonic clock."""
    out = report.work / name
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    _call(report, name, ["pneumomap.cli", "infer", "--pipeline", str(pipeline), "--input", str(inputs),
                         "--out", str(out), "--format", "pneumomap", "--no-artifacts", "--quiet",
                         "--batch-size", str(batch), "--workers", str(workers), *extra], ranks=ranks)
    end = time.monotonic()
    return out, json.loads((out / "run_summary.json").read_text()), start, end


def _predictions(out: Path) -> dict[str, float]:
    with open(out / "predictions.csv", newline="") as handle:
        return {row["image_id"]: float(row["probability"]) for row in csv.DictReader(handle)}


class GpuSampler:
    """GPU utilisation (%) every 0.2 s from ``nvidia-smi -lms``, with the monotonic time of each sample."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                         "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.split(",")[0])))
            except ValueError:
                continue

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.thread.join(timeout=10)

    def mean(self, start: float, end: float) -> float | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return statistics.fmean(values) if values else None


# ----------------------------------------------------------------------------- the steps


def cuda_tests(report: Report) -> None:
    if not report.plan.gpu:
        report.add("cuda tests", None, "", "skipped", "no GPU (tests/test_cuda.py skips itself there)")
        return
    import re

    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs",
                           "-p", "no:cacheprovider"], env=_env(), capture_output=True, text=True, cwd=ROOT,
                          timeout=max(90.0, report.deadline - time.monotonic() + 60))
    (report.work / "logs").mkdir(parents=True, exist_ok=True)
    (report.work / "logs" / "cuda_tests.log").write_text(done.stdout + done.stderr)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", done.stdout)}
    tail = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    report.add("cuda tests", counts.get("passed", 0), "passed", "ok" if done.returncode == 0 else "failed",
               "; ".join([f"{v} {k}" for k, v in counts.items() if k != "passed"] + tail)[:600])


def make_data(report: Report) -> None:
    from collections import Counter

    from pneumomap import synth

    start = time.perf_counter()
    records = synth.generate(report.work / "data", report.plan.n, seed=16, size=report.plan.size,
                             n_jobs=os.cpu_count() or 1)
    mix = Counter(r.transfer_syntax for r in records)
    from pydicom.uid import UID

    report.details["transfer_syntaxes"] = {UID(k).name: v for k, v in mix.items()}
    report.add("data", len(records), "images", "ok", f"{report.plan.size} px, " + ", ".join(
        f"{v} {UID(k).name}" for k, v in sorted(mix.items())) + f"; generated in {time.perf_counter() - start:.0f} s")


def images_folder(report: Report) -> Path:
    from pneumomap.labels import IMAGES_DIR

    return report.work / "data" / IMAGES_DIR


def make_pipeline(report: Report) -> None:
    from pneumomap.infer.tiny import write_pipeline

    write_pipeline(report.work / "pipe", tiny=not report.plan.gpu, source=ROOT / "pipeline.yaml")


def decode_speed(report: Report) -> None:
    """(a): `runner.decode_ahead`, the whole-image inputs included, over every image."""
    from pneumomap.infer import runner, spec
    from pneumomap.stages.reader import UnreadableImageError

    pipeline = spec.load(report.work / "pipe" / "pipeline.yaml")
    sizes = runner.whole_image_sizes(pipeline, {n.name for n in pipeline.model_nodes})
    paths = [str(p) for p in sorted(images_folder(report).glob("*.dcm"))]
    speeds = {}
    for workers in report.plan.workers:
        for _ in runner.decode_ahead(paths[:2 * workers], sizes, workers, ahead=4 * workers):
            pass  # warm-up: the worker processes start and import
        start = time.perf_counter()
        failed = sum(isinstance(image, UnreadableImageError)
                     for image, _ in runner.decode_ahead(paths, sizes, workers, ahead=4 * workers))
        speeds[workers] = len(paths) / (time.perf_counter() - start)
        report.add(f"(a) decode+preprocess, {workers} workers", speeds[workers], "images/s",
                   "ok" if not failed else "failed", f"inputs {sizes}" + (f"; {failed} unreadable" if failed else ""))
    report.details["decode"] = speeds


def forward_speed(report: Report) -> None:
    """(b): the networks alone, as the runner calls them, on random tensors already on the device."""
    import torch

    from pneumomap.device import autocast, forward_batch, inference_precision, resolve_device
    from pneumomap.infer import runner, spec

    device = resolve_device("auto")
    precision = inference_precision(device)
    pipeline = spec.load(report.work / "pipe" / "pipeline.yaml")
    models = runner.load_models(pipeline, {n.name for n in pipeline.model_nodes}, device)
    speeds = {}
    for batch in report.plan.batches:
        call = forward_batch(device, batch)
        inputs = {n.name: torch.randn(call, 1, *models[n.name].input_size, device=device).contiguous(
            memory_format=torch.channels_last) for n in pipeline.model_nodes if n.kind != "mapper"}
        passed = max(1, call // 2)  # the gate passes about half: the mappers decode half of each call

        def once() -> None:
            features = {}
            with torch.inference_mode(), autocast(device, precision=precision):
                for node in pipeline.model_nodes:
                    stage = models[node.name]
                    if node.kind == "mapper":
                        source = node.inputs[0]
                        stage.predict(inputs[source][:passed], [f[:passed] for f in features[source]])
                    elif node.kind == "lungs":
                        stage.predict(inputs[node.name])
                    else:
                        features[node.name] = stage.encode(inputs[node.name])
                        stage.predict(inputs[node.name], features[node.name])

        def synchronize() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(2):  # warm-up: cuDNN's algorithm choice, the CPU's first-call traces
            once()
        synchronize()
        calls = max(2, -(-min(report.plan.n, 256) // call))
        start = time.perf_counter()
        for _ in range(calls):
            once()
        synchronize()
        speeds[batch] = calls * call / (time.perf_counter() - start)
        report.add(f"(b) pure forward, batch {batch}", speeds[batch], "images/s", "ok",
                   f"{precision}, channels_last, {call} image(s) per call, mappers on {passed}")
    report.details["forward"] = speeds
    models.clear()  # free the device for (c)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_gate(report: Report) -> None:
    """A probe run in this process (gate closed: no mapper) on up to 64 images; the gate goes to their median
    probability."""
    from pneumomap.infer import runner, spec

    path = report.work / "pipe" / "pipeline.yaml"
    pipeline = spec.load(path)
    closed = pipeline.with_thresholds({**pipeline.thresholds, "classifier": 1.0})
    options = runner.RunOptions(batch_size=report.plan.batches[0], workers=report.plan.workers[0], artifacts=False,
                                progress=False)
    runner.run(closed, sorted(images_folder(report).glob("*.dcm"))[:64], report.work / "probe", options)
    threshold = statistics.median(_predictions(report.work / "probe").values())
    path.write_text(spec.replace_thresholds(path.read_text(), {**pipeline.thresholds, "classifier": threshold}))
    report.details["gate_threshold"] = threshold
    report.add("gate threshold", threshold, "", "ok", "median probability of the probe run")


def end_to_end(report: Report) -> None:
    """(c): ``pneumomap infer`` over every image at each batch size, the GPU sampled meanwhile."""
    decode, forward = report.details.get("decode", {}), report.details.get("forward", {})
    workers = max(decode, key=decode.get) if decode else report.plan.workers[-1]
    pipeline = report.work / "pipe" / "pipeline.yaml"
    report.details["infer"] = {}
    for batch in report.plan.batches:
        sampler = GpuSampler() if report.plan.gpu and shutil.which("nvidia-smi") else None
        try:
            out, summary, start, end = _infer(report, f"infer_b{batch}", pipeline, images_folder(report), batch,
                                              workers)
        finally:
            if sampler is not None:
                sampler.stop()
        steady = summary["wall_seconds"] - summary["setup_seconds"] - summary["trace_seconds"]
        speed = summary["images"] / steady
        bound = min([v for v in (decode.get(workers), forward.get(batch)) if v] or [speed])
        ratio = speed / bound
        passed = summary["computed"].get("mapper_whole", 0) / summary["images"]
        report.add(f"(c) infer end to end, batch {batch}", speed, "images/s",
                   "ok" if ratio >= 0.8 else "below target",
                   f"{ratio:.0%} of min((a), (b)) (target 80%); {workers} workers; {passed:.0%} past the gate; "
                   f"{where_the_time_goes(summary)}; whole command {end - start:.1f} s")
        report.details["infer"][batch] = {"images_per_second": speed, "ratio": ratio, "passed": passed,
                                          "summary": summary}
        if sampler is None:
            report.add(f"GPU busy, batch {batch}", None, "%", "skipped", "no GPU" if not report.plan.gpu
                       else "nvidia-smi not found")
            continue
        busy = sampler.mean(end - 0.2 - 0.9 * steady, end - 0.2)
        report.details["infer"][batch]["gpu_samples"] = sampler.samples
        report.add(f"GPU busy, batch {batch}", busy, "%", "ok" if busy is not None and busy >= 90 else "below target",
                   f"mean nvidia-smi utilisation over the last 90% of the steady {steady:.1f} s (target 90%)")


def where_the_time_goes(summary: dict) -> str:
    """The run's own seconds per step (waiting for decoded images, networks, ops, writing) as shares of its
    steady time."""
    seconds, computed = summary["seconds"], summary["computed"]
    steady = max(summary["wall_seconds"] - summary["setup_seconds"], 1e-9)
    networks = sum(v for k, v in seconds.items() if k in computed)
    ops = sum(v for k, v in seconds.items() if k not in computed and k not in ("read", "write"))
    parts = {"networks": networks, "waiting for decoding": seconds.get("read", 0.0), "ops": ops,
             "writing": seconds.get("write", 0.0)}
    return ", ".join(f"{k} {v / steady:.0%}" for k, v in parts.items())


def amp_against_fp32(report: Report) -> None:
    """The middle batch size's run (auto: fp16 on CUDA) against an fp32 run over the first images."""
    from pneumomap import score

    batch = report.plan.batches[len(report.plan.batches) // 2]
    reference = report.work / f"infer_b{batch}"
    if not (reference / "predictions.csv").is_file():
        raise RuntimeError(f"(c) at batch {batch} did not run: nothing to compare fp32 with")
    precision = report.details["infer"][batch]["summary"]["precision"]
    if precision != "fp16":
        metric = score.score_submission(reference, report.work / "data")["map_log_loss"]
        for check in ("largest probability difference", "map metric change"):
            report.add(f"AMP fp16 vs fp32: {check}", None, "", "skipped",
                       f"fp16 needs CUDA (this run: {precision}, MIDRC map log loss {metric:.5f})")
        return
    out, _, _, _ = _infer(report, "infer_fp32", report.work / "pipe" / "pipeline.yaml", compare_list(report), batch,
                          report.plan.workers[0], "--precision", "fp32")
    fp16, fp32 = _predictions(reference), _predictions(out)
    ids = sorted(fp32)
    difference = max(abs(fp16[i] - fp32[i]) for i in ids)
    metric = {name: score.score_submission(folder, report.work / "data", ids=ids)["map_log_loss"]
              for name, folder in (("fp16", reference), ("fp32", out))}
    report.details["amp"] = {"max_probability_difference": difference, "map_metric": metric}
    report.add("AMP fp16 vs fp32: largest probability difference", difference, "", "ok",
               f"{len(ids)} images, batch {batch}")
    report.add("AMP fp16 vs fp32: map metric change", metric["fp16"] - metric["fp32"], "", "ok",
               f"MIDRC map log loss {metric['fp16']:.5f} (fp16) against {metric['fp32']:.5f} (fp32), {len(ids)} images")


def compare_list(report: Report) -> Path:
    """A list file of the first ``plan.compare`` images (the fp32 and the torchrun comparisons)."""
    subset = report.work / "compare.txt"
    paths = sorted(images_folder(report).glob("*.dcm"))[:report.plan.compare]
    subset.write_text("\n".join(str(p) for p in paths) + "\n")
    return subset


def _torchrun_skipped(report: Report, check: str, unit: str, tested_by: str) -> bool:
    """Smoke runs without --torchrun skip the torchrun steps: a skipped row naming the CPU test that covers it."""
    if report.plan.torchrun:
        return False
    report.add(check, None, unit, "skipped", f"smoke run (--torchrun runs it on the CPU); tested there by {tested_by}")
    return True


def train_under_torchrun(report: Report) -> None:
    """``torchrun --nproc_per_node 1 -m pneumomap train classifier``, one epoch (NCCL on CUDA, gloo on the CPU)."""
    check = "torchrun 1 rank: train classifier, 1 epoch"
    if _torchrun_skipped(report, check, "s", "tests/test_train_ddp.py (gloo; NCCL needs CUDA)"):
        return
    out = report.work / "train"
    settings = ["epochs=1", f"max_images={report.plan.train_images}"]
    if report.plan.gpu:
        recipe, settings = [], settings + ["batch_size=16", "workers=8"]
    else:
        recipe, settings = ["--recipe", "tiny"], settings + ["batch_size=2", "workers=0", "model.input_size=[64, 64]"]
    start = time.perf_counter()
    done = _call(report, "train", ["pneumomap.cli", "train", "classifier", "--data", str(report.work / "data"),
                                   "--out", str(out), *recipe, *[a for s in settings for a in ("--set", s)]],
                 ranks=1, NCCL_DEBUG="INFO")
    seconds = time.perf_counter() - start
    loss = json.loads((out / "history.json").read_text())[-1]["train_loss"]
    nccl = "NCCL INFO" in done.stdout + done.stderr
    report.add(check, seconds, "s", "ok" if math.isfinite(loss) and (nccl or not report.plan.gpu) else "failed",
               f"{'nccl' if nccl else 'gloo (NCCL needs CUDA)' if not report.plan.gpu else 'NO NCCL seen'}; "
               f"{report.plan.train_images} training images; train_loss {loss:.4f}")


def ranks_equal_one_process(report: Report) -> None:
    """``torchrun --nproc_per_node 2 -m pneumomap infer`` (both ranks on the one device) against one process."""
    import hashlib

    check = "torchrun 2 ranks on one device = 1 process"
    if _torchrun_skipped(report, check, "identical files", "tests/test_infer_resume.py"):
        return
    batch = report.plan.batches[len(report.plan.batches) // 2]
    runs = {}
    for name, ranks in (("single", 0), ("ranks", 2)):
        out, summary, _, _ = _infer(report, f"equal_{name}", report.work / "pipe" / "pipeline.yaml",
                                    compare_list(report), batch, report.plan.workers[0], ranks=ranks)
        runs[name] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
                      if p.is_file() and p.name != "run_summary.json" and ".artifacts" not in p.parts
                      and ".parts" not in p.parts and not p.name.startswith(".")}
    differ = sorted(k for k in runs["single"] if runs["single"][k] != runs["ranks"].get(k))
    report.add(check, len(runs["single"]) - len(differ), "identical files",
               "ok" if not differ and runs["single"].keys() == runs["ranks"].keys() else "failed",
               f"batch {batch}, {summary['shards']} shards, {summary['device']}"
               + (f"; differ: {', '.join(differ[:5])}" if differ else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the CPU-sized run even where there is a GPU")
    parser.add_argument("--torchrun", action="store_true", help="smoke run: the two torchrun steps too (on the "
                        "CPU, gloo; about a minute more on 2 cores)")
    parser.add_argument("--n", type=int, default=None, help="generated images (default: 1000 on a GPU, 8 smoke)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pneumomap-gpu-check"),
                        help="scratch folder, emptied first (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which the remaining steps are "
                        "skipped, the cuda tests get what is left plus a minute (default: %(default)s: the whole "
                        "check must fit 8 minutes on one H200)")
    args = parser.parse_args(argv)
    if args.smoke:  # CPU-sized means on the CPU, here and in every child ("auto" would take a GPU)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    plan = Plan.make(torch.cuda.is_available() and not args.smoke, args.n, args.torchrun)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    report = Report(plan, args.work, time.monotonic() + args.budget)
    started = time.monotonic()
    report.details["device"] = torch.cuda.get_device_name(0) if plan.gpu else "cpu"
    report.details["torch"] = torch.__version__
    # the cuda tests last: the figures are in even if a test hangs until its timeout
    for name, fn in (("data", make_data), ("pipeline", make_pipeline),
                     ("(a) decode+preprocess", decode_speed), ("(b) pure forward", forward_speed),
                     ("gate threshold", set_gate), ("(c) infer end to end", end_to_end),
                     ("AMP fp16 vs fp32", amp_against_fp32), ("torchrun 1 rank: train", train_under_torchrun),
                     ("torchrun 2 ranks on one device = 1 process", ranks_equal_one_process),
                     ("cuda tests", cuda_tests)):
        report.step(name, lambda fn=fn: fn(report))
        report.write()  # after each step: a run killed at its time limit still leaves its rows
    report.details["seconds"] = round(time.monotonic() - started, 1)
    print(f"\ngpu_check ({'GPU: ' + report.details['device'] if plan.gpu else 'CPU smoke run'}, torch "
          f"{torch.__version__}, {report.details['seconds']} s)\n{report.table()}")
    for path in report.write():
        print(f"written: {path}")
    return 1 if any(r.status == "failed" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
