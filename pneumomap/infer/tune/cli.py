"""``pneumomap tune``: the command line of `pneumomap.infer.tune` (its module doc says what a tune does)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

from pneumomap.infer import runner, spec
from pneumomap.infer.tune import TuneError, TuneOptions, TuneResult, tune
from pneumomap.infer.tune.search import CHOICES, DEFAULT_CHOICE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pneumomap.cli import add_precision_argument, add_quiet_argument
    from pneumomap.overrides import add_set_argument
    from pneumomap.score import add_metric_arguments

    parser.add_argument("--pipeline", required=True, type=Path, help="the pipeline.yaml to tune")
    parser.add_argument("--val", required=True, type=Path, help="the truth: an RSNA-format folder (images, labels, "
                        "lung masks) or a folder of reference maps <name>.npy|png with image-level-classifications.csv")
    parser.add_argument("--images", type=Path, help="the radiographs of a reference-map truth (matched by file stem)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write the tuned pipeline into: "
                        "OUT/pipeline.yaml, OUT/pipeline.tune.json, the plots and (default) the stored outputs "
                        "(a path ending in .yaml names the file itself: deprecated)")
    parser.add_argument("--target-tnr", type=float, default=0.99,
                        help="true-negative rate of the classifier gate on the validation negatives (default 0.99)")
    parser.add_argument("--split", default="val", help="split of split.csv to tune on (default val; 'all' for every image)")
    parser.add_argument("--work", type=Path, help="folder of the stored model outputs (default: tune-work/ beside --out)")
    parser.add_argument("--plots", type=Path, help="folder of the metric-vs-parameter plots (default: beside --out)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (for the one network run)")
    add_metric_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="coordinate-descent rounds at most (default 3)")
    parser.add_argument("--folds", type=int, default=None, help="cross-validate the tuning over K folds to report "
                        "the gain to expect on new images (default: 5 with at least 50 images, else 0 = none)")
    parser.add_argument("--choice", choices=CHOICES, default=DEFAULT_CHOICE,
                        help="how each step picks a value on its grid: argmin (the lowest metric) or smoothed (the "
                        f"lowest mean of a value and its two grid neighbours); default {DEFAULT_CHOICE}")
    parser.add_argument("--batch-size", type=int, default=8, help="images per network batch")
    parser.add_argument("--workers", type=int, default=None, help="worker processes: decoding for the network run "
                        "(default: as infer) and the search over the stored outputs (default: one per CPU)")
    add_precision_argument(parser)
    add_set_argument(parser, "a key of the pipeline, e.g. nodes.classifier.checkpoint=runs/cls2 (relative to the "
                     "pipeline file, as in it); the pipeline tuned, with them written in, is OUT/pipeline.given.yaml")
    add_quiet_argument(parser)


def options_of(args: argparse.Namespace) -> TuneOptions:
    """The `TuneOptions` the flags give (``--workers`` serves the network run and the search alike)."""
    return TuneOptions(target_tnr=args.target_tnr, progress=not args.quiet,
                       split=None if args.split == "all" else args.split, work=args.work, plots=args.plots,
                       device=args.device, metric=args.metric, truth_def=args.truth_def, box_level=args.box_level,
                       pos_weight=args.pos_weight, neg_weight=args.neg_weight, images=args.images,
                       rounds=args.rounds, folds=args.folds, batch_size=args.batch_size, workers=args.workers,
                       precision=args.precision, search_workers=args.workers, choice=args.choice)


def main(args: argparse.Namespace) -> int:
    from pneumomap import provenance
    from pneumomap.overrides import write_pipeline

    out = args.out
    if out.suffix.lower() in (".yaml", ".yml"):
        print("pneumomap tune: warning: --out FILE.yaml is deprecated and will be removed; give a folder (the tuned "
              "pipeline is written as FOLDER/pipeline.yaml)", file=sys.stderr)
    else:
        out = out / "pipeline.yaml"
    try:
        options = options_of(args)
        pipeline_path, invoked = args.pipeline, contextlib.nullcontext()
        if args.overrides:  # tune a copy with the --set items written in; the provenance names the user's file
            pipeline_path = write_pipeline(spec.load(args.pipeline, overrides=args.overrides),
                                           out.with_name(f"{out.stem}.given.yaml"))
            invoked = provenance.invoked(args.pipeline, args.overrides)
        with invoked, warnings.catch_warnings():  # warnings printed below as one line
            warnings.filterwarnings("ignore", message="the classifier gate's true-negative rate", category=UserWarning)
            warnings.filterwarnings("ignore", message="the cross-validated gain", category=UserWarning)
            result = tune(pipeline_path, args.val, out, options)
    except (TuneError, runner.RunError, ValueError, OSError) as error:  # PipelineError, SubmissionError are ValueErrors
        print(f"pneumomap tune: error: {error}", file=sys.stderr)
        return 2
    report(result)
    return 0


def report(result: TuneResult) -> None:
    """What the command prints: the metric, the gains, the warnings, each parameter before -> after, the files."""
    print(f"tuned on {result.n_images} images ({'networks ran' if result.ran_networks else 'stored outputs'}, "
          f"{result.evaluations} evaluations, {result.seconds['total']:.1f} s)")
    print(f"{result.metric_name}: {result.metric_before:.5f} before -> {result.metric_after:.5f} after")
    print(result.in_sample.line("  in-sample"))
    cross = result.cross_validation
    if cross:
        print(cross.summary.line(f"  cross-validated over {cross.folds} folds"))
        unstable = [f"{name} {s.min:g}..{s.max:g}" for name, s in cross.stability.items() if s.distinct > 1]
        if unstable:
            print(f"  values chosen across the folds: {'; '.join(unstable)}")
    else:
        print("  not cross-validated (--folds 0, or fewer than 50 images): the in-sample gain overstates the real one")
    doubt = result.gain_doubt()
    if doubt:
        print(f"pneumomap tune: warning: {doubt}", file=sys.stderr)
    if result.achieved_tnr is not None:
        print(f"classifier gate: true-negative rate {result.achieved_tnr:.4g} on the validation negatives "
              f"(target {result.target_tnr:.4g})")
    if result.n_failed:
        print(f"pneumomap tune: warning: {result.n_failed} validation image(s) could not be read and were left "
              f"out; see {Path(result.work) / 'failures.csv'}", file=sys.stderr)
    shortfall = result.tnr_shortfall()
    if shortfall:
        print(f"pneumomap tune: warning: {shortfall}", file=sys.stderr)
    for name, value in result.parameters_after.items():
        old = result.parameters_before[name]
        print(f"  {name:<28} {old!s:>12} -> {value}")
    print(f"wrote {result.out}\nwrote {result.json}\nwrote {len(result.plot_files)} plots in {result.plots}")
