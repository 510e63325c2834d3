"""Tune a pipeline's thresholds on validation data, over stored model outputs only.

    pneumomap tune --pipeline pipeline.yaml --val RSNA_DIR --out tuned/ [--target-tnr 0.99]   # tuned/pipeline.yaml
    pneumomap tune --pipeline pipeline.yaml --val REFERENCE_DIR --images DICOM_DIR --out tuned/

The truth is what `pneumomap score` reads (`pneumomap.truth`): an RSNA-format folder (boxes, as one
reference level ``--box-level``) or a folder of the organisers' reference maps with their
image-level-classifications.csv (the images then come from ``--images``).

1. Runs the networks once over the validation images (``--split`` of the RSNA folder) into ``--work``
   (default: ``tune-work/`` beside the output), every gated node computed for every image
   (`runner.RunOptions(ungated=True)`). When ``--work`` already holds every model output of these
   images and checkpoints, no network runs at all: a re-tune takes seconds (`data`).
2. Sets ``thresholds.classifier`` at the target true-negative rate on the validation negatives
   (`metrics.threshold_at_tnr` on their stored probabilities), a policy rather than a search. The
   threshold stays at most 1.0, so negatives that score 1.0 always pass the gate: the rate achieved
   is reported (``achieved_tnr``, the header, the command's output) with a warning when it falls
   below the target.
3. Searches the other numbers by coordinate descent over small grids (`space`, `search`; a few rounds,
   until no step helps): the extent thresholds, the over-estimation level threshold, dilate and raise
   for the low and high levels, and the clip values (low, high, outside). Each step keeps the current
   value unless a candidate lowers the metric, so the result is never worse than the start.
   The metric is the mean map log loss exactly as `pneumomap score` reports it (``--metric``: the
   organisers' weighted log loss by default, `metrics.map_metric`): the final 8-bit map at the original
   image size (the op chain of the pipeline itself) against the truth's reference codes. Clip values
   stay in [1, 254] (`ops.MAP8_RANGE`): no map ever holds 0 or 255. Every op's output is memoised per
   image by what it depends on (its parameters and its inputs' values/keys: `evaluator`, `keys`), so a
   step re-computes only the images and ops it changes. With ``--folds`` the search is cross-validated
   (`folds`).
4. Writes the tuned YAML (`outputs`): the input file byte for byte except its ``thresholds:`` block
   (`spec.replace_thresholds`) and a header of ``# tune:`` comment lines (what was tuned, on which
   data, the metric before and after, the date; a previous tune header is replaced). When the output
   lives in another folder than the input, each relative ``checkpoint:`` value is rewritten to the
   relative path from the new folder to the same directory (``os.path.relpath``), so it still resolves;
   absolute paths are kept. Beside it: ``<out stem>.tune.json`` (`TuneResult.to_json`: metrics,
   thresholds before/after, the curves) and the plots ``<out stem>-tune-plots/metric_vs_<parameter>.png``
   (or ``--plots``).

Python API: ``tune(pipeline_path, val_dir, out_path, **options) -> TuneResult`` (the options: the fields
of `TuneOptions`). ``thresholds.box`` (RSNA boxes) does not touch the map metric and is kept as it is.
The command line is `cli`.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pneumomap import provenance
from pneumomap.infer import spec
from pneumomap.infer.spec import IMAGE, Pipeline
from pneumomap.infer.tune.data import achieved_tnr, classifier_threshold, image_paths, stored_outputs
from pneumomap.infer.tune.evaluator import BaseEvaluator, Evaluator
from pneumomap.infer.tune.folds import Gain, cross_validate, default_folds
from pneumomap.infer.tune.options import TuneError, TuneOptions
from pneumomap.infer.tune.outputs import (HEADER, header, metric_name, relocate_checkpoints, strip_header,
                                          write_json, write_plots, write_tuned)
from pneumomap.infer.tune.parallel import make_evaluator
from pneumomap.infer.tune.result import SearchResult, TuneResult
from pneumomap.infer.tune.search import CHOICES, DEFAULT_CHOICE, Curve, choose, coordinate_descent, sweep
from pneumomap.infer.tune.space import AXES, CLASSIFIER, Axis, candidates, flat, get_value, has_path, with_value

__all__ = ["AXES", "CHOICES", "CLASSIFIER", "DEFAULT_CHOICE", "HEADER", "Axis", "Curve", "SearchResult",
           "TuneError", "TuneOptions", "TuneResult", "candidates", "choose", "coordinate_descent", "get_value",
           "has_path", "relocate_checkpoints", "stored_outputs", "strip_header", "sweep", "tune", "with_value"]


def tune(pipeline_path: str | Path, val_dir: str | Path, out_path: str | Path, options: TuneOptions | None = None,
         **kwargs) -> TuneResult:
    """Tune ``pipeline_path`` on the truth ``val_dir`` (`truth.load_truth`: an RSNA folder, ``split``
    of it, None = every image; or reference maps, whose radiographs are in ``images``) into ``out_path``.

    ``options`` or its fields as keywords (`TuneOptions`). Returns what ``<out stem>.tune.json`` holds.
    """
    from pneumomap.truth import is_rsna_folder, load_truth

    if options is None:
        options = TuneOptions(**kwargs)
    elif kwargs:
        raise TypeError("tune: give either options or keywords, not both")
    started = time.perf_counter()
    pipeline_path, out_path = Path(pipeline_path), Path(out_path)
    work, plots = options.work_for(out_path), options.plots_for(out_path)
    pipeline = spec.load(pipeline_path)
    map_metric = options.map_metric()
    split = options.split
    if not is_rsna_folder(val_dir) and split not in (None, "val"):
        raise TuneError(f"--split {split}: a folder of reference maps has no splits ({val_dir}); tune on all of it")
    split = split if is_rsna_folder(val_dir) else None  # the default 'val' is an RSNA folder's split
    truth_source = load_truth(val_dir, split=split, truth_def=options.truth_def, box_level=options.box_level)
    paths = image_paths(truth_source, options.images)
    stored, ran = stored_outputs(pipeline, paths, work, options.run_options())
    if not stored:
        raise TuneError(f"{val_dir}: no readable image" + (f" in split {split!r}" if split else ""))
    run_seconds = time.perf_counter() - started

    def truth(i: int) -> np.ndarray:
        size = stored[i][IMAGE]
        return truth_source.codes(stored[i]["image_id"], (size.height, size.width))

    evaluator = make_evaluator(Evaluator(pipeline, stored, truth, map_metric), options.search_workers)
    try:
        found = _search(evaluator, pipeline, stored, truth_source, options)
    finally:
        evaluator.close()
    result = TuneResult(
        **vars(found), n_failed=len(paths) - len(stored), split=split,
        val_dir=str(Path(val_dir).resolve()), pipeline=str(pipeline_path.resolve()),
        out=str(out_path.resolve()), json=str(out_path.with_suffix(".tune.json").resolve()),
        work=str(work.resolve()), plots=str(plots.resolve()), ran_networks=ran,
        metric=map_metric.name, metric_name=metric_name(map_metric), truth=str(truth_source),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        provenance=provenance.build(pipeline, device=options.device, precision=options.precision))
    for warning in (result.tnr_shortfall(), result.gain_doubt()):
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=2)
    write_tuned(pipeline, out_path, result.thresholds_after, header(result))
    result.plot_files = [str(p) for p in write_plots(result, plots)]
    result.seconds = {"run": round(run_seconds, 3), "total": round(time.perf_counter() - started, 3)}
    write_json(result)
    return result


def _search(evaluator: BaseEvaluator, pipeline: Pipeline, stored: list[dict], truth_source: Any,
            options: TuneOptions) -> SearchResult:
    """The gate at the target TNR, the coordinate descent, the curves, the in-sample and cross-validated gains."""
    target_tnr, rounds, choice = options.target_tnr, options.rounds, options.choice
    probability = pipeline.outputs.probability
    negatives = [not truth_source.label(s["image_id"]) for s in stored]
    before = copy.deepcopy(pipeline.thresholds)
    start = copy.deepcopy(before)
    gated = has_path(before, CLASSIFIER)
    if gated:
        start["classifier"] = classifier_threshold(stored, negatives, probability, target_tnr)
    axes = [a for a in AXES if has_path(before, a.path)]
    metric_before = evaluator.metric(before)
    metric_start = evaluator.metric(start)
    after, metric_after, curves = coordinate_descent(evaluator, start, axes, rounds, options.progress, rule=choice)
    if gated:
        probs = [float(s[probability]) for s in stored]
        grid = sorted({round(float(q), 4) for q in np.quantile(probs, np.linspace(0, 1, 11))}
                      | {after["classifier"], before["classifier"]})
        curves["classifier"] = sweep(evaluator, after, CLASSIFIER, grid)
    paths = [a.path for a in axes] + ([CLASSIFIER] if gated else [])
    tnr = achieved_tnr(stored, negatives, probability, after["classifier"]) if has_path(after, CLASSIFIER) else None
    in_sample = Gain.of(*evaluator.losses_of([before, after]))
    k = default_folds(len(stored)) if options.folds is None else options.folds
    if k == 1 or k > len(stored):
        raise TuneError(f"--folds {k}: give 0 (no cross-validation) or 2 to {len(stored)} (the tuning images)")

    def start_of(train: Sequence[int]) -> dict:
        fold_start = copy.deepcopy(start)
        if gated:
            with contextlib.suppress(TuneError):  # no negative in these folds: the gate of all the data
                fold_start["classifier"] = classifier_threshold([stored[i] for i in train],
                                                                [negatives[i] for i in train], probability, target_tnr)
        return fold_start

    cross = None
    if k >= 2:
        cross = cross_validate(
            evaluator, before, start_of,
            lambda train, fold_start: coordinate_descent(evaluator, fold_start, axes, rounds, False, train, choice)[0],
            k, lambda thresholds: flat(thresholds, paths))
    return SearchResult(
        metric_before=metric_before, metric_start=metric_start, metric_after=metric_after,
        thresholds_before=before, thresholds_after=after,
        parameters_before=flat(before, paths), parameters_after=flat(after, paths),
        searched=[a.name for a in axes], n_images=len(stored), n_negatives=int(sum(negatives)),
        target_tnr=target_tnr, achieved_tnr=tnr, in_sample=in_sample, cross_validation=cross,
        rounds=rounds, choice=choice, evaluations=evaluator.evaluations, curves=curves)
