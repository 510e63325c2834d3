"""The whole lifecycle on phantom data, each step the command a user would type.

  1. pneumomap synth     a phantom RSNA-format data set (train / val / test split by patient)
  2. pneumomap train     every stage on its own, small backbones (the `tiny` recipes)
  3. pneumomap tune      thresholds on the validation split, over stored model outputs
  4. pneumomap infer     the test split into both submission formats (untuned and tuned)
  5. pneumomap score     both submissions against the truth; two map baselines for scale
  6. pneumomap report    an offline HTML page of map overlays

Prints a summary table and writes OUT/summary.json. Every step's output stays in OUT, so each
command can be re-run by hand (they are printed as they run).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pneumomap.checkpoints import BEST
from pneumomap.fileio import atomic_write_text
from pneumomap.train.recipes import STAGES

TRAIN_ORDER = tuple(STAGES)  # the training stages in the order they are listed: each mapper after its source
ENCODER_OF = {name: spec.source for name, spec in STAGES.items() if spec.source}  # mapper -> the stage it decodes
REPOSITORY_PIPELINE = Path(__file__).resolve().parents[1] / "pipeline.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", type=Path, help="working folder (default: %(default)s)")
    parser.add_argument("--n", type=int, default=400, help="phantom images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="phantom image size in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom set (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override passed to every `pneumomap train` (e.g. epochs=2 for a smoke run)")


def pneumomap(*args: Any, log: Path) -> float:
    """Run one `pneumomap` command as a user would; its output goes to ``log``. Returns seconds."""
    command = [sys.executable, "-m", "pneumomap", *map(str, args)]
    print("$ pneumomap " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise RuntimeError(f"`pneumomap {args[0]}` failed with status {status} (log: {log}):\n{tail}")
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def write_demo_pipeline(models: Path, path: Path) -> Path:
    """The repository's pipeline.yaml with its checkpoints pointed at the demo's training runs."""
    raw = yaml.safe_load(REPOSITORY_PIPELINE.read_text(encoding="utf-8"))
    for name, node in raw["nodes"].items():
        if "stage" in node:
            node["checkpoint"] = str((models / name).resolve())
    header = "# The demo's pipeline: the default pipeline.yaml with the checkpoints trained by `pneumomap demo`.\n"
    atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return path


def write_list(paths: list[Path], path: Path) -> Path:
    atomic_write_text(path, "".join(f"{p.resolve()}\n" for p in paths))
    return path


def best_baselines(dataset, ids: list[str]) -> dict[str, float]:
    """Best constant map and best lung-prior map (value inside the lungs, floor outside) on ``ids``,
    by the same map metric `pneumomap score` reports (the organisers', boxes inside the lungs at level 1)."""
    from pneumomap.metrics import map_metric
    from pneumomap.stages.reader import read_image
    from pneumomap.truth import RsnaTruth

    metric, truth = map_metric("midrc"), RsnaTruth(dataset)
    values = np.arange(1, 255)
    constant = np.zeros(len(values))
    prior = np.zeros(len(values))
    for pid in ids:
        lungs = read_image(dataset.mask_path(pid)).pixels > 127
        codes = truth.codes(pid, lungs.shape)
        for j, v in enumerate(values):
            constant[j] += metric.loss(np.full(lungs.shape, v, np.uint8), codes)
            prior[j] += metric.loss(np.where(lungs, v, 1).astype(np.uint8), codes)
    return {"map_metric_constant": float(constant.min() / len(ids)),
            "constant_value": int(values[constant.argmin()]),
            "map_metric_lung_prior": float(prior.min() / len(ids)),
            "lung_prior_value": int(values[prior.argmin()])}


def lung_dice(dataset, ids: list[str], masks: Path) -> float:
    """Mean Dice of the lung stage's masks (``pneumomap stage lungs`` output) against the truth."""
    from pneumomap.metrics import dice
    from pneumomap.stages.reader import read_image

    scores = [dice(read_image(masks / f"{pid}.png").pixels > 127, read_image(dataset.mask_path(pid)).pixels > 127)
              for pid in ids]
    return float(np.mean(scores))


def run_demo(out: Path, n: int, size: int, seed: int, device: str, overrides: list[str]) -> dict[str, Any]:
    from pneumomap.labels import load_rsna
    from pneumomap.score import score_submission
    from pneumomap.submission import default_work

    start = time.perf_counter()
    out = out.resolve()
    data, models, logs = out / "data", out / "models", out / "logs"
    seconds: dict[str, float] = {}
    seconds["synth"] = pneumomap("synth", "--out", data, "--n", n, "--seed", seed, "--size", size,
                                 log=logs / "synth.log")
    dataset = load_rsna(data)
    test_ids = dataset.ids_in("test")
    test_list = write_list([dataset.image_path(pid) for pid in test_ids], out / "test_images.txt")

    sets = [arg for o in overrides for arg in ("--set", o)]
    for stage in TRAIN_ORDER:
        extra = ["--set", f"encoder_from={models / ENCODER_OF[stage] / BEST}"] if stage in ENCODER_OF else []
        seconds[f"train {stage}"] = pneumomap("train", stage, "--data", data, "--out", models / stage,
                                              "--recipe", "tiny", "--device", device, *extra, *sets,
                                              log=logs / f"train_{stage}.log")

    pipeline = write_demo_pipeline(models, out / "pipeline.yaml")
    tuned = out / "tuned" / "pipeline.yaml"  # what `tune --out DIR` writes
    seconds["tune"] = pneumomap("tune", "--pipeline", pipeline, "--val", data, "--out", tuned.parent,
                                "--device", device, "--work", out / "tune_work", log=logs / "tune.log")
    submissions = {"untuned": out / "submission_untuned", "tuned": out / "submission"}
    for name, yaml_path in (("untuned", pipeline), ("tuned", tuned)):
        seconds[f"infer {name}"] = pneumomap("infer", "--pipeline", yaml_path, "--input", test_list,
                                             "--out", submissions[name], "--device", device, "--quiet",
                                             log=logs / f"infer_{name}.log")
    seconds["score"] = pneumomap("score", "--pred", submissions["tuned"], "--truth", data, "--split", "test",
                                 "--json", out / "score.json", "--plots", out / "plots", log=logs / "score.log")
    seconds["report"] = pneumomap("report", "--pred", submissions["tuned"], "--images", data / "stage_2_train_images",
                                  "--truth", data, "--out", out / "report", log=logs / "report.log")
    seconds["stage lungs"] = pneumomap("stage", "lungs", "--checkpoint", models / "lungs", "--input", test_list,
                                       "--out", out / "lungs_test", "--device", device, log=logs / "stage_lungs.log")

    tuned_score = json.loads((out / "score.json").read_text(encoding="utf-8"))
    untuned_score = score_submission(submissions["untuned"], data, split="test", dataset=dataset)
    work = default_work(submissions["tuned"])  # the run's own files, beside the MIDRC submission folder
    run_summary = json.loads((work / "run_summary.json").read_text(encoding="utf-8"))
    summary: dict[str, Any] = {
        "classifier_auc": tuned_score["auc"],
        "lung_dice": lung_dice(dataset, test_ids, out / "lungs_test" / "masks"),
        "map_metric_untuned": untuned_score["map_log_loss"],
        "map_metric_tuned": tuned_score["map_log_loss"],
        **best_baselines(dataset, test_ids),
        "rsna_map_tuned": tuned_score.get("rsna_map"),
        "dice_tuned": tuned_score.get("dice"),
        "images_per_second": run_summary.get("images_per_second"),
        "n_images": n, "n_test": len(test_ids), "image_size": size,
        "submission": str(submissions["tuned"]), "rsna_submission": str(work / "rsna_submission.csv"),
        "tuned_pipeline": str(tuned), "report": str(out / "report" / "index.html"),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary["checks"] = checks(summary)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def checks(s: dict[str, Any]) -> dict[str, bool]:
    """What shows that learning worked (the demo's acceptance)."""
    return {
        "classifier_auc >= 0.95": s["classifier_auc"] is not None and s["classifier_auc"] >= 0.95,
        "lung_dice >= 0.95": s["lung_dice"] >= 0.95,
        "tuned < untuned": s["map_metric_tuned"] < s["map_metric_untuned"],
        "tuned < best constant map": s["map_metric_tuned"] < s["map_metric_constant"],
        "tuned < best lung-prior map": s["map_metric_tuned"] < s["map_metric_lung_prior"],
    }


def print_summary(s: dict[str, Any], path: Path) -> None:
    rows = [("classifier AUC (test)", s["classifier_auc"]), ("lung Dice (test)", s["lung_dice"]),
            ("map log loss, untuned", s["map_metric_untuned"]), ("map log loss, tuned", s["map_metric_tuned"]),
            ("map log loss, best constant map", s["map_metric_constant"]),
            ("map log loss, best lung-prior map", s["map_metric_lung_prior"]),
            ("RSNA mAP (tuned boxes)", s["rsna_map_tuned"]), ("inference images/s", s["images_per_second"]),
            ("total seconds", s["total_seconds"])]
    print("\npneumomap demo summary (map metric: the MIDRC organisers' weighted log loss, lower is better)")
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {name:<36} {shown:>10}")
    for name, ok in s["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"\nsubmission: {s['submission']}\ntuned pipeline: {s['tuned_pipeline']}\nreport: {s['report']}\n"
          f"summary: {path}")


def main(args: argparse.Namespace) -> int:
    try:
        summary = run_demo(args.out, args.n, args.size, args.seed, args.device, args.overrides)
    except RuntimeError as exc:
        print(f"pneumomap demo: {exc}", file=sys.stderr)
        return 1
    print_summary(summary, args.out.resolve() / "summary.json")
    return 0 if all(summary["checks"].values()) else 1
