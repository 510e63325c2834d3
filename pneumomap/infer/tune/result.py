"""What a tune found (`SearchResult`) and the whole record of one tune (`TuneResult`): what
``<out stem>.tune.json`` holds (`TuneResult.to_json`, its keys in the order of the fields), and the
warnings it calls for."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from pneumomap.infer.tune.folds import CrossValidation, Gain
from pneumomap.infer.tune.search import Curve


@dataclass
class SearchResult:
    """The search's outcome: the metric before (untuned), at the start (the gate at the target TNR) and
    after; the thresholds and the searched parameters ('clip.low': 10) before and after; the gains."""

    metric_before: float
    metric_start: float
    metric_after: float
    thresholds_before: dict
    thresholds_after: dict
    parameters_before: dict[str, Any]
    parameters_after: dict[str, Any]
    searched: list[str]  # the axes' names
    n_images: int
    n_negatives: int
    target_tnr: float
    achieved_tnr: float | None  # None without a classifier threshold
    in_sample: Gain
    cross_validation: CrossValidation | None
    rounds: int
    choice: str
    evaluations: int
    curves: dict[str, Curve]  # the last sweep of each parameter (the classifier's: around its value)


@dataclass
class TuneResult(SearchResult):
    """One tune: the search's outcome, what it ran on and what it wrote (paths resolved, as text)."""

    n_failed: int  # validation images that could not be read
    split: str | None
    val_dir: str
    pipeline: str
    out: str
    json: str
    work: str
    plots: str
    ran_networks: bool
    metric: str  # `metrics.MapMetric.name`
    metric_name: str  # its name in prose
    truth: str
    date: str
    provenance: dict
    plot_files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # run (the networks) and total

    def to_json(self) -> dict[str, Any]:
        """The content of ``<out stem>.tune.json``."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def tnr_shortfall(self) -> str | None:
        """A warning when the tuned gate stops fewer validation negatives than ``--target-tnr`` asked, else None."""
        tnr = self.achieved_tnr
        if tnr is None or tnr >= self.target_tnr - 1e-9:  # (count / n against the target, to rounding)
            return None
        passing = self.n_negatives - round(tnr * self.n_negatives)
        return (f"the classifier gate's true-negative rate on the {self.n_negatives} validation negatives is "
                f"{tnr:.4g}, below the target {self.target_tnr:.4g}: {passing} negative(s) score "
                f">= {self.thresholds_after['classifier']:.6g} and the threshold cannot go above 1.0 (the "
                "classifier saturates on them); their maps are computed as positives. Retrain or recalibrate the "
                "classifier, or accept the lower rate")

    def gain_doubt(self) -> str | None:
        """A warning when the cross-validated gain is not clearly positive (its 95% interval reaches 0)."""
        cross = self.cross_validation
        if cross is None or cross.summary.clearly_positive():
            return None
        low, high = cross.summary.gain_ci95
        return (f"the cross-validated gain is not clearly positive ({cross.summary.gain:+.4f}, 95% interval "
                f"[{low:+.4f}, {high:+.4f}] over {cross.folds} folds): the tuned thresholds may not beat the "
                "untuned ones on new images; tune on more images or keep the untuned thresholds")


def _plain(value: Any) -> Any:
    """``value`` with its dataclasses as JSON-ready dicts (a class's own ``to_json`` where it has one)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
