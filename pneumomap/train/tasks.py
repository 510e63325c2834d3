"""What differs between the stage kinds during training: recipe rules, the model, its outputs for the loss,
validation metrics, datasets and resuming.

The loop (`pneumomap.train.loop`) is the same for all stages; a `Task` adapts it to one stage kind. Each
kind has one Task class, registered under the kind like the stage classes (`register_task` / `task_class`,
as `pneumomap.stages.base.register_stage` / `stage_class`); `make_task(stage, recipe)` builds the one of a
training stage's kind. Probabilities always come from the stage's own `activation`, the one its `predict`
uses, so validation sees what inference gives.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from pneumomap import metrics
from pneumomap.stages import create_stage, load_stage
from pneumomap.train.losses import make_loss
from pneumomap.train.recipes import Recipe, RecipeError, StageSpec, check_model_keys, stage_spec, target_of

_TASKS: dict[str, type["Task"]] = {}


def register_task(cls: type["Task"]) -> type["Task"]:
    """Class decorator: the training task of the stage kind ``cls.kind``."""
    if cls.kind in _TASKS and _TASKS[cls.kind] is not cls:
        raise ValueError(f"training task of kind {cls.kind!r} registered twice")
    _TASKS[cls.kind] = cls
    return cls


def task_class(kind: str) -> type["Task"]:
    """The training task class of stage kind ``kind``; a clear error for a kind without one."""
    if kind not in _TASKS:
        raise KeyError(f"no training task for stage kind {kind!r}; kinds: {sorted(_TASKS)}")
    return _TASKS[kind]


def make_task(stage: str, recipe: Recipe) -> "Task":
    """The task of training stage ``stage`` (e.g. 'regressor_left') with its resolved ``recipe``."""
    return task_class(stage_spec(stage).kind)(stage, recipe)


class Task:
    """One training stage: ``model`` (the Stage that is saved), its loss and its validation metrics.

    Subclasses set ``kind`` (the stage kind they train) and ``losses`` (the recipe losses that fit)."""

    kind: ClassVar[str] = ""
    losses: ClassVar[tuple[str, ...]] = ()

    def __init__(self, stage: str, recipe: Recipe):
        self.stage, self.recipe = stage, recipe
        self.spec: StageSpec = stage_spec(stage)
        self.model = self.build()
        self.loss = make_loss(recipe)

    # ---- the recipe (checked before any model exists, by `pneumomap.train.recipes.validate`)
    @classmethod
    def model_config(cls, stage: str, recipe: Recipe) -> dict:
        """The stage config the recipe builds: ``model`` plus what the stage and its target imply."""
        return dict(recipe.model)

    @classmethod
    def check_recipe(cls, stage: str, recipe: Recipe) -> None:
        """The recipe's ``model`` keys and values and its loss fit this kind; `RecipeError` otherwise."""
        check_model_keys(stage, recipe)
        cls.check_model(stage, recipe)
        cls.check_loss(stage, recipe)

    @classmethod
    def check_model(cls, stage: str, recipe: Recipe) -> None:
        """The config `model_config` gives is valid for the stage kind."""
        from pneumomap.stages.base import ConfigError, make_config

        try:
            make_config(cls.kind, cls.model_config(stage, recipe), where="model")
        except ConfigError as exc:
            raise RecipeError(f"recipe key {exc}") from None

    @classmethod
    def check_loss(cls, stage: str, recipe: Recipe) -> None:
        if recipe.loss not in cls.losses:
            raise RecipeError(f"recipe key 'loss': {recipe.loss!r} does not fit stage {stage}; use "
                              f"{' | '.join(cls.losses)}")

    # ---- model
    def build(self) -> nn.Module:
        return create_stage(self.kind, self.model_config(self.stage, self.recipe))

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.input_size)

    def set_train_mode(self, training: bool) -> None:
        """train()/eval() (a mapper keeps its frozen encoder in eval mode itself)."""
        self.model.train(training)

    def outputs(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """What the loss takes from ``net`` (the model, maybe DDP-wrapped): its logits by default."""
        return net(images)

    def datasets(self, data: str | Path, cache_dir: str | Path | None):
        """(train, val) datasets of an RSNA-format folder (`pneumomap.train.datasets.rsna_datasets`)."""
        from pneumomap.train.datasets import rsna_datasets

        return rsna_datasets(data, self.spec, self.recipe, self.input_size, cache_dir)

    def check_resumed(self, out: Path) -> None:
        """Refuse a model just loaded from OUT/last that this run cannot go on with (nothing by default)."""

    # ---- validation
    def batch_results(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample results of one validation batch (gathered over ranks, then `summarise`d)."""
        raise NotImplementedError(f"{type(self).__name__} has no validation results")

    def summarise(self, results: dict[str, np.ndarray]) -> dict:
        """Stage metrics of the whole validation set; the selection metric is ``spec.metric``."""
        raise NotImplementedError(f"{type(self).__name__} has no validation metrics")


@register_task
class ClassifierTask(Task):
    """The whole-image classifier: binary (RSNA Target) or multi-class by the recipe's ``target``."""

    kind = "classifier"

    @classmethod
    def model_config(cls, stage: str, recipe: Recipe) -> dict:
        """A multi-class target's classes (``n_classes``, ``class_names``) unless ``model`` sets them."""
        config = dict(recipe.model)
        target = target_of(recipe.target)
        if target is not None and target.detailed:
            from pneumomap.labels import CLASSES

            config.setdefault("n_classes", len(CLASSES))
            config.setdefault("class_names", list(CLASSES))
        return config

    @classmethod
    def check_loss(cls, stage: str, recipe: Recipe) -> None:
        """The loss fits the target (`recipes.TARGETS`); ``class_weights`` has one weight per class."""
        name = recipe.target or "binary"
        target = target_of(recipe.target)
        if target is not None and recipe.loss not in target.losses:
            raise RecipeError(f"recipe key 'loss': {recipe.loss!r} does not fit target {name!r}; use "
                              f"{' | '.join(target.losses)} (or leave loss unset)")
        weights = recipe.class_weights
        if weights is not None:
            n = 2 if target is not None and not target.detailed else int(cls.model_config(stage, recipe)["n_classes"])
            if not isinstance(weights, list) or len(weights) != n:
                raise RecipeError(f"recipe key 'class_weights': {weights!r}; target {name!r} takes a list of {n} "
                                  + ("[w_negative, w_positive]" if n == 2 else "weights, one per class"))

    def batch_results(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """p(pneumonia) by the classifier's activation (a multi-class head: its positive class's column)."""
        probs = self.model.activation(outputs.detach().float().cpu())
        target = target.detach().cpu()
        index = self.model.class_index()
        if index is None:
            return {"probability": probs[:, 0], "target": target.reshape(-1).float()}
        return {"probability": probs[:, index], "target": (target.long() == index).float()}

    def summarise(self, results: dict[str, np.ndarray]) -> dict:
        truth, probs = results["target"], results["probability"]
        found = metrics.classification_metrics(truth, probs)
        out = {"auc": metrics.roc_auc(truth, probs)}
        out.update({k: found[k] for k in ("accuracy", "precision", "recall", "f1", "confusion_matrix")})
        return out


@register_task
class RegressorTask(Task):
    """An extent regressor: the loss takes the extents in [0, 1] (the regressor's activation)."""

    kind = "regressor"
    losses = ("mse_mae",)

    @classmethod
    def model_config(cls, stage: str, recipe: Recipe) -> dict:
        """The training stage's side unless ``model`` sets one."""
        config = dict(recipe.model)
        config.setdefault("side", stage_spec(stage).side)
        return config

    def outputs(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Extents (B,) in [0, 1], as `Regressor.predict` gives them."""
        return self.model.activation(net(images)).reshape(-1)

    def batch_results(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"prediction": outputs.detach().float().cpu().reshape(-1),
                "target": target.detach().cpu().reshape(-1).float()}

    def summarise(self, results: dict[str, np.ndarray]) -> dict:
        return {"mae": metrics.mae(results["target"], results["prediction"])}


class MaskTask(Task):
    """A stage whose output is a probability map, validated by Dice against a mask."""

    losses = ("dice",)

    def batch_results(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = self.model.activation(outputs.detach().float().cpu()).numpy()
        target = target.detach().cpu()
        dice = [metrics.dice(p[0], t[0].numpy() > 0.5) for p, t in zip(probs, target)]
        return {"dice": torch.tensor(dice, dtype=torch.float64)}

    def summarise(self, results: dict[str, np.ndarray]) -> dict:
        return {"dice": float(np.mean(results["dice"]))}


@register_task
class LungsTask(MaskTask):
    """Lung segmentation, trained on the images with a drawn lung mask."""

    kind = "lungs"

    def datasets(self, data: str | Path, cache_dir: str | Path | None):
        """(train, val) of the images with a drawn mask (`pneumomap.train.datasets.rsna_lung_datasets`)."""
        from pneumomap.train.datasets import rsna_lung_datasets

        return rsna_lung_datasets(data, self.spec, self.recipe, self.input_size, cache_dir)


@register_task
class MapperTask(MaskTask):
    """A decoder over the frozen encoder of a trained classifier / regressor (``encoder_from``); the
    mapper's config records that encoder's `encoder_sha256` (`Mapper.from_source`), which a pipeline
    compares with its source node's encoder at load."""

    kind = "mapper"

    @classmethod
    def check_recipe(cls, stage: str, recipe: Recipe) -> None:
        """``encoder_from`` is set; the rest of the config comes from it (`Mapper.from_source`)."""
        if not recipe.encoder_from:
            raise RecipeError(f"stage {stage}: set the borrowed encoder, e.g. "
                              f"--set encoder_from=runs/{stage_spec(stage).source}/best")
        super().check_recipe(stage, recipe)

    @classmethod
    def check_model(cls, stage: str, recipe: Recipe) -> None:
        """Nothing to build yet: ``model`` holds overrides of what the encoder_from checkpoint gives."""

    def build(self) -> nn.Module:
        from pneumomap.stages.mapper import Mapper

        source_dir = self.recipe.encoder_from
        source = load_stage(source_dir)
        wanted = stage_spec(self.spec.source)
        if source.kind != wanted.kind or source.side != wanted.side:
            raise RecipeError(f"encoder_from={source_dir}: holds a {source.kind!r} stage"
                             f"{' (' + source.side + ')' if source.side else ''}; "
                             f"{self.stage} decodes the encoder of {self.spec.source}")
        return Mapper.from_source(source, **self.recipe.model)

    def check_resumed(self, out: Path) -> None:
        """A mapper resumed from OUT/last goes on with the encoder stored there: refuse when it is not the
        encoder_from one, whose hash the mapper's config records (its checkpoints would say otherwise)."""
        from pneumomap.stages.mapper import EncoderMismatchError

        try:
            self.model.verify_stored_encoder()
        except EncoderMismatchError as exc:
            raise RecipeError(f"--resume: {out / 'last'} was trained on another encoder than encoder_from ({exc}); "
                              "resume with the encoder_from of that run, or train afresh into another --out") from None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
