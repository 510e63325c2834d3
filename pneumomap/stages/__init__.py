"""The stage programs (lungs, classifier, regressor, mapper) and the shared image I/O.

Build a stage from its kind and config, save it, load it back::

    from pneumomap.stages import create_stage, load_stage, tiny_config
    clf = create_stage("classifier", {"backbones": ["convnext_tiny"]})
    clf.save("ckpt/classifier"); clf = load_stage("ckpt/classifier")

The names below are imported lazily: ``import pneumomap.stages.reader`` (e.g. in image-decoding
worker processes) does not pull in torch, timm or smp.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ConfigError", "Stage", "StageConfig", "create_stage", "list_stages", "load_stage",
           "register_stage", "stage_class", "tiny_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pneumomap.stages.base"), name)
    raise AttributeError(f"module 'pneumomap.stages' has no attribute {name!r}")
