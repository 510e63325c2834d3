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
against the hash its training recorded). The images run through the engine of `pneumomap infer`:
the same decoding ahead, model inputs and network calls (device, precision, images per call).

Example:  pneumomap stage classifier --checkpoint runs/classifier/best --input images/ --out out/
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumomap.infer.engine import ImageState, Tally, run_images
from pneumomap.infer.inputs import decode_ahead, list_items
from pneumomap.infer.models import Executor

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
    from pneumomap.cli import add_precision_argument, add_quiet_argument, add_workers_argument
    from pneumomap.overrides import add_set_argument

    add_workers_argument(parser, None, "image-decoding worker processes (default: 4 beside a GPU, 0 on the CPU)")
    add_quiet_argument(parser)
    add_set_argument(parser, "a key of the checkpoint's config.yaml config, e.g. flip_tta=true (not one that "
                     "changes the network)")
    parser.add_argument("--npy", action="store_true", help="also write the float maps as .npy (model input size)")
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

    from pneumomap import provenance
    from pneumomap.device import cpu_streams, decode_workers, for_inference, inference_precision, resolve_device
    from pneumomap.fileio import atomic_write_text
    from pneumomap.stages.base import FROM_SOURCE, load_stage
    from pneumomap.stages.inference import optimize_for_inference

    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    device = resolve_device(args.device)
    precision = inference_precision(device, args.precision)  # refused before any image
    stage = load_stage(args.checkpoint, map_location="cpu", overrides=args.overrides)
    gradcam = args.kind.startswith("gradcam")
    expected = "classifier" if gradcam else args.kind
    if stage.kind != expected:
        raise ValueError(f"{args.checkpoint} holds a {stage.kind!r} stage; '{args.kind}' needs a {expected!r} "
                         "checkpoint")
    if stage.region == FROM_SOURCE:
        _check_mapper_encoder(stage, args.checkpoint)
    lungs = None
    if stage.on_lung_half:
        if args.lungs is None and not args.fixed_crops:
            raise ValueError(f"a {stage.kind} on lung halves needs --lungs DIR (a lungs checkpoint) or --fixed-crops")
        if args.lungs is not None:
            lungs = for_inference(load_stage(args.lungs), device)
            if lungs.kind != "lungs":
                raise ValueError(f"--lungs {args.lungs}: holds a {lungs.kind!r} stage, not 'lungs'")
    elif args.lungs is not None or args.fixed_crops:
        raise ValueError(f"--lungs/--fixed-crops apply to stages on lung halves, not to '{args.kind}'")
    model = for_inference(stage, device)
    if gradcam:
        from pneumomap.stages.gradcam import GradCAM

        model = GradCAM(model, method=args.kind)  # needs the eager network (gradients, hooks)
    else:
        model = optimize_for_inference(model, device)  # the CPU path `pneumomap infer` takes
    if lungs is not None:
        lungs = optimize_for_inference(lungs, device)

    items = list_items(args.input)
    files = StageFiles(args.kind, stage, args.out, args.npy)
    executor = Executor(device, precision, args.batch_size, gradients=gradcam)
    job = StageJob(model, stage, lungs, executor, files)
    sizes = tuple(sorted({tuple(m.input_size) for m in (stage, lungs) if m is not None and not m.on_lung_half}))
    workers = decode_workers(device, args.workers)
    decoded = decode_ahead([i.path for i in items], sizes, workers, ahead=2 * args.batch_size + workers)
    records: dict[int, Any] = {}
    bar = tqdm(total=len(items), desc=f"stage {args.kind}", unit="img", disable=args.quiet)
    with contextlib.closing(bar), contextlib.closing(decoded):
        run_images(job, items, decoded, {i.index for i in items}, records, bar, Tally(), args.batch_size,
                   cpu_streams(device, precision))
    failures = files.close([records[i.index] for i in items])

    record = provenance.build(checkpoints={args.kind: args.checkpoint, **({"lungs": args.lungs} if lungs else {})},
                              device=device, precision=precision, overrides=args.overrides)
    atomic_write_text(args.out / "provenance.json", json.dumps(record, indent=2) + "\n")
    if failures:
        print(f"pneumomap stage: {failures} of {len(items)} image(s) unreadable, "
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


class StageJob:
    """One stage over a chunk of images (`engine.Job`): its network's `predict` on each readable image's
    input (the whole image, or the lung-half crop by the ``lungs`` model's split or, without one, the
    fixed crops), written per image by `StageFiles`. An image's values: ``input`` (the network's input),
    ``output`` (its `predict`) and, on a lung half, ``split`` and ``box`` (the crop's, in the image's pixels)."""

    def __init__(self, model: Any, stage: Any, lungs: Any, executor: Executor, files: StageFiles) -> None:
        self.model, self.stage, self.lungs, self.executor, self.files = model, stage, lungs, executor, files

    def accept(self, st: ImageState, image: Any, ready: dict) -> None:
        st.accept(image, ready)

    def process(self, states: list[ImageState]) -> None:
        live = [st for st in states if st.failure is None]
        if not live:
            return
        stage = self.stage
        if stage.on_lung_half:
            name, splits = self.splits(live)
            for st, split in zip(live, splits):
                st.values["split"] = split
                st.values["input"], st.values["box"] = st.inputs.half(split, name, stage.side, stage.input_size)
        else:
            for st in live:
                st.values["input"] = st.inputs.whole(stage.input_size)
        outputs, _ = self.executor(lambda x, _features: (self.model.predict(x), None),
                                   [st.values["input"] for st in live])
        for st, output in zip(live, outputs):
            st.values["output"] = output

    def splits(self, states: list[ImageState]) -> tuple[str, list[Any]]:
        """(a name, the lung split of each image): the lungs model's, else the fixed crops."""
        from pneumomap.stages.lung_geometry import fixed_split

        if self.lungs is None:
            return "fixed", [fixed_split(st.inputs.radiograph.pixels.shape) for st in states]
        probs, _ = self.executor(lambda x, _features: (self.lungs.predict(x), None),
                                 [st.inputs.whole(self.lungs.input_size) for st in states])
        return "lungs", self.lungs.splits(np.stack(probs))

    def finish(self, st: ImageState) -> StageResult:
        return self.files.write(st)


@dataclass
class StageResult:
    """What one image adds to the tables: its row of the stage's CSV (none for a map) or of failures.csv."""

    row: list | None = None
    failure: list | None = None


def _box_text(box: Any) -> str:
    return "" if box is None else " ".join(str(int(v)) for v in box)


class StageFiles:
    """Per-image files as they come (masks, maps); the CSVs atomically at the end (`close`). What an image
    gives follows from the stage's output type: a lung split, a map, or scores."""

    def __init__(self, kind: str, stage: Any, out: Path, npy: bool) -> None:
        self.kind, self.stage, self.out, self.npy = kind, stage, Path(out), npy
        if kind.startswith("gradcam") or stage.output_type in ("map", "lungmap"):
            self.gives = "map"
        else:
            self.gives = "lungs" if stage.output_type == "lungs" else "scores"
        self.out.mkdir(parents=True, exist_ok=True)
        if self.gives == "lungs":
            self.header = ["image_id", "fallback", "right_box", "left_box"]
        elif self.gives == "scores" and stage.on_lung_half:
            self.header = ["image_id", f"{stage.side}_extent", "fallback", "box"]
        elif self.gives == "scores":
            names = stage.config.class_names or [str(i) for i in range(stage.config.n_classes)]
            self.header = ["image_id", "probability"] if stage.config.n_classes == 1 else \
                ["image_id", *(f"p_{n}" for n in names)]
        else:
            self.header = []

    def write(self, st: ImageState) -> StageResult:
        """Write the image's files; its rows."""
        if st.failure is not None:
            return StageResult(failure=[st.item.image_id, st.item.path, st.failure])
        output = st.values["output"]
        if self.gives == "lungs":
            return StageResult(row=self.lungs(st, output[0]))
        if self.gives == "map":
            self.map(st, output[0], st.values.get("box"))
            return StageResult()
        values = [f"{float(v):.6f}" for v in np.atleast_1d(output)]
        if self.stage.on_lung_half:
            values += [int(st.values["split"].fallback), _box_text(st.values["box"])]
        return StageResult(row=[st.item.image_id, *values])

    def _png(self, folder: str, image_id: str, values: np.ndarray, raw: np.ndarray) -> None:
        from pneumomap.fileio import atomic_write_bytes, write_png

        write_png(self.out / folder / f"{image_id}.png", np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))
        if self.npy:
            buffer = io.BytesIO()
            np.save(buffer, raw.astype(np.float32))
            atomic_write_bytes(self.out / folder / f"{image_id}.npy", buffer.getvalue())

    def lungs(self, st: ImageState, prob: np.ndarray) -> list:
        from pneumomap.stages.lung_geometry import scale_box
        from pneumomap.stages.preprocess import resize

        split = self.stage.splits(prob[None])[0]
        shape = (st.size.height, st.size.width)
        mask = resize(split.mask, shape, order=0)
        self._png("masks", st.item.image_id, mask.astype(np.float32), prob)
        return [st.item.image_id, int(split.fallback), _box_text(scale_box(split.right_box, split.mask.shape, shape)),
                _box_text(scale_box(split.left_box, split.mask.shape, shape))]

    def map(self, st: ImageState, prob: np.ndarray, box: Any) -> None:
        from pneumomap.stages.lungs import paste_half
        from pneumomap.stages.preprocess import to_original

        shape = (st.size.height, st.size.width)
        full = to_original(prob, *shape) if box is None else paste_half(prob, box, shape)
        self._png("maps", st.item.image_id, full, prob)

    def close(self, results: list[StageResult]) -> int:
        """Write the CSVs from the images' results (input order); the number of failed images."""
        from pneumomap.fileio import atomic_open

        rows = [r.row for r in results if r.row is not None]
        failures = [r.failure for r in results if r.failure is not None]
        if self.header:
            with atomic_open(self.out / f"{self.stage.kind}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows([self.header, *rows])
        with atomic_open(self.out / "failures.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([["image_id", "path", "reason"], *failures])
        return len(failures)
