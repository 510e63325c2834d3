"""Average several finished runs into one submission.

  pneumomap ensemble RUN_WORK... --pipeline PIPELINE --out OUT [--weights W...] [--format midrc|pneumomap]

Each RUN_WORK is the work folder of a finished ``pneumomap infer --save-probabilities`` run (midrc:
its --work, by default OUT-work beside its OUT; pneumomap: its --out). The runs must cover the same
image ids. Per image: the weighted mean of the runs' saved float maps (before clipping) and image
probabilities, then PIPELINE's final op (`clip`, with its parameters) with the lung mask saved by
the first run that processed the image; the maps and tables are written as `pneumomap infer` writes
them (`pneumomap.submission`), into OUT in the chosen layout, the run's own files into --work.

An image that failed in some runs is averaged over the others (their weights renormalised); one
that failed in every run gets probability 0 and a floor-value map and is listed in failures.csv,
as `infer` does. decisions.csv has the images' probabilities but empty decision cells (the gates of
several runs have no single value). An ensemble of one run reproduces that run's maps and tables
byte for byte (`pneumomap.infer.writers`: the saved float16 maps keep their 8-bit values).

Exit status: 0 ok, 1 some images failed in every run (see failures.csv), 2 unusable input.
"""
from __future__ import annotations

import argparse
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pneumomap.errors import UserError
from pneumomap.infer import writers

NOT_A_RUN = ("not the work folder of a finished `pneumomap infer --save-probabilities` run (midrc: its --work, "
             "by default OUT-work beside OUT; pneumomap: its --out)")


class EnsembleError(UserError):
    """Runs that cannot be averaged; the message names the file and what is wrong."""


@dataclass
class Run:
    """One run's work folder as the ensemble reads it."""

    work: Path
    weight: float
    ids: list[str]  # input order (decisions.csv)
    failures: dict[str, tuple[str, str]]  # image id -> (path, reason), from failures.csv

    def path_of(self, image_id: str) -> Path:
        return writers.probability_path(self.work, image_id)

    def saved(self, image_id: str) -> writers.SavedProbabilities | None:
        """The image's saved probabilities; None when it failed in this run."""
        if image_id in self.failures:
            return None
        try:
            return writers.load_probabilities(self.path_of(image_id))
        except ValueError as exc:
            raise EnsembleError(str(exc)) from None


class _SavedLungs:
    """The saved lung mask standing in for the `LungRegions` value the final op takes (its ``mask_at``)."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def mask_at(self, shape: tuple[int, int], side: str = "mask") -> np.ndarray:
        if side != "mask" or tuple(shape) != self.mask.shape:
            raise ValueError(f"the saved lung mask is the whole mask at {self.mask.shape}, not {side} at {shape}")
        return self.mask


def read_run(work: str | Path, weight: float) -> Run:
    """A run's ids, failures and the check that every processed image has its saved probabilities."""
    from pneumomap.submission import SubmissionError, read_csv

    work = Path(work)
    decisions = work / "decisions.csv"
    if not decisions.is_file():
        raise EnsembleError(f"{work}: no decisions.csv: {NOT_A_RUN}")
    try:
        ids = [row["image_id"] for row in read_csv(decisions, ("image_id",))]
        failed = read_csv(work / "failures.csv", ("image_id", "path", "reason")) \
            if (work / "failures.csv").is_file() else []
    except SubmissionError as exc:
        raise EnsembleError(str(exc)) from None
    run = Run(work, weight, ids, {row["image_id"]: (row["path"], row["reason"]) for row in failed})
    missing = [i for i in ids if i not in run.failures and not run.path_of(i).is_file()]
    if missing:
        raise EnsembleError(f"{run.path_of(missing[0])}: missing ({len(missing)} of {len(ids)} images have no saved "
                            "probabilities): run that `pneumomap infer` command again with --save-probabilities (it "
                            "only fills in the missing files)")
    return run


