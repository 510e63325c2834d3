"""Predict the lung masks that were not drawn, once, with a trained lung stage.

For every image of DATA's stage_2_train_labels.csv that has no drawn mask (DATA/lung_masks/<patientId>.png)
it writes DATA/lung_masks_predicted/<patientId>.png: 255 = lung, at the image's size, the clean two-lung mask
the pipeline's lungs node makes (`Lungs.splits`). A drawn mask is never written, read or overwritten; where
one exists, it is the image's mask (`RsnaDataset.lung_mask_path`: drawn, else predicted).

  DATA/lung_masks_predicted/fill.json      the lung checkpoint (path, sha256) that predicted the masks
  DATA/lung_masks_predicted/manifest.csv   patientId,source,checkpoint_sha256,reason for every image:
                                           source drawn | predicted | unreadable (reason given)

Every PNG is written atomically, so the command is resumable: run again, it predicts only the masks still
missing. Masks predicted by another checkpoint are refused unless --replace (then all are predicted again).
An unreadable image is listed in the manifest (exit status 1); the others are written all the same.
Then train the stages that need a mask for every image (regressors, mappers) and run score, tune, report.

Example:  pneumomap fill-masks --data rsna/ --lungs runs/lungs
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pneumomap import labels as rsna
from pneumomap.fileio import atomic_write_text, exclusive_lock, remove_temporaries, write_png

FILL_FILE = "fill.json"
MANIFEST_COLUMNS = ("patientId", "source", "checkpoint_sha256", "reason")


class FillError(ValueError):
    """A fill that cannot run as asked; the message says why and what to do."""


def checkpoint_sha256(checkpoint: Path) -> str:
    """sha256 over the checkpoint's files (config.yaml, weights.safetensors)."""
    from pneumomap.infer.artifacts import file_hash
    from pneumomap.infer.spec import CHECKPOINT_FILES

    return hashlib.sha256("".join(file_hash(checkpoint / name) for name in CHECKPOINT_FILES).encode()).hexdigest()


def _load_lungs(lungs: Path, device: Any) -> tuple[Any, Path]:
    """(the lung stage ready for inference, its checkpoint folder)."""
    from pneumomap.device import for_inference
    from pneumomap.infer.spec import resolve_checkpoint
    from pneumomap.stages.base import load_stage
    from pneumomap.stages.inference import optimize_for_inference

    checkpoint = resolve_checkpoint(Path(lungs))
    stage = load_stage(checkpoint)
    if stage.kind != "lungs":
        raise FillError(f"--lungs {lungs}: holds a {stage.kind!r} stage, not a lung stage (pneumomap train lungs)")
    return optimize_for_inference(for_inference(stage, device), device), checkpoint


def _start(folder: Path, checkpoint: Path, sha: str, replace: bool) -> int:
    """Check (or, with ``replace``, clear) what an earlier fill left; record this checkpoint. Returns PNGs removed."""
    removed = 0
    record_path = folder / FILL_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("checkpoint_sha256") != sha:
            if not replace:
                raise FillError(f"{folder}: its masks were predicted by another lung checkpoint "
                                f"({record.get('checkpoint')}, sha256 {str(record.get('checkpoint_sha256'))[:12]}...); "
                                "give that --lungs to complete "
                                f"them, or --replace to predict them all again with {checkpoint}")
            for path in folder.glob("*.png"):
                path.unlink()
                removed += 1
    atomic_write_text(record_path, json.dumps({"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha,
                                               "date": datetime.datetime.now().isoformat(timespec="seconds")},
                                              indent=1) + "\n")
    return removed


def _predict(model: Any, images: list, device: Any, precision: str) -> list[np.ndarray]:
    """Clean lung masks (bool, each image's size) of a batch of radiographs."""
    from pneumomap.device import autocast, images_to_device
    from pneumomap.stages.preprocess import resize, to_model_input

    with autocast(device, precision=precision):
        probs = model.predict(images_to_device([to_model_input(r.pixels, model.input_size) for r in images], device))
    return [resize(split.mask, r.pixels.shape, order=0) > 0 for r, split in zip(images, model.splits(probs))]


