"""The training loop shared by every stage: AdamW, the recipe's schedule, AMP, accumulation,
validation metrics, history, best/last checkpoints, early stopping, --resume and DDP.

Output (docs/contracts.md, "Training output")::

    OUT/best/   stage checkpoint with the best validation metric (load_stage(OUT/best))
    OUT/last/   the last epoch's checkpoint + train_state.pt (optimiser, scheduler, epoch, history)
    OUT/history.json, OUT/history.csv, OUT/loss_curve.png, OUT/recipe.yaml
    OUT/summary.json  the returned summary: epochs, best metric, skipped images, lung masks drawn / predicted
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pneumomap.device import autocast, pin_memory, to_device
from pneumomap.fileio import atomic_write_text
from pneumomap.train import ddp, history
from pneumomap.train.datasets import StageDataset, collate, describe_lung_masks, lung_mask_counts
from pneumomap.train.recipes import Recipe, dump
from pneumomap.train.schedule import make_scheduler
from pneumomap.train.tasks import Task, trainable_parameters

STATE_FILE = "train_state.pt"


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(model: torch.nn.Module, directory: Path, state: dict | None = None) -> None:
    """Write a stage checkpoint (and optionally the training state) into a fresh directory, then swap it in."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_last(model: torch.nn.Module, out: Path) -> dict:
    """Load OUT/last's weights into ``model``; returns its training state."""
    from safetensors.torch import load_file

    from pneumomap.stages.base import WEIGHTS_FILE

    last = out / "last"
    if not (last / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {last / STATE_FILE} not found (train once without --resume first)")
    model.load_state_dict(load_file(str(last / WEIGHTS_FILE)), strict=True)
    return torch.load(last / STATE_FILE, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- helpers

def _improved(value: float, best: float | None, higher_is_better: bool) -> bool:
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if higher_is_better else value < best


def make_loader(dataset: StageDataset, recipe: Recipe, device: torch.device, train: bool) -> DataLoader:
    """Batches of a dataset; cached data on the CPU is augmented in the main process (no worker start-up)."""
    workers = 0 if dataset.cached is not None and device.type == "cpu" else recipe.workers
    sampler = ddp.sampler(dataset, shuffle=train, seed=recipe.seed)
    local = math.ceil(len(dataset) / ddp.world_size())
    return DataLoader(dataset, batch_size=recipe.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory(device),
                      drop_last=train and local % recipe.batch_size == 1 and local > 1)


def _epoch_seed(recipe: Recipe, epoch: int) -> None:
    """Shuffling and augmentation of epoch ``epoch`` depend on (seed, epoch, rank) only: resumable."""
    torch.manual_seed(recipe.seed * 1000003 + epoch * 101 + ddp.rank())


# ---------------------------------------------------------------- one epoch

def train_epoch(task: Task, net, loader, optimizer, scheduler, scaler, device, recipe: Recipe,
                desc: str) -> tuple[float, int]:
    """One pass over the training data; returns (mean loss over this rank's samples, skipped images)."""
    task.set_train_mode(True)
    accumulate, channels_last = recipe.accumulate, recipe.channels_last and device.type == "cuda"
    total, count, skipped = 0.0, 0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=desc, leave=False, disable=not ddp.is_main())
    for step, batch in enumerate(bar):
        skipped += batch["skipped"]
        if "image" not in batch:
            continue
        images = to_device(batch["image"], device, channels_last)
        target = to_device(batch["target"], device, channels_last=False)
        sync = (step + 1) % accumulate == 0 or step + 1 == len(loader)
        no_sync = net.no_sync() if (not sync and hasattr(net, "no_sync")) else contextlib.nullcontext()
        with no_sync:
            with autocast(device, recipe.amp):
                loss = task.loss(task.outputs(net, images), target)
            scaler.scale(loss / accumulate).backward()
        if sync:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total += float(loss.detach()) * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return ddp.mean(total / max(count, 1), count), skipped


@torch.no_grad()
def evaluate(task: Task, loader, device, recipe: Recipe) -> dict:
    """Validation loss and the stage metrics, over every rank's share (gathered, duplicates removed)."""
    task.set_train_mode(False)
    channels_last = recipe.channels_last and device.type == "cuda"
    total, count = 0.0, 0
    parts: dict[str, list[torch.Tensor]] = {"index": []}
    skipped = 0
    for batch in tqdm(loader, desc="val", leave=False, disable=not ddp.is_main()):
        skipped += batch["skipped"]
        if "image" not in batch:
            continue
        images = to_device(batch["image"], device, channels_last)
        target = to_device(batch["target"], device, channels_last=False)
        with autocast(device, recipe.amp):
            outputs = task.outputs(task.model, images)
            loss = task.loss(outputs, target)
        total += float(loss) * len(images)
        count += len(images)
        parts["index"].append(batch["index"])
        for key, value in task.batch_results(outputs, target).items():
            parts.setdefault(key, []).append(value)
    gathered = {k: ddp.gather(torch.cat(v) if v else torch.zeros(0)).numpy() for k, v in parts.items()}
    _, first = np.unique(gathered.pop("index"), return_index=True)  # DistributedSampler pads with repeats
    results = {k: v[first] for k, v in gathered.items()}
    return {"loss": ddp.mean(total / max(count, 1), count), "skipped": skipped, **task.summarise(results)}


# ---------------------------------------------------------------- the run

def fit(task: Task, train_set: StageDataset, val_set: StageDataset, recipe: Recipe, out: str | Path,
        device: torch.device, resume: bool = False) -> dict:
    """Train ``task.model``; write OUT/best, OUT/last, history and the curve; returns a summary."""
    out = Path(out)
    model = task.model.to(device)
    if recipe.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    train_loader = make_loader(train_set, recipe, device, train=True)
    val_loader = make_loader(val_set, recipe, device, train=False)
    scheduler = make_scheduler(optimizer, recipe, math.ceil(len(train_loader) / recipe.accumulate))
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp and device.type == "cuda")
    spec = task.spec
    state = {"epoch": 0, "best": None, "best_epoch": None, "stale": 0, "history": []}
    if resume:
        saved = load_last(model, out)
        task.check_resumed(out)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = {k: saved[k] for k in state}
    net = ddp.wrap(model, device)
    masks = lung_mask_counts(train_set, val_set)
    if ddp.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "recipe.yaml", dump(recipe))
        tqdm.write(f"{task.stage}: {len(train_set)} training / {len(val_set)} validation images "
                   f"({train_set.skipped + val_set.skipped} unreadable skipped), input {task.input_size}, "
                   f"{sum(p.numel() for p in params):,} trainable parameters, device {device}, "
                   f"{ddp.world_size()} process(es)" + (f"; {describe_lung_masks(masks)}" if masks else ""))
    skipped_at_start = train_set.skipped + val_set.skipped
    for epoch in range(state["epoch"], recipe.epochs):
        started = time.perf_counter()
        _epoch_seed(recipe, epoch)
        if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, skipped = train_epoch(task, net, train_loader, optimizer, scheduler, scaler, device, recipe,
                                          desc=f"epoch {epoch + 1}/{recipe.epochs}")
        ddp.sync_buffers(model)
        val = evaluate(task, val_loader, device, recipe)
        skipped += skipped_at_start + val.pop("skipped")
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "val_loss": val.pop("loss"),
                  **{f"val_{k}": v for k, v in val.items()},
                  "skipped": skipped, "seconds": round(time.perf_counter() - started, 2)}
        value = record[f"val_{spec.metric}"]
        improved = _improved(value, state["best"], spec.higher_is_better)
        if improved:
            state.update(best=value, best_epoch=epoch + 1, stale=0)
        else:
            state["stale"] += 1
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if ddp.is_main():
            tqdm.write(history.format_record(record))
            if improved:
                save_checkpoint(model, out / "best")
            save_checkpoint(model, out / "last", {"optimizer": optimizer.state_dict(),
                                                  "scheduler": scheduler.state_dict(),
                                                  "scaler": scaler.state_dict(), **state})
            history.write(out, state["history"])
        ddp.barrier()
        if ddp.broadcast_flag(bool(recipe.patience) and state["stale"] >= recipe.patience):
            if ddp.is_main():
                tqdm.write(f"early stopping: no better val_{spec.metric} for {state['stale']} epochs")
            break
    if ddp.is_main() and state["history"]:
        history.plot(out, state["history"], spec.metric)
    summary = {"stage": task.stage, "out": str(out), "epochs": state["epoch"], "best_epoch": state["best_epoch"],
               f"best_val_{spec.metric}": state["best"],
               "skipped": state["history"][-1]["skipped"] if state["history"] else skipped_at_start,
               "train_images": len(train_set), "val_images": len(val_set), "lung_masks": masks}
    if ddp.is_main():
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
