"""What a tune is asked to do (`TuneOptions`, checked when made) and the error it raises on bad input."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pneumomap import metrics
from pneumomap.infer import runner
from pneumomap.infer.tune.search import CHOICES, DEFAULT_CHOICE


class TuneError(RuntimeError):
    """A problem with the tuning inputs (no images, no negatives, unresolvable checkpoints, bad options)."""


@dataclass
class TuneOptions:
    """The options of one tune (the command's flags; `pneumomap.infer.tune.tune` module doc).

    ``split``: the RSNA folder's split (None: every image); ``work``: the stored model outputs (None:
    ``tune-work/`` beside the output); ``plots``: the plots' folder (None: ``<out stem>-tune-plots/``);
    ``images``: the radiographs of a reference-map truth; ``folds``: None for `folds.default_folds`;
    ``workers``: decoding for the network run; ``search_workers``: the search's processes (None: the CPUs).
    """

    target_tnr: float = 0.99
    split: str | None = "val"
    work: Path | None = None
    plots: Path | None = None
    device: str = "auto"
    metric: str = metrics.DEFAULT_MAP_METRIC
    truth_def: str = "boxes_in_lungs"
    box_level: float = 1.0
    pos_weight: float = 1.0
    neg_weight: float = 1.0
    images: Path | None = None
    rounds: int = 3
    folds: int | None = None
    batch_size: int = 8
    workers: int | None = None
    precision: str = "auto"
    progress: bool = True
    search_workers: int | None = None
    choice: str = DEFAULT_CHOICE

    def __post_init__(self) -> None:
        for name in ("work", "plots", "images"):
            value = getattr(self, name)
            if not isinstance(value, Path):
                setattr(self, name, Path(value) if value else None)
        problems = []
        if not 0.0 <= self.target_tnr <= 1.0:
            problems.append(f"--target-tnr {self.target_tnr}: give a true-negative rate in [0, 1]")
        if self.rounds < 0:
            problems.append(f"--rounds {self.rounds}: give 0 or more")
        if self.folds is not None and self.folds < 0:
            problems.append(f"--folds {self.folds}: give 0 (no cross-validation) or 2 or more")
        if self.choice not in CHOICES:
            problems.append(f"--choice {self.choice}: choose one of {', '.join(CHOICES)}")
        if self.batch_size < 1:
            problems.append(f"--batch-size {self.batch_size}: give 1 or more")
        for name in ("workers", "search_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"{name} {value}: give 0 or more")
        if self.metric not in metrics.MAP_METRICS:
            problems.append(f"--metric {self.metric}: choose one of {', '.join(metrics.MAP_METRICS)}")
        if problems:
            raise TuneError("; ".join(problems))

    def map_metric(self) -> metrics.MapMetric:
        """The metric the search minimises (`metrics.map_metric`)."""
        return metrics.map_metric(self.metric, self.pos_weight, self.neg_weight)

    def run_options(self) -> runner.RunOptions:
        """The one network run's options: every gated node for every image (`runner.RunOptions.ungated`)."""
        return runner.RunOptions(device=self.device, batch_size=self.batch_size, workers=self.workers,
                                 precision=self.precision, ungated=True, progress=self.progress)

    def work_for(self, out_path: Path) -> Path:
        """The stored outputs' folder for a tune written to ``out_path``."""
        return self.work or out_path.parent / "tune-work"

    def plots_for(self, out_path: Path) -> Path:
        """The plots' folder for a tune written to ``out_path``."""
        return self.plots or out_path.parent / f"{out_path.stem}-tune-plots"