def fill_masks(data_dir: str | Path, lungs: str | Path, *, device: str = "auto", workers: int | None = None,
               batch_size: int = 8, replace: bool = False, progress: bool = True) -> dict:
    """Predict and write the lung masks DATA lacks (see the module doc); returns counts and the failures."""
    from tqdm import tqdm

    from pneumomap.device import decode_workers, forward_batch, inference_precision, resolve_device
    from pneumomap.stages.reader import UnreadableImageError, read_images

    if batch_size < 1:
        raise FillError("--batch-size must be at least 1")
    data = rsna.load_rsna(data_dir)
    folder = data.root / rsna.PREDICTED_MASKS_DIR
    torch_device = resolve_device(device)
    precision = inference_precision(torch_device, "auto")
    model, checkpoint = _load_lungs(Path(lungs), torch_device)
    sha = checkpoint_sha256(checkpoint)
    failures: dict[str, str] = {}
    with exclusive_lock(folder / ".lock", f"{folder}"):
        remove_temporaries(folder)
        removed = _start(folder, checkpoint, sha, replace)
        sources = data.mask_sources(data.ids)
        todo = sources["missing"] + sources["unreadable"]  # those an earlier fill could not read are tried again
        per_call = forward_batch(torch_device, batch_size)
        results = read_images([data.image_path(pid) for pid in todo], n_jobs=decode_workers(torch_device, workers))
        pending: list[tuple[str, Any]] = []
        with tqdm(total=len(todo), desc="fill-masks", unit="img", disable=not progress) as bar:
            for pid, item in zip(todo, results):
                if isinstance(item, UnreadableImageError):
                    failures[pid] = str(item)
                else:
                    pending.append((pid, item))
                if len(pending) == per_call:
                    _write_batch(data, model, pending, torch_device, precision, failures)
                    pending = []
                bar.update(1)
        if pending:
            _write_batch(data, model, pending, torch_device, precision, failures)
        sources = write_manifest(data, sha, failures)
    return {"data": str(data.root), "checkpoint": str(checkpoint), "checkpoint_sha256": sha,
            "images": len(data.ids), "drawn": len(sources["drawn"]), "predicted": len(sources["predicted"]),
            "newly_predicted": len(todo) - len(failures), "removed": removed, "unreadable": len(failures),
            "failures": failures, "manifest": str(folder / rsna.MASK_MANIFEST)}


def _write_batch(data: rsna.RsnaDataset, model: Any, batch: list[tuple[str, Any]], device: Any, precision: str,
                 failures: dict[str, str]) -> None:
    """Predict one batch and write each mask; an image that fails is recorded, the others are written."""
    try:
        masks = _predict(model, [image for _, image in batch], device, precision)
    except (RuntimeError, ValueError) as exc:  # e.g. one image too small for the network: retry one by one
        if len(batch) == 1:
            failures[batch[0][0]] = f"{batch[0][1].meta.path}: lung stage failed: {exc}"
            return
        for one in batch:
            _write_batch(data, model, [one], device, precision, failures)
        return
    for (pid, _), mask in zip(batch, masks):
        write_png(data.predicted_mask_path(pid), mask.astype(np.uint8) * 255)


def write_manifest(data: rsna.RsnaDataset, sha: str, failures: dict[str, str]) -> dict[str, list[str]]:
    """manifest.csv: every image's mask source (drawn, predicted, unreadable); returns `mask_sources`
    (before this manifest: this fill's ``failures`` are the unreadable ones)."""
    sources = data.mask_sources(data.ids)
    drawn = set(sources["drawn"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for pid in data.ids:
        if pid in drawn:
            writer.writerow([pid, "drawn", "", ""])
        elif pid in failures:
            writer.writerow([pid, "unreadable", "", failures[pid]])
        else:
            writer.writerow([pid, "predicted" if pid in sources["predicted"] else "missing", sha, ""])
    atomic_write_text(data.root / rsna.PREDICTED_MASKS_DIR / rsna.MASK_MANIFEST, buffer.getvalue())
    return sources


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="RSNA-format folder: stage_2_train_labels.csv, stage_2_train_images/, "
                             "lung_masks/ (drawn, for a subset)")
    parser.add_argument("--lungs", required=True, type=Path,
                        help="the lung stage: a checkpoint folder or a training run (its best/), e.g. runs/lungs")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    parser.add_argument("--workers", type=int, default=None,
                        help="image-decoding worker processes (default: 4 beside a GPU, 0 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per network call on CUDA (default 8)")
    parser.add_argument("--replace", action="store_true",
                        help="predict every mask again when the present ones came from another lung checkpoint")


def main(args: argparse.Namespace) -> int:
    from pneumomap.fileio import FolderLockedError

    try:
        result = fill_masks(args.data, args.lungs, device=args.device, workers=args.workers,
                            batch_size=args.batch_size, replace=args.replace)
    except (ValueError, OSError, KeyError, FolderLockedError) as exc:  # FillError, LabelError, missing checkpoint
        print(f"pneumomap fill-masks: error: {exc}", file=sys.stderr)
        return 2
    print(f"{result['images']} images: {result['drawn']} drawn masks (untouched), {result['predicted']} predicted "
          f"({result['newly_predicted']} now) by {result['checkpoint']}; manifest {result['manifest']}")
    for pid, reason in list(result["failures"].items())[:10]:
        print(f"pneumomap fill-masks: unreadable: {reason}", file=sys.stderr)
    if result["unreadable"]:
        print(f"pneumomap fill-masks: {result['unreadable']} image(s) unreadable, listed in {result['manifest']}; "
              "the stages that need their masks will report them", file=sys.stderr)
        return 1
    return 0
