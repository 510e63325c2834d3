"""Train one stage from an RSNA-format folder with its recipe.

Stages (the pipeline's model nodes):
  lungs             U-Net lung segmentation; target DATA/lung_masks
  classifier        whole-image pneumonia classifier; target RSNA Target (--set target=three_class: the detailed
                    class, with the ce loss unless --set loss=focal)
  regressor_right   extent regressor on the patient's right lung-half crop; target area(boxes & lung)/area(lung)
  regressor_left    the same for the left lung
  mapper_whole      opacity-map decoder over the classifier's FROZEN encoder (--set encoder_from=RUN/best)
  mapper_right      opacity-map decoder over regressor_right's frozen encoder, on the right lung crop
  mapper_left       the same for the left lung
Recipes: the reference defaults (DESIGN.md "Training") live in pneumomap/train/recipes/<stage>.yaml
(shared keys in common.yaml); --recipe FILE or a recipe name (tiny = small backbones, 128 px, for
CPU tests and the demo) overrides them, and --set key=value overrides any key (model.KEY: a field of
the stage's config, e.g. model.backbones, model.input_size, model.pretrained; an unknown key is an error
that names the closest one).
Output: OUT/best (the checkpoint a pipeline.yaml points at), OUT/last (+ training state for
--resume), OUT/history.json, OUT/history.csv, OUT/loss_curve.png, OUT/recipe.yaml, OUT/provenance.json
(versions, command line, the --set items, the best checkpoint's sha256).
Several processes: torchrun --nproc_per_node N -m pneumomap train STAGE ... (DDP; gloo on CPU, NCCL on CUDA).

Examples:
  pneumomap train lungs --data rsna/ --out runs/lungs
  pneumomap train classifier --data rsna/ --out runs/cls --set epochs=12 --set 'model.backbones=[convnext_tiny]'
  pneumomap train mapper_whole --data rsna/ --out runs/map --set encoder_from=runs/cls/best
  pneumomap train classifier --data rsna/ --out runs/cls --resume
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pneumomap.train.recipes import STAGES, Recipe, RecipeError, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=list(STAGES), metavar="STAGE", help=f"one of: {', '.join(STAGES)}")
    parser.add_argument("--data", required=True, help="RSNA-format folder (label CSVs, images, lung_masks, split.csv)")
    parser.add_argument("--out", required=True, help="output directory of this training run")
    parser.add_argument("--recipe", help="a recipe YAML file (partial: only the keys it changes) or a recipe name, e.g. tiny")
    from pneumomap.overrides import add_set_argument

    add_set_argument(parser, "a recipe key (model.KEY for the stage config's keys, e.g. 'model.backbones=[resnet10t]')")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last: epoch count, optimiser and schedule")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, honouring LOCAL_RANK), cpu, cuda, cuda:1")
    parser.add_argument("--cache", help="folder of the on-disk cache of prepared samples (default OUT/cache); stages "
                        "given the same folder share the inputs they have in common; delete it to clear it")


def train(stage: str, data: str | Path, out: str | Path, recipe: Recipe, resume: bool = False,
          device: str = "auto") -> dict:
    """Build the stage, its datasets and train it (see `pneumomap.train.loop.fit`); returns the summary."""
    import torch

    from pneumomap.device import resolve_device
    from pneumomap.train import ddp
    from pneumomap.train.datasets import cache_folder
    from pneumomap.train.loop import fit
    from pneumomap.train.tasks import make_task

    torch_device = resolve_device(device)
    ddp.setup(torch_device)
    try:
        torch.manual_seed(recipe.seed)
        task = make_task(stage, recipe)
        train_set, val_set = task.datasets(data, cache_folder(recipe, out))
        return fit(task, train_set, val_set, recipe, out, torch_device, resume)
    finally:
        ddp.teardown()


def main(args: argparse.Namespace) -> int:
    from pneumomap.labels import LabelError
    from pneumomap.stages.base import ConfigError

    try:
        recipe = resolve(args.stage, args.recipe, args.overrides)
        if args.cache:
            recipe = recipe.replace(cache_dir=args.cache)
        summary = train(args.stage, args.data, args.out, recipe, args.resume, args.device)
    except (RecipeError, ConfigError, LabelError) as exc:  # a recipe, config or label folder that cannot be used
        print(f"pneumomap train: error: {exc}", file=sys.stderr)
        return 2
    from pneumomap import provenance
    from pneumomap.device import resolve_device
    from pneumomap.fileio import atomic_write_text
    from pneumomap.train import ddp

    if ddp.is_main():
        record = provenance.build(device=resolve_device(args.device), overrides=args.overrides,
                                  checkpoints={"best": Path(args.out) / "best"})
        atomic_write_text(Path(args.out) / "provenance.json", json.dumps(record, indent=2) + "\n")
        print(json.dumps(summary))
    return 0
