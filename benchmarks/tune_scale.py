"""`pneumomap tune` at RSNA's size: search time and peak memory against the number of 1024-px images,
today's tuner side by side with the one before the evaluator rewrite, in one run.

    python benchmarks/tune_scale.py [--data /work/bench/val600] [--pipeline runs/demo/pipeline.yaml]
                                    [--sizes 150 300 600] [--old-sizes 150 300] [--baseline c21552d]

Makes (once) ``--n`` phantoms of 1024 px (`pneumomap synth`, every image in the val split) and runs the
pipeline's networks over them once (``RunOptions(ungated=True)``: every model output stored), so that
each measured tune is a pure search from stored outputs (``--folds 0``, plus one run with the default
folds). Each measurement runs in its own process, its CPU time (user + system, workers included) reported
beside its wall time, since other work on the machine stretches the wall time; its memory is sampled every 0.2 s as the sum of the
proportional set sizes (PSS) of the process and its workers, and the peak RSS of the parent.

The baseline is ``pneumomap`` at git commit ``--baseline`` (the tuner before the rewrite, with the
modules it used then), extracted by ``git archive`` into a temporary folder; both tune the same stored outputs with the same grids,
and their tuned thresholds and metrics are compared. Prints a table, the per-image slope, and writes
``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # rsna_subset


def _pss_kib(pid: int) -> int:
    """PSS of ``pid`` and its live children (KiB)."""
    total = 0
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for one in pids:
        try:
            for line in Path(f"/proc/{one}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(variant: str, n: int, args: argparse.Namespace) -> dict:
    """One tune in a child process (``--child``), its wall time and peak memory."""
    command = [sys.executable, __file__, "--child", variant, "--n-child", str(n), "--data", str(args.data),
               "--pipeline", str(args.pipeline), "--work", str(args.work), "--baseline", args.baseline]
    import resource

    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _pss_kib(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{variant} n={n} failed (exit {process.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result.update(variant=variant, n=n, wall_s=round(time.perf_counter() - started, 1),
                  cpu_s=round(cpu, 1), peak_pss_mib=round(peak[0] / 1024, 1))
    return result


def _baseline_root(commit: str) -> Path:
    """The whole source tree at ``commit`` (a git archive, made once): the baseline tuner with the modules
    it imported then, so that moving today's modules never breaks the comparison."""
    root = Path(tempfile.gettempdir()) / f"pneumomap-baseline-{commit}"
    if not (root / "pneumomap").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "pneumomap"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def child(args: argparse.Namespace) -> None:
    """Tune the first ``--n-child`` val images from the stored outputs; print one JSON line."""
    import resource

    variant, n = args.child, args.n_child
    if variant == "old":  # the baseline's own package tree first on the path
        sys.path.insert(0, str(_baseline_root(args.baseline)))
    from pneumomap.infer import tune as module

    assert (variant == "old") == (str(_baseline_root(args.baseline)) in module.__file__), module.__file__
    folds = 5 if variant == "new+folds" else 0
    data = Path(tempfile.mkdtemp()) / "subset"
    _subset(args.data, data, n)
    out = Path(tempfile.mkdtemp()) / "tuned.yaml"
    started = time.perf_counter()
    kwargs = dict(split="val", work=args.work, device="cpu", progress=False, folds=folds)
    result = module.tune(args.pipeline, data, out, **kwargs)
    seconds = time.perf_counter() - started
    result = result if isinstance(result, dict) else result.to_json()  # the baseline returns the JSON's dict
    print(json.dumps({"search_s": round(seconds, 1), "metric_after": result["metric_after"],
                      "metric_before": result["metric_before"], "thresholds_after": result["thresholds_after"],
                      "evaluations": result["evaluations"], "n_images": result["n_images"],
                      "ran_networks": result["ran_networks"],
                      "parent_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def _subset(source: Path, target: Path, n: int) -> None:
    """An RSNA folder holding the first ``n`` val ids of ``source`` (labels filtered, images linked)."""
    from rsna_subset import link_subset, read_splits

    val = [pid for pid, split in read_splits(source).items() if split == "val"][:n]
    link_subset(source, target, {pid: "val" for pid in val})


def prepare(args: argparse.Namespace) -> None:
    """The phantoms and their stored model outputs, once."""
    from pneumomap import synth
    from pneumomap.infer import runner, spec
    from pneumomap.labels import load_rsna

    if not (args.data / "split.csv").is_file():
        synth.generate(args.data, args.n, seed=0, size=1024, fractions=(0.0, 1.0, 0.0), n_jobs=2)
    dataset = load_rsna(args.data)
    paths = [dataset.image_path(pid) for pid in dataset.ids_in("val")]
    started = time.perf_counter()
    runner.run(spec.load(args.pipeline), paths, args.work,
               runner.RunOptions(device="cpu", ungated=True, progress=True))
    print(f"stored outputs of {len(paths)} images in {time.perf_counter() - started:.0f} s (done once)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/bench/val600"))
    parser.add_argument("--work", type=Path, default=None, help="stored outputs (default DATA-work)")
    parser.add_argument("--pipeline", type=Path, default=ROOT / "runs/demo/pipeline.yaml")
    parser.add_argument("--n", type=int, default=600, help="phantoms to make when --data is empty")
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 300, 600])
    parser.add_argument("--old-sizes", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--folds-size", type=int, default=600, help="size of the one run with 5 folds")
    parser.add_argument("--baseline", default="c21552d")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/tune_scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or args.data.with_name(args.data.name + "-work")
    if args.child:
        child(args)
        return
    prepare(args)
    rows = []
    for n in sorted(set(args.sizes) | set(args.old_sizes)):
        for variant in ("old", "new"):
            if (variant == "old" and n in args.old_sizes) or (variant == "new" and n in args.sizes):
                rows.append(measure(variant, n, args))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "thresholds_after"}), flush=True)
    if args.folds_size:
        rows.append(measure("new+folds", args.folds_size, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "thresholds_after"}), flush=True)
    by = {(r["variant"], r["n"]): r for r in rows}
    same = {n: by[("old", n)]["thresholds_after"] == by[("new", n)]["thresholds_after"]
            and by[("old", n)]["metric_after"] == by[("new", n)]["metric_after"]
            for n in args.old_sizes if ("new", n) in by}
    print(f"\n{'variant':<10} {'images':>6} {'search s':>9} {'CPU s':>8} {'s/image':>8} {'peak PSS MiB':>13} "
          f"{'parent RSS MiB':>15}")
    for r in rows:
        print(f"{r['variant']:<10} {r['n']:>6} {r['search_s']:>9.1f} {r.get('cpu_s', float('nan')):>8.1f} "
              f"{r['search_s'] / r['n']:>8.3f} {r['peak_pss_mib']:>13.0f} {r['parent_peak_rss_mib']:>15.0f}")
    slope = {}
    for variant in ("old", "new"):
        points = sorted((r["n"], r["search_s"], r["peak_pss_mib"]) for r in rows if r["variant"] == variant)
        if len(points) >= 2:
            (n0, t0, m0), (n1, t1, m1) = points[0], points[-1]
            slope[variant] = {"s_per_image": (t1 - t0) / (n1 - n0), "mib_per_image": (m1 - m0) / (n1 - n0)}
            print(f"{variant}: {slope[variant]['s_per_image']:.3f} s and {slope[variant]['mib_per_image']:.2f} MiB "
                  f"per image -> 5,338 images: {t1 + slope[variant]['s_per_image'] * (5338 - n1):.0f} s, "
                  f"{m1 + slope[variant]['mib_per_image'] * (5338 - n1):.0f} MiB")
    print("same thresholds and metric as the baseline:", same)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "slope": slope, "same_result": same,
                                    "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
