"""Lung segmentation on real radiographs: train the lung stage on Shenzhen images, Dice on held-out ones.

    python benchmarks/lungs_real.py --out runs/lungs_real [--data ../shared/data/real/shenzhen] [--epochs 60]

The 11 Shenzhen CXRs (images/ + masks/, lung = mask > 127) are split by file order: the first
8 train, the last 3 are held out (they also pick OUT/best, so the headline is the *last*
epoch's held-out Dice, which nothing was selected on; best is printed too). Training uses the
lung recipe with a small random-init encoder at 256 px, rotation and flips, on the CPU in a few
minutes. The Dice is computed at the original image size after the pipeline's mask cleaning
(two largest components, holes filled). OUT is a training run directory: OUT/best is a lung
stage checkpoint for `pneumomap stage lungs --checkpoint OUT` and for pipeline.yaml.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pneumomap.metrics import dice
from pneumomap.stages import load_stage
from pneumomap.stages.lung_geometry import clean_mask
from pneumomap.stages.preprocess import to_model_input, to_original
from pneumomap.stages.reader import read_image
from pneumomap.train import recipes
from pneumomap.labels import read_lung_mask
from pneumomap.train.datasets import lung_datasets
from pneumomap.train.loop import fit
from pneumomap.train.tasks import make_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "shenzhen"
HELD_OUT = 3


def pairs(data: Path) -> list[tuple[str, str]]:
    images = sorted((data / "images").glob("*.png"))
    return [(str(p), str(data / "masks" / f"{p.stem}_mask.png")) for p in images]


def held_out_dice(checkpoint: Path, held_out: list[tuple[str, str]]) -> list[float]:
    """Dice of the cleaned predicted mask against the truth, at the original image size."""
    stage = load_stage(checkpoint)
    scores = []
    for image_path, mask_path in held_out:
        pixels = read_image(image_path).pixels
        x = torch.from_numpy(to_model_input(pixels, stage.input_size))[None, None]
        prob = stage.predict(x)[0, 0].numpy()
        mask = clean_mask(to_original(prob, *pixels.shape), stage.config.threshold)
        scores.append(dice(mask.astype(np.float32), read_lung_mask(mask_path)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--encoder", default="tu-resnet10t")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    all_pairs = pairs(args.data)
    train_pairs, held_out = all_pairs[:-HELD_OUT], all_pairs[-HELD_OUT:]
    recipe = recipes.resolve("lungs", None, [
        f"model.encoder={args.encoder}", f"model.input_size=[{args.size}, {args.size}]",
        "model.decoder_channels=[128, 64, 32, 16, 16]", f"epochs={args.epochs}", "batch_size=4",
        "lr=1e-3", "rotate=15", "hflip=true", "workers=0"])
    torch.manual_seed(recipe.seed)
    task = make_task("lungs", recipe)
    train_set, val_set = lung_datasets(train_pairs, held_out, task.spec, recipe, task.input_size)
    started = time.perf_counter()
    summary = fit(task, train_set, val_set, recipe, args.out, torch.device("cpu"))
    seconds = time.perf_counter() - started
    last = held_out_dice(args.out / "last", held_out)
    best = held_out_dice(args.out / "best", held_out)
    result = {"train_images": len(train_pairs), "held_out_images": [Path(p).name for p, _ in held_out],
              "encoder": args.encoder, "size": args.size, "epochs": summary["epochs"],
              "train_seconds": round(seconds, 1),
              "held_out_dice_last": round(float(np.mean(last)), 4), "per_image_last": [round(d, 4) for d in last],
              "held_out_dice_best": round(float(np.mean(best)), 4), "best_epoch": summary["best_epoch"],
              "checkpoint": str(args.out)}
    (args.out / "lungs_real.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
