"""Acceptance of `pneumomap tune`: tuned thresholds beat the untuned defaults on val AND on a held-out test split.

    python benchmarks/tune_phantom.py [--out runs/tune_phantom] [--n 120] [--size 128] [--device cpu]

Makes a phantom RSNA set (train/val/test by patient), trains every stage with the tiny recipe (skipped
when OUT/models/<stage>/best exists), tunes the default pipeline on the val split, then runs the untuned and
the tuned pipeline over the test split (the tuned run reuses the untuned run's stored model outputs) and
scores both with `pneumomap.score.score_submission`. Prints a table and writes OUT/tune_phantom.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from pneumomap.demo import ENCODER_OF, TRAIN_ORDER, write_demo_pipeline
from pneumomap.infer import runner, tune
from pneumomap.labels import load_rsna
from pneumomap.score import score_submission


def train_all(data: Path, models: Path, device: str, overrides: list[str]) -> dict[str, float]:
    """Tiny-recipe training of every stage not trained yet; seconds per stage."""
    from pneumomap.train import recipes
    from pneumomap.train.cli import train

    seconds = {}
    for stage in TRAIN_ORDER:
        if (models / stage / "best").is_dir():
            continue
        sets = list(overrides) + ([f"encoder_from={models / ENCODER_OF[stage] / 'best'}"] if stage in ENCODER_OF else [])
        start = time.perf_counter()
        train(stage, data, models / stage, recipes.resolve(stage, "tiny", sets), device=device)
        seconds[stage] = round(time.perf_counter() - start, 1)
        print(f"trained {stage} in {seconds[stage]} s", flush=True)
    return seconds


def infer_and_score(pipeline: Path, data: Path, ids: list[str], out: Path, device: str, reuse: Path | None = None) -> dict:
    """Run ``pipeline`` over ``ids`` into ``out`` (starting from ``reuse``'s stored outputs) and score it."""
    if reuse is not None and not out.exists():
        shutil.copytree(reuse / ".artifacts", out / ".artifacts")
    dataset = load_rsna(data)
    runner.run(pipeline, [dataset.image_path(pid) for pid in ids], out, runner.RunOptions(device=device, progress=False))
    return score_submission(out, data, ids=ids, dataset=dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/tune_phantom"))
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every stage, e.g. epochs=6")
    args = parser.parse_args()
    from pneumomap import synth

    out = args.out.resolve()
    data, models = out / "data", out / "models"
    if not (data / "split.csv").is_file():
        synth.generate(data, args.n, seed=args.seed, size=args.size, n_jobs=2)
    train_seconds = train_all(data, models, args.device, args.overrides)
    pipeline = write_demo_pipeline(models, out / "pipeline.yaml")
    tuned_path = out / "pipeline_tuned.yaml"

    start = time.perf_counter()
    result = tune.tune(pipeline, data, tuned_path, split="val", device=args.device, work=out / "tune_work")
    first = time.perf_counter() - start
    start = time.perf_counter()
    tune.tune(pipeline, data, tuned_path, split="val", device=args.device, work=out / "tune_work", progress=False)
    again = time.perf_counter() - start

    test_ids = load_rsna(data).ids_in("test")
    untuned = infer_and_score(pipeline, data, test_ids, out / "test_untuned", args.device)
    tuned = infer_and_score(tuned_path, data, test_ids, out / "test_tuned", args.device, reuse=out / "test_untuned")
    summary = {
        "n_val": result.n_images, "n_test": len(test_ids),
        "val_before": result.metric_before, "val_after": result.metric_after,
        "test_before": untuned["map_log_loss"], "test_after": tuned["map_log_loss"],
        "test_dice_before": untuned["dice"], "test_dice_after": tuned["dice"],
        "test_specificity_before": untuned["specificity"], "test_specificity_after": tuned["specificity"],
        "test_recall_before": untuned["recall"], "test_recall_after": tuned["recall"],
        "tune_seconds_first": round(first, 1), "tune_seconds_again": round(again, 1),
        "evaluations": result.evaluations, "train_seconds": train_seconds,
        "thresholds_before": result.thresholds_before, "thresholds_after": result.thresholds_after,
    }
    (out / "tune_phantom.json").write_text(json.dumps(summary, indent=2) + "\n")
    for key, value in summary.items():
        if not isinstance(value, dict):
            print(f"{key:<26} {value:.5g}" if isinstance(value, float) else f"{key:<26} {value}")
    holds = summary["val_after"] < summary["val_before"] and summary["test_after"] < summary["test_before"]
    print("ACCEPTANCE:", "tuned beats untuned on val and on test" if holds else "NOT MET")


if __name__ == "__main__":
    main()
