"""What a tune searches over: the truth's radiographs, their stored model outputs (the networks run only
for what is missing), and the classifier gate at a true-negative rate on the negatives' stored scores."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.infer import runner
from pneumomap.infer.runner import MISSING
from pneumomap.infer.spec import Pipeline
from pneumomap.infer.tune.options import TuneError


def image_paths(truth: Any, images: Path | None) -> list[Path]:
    """The radiographs of the truth's ids: the truth's own (RSNA) or those of ``images`` by file stem."""
    if images is None:
        paths = [truth.image_path(pid) for pid in truth.ids]
        if any(p is None for p in paths):
            raise TuneError(f"{truth}: the truth does not hold the radiographs; name their folder with --images")
        return paths
    from pneumomap.stages.reader import list_images

    found = {p.stem: p for p in list_images(images)}
    missing = [pid for pid in truth.ids if pid not in found]
    if missing:
        raise TuneError(f"--images {images}: no radiograph for {len(missing)} truth id(s): {', '.join(missing[:5])}")
    return [found[pid] for pid in truth.ids]


def _failed_ids(work: Path) -> set[str]:
    path = work / "failures.csv"
    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["image_id"] for row in csv.DictReader(handle)}


def _complete(pipeline: Pipeline, stored: list[dict], expected: set[str]) -> bool:
    have = {s["image_id"] for s in stored if all(s[n.name] is not MISSING for n in pipeline.model_nodes)}
    return expected <= have


def stored_outputs(pipeline: Pipeline, paths: list[Path], work: Path, options: runner.RunOptions
                   ) -> tuple[list[dict], bool]:
    """Every model output of ``paths`` (gated ones too), from ``work``; runs the networks only for what is
    missing. Returns (outputs, whether the pipeline ran); maps stay on disk (`runner.Deferred`)."""
    expected = {p.stem for p in paths} - _failed_ids(work)
    stored = runner.load_outputs(pipeline, work, paths, options, lazy=True) if work.is_dir() else []
    if _complete(pipeline, stored, expected):
        return stored, False
    runner.run(pipeline, paths, work, options)
    stored = runner.load_outputs(pipeline, work, paths, options, lazy=True)
    return [s for s in stored if all(s[n.name] is not MISSING for n in pipeline.model_nodes)], True


def classifier_threshold(stored: list[dict], negatives: Sequence[bool], probability: str, target_tnr: float) -> float:
    """`metrics.threshold_at_tnr` on the negatives' stored probabilities, at most 1.0 (the gate's range):
    negatives that score 1.0 pass even that, so the achieved rate can fall short (`achieved_tnr`)."""
    scores = [float(s[probability]) for s, neg in zip(stored, negatives) if neg]
    if not scores:
        raise TuneError("no negative image among the tuning images: cannot set the classifier at a true-negative rate")
    return min(metrics.threshold_at_tnr(scores, target_tnr), 1.0)


def achieved_tnr(stored: list[dict], negatives: Sequence[bool], probability: str, threshold: float) -> float:
    """The fraction of the negatives that the gate stops at ``threshold`` (score < threshold)."""
    scores = np.asarray([float(s[probability]) for s, neg in zip(stored, negatives) if neg], dtype=np.float64)
    return float(np.mean(scores < threshold)) if scores.size else float("nan")
