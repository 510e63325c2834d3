"""Which step rule of `pneumomap tune` generalises: the plain argmin against the smoothed minimum
(`tune.choose`), tuned on validation images and scored on held-out test images.

    python benchmarks/tune_choice.py [--demo runs/demo] [--large /work/bench/choice1000] [--subsets 5]

Three comparisons, each tuning with both rules from the same stored outputs (``--folds 0``) and scoring
the tuned thresholds on the test images with the evaluator (`pneumomap score`'s number, from stored outputs):

1. the demo (``make demo``: its val and test splits, 80 + 80 phantoms of 128 px, its tiny models);
2. a larger phantom set (``--n`` 1000 made once: 400 val, 400 test) with the demo's models;
3. ``--subsets`` disjoint 80-image subsets of that larger val split (small validation sets, as in the
   MIDRC validation phase), each scored on the same 400 test images.

Prints a table and writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # rsna_subset
RULES = ("argmin", "smoothed")


def test_metric(pipeline_path: Path, data: Path, thresholds_list: list[dict], work: Path) -> list[float]:
    """The test split's mean map metric of each thresholds block (stored outputs, networks run once)."""
    from pneumomap import metrics
    from pneumomap.infer import runner, spec, tune
    from pneumomap.infer.tune.evaluator import Evaluator
    from pneumomap.truth import load_truth

    pipeline = spec.load(pipeline_path)
    truth = load_truth(data, split="test")
    paths = [truth.image_path(pid) for pid in truth.ids]
    options = runner.RunOptions(device="cpu", ungated=True, progress=False)
    stored, _ = tune.stored_outputs(pipeline, paths, work, options)

    def codes(i: int) -> np.ndarray:
        return truth.codes(stored[i]["image_id"], (stored[i]["image"].height, stored[i]["image"].width))

    return Evaluator(pipeline, stored, codes, metrics.map_metric("midrc")).metrics_of(thresholds_list)


def compare(name: str, pipeline: Path, val: Path, test: Path, work: Path, test_work: Path) -> dict:
    """Tune ``val`` with each rule, score both and the untuned on ``test``."""
    from pneumomap.infer import spec, tune

    row: dict = {"set": name}
    tuned = {}
    for rule in RULES:
        out = Path(tempfile.mkdtemp()) / "tuned.yaml"
        started = time.perf_counter()
        result = tune.tune(pipeline, val, out, split="val", work=work, device="cpu", progress=False, folds=0,
                           choice=rule)
        tuned[rule] = result.thresholds_after
        row[f"val_{rule}"] = result.metric_after
        row[f"seconds_{rule}"] = round(time.perf_counter() - started, 1)
        row["n_val"] = result.n_images
    untuned = spec.load(pipeline).thresholds
    scores = test_metric(pipeline, test, [untuned, tuned["argmin"], tuned["smoothed"]], test_work)
    row.update(test_untuned=scores[0], test_argmin=scores[1], test_smoothed=scores[2], thresholds=tuned)
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "thresholds"}),
          flush=True)
    return row


def subset_folder(source: Path, target: Path, val_ids: list[str]) -> Path:
    """An RSNA folder whose val split is ``val_ids`` and test split the source's test split (links)."""
    from rsna_subset import link_subset, read_splits

    test = {pid: "test" for pid, split in read_splits(source).items() if split == "test"}
    return link_subset(source, target, {**test, **{pid: "val" for pid in val_ids}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "runs/demo")
    parser.add_argument("--large", type=Path, default=Path("/work/bench/choice1000"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--subsets", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/tune_choice.json")
    args = parser.parse_args()
    from pneumomap import synth
    from pneumomap.labels import load_rsna

    pipeline = args.demo / "pipeline.yaml"
    rows = [compare("demo 80/80", pipeline, args.demo / "data", args.demo / "data",
                    args.demo / "choice-work", args.demo / "choice-work")]
    if not (args.large / "split.csv").is_file():
        synth.generate(args.large, args.n, seed=11, size=128, fractions=(0.2, 0.4, 0.4), n_jobs=2)
    work = args.large.with_name(args.large.name + "-work")
    rows.append(compare(f"large {len(load_rsna(args.large).ids_in('val'))}/{len(load_rsna(args.large).ids_in('test'))}",
                        pipeline, args.large, args.large, work, work))
    val_ids = sorted(load_rsna(args.large).ids_in("val"))
    rng = np.random.default_rng(0)
    rng.shuffle(val_ids)
    for k in range(args.subsets):
        ids = val_ids[k * 80:(k + 1) * 80]
        folder = subset_folder(args.large, args.large.with_name(f"{args.large.name}-sub{k}"), ids)
        rows.append(compare(f"small val {k + 1} (80) / 400", pipeline, folder, args.large, work, work))
    print(f"\n{'set':<24} {'val argmin':>10} {'val smooth':>10} {'test untuned':>12} {'test argmin':>11} "
          f"{'test smooth':>11}")
    for r in rows:
        print(f"{r['set']:<24} {r['val_argmin']:>10.4f} {r['val_smoothed']:>10.4f} {r['test_untuned']:>12.4f} "
              f"{r['test_argmin']:>11.4f} {r['test_smoothed']:>11.4f}")
    small = [r for r in rows if r["set"].startswith("small")]
    if small:
        diff = np.array([r["test_argmin"] - r["test_smoothed"] for r in small])
        print(f"small sets: smoothed better on {int((diff > 0).sum())} of {len(small)}, mean test gain of smoothed "
              f"over argmin {diff.mean():+.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
