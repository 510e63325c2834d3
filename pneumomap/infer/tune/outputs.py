"""What a tune writes: the tuned YAML (the input's text with a new thresholds block, a ``# tune:`` header,
relative checkpoint paths rewritten for its folder), ``<out stem>.tune.json`` and the metric-vs-parameter
plots."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pneumomap import metrics
from pneumomap.fileio import atomic_write_text
from pneumomap.infer import spec
from pneumomap.infer.spec import Pipeline
from pneumomap.infer.tune.options import TuneError
from pneumomap.infer.tune.result import TuneResult

HEADER = "# tune: "


def strip_header(text: str) -> str:
    """``text`` without a leading tune header (so a re-tune replaces it)."""
    lines = text.splitlines(keepends=True)
    n = 0
    while n < len(lines) and lines[n].startswith(HEADER):
        n += 1
    return "".join(lines[n:])


def relocate_checkpoints(text: str, pipeline: Pipeline, out_path: Path) -> str:
    """Rewrite relative ``checkpoint:`` values so they resolve from ``out_path``'s folder: each becomes the
    relative path from there to the same directory (``os.path.relpath``); absolute paths are kept."""
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
    """The tuned YAML: the input byte for byte but its thresholds block (`spec.replace_thresholds`), under
    ``header`` (a previous one replaced), checkpoints relocated; checks that it loads with the same ones."""
    text = strip_header(pipeline.path.read_text(encoding="utf-8"))
    text = relocate_checkpoints(spec.replace_thresholds(text, thresholds), pipeline, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, "".join(f"{HEADER}{line}\n" for line in header) + text)
    tuned = spec.load(out_path)
    moved = [n.name for n in tuned.model_nodes if n.checkpoint != pipeline.nodes[n.name].checkpoint]
    if moved:
        raise TuneError(f"{out_path}: checkpoints of {', '.join(moved)} no longer resolve to the same directory; "
                        "write the tuned pipeline beside the original or use absolute checkpoint paths")


def header(result: TuneResult) -> list[str]:
    """The tune header's lines (without the prefix): what was tuned, on which data, the metric and gains."""
    names = ", ".join(result.searched)
    cross = result.cross_validation
    return [
        f"tuned by `pneumomap tune` on {result.date}; only the thresholds block below was changed.",
        f"classifier: at {result.target_tnr:.4g} true-negative rate on {result.n_negatives} validation negatives"
        + ("" if result.achieved_tnr is None else f" (achieved {result.achieved_tnr:.4g})") + ";",
        f"searched (coordinate descent over grids): {names}.",
        f"data: {result.val_dir}, split {result.split or 'all'}, {result.n_images} images; "
        f"truth: {result.truth}.",
        f"{result.metric_name}: {result.metric_before:.5f} before (untuned thresholds) -> "
        f"{result.metric_after:.5f} after (at the TNR classifier, before the search: {result.metric_start:.5f}).",
        result.in_sample.line("in-sample") + ".",
        (cross.summary.line(f"cross-validated ({cross.folds} folds, what to expect on new images)") + "." if cross
         else "not cross-validated (--folds 0, or fewer than 50 images): the in-sample gain overstates the real one."),
        f"source: {result.pipeline}; details: {Path(result.json).name}",
    ]


def metric_name(map_metric: metrics.MapMetric) -> str:
    """The metric's name in prose (the header, the plots)."""
    return {"midrc": "MIDRC weighted log loss"}.get(map_metric.name, f"{map_metric.name} map log loss")


def write_plots(result: TuneResult, plots_dir: Path) -> list[Path]:
    """One PNG per parameter: the metric against its value, before / after marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pneumomap.score import _save_figure

    paths = []
    for name, curve in result.curves.items():
        path = Path(plots_dir) / f"metric_vs_{name}.png"
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(curve.values, curve.metrics, "o-", ms=3)
        before, after = result.parameters_before[name], result.parameters_after[name]
        ax.axvline(before, ls=":", c="grey", label=f"before {before:.4g}")
        ax.axvline(after, ls="--", c="red", label=f"after {after:.4g}")
        ax.set(xlabel=name, ylabel=result.metric_name, title=f"{result.metric} map metric vs {name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, path)
        paths.append(path)
    return paths


def write_json(result: TuneResult) -> None:
    """``<out stem>.tune.json``: `TuneResult.to_json`."""
    atomic_write_text(Path(result.json), json.dumps(result.to_json(), indent=2) + "\n")
