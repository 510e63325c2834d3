"""Run one stage alone over a folder of radiographs and write its outputs per image.

  lungs        OUT/masks/<id>.png   clean lung mask (255 = lung) at the original size
               OUT/lungs.csv        image_id,fallback,right_box,left_box  (boxes: row0 col0 row1 col1, original pixels)
  classifier   OUT/classifier.csv   image_id,probability   (multi-class: image_id,p_<class>,...)
  regressor    OUT/regressor.csv    image_id,<side>_extent,fallback,box
  mapper       OUT/maps/<id>.png    opacity map, p = value / 255, at the original size
               (a lung-half mapper's map is pasted into its lung box, 0 elsewhere)
  gradcam      OUT/maps/<id>.png    Grad-CAM of a classifier checkpoint ('gradcam++' for Grad-CAM++)

OUT/provenance.json records the versions, the command line, the checkpoints' sha256, the device and
precision and the --set items (`pneumomap.provenance`).
--npy also writes the float maps (lung probabilities / opacity maps) as OUT/<masks|maps>/<id>.npy
at the model's input size. Stages on lung halves (regressor, mapper with source regressor)
need the lungs: --lungs DIR (a lungs checkpoint) or --fixed-crops (the fixed lung-region
crops: rows 15-90 %, columns 20-80 %, split at the middle). The patient's right lung is on
the image's LEFT. Unreadable images are listed in OUT/failures.csv and make the exit status 1.
A mapper runs on the encoder stored in its checkpoint, the one its decoder was trained on (checked
against the hash its training recorded).

Example:  pneumomap stage classifier --checkpoint runs/classifier/best --input images/ --out out/
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pneumomap.device import for_inference, images_to_device

KINDS = ("lungs", "classifier", "regressor", "mapper", "gradcam", "gradcam++")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="the stage to run (gradcam/gradcam++: of a classifier checkpoint)")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="stage checkpoint directory (config.yaml + weights.safetensors, or a training run's OUT)")
    parser.add_argument("--input", required=True, type=Path, help="image folder, image file or list file (.txt)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per network call on CUDA (default: 8); the CPU takes one at a time")
    from pneumomap.cli import add_quiet_argument, add_workers_argument
    from pneumomap.overrides import add_set_argument

    add_workers_argument(parser, None, "image-decoding worker processes (default: 4 beside a GPU, 0 on the CPU)")
    add_quiet_argument(parser)
    add_set_argument(parser, "a key of the checkpoint's config.yaml config, e.g. flip_tta=true (not one that "
                     "changes the network)")
    parser.add_argument("--npy", action="store_true", help="also write the float maps as .npy (model input size)")
    from pneumomap.infer.cli import add_precision_argument

    add_precision_argument(parser)
    lungs = parser.add_mutually_exclusive_group()
    lungs.add_argument("--lungs", type=Path, help="lungs checkpoint, for the stages that run on lung halves")
    lungs.add_argument("--fixed-crops", action="store_true",
                       help="lung-half stages without a lungs model: the fixed lung-region crops")


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        print(f"pneumomap stage: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pneumomap.device import autocast, decode_workers, forward_batch, inference_precision, resolve_device
    from pneumomap.stages.base import load_stage
    from pneumomap.stages.inference import optimize_for_inference
    from pneumomap.stages.reader import UnreadableImageError, list_images, read_images

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    device = resolve_device(args.device)
    precision = inference_precision(device, args.precision)  # refused before any image
    stage = load_stage(args.checkpoint, map_location="cpu", overrides=args.overrides)
    expected = "classifier" if args.kind.startswith("gradcam") else args.kind
    if stage.kind != expected:
        raise ValueError(f"{args.checkpoint} holds a {stage.kind!r} stage; '{args.kind}' needs a {expected!r} checkpoint")
    if stage.kind == "mapper":
        _check_mapper_encoder(stage, args.checkpoint)
    on_halves = stage.kind == "regressor" or (stage.kind == "mapper" and stage.config.source == "regressor")
    lungs = None
    if on_halves:
        if args.lungs is None and not args.fixed_crops:
            raise ValueError(f"a {stage.kind} on lung halves needs --lungs DIR (a lungs checkpoint) or --fixed-crops")
        if args.lungs is not None:
            lungs = for_inference(load_stage(args.lungs), device)
            if lungs.kind != "lungs":
                raise ValueError(f"--lungs {args.lungs}: holds a {lungs.kind!r} stage, not 'lungs'")
    elif args.lungs is not None or args.fixed_crops:
        raise ValueError(f"--lungs/--fixed-crops apply to stages on lung halves, not to '{args.kind}'")
    model = for_inference(stage, device)
    if args.kind.startswith("gradcam"):
        from pneumomap.stages.gradcam import GradCAM

        model = GradCAM(model, method=args.kind)  # needs the eager network (gradients, hooks)
    else:
        model = optimize_for_inference(model, device)  # the CPU path `pneumomap infer` takes
    if lungs is not None:
        lungs = optimize_for_inference(lungs, device)

    paths = list_images(args.input)
    writer = _Writer(args.kind, stage, args.out, args.npy)
    with tqdm(total=len(paths), desc=f"stage {args.kind}", unit="img", disable=args.quiet) as bar:
        for batch in _batches(read_images(paths, n_jobs=decode_workers(device, args.workers)),
                              forward_batch(device, args.batch_size)):
            images = [item for item in batch if not isinstance(item, UnreadableImageError)]
            for failure in (item for item in batch if isinstance(item, UnreadableImageError)):
                writer.failure(failure)
            if images:
                with autocast(device, precision=precision):
                    _run_batch(model, stage, images, writer, device, lungs, on_halves)
            bar.update(len(batch))
    writer.close()
    from pneumomap import provenance
    from pneumomap.fileio import atomic_write_text

    record = provenance.build(checkpoints={args.kind: args.checkpoint, **({"lungs": args.lungs} if lungs else {})},
                              device=device, precision=precision, overrides=args.overrides)
    atomic_write_text(args.out / "provenance.json", json.dumps(record, indent=2) + "\n")
    if writer.failures:
        print(f"pneumomap stage: {len(writer.failures)} of {len(paths)} image(s) unreadable, "
              f"listed in {args.out / 'failures.csv'}", file=sys.stderr)
        return 1
    return 0


def _check_mapper_encoder(stage: Any, checkpoint: Path) -> None:
    """A mapper runs here on the encoder stored in its checkpoint: refuse one that is not the encoder
    its decoder was trained on (the hash recorded at training, `Mapper.verify_stored_encoder`)."""
    from pneumomap.stages.mapper import EncoderMismatchError

    try:
        stage.verify_stored_encoder()
    except EncoderMismatchError as exc:
        raise ValueError(f"{checkpoint}: {exc}; this checkpoint's encoder was replaced after training: use the "
                         "checkpoint its training run wrote, or retrain the mapper (`pneumomap train mapper_* "
                         "--set encoder_from=...`)") from None


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_batch(model: Any, stage: Any, images: list[Any], writer: "_Writer", device: torch.device,
               lungs: Any, on_halves: bool) -> None:
    from pneumomap.stages.lung_geometry import fixed_split
    from pneumomap.stages.lungs import lung_half_inputs
    from pneumomap.stages.preprocess import to_model_input

    if stage.kind == "lungs":
        probs = model.predict(images_to_device([to_model_input(r.pixels, stage.input_size) for r in images], device))
        for image, prob, split in zip(images, probs[:, 0].float().cpu().numpy(), model.splits(probs)):
            writer.lungs(image, prob, split)
        return
    boxes: list[Any] = [None] * len(images)
    fallback: list[Any] = [None] * len(images)
    if on_halves:
        if lungs is not None:
            probs = lungs.predict(images_to_device([to_model_input(r.pixels, lungs.input_size) for r in images], device))
            splits = lungs.splits(probs)
        else:
            splits = [fixed_split(r.pixels.shape) for r in images]
        side = stage.config.side
        halves = [lung_half_inputs(r.pixels, s, stage.input_size)[side] for r, s in zip(images, splits)]
        inputs = [h[0] for h in halves]
        boxes = [h[1] for h in halves]
        fallback = [s.fallback for s in splits]
    else:
        inputs = [to_model_input(r.pixels, stage.input_size) for r in images]
    outputs = model.predict(images_to_device(inputs, device)).float().cpu().numpy()
    for image, output, box, fb in zip(images, outputs, boxes, fallback):
        if outputs.ndim == 4:
            writer.map(image, output[0], box)
        else:
            writer.scores(image, output, box, fb)


def _box_text(box: Any) -> str:
    return "" if box is None else " ".join(str(int(v)) for v in box)


class _Writer:
    """Per-image files as they come; the CSVs atomically at the end."""

    def __init__(self, kind: str, stage: Any, out: Path, npy: bool) -> None:
        self.kind, self.stage, self.out, self.npy = kind, stage, Path(out), npy
        self.rows: list[list[Any]] = []
        self.failures: list[list[str]] = []
        self.out.mkdir(parents=True, exist_ok=True)
        if stage.kind == "lungs":
            self.header = ["image_id", "fallback", "right_box", "left_box"]
        elif stage.kind == "regressor":
            self.header = ["image_id", f"{stage.config.side}_extent", "fallback", "box"]
        elif stage.kind == "classifier" and kind == "classifier":
            names = stage.config.class_names or [str(i) for i in range(stage.config.n_classes)]
            self.header = ["image_id", "probability"] if stage.config.n_classes == 1 else \
                ["image_id", *(f"p_{n}" for n in names)]
        else:
            self.header = []

    def failure(self, error: Any) -> None:
        self.failures.append([Path(error.path).stem, error.path, error.reason])

    def _png(self, folder: str, image_id: str, values: np.ndarray, raw: np.ndarray) -> None:
        from pneumomap.fileio import atomic_write_bytes, write_png

        write_png(self.out / folder / f"{image_id}.png", np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))
        if self.npy:
            buffer = io.BytesIO()
            np.save(buffer, raw.astype(np.float32))
            atomic_write_bytes(self.out / folder / f"{image_id}.npy", buffer.getvalue())

    def lungs(self, image: Any, prob: np.ndarray, split: Any) -> None:
        from pneumomap.stages.lung_geometry import scale_box
        from pneumomap.stages.preprocess import resize

        meta = image.meta
        shape = (meta.height, meta.width)
        mask = resize(split.mask, shape, order=0)
        self._png("masks", meta.image_id, mask.astype(np.float32), prob)
        self.rows.append([meta.image_id, int(split.fallback),
                          _box_text(scale_box(split.right_box, split.mask.shape, shape)),
                          _box_text(scale_box(split.left_box, split.mask.shape, shape))])

    def map(self, image: Any, prob: np.ndarray, box: Any) -> None:
        from pneumomap.stages.lungs import paste_half
        from pneumomap.stages.preprocess import to_original

        meta = image.meta
        if box is None:
            full = to_original(prob, meta.height, meta.width)
        else:
            full = paste_half(prob, box, (meta.height, meta.width))
        self._png("maps", meta.image_id, full, prob)

    def scores(self, image: Any, output: np.ndarray, box: Any, fallback: Any) -> None:
        values = [f"{float(v):.6f}" for v in np.atleast_1d(output)]
        row = [image.meta.image_id, *values]
        if self.stage.kind == "regressor":
            row += [int(fallback), _box_text(box)]
        self.rows.append(row)

    def close(self) -> None:
        from pneumomap.fileio import atomic_open

        if self.header:
            with atomic_open(self.out / f"{self.stage.kind}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows([self.header, *self.rows])
        with atomic_open(self.out / "failures.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([["image_id", "path", "reason"], *self.failures])