def _map_shape(path: Path) -> tuple[int, ...]:
    """The saved map's shape from its .npy header (nothing else decompressed)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("map.npy") as handle:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(reader(handle)[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise EnsembleError(f"{path}: not a saved-probabilities file ({type(exc).__name__}: {exc})") from None


def check_runs(runs: Sequence[Run]) -> None:
    """Refuse, before anything is written, runs of other images or maps of other sizes."""
    first = runs[0]
    for run in runs[1:]:
        if run.ids != first.ids:
            only = sorted(set(run.ids) ^ set(first.ids))
            detail = (f"ids in one but not the other: {', '.join(only[:5])}" + (" ..." if len(only) > 5 else "")
                      if only else "the same ids in another order")
            raise EnsembleError(f"{run.work / 'decisions.csv'}: not the images of {first.work / 'decisions.csv'} "
                                f"({len(run.ids)} against {len(first.ids)} images; {detail}): ensemble runs of one "
                                "input list")
    for image_id in first.ids:
        shapes = {run.path_of(image_id): _map_shape(run.path_of(image_id)) for run in runs
                  if image_id not in run.failures}
        if len(set(shapes.values())) > 1:
            shown = ", ".join(f"{path} is {'x'.join(map(str, shape))}" for path, shape in shapes.items())
            raise EnsembleError(f"{image_id}: the runs' maps differ in size ({shown}): runs of other inputs")


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise EnsembleError(f"--weights: {len(weights)} weight(s) for {n} run(s): give one per run, in their order")
    bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
    if bad:
        raise EnsembleError(f"--weights: {bad[0]} is not a positive number")
    return [float(w) for w in weights]


def combine_image(pipeline: Any, image_id: str, runs: Sequence[Run]) -> tuple[writers.Record, np.ndarray]:
    """One image's record and 8-bit map: the weighted mean over the runs it did not fail in, then the final op."""
    from pneumomap.infer.runner import evaluate_op

    present = [(run.weight, saved) for run in runs if (saved := run.saved(image_id)) is not None]
    node = pipeline.nodes[pipeline.outputs.map]
    if not present:
        path = runs[0].failures[image_id][0]
        reasons = list(dict.fromkeys(run.failures[image_id][1] for run in runs))
        return writers.failure_record(image_id, path, "; ".join(reasons)), writers.fallback_map(path, pipeline.floor)
    total = sum(weight for weight, _ in present)
    mean = np.zeros(present[0][1].map.shape, np.float64)
    probability = 0.0
    for weight, saved in present:
        mean += (weight / total) * saved.map.astype(np.float64)
        probability += (weight / total) * saved.probability
    first = present[0][1]
    map_input, lungs_input = writers.probability_inputs(pipeline)
    map8 = evaluate_op(node, {map_input: mean, lungs_input: _SavedLungs(first.lungs)})
    record = writers.make_record(image_id, first.path, probability, {}, map8, pipeline.outputs.rsna)
    return record, map8


def ensemble(works: Sequence[str | Path], pipeline: Any, out: str | Path, weights: Sequence[float] | None = None,
             format: str = "midrc", work: str | Path | None = None) -> dict[str, Any]:
    """Average the runs in ``works`` into ``out`` (module doc); return the summary written to run_summary.json."""
    from pneumomap import submission
    from pneumomap.fileio import atomic_write_text, exclusive_lock, write_png
    from pneumomap.infer.runner import Item, check_output
    from pneumomap.infer.spec import load

    if not works:
        raise EnsembleError("name at least one run's work folder")
    pipeline = load(pipeline, check_checkpoints=False) if isinstance(pipeline, (str, Path)) else pipeline
    try:
        writers.probability_inputs(pipeline)
    except ValueError as exc:
        raise EnsembleError(f"--pipeline {pipeline.path}: {exc}") from None
    try:
        layout = submission.make_layout(format, out, work)
    except ValueError as exc:
        raise EnsembleError(str(exc)) from None
    runs = [read_run(w, weight) for w, weight in zip(works, check_weights(weights, len(works)))]
    for flag, folder in (("--out", layout.out), ("--work", layout.work)):
        if any(folder.resolve() == run.work.resolve() for run in runs):
            raise EnsembleError(f"{flag} {folder}: is one of the runs being averaged: write elsewhere")
    check_runs(runs)
    ids = runs[0].ids
    check_output(layout, [Item(i, "", image_id, "") for i, image_id in enumerate(ids)])
    with exclusive_lock(layout.work / ".pneumomap-ensemble.lock", f"--work {layout.work}"):
        layout.remove_tables()
        records = []
        for image_id in ids:
            record, map8 = combine_image(pipeline, image_id, runs)
            write_png(layout.map_path(image_id), map8)
            records.append(record)
        layout.write_tables(records, rsna=pipeline.outputs.rsna is not None)
        summary = {"images": len(records), "failures": sum(1 for r in records if r.failure),
                   "ensemble": [{"work": str(run.work.resolve()), "weight": run.weight} for run in runs],
                   "pipeline": str(pipeline.path), "format": layout.name, "out": str(layout.out.resolve()),
                   "work": str(layout.work.resolve())}
        atomic_write_text(layout.work / "run_summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pneumomap.overrides import add_set_argument

    parser.add_argument("runs", nargs="+", metavar="RUN_WORK", help="the work folders of finished `pneumomap infer "
                        "--save-probabilities` runs over the same images")
    parser.add_argument("--pipeline", default="pipeline.yaml", help="the pipeline whose final op (clip) and its "
                        "parameters make the 8-bit maps (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the submission folder to write")
    parser.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                        help="one positive weight per run, in their order (default: equal weights)")
    parser.add_argument("--format", default="midrc", choices=("midrc", "pneumomap"),
                        help="the output layout, as in `pneumomap infer` (default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder of the ensemble's own tables (default: OUT-work beside "
                        "OUT for midrc, OUT itself for pneumomap)")
    add_set_argument(parser, "a key of the pipeline, e.g. thresholds.clip.low=20")


def main(args: argparse.Namespace) -> int:
    from pneumomap.infer.cli import print_summary
    from pneumomap.infer.spec import load

    pipeline = load(args.pipeline, check_checkpoints=False, overrides=args.overrides)
    summary = ensemble(args.runs, pipeline, args.out, args.weights, args.format, args.work)
    return print_summary(summary, "ensemble", "failed in every run")
