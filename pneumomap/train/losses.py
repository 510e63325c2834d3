"""Losses of the recipes: BCE / focal (class weights optional), cross-entropy, mean of MSE and MAE, Dice."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumomap.train.recipes import Recipe, target_of


class BinaryLoss(nn.Module):
    """BCE on logits (B,) with optional [w_negative, w_positive] weights; focal when gamma > 0."""

    def __init__(self, class_weights: list[float] | None = None, gamma: float = 0.0):
        super().__init__()
        weights = torch.tensor(class_weights if class_weights else [1.0, 1.0], dtype=torch.float32)
        if weights.numel() != 2:
            raise ValueError(f"class_weights: binary targets take [w_negative, w_positive], got {class_weights}")
        self.register_buffer("weights", weights)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float().reshape(-1), target.float().reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.gamma:
            p_true = torch.exp(-loss)
            loss = (1.0 - p_true) ** self.gamma * loss
        weight = self.weights[0] + (self.weights[1] - self.weights[0]) * target
        return (weight * loss).sum() / weight.sum().clamp_min(1e-8)


class MultiClassLoss(nn.Module):
    """Cross-entropy on logits (B, C) with optional per-class weights; focal when gamma > 0."""

    def __init__(self, class_weights: list[float] | None = None, gamma: float = 0.0):
        super().__init__()
        self.register_buffer("weights", torch.tensor(class_weights, dtype=torch.float32) if class_weights else None)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.long().reshape(-1)
        loss = F.cross_entropy(logits, target, reduction="none")
        if self.gamma:
            loss = (1.0 - torch.exp(-loss)) ** self.gamma * loss
        if self.weights is None:
            return loss.mean()
        weight = self.weights[target]
        return (weight * loss).sum() / weight.sum().clamp_min(1e-8)


class MseMae(nn.Module):
    """Mean of MSE and MAE (the extent regressors' loss) on predictions already in [0, 1]."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction, target = prediction.float().reshape(-1), target.float().reshape(-1)
        return 0.5 * (F.mse_loss(prediction, target) + F.l1_loss(prediction, target))


class Dice(nn.Module):
    """smp's binary soft Dice loss on logits (B, 1, H, W) against a {0, 1} mask."""

    def __init__(self):
        super().__init__()
        from segmentation_models_pytorch.losses import DiceLoss

        self.dice = DiceLoss(mode="binary", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits.float(), target.float())


def make_loss(recipe: Recipe) -> nn.Module:
    """The recipe's ``loss`` (+ ``class_weights``, ``focal_gamma``, ``target``) as a module."""
    name = recipe.loss
    target = target_of(recipe.target)
    multi_class = target is not None and target.detailed
    gamma = float(recipe.focal_gamma or 0.0) if name == "focal" else 0.0
    if name in ("bce", "focal") and not multi_class:
        return BinaryLoss(recipe.class_weights, gamma)
    if name in ("ce", "focal") and multi_class:
        return MultiClassLoss(recipe.class_weights, gamma)
    if name == "mse_mae":
        return MseMae()
    if name == "dice":
        return Dice()
    raise ValueError(f"recipe key 'loss': {name!r} does not fit target {recipe.target or 'mask'!r} "
                     "(binary: bce | focal; three_class: ce | focal; regressors: mse_mae; masks: dice)")
