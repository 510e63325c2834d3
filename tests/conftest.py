"""Fixtures shared by the test modules: the tiny random-weight pipeline and folders of phantom input
DICOMs (`pneumomap.infer.tiny`), each built once a session per set of arguments and copied into the
folder a test module names, so that a module may write beside its copy as if it had built it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest


class BuiltOnce:
    """``make(folder, **kwargs)``: ``build(folder, **kwargs)``'s files, built once per ``kwargs`` into a
    cache and copied to ``folder``; returns the path ``build`` returned, inside ``folder``.
    ``after_build`` / ``after_copy``: what a fresh build leaves behind besides files (a random state),
    recorded once and set again on each copy."""

    def __init__(self, cache: Path, build: Callable[..., Path], after_build: Callable[[], Any] = lambda: None,
                 after_copy: Callable[[Any], None] = lambda state: None) -> None:
        self.cache, self.build = cache, build
        self.after_build, self.after_copy = after_build, after_copy
        self.built: dict[str, tuple[Path, Path, Any]] = {}  # kwargs -> (cache folder, path in it, state)

    def __call__(self, folder: str | Path, **kwargs: Any) -> Path:
        key = json.dumps(kwargs, sort_keys=True)
        if key not in self.built:
            source = self.cache / str(len(self.built))
            self.built[key] = (source, self.build(source, **kwargs).relative_to(source), self.after_build())
        source, relative, state = self.built[key]
        shutil.copytree(source, folder, dirs_exist_ok=True)
        self.after_copy(state)
        return Path(folder) / relative


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> BuiltOnce:
    """``tiny_pipeline(folder, thresholds=None, seed=0) -> folder/pipeline.yaml``: the repository's
    pipeline over tiny random-weight checkpoints (`pneumomap.infer.tiny.write_pipeline`); the torch
    random state is left as that function leaves it."""
    import torch

    from pneumomap.infer.tiny import write_pipeline

    return BuiltOnce(tmp_path_factory.mktemp("tiny_pipelines"), write_pipeline, torch.get_rng_state,
                     torch.set_rng_state)


@pytest.fixture(scope="session")
def phantom_inputs(tmp_path_factory) -> BuiltOnce:
    """``phantom_inputs(folder, n=8, size=128, seed=0, corrupt=True) -> folder/images``: phantom DICOMs
    (`pneumomap.infer.tiny.write_inputs`; with ``corrupt``, one file that is not a DICOM)."""
    from pneumomap.infer.tiny import write_inputs

    return BuiltOnce(tmp_path_factory.mktemp("phantom_inputs"), write_inputs)
