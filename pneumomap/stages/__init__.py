"""The stage programs (lungs, classifier, regressor, mapper) and the shared image I/O.

Build a stage from its kind and config, save it, load it back::

    from pneumomap.stages import create_stage, load_stage, tiny_config
    clf = create_stage("classifier", {"backbones": ["convnext_tiny"]})
    clf.save("ckpt/classifier"); clf = load_stage("ckpt/classifier")

The stage modules import torch, timm and smp; the reader and geometry modules do not,
and importing this package does not import the stage modules until a stage is asked for.
"""
from __future__ import annotations

from pneumomap.stages.base import (ConfigError, Stage, StageConfig, create_stage, list_stages, load_stage,
                                   register_stage, stage_class, tiny_config)

__all__ = ["ConfigError", "Stage", "StageConfig", "create_stage", "list_stages", "load_stage",
           "register_stage", "stage_class", "tiny_config"]
