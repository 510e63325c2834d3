"""Learning-rate schedules of the recipes, stepped once per optimiser step.

The reference table says "cosine, LR x0.5 per epoch" (x0.75 for regressors and mappers,
constant for the lungs). We read it as a cosine-smoothed exponential decay: within epoch ``e``
the LR follows a half cosine from ``lr * d**e`` down to ``lr * d**(e+1)``, so it falls by the
factor ``d`` per epoch without jumps or restarts. ``d = 1`` or ``schedule: constant`` keeps the
LR fixed. ``min_lr`` is a floor: ``lr(t) = min_lr + (lr - min_lr) * factor(t)``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pneumomap.train.recipes import Recipe


def lr_factor(epoch_position: float, decay: float, schedule: str = "cosine") -> float:
    """Multiplier of the initial LR at a fractional epoch position (0.0 = start of training)."""
    if schedule == "constant" or decay == 1.0:
        return 1.0
    epoch = math.floor(epoch_position)
    frac = epoch_position - epoch
    start = decay ** epoch
    return start * (decay + (1.0 - decay) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over optimiser steps; its state_dict (the step count) makes --resume continue it."""
    steps = max(1, steps_per_epoch)
    floor = recipe.min_lr / recipe.lr if recipe.lr > 0 else 0.0

    def factor(step: int) -> float:
        return floor + (1.0 - floor) * lr_factor(step / steps, recipe.lr_decay, recipe.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
