"""The layout of a stage checkpoint folder and of a training run, in one place for every layer.

A stage checkpoint is a folder holding `CONFIG_FILE` and `WEIGHTS_FILE` (`pneumomap.stages.base`
writes and reads them); ``pneumomap train STAGE --out RUN`` keeps its best one in ``RUN/best``
(`BEST`). Wherever a checkpoint folder is asked for, a training run's folder means its ``best/``
(`checkpoint_folder`): pipelines, `load_stage`, provenance records and packages read it the same way.
Imports nothing of pneumomap, so `stages`, `train`, `infer` and the top-level modules can all use it.
"""
from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.safetensors"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
BEST = "best"  # a training run's checkpoint with the best validation metric: RUN/best


def checkpoint_folder(directory: str | os.PathLike) -> Path:
    """``directory``, or ``directory/best`` when ``directory`` is a training run (no `CONFIG_FILE`
    of its own, a ``best/`` folder inside)."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() and (directory / BEST).is_dir():
        return directory / BEST
    return directory


def run_folder(checkpoint: str | os.PathLike) -> Path | None:
    """The training run a checkpoint folder came from: the parent of a ``best/``, else None."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent if checkpoint.name == BEST else None
