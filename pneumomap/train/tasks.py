"""What differs between the stages during training: the model, its outputs, loss inputs and metrics.

The loop (`pneumomap.train.loop`) is the same for all stages; a `Task` adapts it to one stage.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumomap import metrics
from pneumomap.labels import CLASSES, POSITIVE_CLASS
from pneumomap.stages import create_stage, load_stage
from pneumomap.train.losses import make_loss
from pneumomap.train.recipes import RecipeError, StageSpec, model_config, stage_spec


class Task:
    """One training stage: ``model`` (the Stage that is saved), its loss and its validation metrics."""

    def __init__(self, stage: str, recipe: dict):
        self.stage, self.recipe = stage, recipe
        self.spec: StageSpec = stage_spec(stage)
        self.model = self.build()
        self.loss = make_loss(recipe)

    # ---- model
    def build(self) -> nn.Module:
        return create_stage(self.spec.kind, model_config(self.stage, self.recipe))

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.input_size)

    def set_train_mode(self, training: bool) -> None:
        """train()/eval() (a mapper keeps its frozen encoder in eval mode itself)."""
        self.model.train(training)

    def outputs(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The network's raw output for the loss: logits, or extents in [0, 1] for regressors."""
        out = net(images)
        if self.spec.kind == "regressor":
            return torch.sigmoid(out.float()).reshape(-1)  # as Regressor.predict
        if self.spec.kind == "classifier" and self.recipe.get("target") != "three_class":
            return out.reshape(-1)  # binary: one logit per image
        return out

    # ---- validation
    def batch_results(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample results of one validation batch (gathered over ranks, then `summarise`d)."""
        outputs = outputs.detach().float().cpu()
        target = target.detach().cpu()
        if self.spec.kind in ("lungs", "mapper"):
            probs = torch.sigmoid(outputs).numpy()
            dice = [metrics.dice(p[0], t[0].numpy() > 0.5) for p, t in zip(probs, target)]
            return {"dice": torch.tensor(dice, dtype=torch.float64)}
        if self.spec.kind == "regressor":
            return {"prediction": outputs.reshape(-1), "target": target.reshape(-1).float()}
        if self.recipe.get("target") == "three_class":
            probs = torch.softmax(outputs, dim=1)[:, CLASSES.index(POSITIVE_CLASS)]
            truth = (target.long() == CLASSES.index(POSITIVE_CLASS)).float()
            return {"probability": probs, "target": truth}
        return {"probability": torch.sigmoid(outputs.reshape(-1)), "target": target.reshape(-1).float()}

    def summarise(self, results: dict[str, np.ndarray]) -> dict:
        """Stage metrics of the whole validation set; the selection metric is ``spec.metric``."""
        if "dice" in results:
            return {"dice": float(np.mean(results["dice"]))}
        if "prediction" in results:
            return {"mae": metrics.mae(results["target"], results["prediction"])}
        truth, probs = results["target"], results["probability"]
        found = metrics.classification_metrics(truth, probs)
        out = {"auc": metrics.roc_auc(truth, probs)}
        out.update({k: found[k] for k in ("accuracy", "precision", "recall", "f1", "confusion_matrix")})
        return out


class MapperTask(Task):
    """A decoder over the frozen encoder of a trained classifier / regressor (``encoder_from``); the
    mapper's config records that encoder's `encoder_sha256` (`Mapper.from_source`), which a pipeline
    compares with its source node's encoder at load."""

    def build(self) -> nn.Module:
        from pneumomap.stages.mapper import Mapper

        source_dir = self.recipe["encoder_from"]
        source = load_stage(source_dir)
        wanted = stage_spec(self.spec.source)
        if source.kind != wanted.kind or getattr(source.config, "side", None) != wanted.side:
            raise RecipeError(f"encoder_from={source_dir}: holds a {source.kind!r} stage"
                             f"{' (' + source.config.side + ')' if getattr(source.config, 'side', None) else ''}; "
                             f"{self.stage} decodes the encoder of {self.spec.source}")
        return Mapper.from_source(source, **self.recipe["model"])


def make_task(stage: str, recipe: dict) -> Task:
    return MapperTask(stage, recipe) if stage_spec(stage).kind == "mapper" else Task(stage, recipe)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
