"""Device choice and the CUDA fast paths (AMP, channels_last, pinned non-blocking copies).

Every path is written so that the same code runs on the CPU: autocast is disabled there and
``non_blocking`` is a no-op for CPU tensors.
"""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the local CUDA device when present (honours LOCAL_RANK under torchrun), else CPU."""
    import os

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
    return device


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (float16), nothing on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def to_device(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """Copy a (pinned, when on CUDA) batch to the device without blocking; NHWC memory layout for 4-D."""
    if device.type == "cuda" and not batch.is_pinned():
        batch = batch.pin_memory()
    batch = batch.to(device, non_blocking=True)
    if channels_last and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders feeding ``device`` should pin memory."""
    return device.type == "cuda"
