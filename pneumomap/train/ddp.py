"""Distributed data parallel under torchrun: process group, samplers, gathering, buffer sync.

Single-process runs go through the same functions, which then do nothing. torchrun sets
WORLD_SIZE / RANK / LOCAL_RANK; the backend is NCCL on CUDA and gloo on the CPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only rank 0 writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (torchrun) set up the env:// rendezvous for this process."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(device: torch.device) -> bool:
    """Join the torchrun process group (one rank too: the same DDP and NCCL path as N ranks);
    returns whether training is distributed."""
    if not launched() or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when distributed (frozen parameters are left out), else the model itself."""
    if not dist.is_initialized():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def sampler(dataset, shuffle: bool, seed: int):
    """A DistributedSampler when distributed, else None (the DataLoader then shuffles itself)."""
    if not dist.is_initialized():
        return None
    return torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)


def sync_buffers(model: nn.Module) -> None:
    """Broadcast buffers (BatchNorm running statistics) from rank 0, so every rank validates the same model."""
    if not dist.is_initialized():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (first dimension may differ between ranks) over all ranks, in rank order."""
    if not dist.is_initialized():
        return tensor
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts)


def mean(value: float, count: int) -> float:
    """The weighted mean of a per-rank average (e.g. a loss over ``count`` samples) over all ranks."""
    if not dist.is_initialized():
        return value
    # NCCL reduces CUDA tensors only
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    total = torch.tensor([value * count, float(count)], dtype=torch.float64, device=on)
    dist.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1.0))


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision (e.g. early stopping) for every rank."""
    if not dist.is_initialized():
        return flag
    value = [flag]
    dist.broadcast_object_list(value, src=0)
    return bool(value[0])
