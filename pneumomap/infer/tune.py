"""Tune a pipeline's thresholds on validation data, over stored model outputs only.

    pneumomap tune --pipeline pipeline.yaml --val RSNA_DIR --out tuned/ [--target-tnr 0.99]   # tuned/pipeline.yaml
    pneumomap tune --pipeline pipeline.yaml --val REFERENCE_DIR --images DICOM_DIR --out tuned/

The truth is what `pneumomap score` reads (`pneumomap.truth`): an RSNA-format folder (boxes, as one
reference level ``--box-level``) or a folder of the organisers' reference maps with their
image-level-classifications.csv (the images then come from ``--images``).

1. Runs the networks once over the validation images (``--split`` of the RSNA folder) into ``--work``
   (default: ``tune-work/`` beside the output), every gated node computed for every image
   (`runner.RunOptions(ungated=True)`). When ``--work`` already holds every model output of these
   images and checkpoints, no network runs at all: a re-tune takes seconds.
2. Sets ``thresholds.classifier`` at the target true-negative rate on the validation negatives
   (`metrics.threshold_at_tnr` on their stored probabilities), a policy rather than a search. The
   threshold stays at most 1.0, so negatives that score 1.0 always pass the gate: the rate achieved
   is reported (``achieved_tnr``, the header, the command's output) with a warning when it falls
   below the target.
3. Searches the other numbers by coordinate descent over small grids (a few rounds, until no step
   helps): the extent thresholds, the over-estimation level threshold, dilate and raise for the low
   and high levels, and the clip values (low, high, outside). Each step keeps the current value
   unless a candidate lowers the metric, so the result is never worse than the start.
   The metric is the mean map log loss exactly as `pneumomap score` reports it (``--metric``: the
   organisers' weighted log loss by default, `metrics.map_metric`): the final 8-bit map at the original
   image size (the op chain of the pipeline itself) against the truth's reference codes. Clip values
   stay in [1, 254] (`ops.MAP8_RANGE`): no map ever holds 0 or 255. Every op's output is memoised per image by what
   it depends on (its parameters and its inputs' values/keys), so a step re-computes only the images and
   ops it changes.
4. Writes the tuned YAML: the input file byte for byte except its ``thresholds:`` block
   (`spec.replace_thresholds`) and a header of ``# tune:`` comment lines (what was tuned, on which
   data, the metric before and after, the date; a previous tune header is replaced). When the output
   lives in another folder than the input, each relative ``checkpoint:`` value is rewritten to the
   relative path from the new folder to the same directory (``os.path.relpath``), so it still resolves;
   absolute paths are kept. Beside it: ``<out stem>.tune.json`` (metrics, thresholds before/after,
   the curves) and the plots ``<out stem>-tune-plots/metric_vs_<parameter>.png`` (or ``--plots``).

Python API: ``tune(pipeline_path, val_dir, out_path, ...) -> dict`` (the JSON's content).
``thresholds.box`` (RSNA boxes) does not touch the map metric and is kept as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pneumomap import metrics, provenance
from pneumomap.fileio import atomic_write_text
from pneumomap.infer.ops import MAP8_RANGE
from pneumomap.infer import runner, spec, tune_folds
from pneumomap.infer.evaluator import BaseEvaluator, Evaluator, Progress, make_evaluator
from pneumomap.infer.runner import MISSING
from pneumomap.infer.spec import IMAGE, Pipeline

HEADER = "# tune: "


class TuneError(RuntimeError):
    """A problem with the tuning inputs (no images, no negatives, unresolvable checkpoints)."""


# ----------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Axis:
    """One searched threshold: its path in the thresholds block and its candidate grid."""

    path: tuple[str, ...]
    grid: tuple[float, ...]
    integer: bool = False

    @property
    def name(self) -> str:
        return ".".join(self.path)


_UNIT = tuple(round(float(v), 2) for v in np.linspace(0.0, 1.0, 21))
_DILATE = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24)
_RAISE = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8)
AXES: tuple[Axis, ...] = (
    Axis(("right_extent",), _UNIT),
    Axis(("left_extent",), _UNIT),
    Axis(("level",), _UNIT),
    Axis(("overestimate", "low", "dilate"), _DILATE, True),
    Axis(("overestimate", "low", "raise"), _RAISE),
    Axis(("overestimate", "high", "dilate"), _DILATE, True),
    Axis(("overestimate", "high", "raise"), _RAISE),
    Axis(("clip", "low"), (1, 2, 3, 5, 7, 10, 15, 20, 30, 45, 64, 90, 128), True),
    Axis(("clip", "high"), (128, 160, 192, 215, 230, 240, 245, 250, 252, 254), True),
    Axis(("clip", "outside"), (1, 2, 3, 5, 10, 20), True),
)
assert all(MAP8_RANGE[0] <= v <= MAP8_RANGE[1] for a in AXES if a.path[0] == "clip" for v in a.grid)
CLASSIFIER = ("classifier",)


def get_value(thresholds: dict, path: Sequence[str]) -> Any:
    """The value at ``path`` in a nested thresholds block (KeyError when absent)."""
    value: Any = thresholds
    for key in path:
        value = value[key]
    return value


def with_value(thresholds: dict, path: Sequence[str], value: Any) -> dict:
    """A copy of ``thresholds`` with ``path`` set to ``value``."""
    out = copy.deepcopy(thresholds)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def has_path(thresholds: dict, path: Sequence[str]) -> bool:
    try:
        get_value(thresholds, path)
        return True
    except (KeyError, TypeError):
        return False


def candidates(axis: Axis, thresholds: dict) -> list:
    """The grid plus the current value, sorted; clip.low never above clip.high and vice versa."""
    cast = int if axis.integer else float
    values = sorted({cast(v) for v in axis.grid} | {cast(get_value(thresholds, axis.path))})
    if axis.path[0] == "clip" and has_path(thresholds, ("clip", "low")) and has_path(thresholds, ("clip", "high")):
        if axis.path[1] == "low":
            values = [v for v in values if v <= thresholds["clip"]["high"]]
        elif axis.path[1] == "high":
            values = [v for v in values if v >= thresholds["clip"]["low"]]
    return values


# ----------------------------------------------------------------------------- search


@dataclass
class Curve:
    values: list
    metrics: list[float]


def sweep(evaluator: BaseEvaluator, thresholds: dict, path: Sequence[str], values: Sequence,
          indices: Sequence[int] | None = None, progress: Progress | None = None) -> Curve:
    """The metric at each value of one threshold, the others as in ``thresholds`` (invalid values skipped)."""
    kept, blocks = [], []
    for value in values:
        block = with_value(thresholds, path, value)
        try:
            evaluator.pipeline.with_thresholds(block)
        except spec.PipelineError:
            continue
        kept.append(value)
        blocks.append(block)
    return Curve(kept, evaluator.metrics_of(blocks, indices, progress) if blocks else [])


CHOICES = ("argmin", "smoothed")
DEFAULT_CHOICE = "argmin"


def choose(curve: Curve, current: Any, rule: str = "argmin") -> int | None:
    """The index of the value to move to on ``curve``, or None to stay at ``current``.

    'argmin': the lowest metric, when it is below the current value's. 'smoothed': the lowest mean of a
    value and its grid neighbours (a minimum that its neighbours confirm, not one image's luck), when that
    mean is below the current value's own.
    """
    metrics_ = np.asarray(curve.metrics, dtype=np.float64)
    here = curve.values.index(current) if current in curve.values else None
    if rule == "argmin":
        j = int(np.argmin(metrics_))
        return j if here is None or metrics_[j] < metrics_[here] else None
    if rule != "smoothed":
        raise ValueError(f"unknown choice rule {rule!r}; choose one of {', '.join(CHOICES)}")
    padded = np.concatenate(([metrics_[0]], metrics_, [metrics_[-1]]))  # edges: the end value counts twice
    smooth = (padded[:-2] + padded[1:-1] + padded[2:]) / 3.0
    j = int(np.argmin(smooth))
    return j if here is None or smooth[j] < smooth[here] else None


def coordinate_descent(evaluator: BaseEvaluator, start: dict, axes: Sequence[Axis], rounds: int = 3,
                       progress: bool = True, indices: Sequence[int] | None = None, rule: str = "argmin"
                       ) -> tuple[dict, float, dict[str, Curve]]:
    """Minimise the metric over ``indices`` (default all images) one axis at a time over its grid, each
    step chosen by ``rule`` (`choose`); returns (thresholds, metric, last curve per axis)."""
    from tqdm import tqdm

    n = evaluator.n_images if indices is None else len(indices)
    current = copy.deepcopy(start)
    best = evaluator.metric(current, indices)
    curves: dict[str, Curve] = {}
    for round_ in range(rounds):
        changed = False
        for axis in axes:
            values = candidates(axis, current)
            with tqdm(total=n * len(values), desc=f"tune round {round_ + 1}: {axis.name}", unit=" image-candidates",
                      unit_scale=True, disable=not progress, leave=False) as bar:
                curve = sweep(evaluator, current, axis.path, values, indices,
                              lambda k, width=len(values): bar.update(k * width))
            curves[axis.name] = curve
            j = choose(curve, get_value(current, axis.path), rule)
            if j is not None and curve.values[j] != get_value(current, axis.path):
                current, best, changed = with_value(current, axis.path, curve.values[j]), curve.metrics[j], True
        if not changed:
            break
    return current, best, curves


# ----------------------------------------------------------------------------- stored outputs


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


def tnr_shortfall(result: dict) -> str | None:
    """A warning when the tuned gate stops fewer validation negatives than ``--target-tnr`` asked, else None."""
    tnr = result.get("achieved_tnr")
    if tnr is None or tnr >= result["target_tnr"] - 1e-9:  # (count / n against the target, to rounding)
        return None
    passing = result["n_negatives"] - round(tnr * result["n_negatives"])
    return (f"the classifier gate's true-negative rate on the {result['n_negatives']} validation negatives is "
            f"{tnr:.4g}, below the target {result['target_tnr']:.4g}: {passing} negative(s) score "
            f">= {result['thresholds_after']['classifier']:.6g} and the threshold cannot go above 1.0 (the "
            "classifier saturates on them); their maps are computed as positives. Retrain or recalibrate the "
            "classifier, or accept the lower rate")


# ----------------------------------------------------------------------------- writing


def strip_header(text: str) -> str:
    """``text`` without a leading tune header (so a re-tune replaces it)."""
    lines = text.splitlines(keepends=True)
    n = 0
    while n < len(lines) and lines[n].startswith(HEADER):
        n += 1
    return "".join(lines[n:])


def relocate_checkpoints(text: str, pipeline: Pipeline, out_path: Path) -> str:
    """Rewrite relative ``checkpoint:`` values so they resolve from ``out_path``'s folder (see module doc)."""
    source, target = pipeline.path.parent.resolve(), out_path.parent.resolve()
    if source == target:
        return text
    raw_nodes = pipeline.raw.get("nodes", {})
    new_values = {}
    for name, body in raw_nodes.items():
        value = body.get("checkpoint") if isinstance(body, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            new_values[name] = os.path.relpath((source / value).resolve(), target)
    return spec.replace_checkpoints(text, raw_nodes, new_values)


def write_tuned(pipeline: Pipeline, out_path: Path, thresholds: dict, header: list[str]) -> None:
    """The tuned YAML (module doc, step 4); checks that it loads with the same checkpoints."""
    text = strip_header(pipeline.path.read_text(encoding="utf-8"))
    text = relocate_checkpoints(spec.replace_thresholds(text, thresholds), pipeline, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, "".join(f"{HEADER}{line}\n" for line in header) + text)
    tuned = spec.load(out_path)
    moved = [n.name for n in tuned.model_nodes if n.checkpoint != pipeline.nodes[n.name].checkpoint]
    if moved:
        raise TuneError(f"{out_path}: checkpoints of {', '.join(moved)} no longer resolve to the same directory; "
                        "write the tuned pipeline beside the original or use absolute checkpoint paths")


def _header(result: dict) -> list[str]:
    names = ", ".join(result["searched"])
    return [
        f"tuned by `pneumomap tune` on {result['date']}; only the thresholds block below was changed.",
        f"classifier: at {result['target_tnr']:.4g} true-negative rate on {result['n_negatives']} validation negatives"
        + ("" if result.get("achieved_tnr") is None else f" (achieved {result['achieved_tnr']:.4g})") + ";",
        f"searched (coordinate descent over grids): {names}.",
        f"data: {result['val_dir']}, split {result['split'] or 'all'}, {result['n_images']} images; "
        f"truth: {result['truth']}.",
        f"{result['metric_name']}: {result['metric_before']:.5f} before (untuned thresholds) -> "
        f"{result['metric_after']:.5f} after (at the TNR classifier, before the search: {result['metric_start']:.5f}).",
        _gain_line("in-sample", result["in_sample"]) + ".",
        (_gain_line(f"cross-validated ({result['cross_validation']['folds']} folds, what to expect on new images)",
                    result["cross_validation"]) + "." if result["cross_validation"] else
         "not cross-validated (--folds 0, or fewer than 50 images): the in-sample gain overstates the real one."),
        f"source: {result['pipeline']}; details: {Path(result['json']).name}",
    ]


def write_plots(result: dict, plots_dir: Path) -> list[Path]:
    """One PNG per parameter: the metric against its value, before / after marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pneumomap.score import _save_figure

    paths = []
    for name, curve in result["curves"].items():
        path = Path(plots_dir) / f"metric_vs_{name}.png"
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(curve["values"], curve["metrics"], "o-", ms=3)
        before, after = result["parameters_before"][name], result["parameters_after"][name]
        ax.axvline(before, ls=":", c="grey", label=f"before {before:.4g}")
        ax.axvline(after, ls="--", c="red", label=f"after {after:.4g}")
        ax.set(xlabel=name, ylabel=result["metric_name"], title=f"{result['metric']} map metric vs {name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- the whole


def _flat(thresholds: dict, paths: Sequence[Sequence[str]]) -> dict[str, Any]:
    return {".".join(p): get_value(thresholds, p) for p in paths}


def tune(pipeline_path: str | Path, val_dir: str | Path, out_path: str | Path, *, target_tnr: float = 0.99,
         split: str | None = "val", work: str | Path | None = None, plots: str | Path | None = None,
         device: str = "auto", metric: str = "midrc", truth_def: str = "boxes_in_lungs", box_level: float = 1.0,
         pos_weight: float = 1.0, neg_weight: float = 1.0, images: str | Path | None = None,
         rounds: int = 3, folds: int | None = None, batch_size: int = 8, workers: int | None = None,
         precision: str = "auto", progress: bool = True, search_workers: int | None = None,
         choice: str = DEFAULT_CHOICE) -> dict:
    """Tune ``pipeline_path`` on the truth ``val_dir`` (`truth.load_truth`: an RSNA folder, ``split``
    of it, None = every image; or reference maps, whose radiographs are in ``images``) into ``out_path``.

    Returns what ``<out stem>.tune.json`` holds: metric_before/start/after, thresholds_before/after,
    n_images, curves, the paths written, seconds.
    """
    from pneumomap.truth import is_rsna_folder, load_truth

    started = time.perf_counter()
    pipeline_path, out_path = Path(pipeline_path), Path(out_path)
    work = Path(work) if work else out_path.parent / "tune-work"
    plots = Path(plots) if plots else out_path.parent / f"{out_path.stem}-tune-plots"
    pipeline = spec.load(pipeline_path)
    map_metric = metrics.map_metric(metric, pos_weight, neg_weight)
    if not is_rsna_folder(val_dir) and split not in (None, "val"):
        raise TuneError(f"--split {split}: a folder of reference maps has no splits ({val_dir}); tune on all of it")
    split = split if is_rsna_folder(val_dir) else None  # the default 'val' is an RSNA folder's split
    truth_source = load_truth(val_dir, split=split, truth_def=truth_def, box_level=box_level)
    image_paths = _image_paths(truth_source, images)
    options = runner.RunOptions(device=device, batch_size=batch_size, workers=workers, precision=precision,
                                ungated=True, progress=progress)
    stored, ran = stored_outputs(pipeline, image_paths, work, options)
    if not stored:
        raise TuneError(f"{val_dir}: no readable image" + (f" in split {split!r}" if split else ""))
    run_seconds = time.perf_counter() - started

    def truth(i: int) -> np.ndarray:
        size = stored[i][IMAGE]
        return truth_source.codes(stored[i]["image_id"], (size.height, size.width))

    evaluator = make_evaluator(Evaluator(pipeline, stored, truth, map_metric), search_workers)
    try:
        result = _search(evaluator, pipeline, stored, truth_source, target_tnr, rounds, folds, progress, choice)
    finally:
        evaluator.close()
    result.update({
        "n_failed": len(image_paths) - len(stored), "split": split,
        "val_dir": str(Path(val_dir).resolve()), "pipeline": str(pipeline_path.resolve()),
        "out": str(out_path.resolve()), "json": str(out_path.with_suffix(".tune.json").resolve()),
        "work": str(work.resolve()), "plots": str(plots.resolve()), "ran_networks": ran,
        "metric": map_metric.name, "metric_name": _metric_name(map_metric), "truth": str(truth_source),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "provenance": provenance.build(pipeline, device=device, precision=precision),
    })
    shortfall = tnr_shortfall(result)
    if shortfall:
        warnings.warn(shortfall, UserWarning, stacklevel=2)
    doubt = gain_doubt(result)
    if doubt:
        warnings.warn(doubt, UserWarning, stacklevel=2)
    write_tuned(pipeline, out_path, result["thresholds_after"], _header(result))
    result["plot_files"] = [str(p) for p in write_plots(result, plots)]
    result["seconds"] = {"run": round(run_seconds, 3), "total": round(time.perf_counter() - started, 3)}
    atomic_write_text(Path(result["json"]), json.dumps(result, indent=2) + "\n")
    return result


def _search(evaluator: BaseEvaluator, pipeline: Pipeline, stored: list[dict], truth_source: Any,
            target_tnr: float, rounds: int, folds: int | None, progress: bool, choice: str = "argmin") -> dict:
    """The gate at the target TNR, the coordinate descent, the curves, the in-sample and cross-validated gains."""
    negatives = [not truth_source.label(s["image_id"]) for s in stored]
    before = copy.deepcopy(pipeline.thresholds)
    start = copy.deepcopy(before)
    if has_path(before, CLASSIFIER):
        start["classifier"] = classifier_threshold(stored, negatives, pipeline.outputs.probability, target_tnr)
    axes = [a for a in AXES if has_path(before, a.path)]
    metric_before = evaluator.metric(before)
    metric_start = evaluator.metric(start)
    after, metric_after, curves = coordinate_descent(evaluator, start, axes, rounds, progress, rule=choice)
    if has_path(before, CLASSIFIER):
        probs = [float(s[pipeline.outputs.probability]) for s in stored]
        grid = sorted({round(float(q), 4) for q in np.quantile(probs, np.linspace(0, 1, 11))}
                      | {after["classifier"], before["classifier"]})
        curves["classifier"] = sweep(evaluator, after, CLASSIFIER, grid)
    paths = [a.path for a in axes] + ([CLASSIFIER] if has_path(before, CLASSIFIER) else [])
    tnr = (achieved_tnr(stored, negatives, pipeline.outputs.probability, after["classifier"])
           if has_path(after, CLASSIFIER) else None)
    in_sample = tune_folds.gain_summary(*evaluator.losses_of([before, after]))
    k = tune_folds.default_folds(len(stored)) if folds is None else folds
    if k == 1 or k > len(stored):
        raise TuneError(f"--folds {k}: give 0 (no cross-validation) or 2 to {len(stored)} (the tuning images)")

    def start_of(train: Sequence[int]) -> dict:
        fold_start = copy.deepcopy(start)
        if has_path(before, CLASSIFIER):
            with contextlib.suppress(TuneError):  # no negative in these folds: the gate of all the data
                fold_start["classifier"] = classifier_threshold([stored[i] for i in train],
                                                                [negatives[i] for i in train],
                                                                pipeline.outputs.probability, target_tnr)
        return fold_start

    cross = None
    if k >= 2:
        cross = tune_folds.cross_validate(
            evaluator, before, start_of,
            lambda train, fold_start: coordinate_descent(evaluator, fold_start, axes, rounds, False, train, choice)[0],
            k, lambda thresholds: _flat(thresholds, paths))
    return {
        "metric_before": metric_before, "metric_start": metric_start, "metric_after": metric_after,
        "thresholds_before": before, "thresholds_after": after,
        "parameters_before": _flat(before, paths), "parameters_after": _flat(after, paths),
        "searched": [a.name for a in axes], "n_images": len(stored), "n_negatives": int(sum(negatives)),
        "target_tnr": target_tnr, "achieved_tnr": tnr, "in_sample": in_sample, "cross_validation": cross,
        "rounds": rounds, "choice": choice, "evaluations": evaluator.evaluations,
        "curves": {k: {"values": c.values, "metrics": c.metrics} for k, c in curves.items()},
    }


def _image_paths(truth: Any, images: str | Path | None) -> list[Path]:
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


def gain_doubt(result: dict) -> str | None:
    """A warning when the cross-validated gain is not clearly positive (its 95% interval reaches 0)."""
    cross = result.get("cross_validation")
    if cross is None or tune_folds.clearly_positive(cross):
        return None
    low, high = cross["gain_ci95"]
    return (f"the cross-validated gain is not clearly positive ({cross['gain']:+.4f}, 95% interval [{low:+.4f}, "
            f"{high:+.4f}] over {cross['folds']} folds): the tuned thresholds may not beat the untuned ones on new "
            "images; tune on more images or keep the untuned thresholds")


def _gain_line(name: str, summary: dict) -> str:
    low, high = summary["gain_ci95"]
    return (f"{name}: {summary['before']:.5f} -> {summary['after']:.5f}, gain {summary['gain']:+.5f} "
            f"(95% interval over images [{low:+.5f}, {high:+.5f}])")


def _metric_name(map_metric: metrics.MapMetric) -> str:
    return {"midrc": "MIDRC weighted log loss"}.get(map_metric.name, f"{map_metric.name} map log loss")


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    from pneumomap.infer.cli import add_precision_argument

    add_precision_argument(parser)
    from pneumomap.cli import add_quiet_argument
    from pneumomap.overrides import add_set_argument

    add_set_argument(parser, "a key of the pipeline, e.g. nodes.classifier.checkpoint=runs/cls2 (relative to the "
                     "pipeline file, as in it); the pipeline tuned, with them written in, is OUT/pipeline.given.yaml")
    add_quiet_argument(parser)


def main(args: argparse.Namespace) -> int:
    from pneumomap.overrides import write_pipeline

    out = args.out
    if out.suffix.lower() in (".yaml", ".yml"):
        print("pneumomap tune: warning: --out FILE.yaml is deprecated and will be removed; give a folder (the tuned "
              "pipeline is written as FOLDER/pipeline.yaml)", file=sys.stderr)
    else:
        out = out / "pipeline.yaml"
    try:
        pipeline_path, invoked = args.pipeline, contextlib.nullcontext()
        if args.overrides:  # tune a copy with the --set items written in; the provenance names the user's file
            pipeline_path = write_pipeline(spec.load(args.pipeline, overrides=args.overrides),
                                           out.with_name(f"{out.stem}.given.yaml"))
            invoked = provenance.invoked(args.pipeline, args.overrides)
        with invoked, warnings.catch_warnings():  # warnings printed below as one line
            warnings.filterwarnings("ignore", message="the classifier gate's true-negative rate", category=UserWarning)
            warnings.filterwarnings("ignore", message="the cross-validated gain", category=UserWarning)
            result = tune(pipeline_path, args.val, out, target_tnr=args.target_tnr, progress=not args.quiet,
                          split=None if args.split == "all" else args.split, work=args.work, plots=args.plots,
                          device=args.device, metric=args.metric, truth_def=args.truth_def, box_level=args.box_level,
                          pos_weight=args.pos_weight, neg_weight=args.neg_weight, images=args.images,
                          rounds=args.rounds, folds=args.folds, batch_size=args.batch_size,
                          workers=args.workers, precision=args.precision, search_workers=args.workers,
                          choice=args.choice)
    except (TuneError, runner.RunError, ValueError, OSError) as error:  # PipelineError, SubmissionError are ValueErrors
        print(f"pneumomap tune: error: {error}", file=sys.stderr)
        return 2
    print(f"tuned on {result['n_images']} images ({'networks ran' if result['ran_networks'] else 'stored outputs'}, "
          f"{result['evaluations']} evaluations, {result['seconds']['total']:.1f} s)")
    print(f"{result['metric_name']}: {result['metric_before']:.5f} before -> {result['metric_after']:.5f} after")
    print(_gain_line("  in-sample", result["in_sample"]))
    cross = result["cross_validation"]
    if cross:
        print(_gain_line(f"  cross-validated over {cross['folds']} folds", cross))
        unstable = [f"{name} {s['min']:g}..{s['max']:g}" for name, s in cross["stability"].items() if s["distinct"] > 1]
        if unstable:
            print(f"  values chosen across the folds: {'; '.join(unstable)}")
    else:
        print("  not cross-validated (--folds 0, or fewer than 50 images): the in-sample gain overstates the real one")
    doubt = gain_doubt(result)
    if doubt:
        print(f"pneumomap tune: warning: {doubt}", file=sys.stderr)
    if result["achieved_tnr"] is not None:
        print(f"classifier gate: true-negative rate {result['achieved_tnr']:.4g} on the validation negatives "
              f"(target {result['target_tnr']:.4g})")
    if result["n_failed"]:
        print(f"pneumomap tune: warning: {result['n_failed']} validation image(s) could not be read and were left "
              f"out; see {Path(result['work']) / 'failures.csv'}", file=sys.stderr)
    shortfall = tnr_shortfall(result)
    if shortfall:
        print(f"pneumomap tune: warning: {shortfall}", file=sys.stderr)
    for name, value in result["parameters_after"].items():
        old = result["parameters_before"][name]
        print(f"  {name:<28} {old!s:>12} -> {value}")
    print(f"wrote {result['out']}\nwrote {result['json']}\nwrote {len(result['plot_files'])} plots in {result['plots']}")
    return 0
