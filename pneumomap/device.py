"""Device choice and the fast paths of each device: precision, images per network call,
decode workers, channels_last, pinned non-blocking copies.

Every path is written so that the same code runs on the CPU: autocast is off there unless
asked for (``precision='bf16'``) and ``non_blocking`` is a no-op for CPU tensors.
"""
from __future__ import annotations

import contextlib
import os

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the local CUDA device when present, else CPU; 'auto' and 'cuda' (no index) take the
    local device, cuda:LOCAL_RANK under torchrun (NCCL and DDP need a device with its index)."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def autocast(device: torch.device, enabled: bool = True, precision: str = "auto"):
    """Mixed precision for inference and training.

    ``auto``: float16 autocast on CUDA, full float32 on the CPU (`inference_precision` names it
    for the run summary and the stored outputs' key). ``fp32``: never. ``bf16``: bfloat16
    autocast on either device (on the CPU it pays only where the processor computes in
    bfloat16, AVX512-BF16 or AMX; see `check_precision`). ``fp16``: CUDA only.
    """
    _known(precision)
    if not enabled or precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16)


def inference_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision inference runs at (checked by `check_precision`): ``auto`` is float16 AMP on
    CUDA and full float32 on the CPU (as nnU-Net does; bf16 is the CPU's opt-in: faster with two
    streams, slightly less exact; the figures: benchmarks/RESULTS.md, "Figures behind design choices")."""
    check_precision(device, precision)
    if precision != "auto":
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def _known(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run (ValueError with what to use instead)."""
    _known(precision)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; on the CPU use bf16 (where the processor supports it) or fp32")
    if precision == "bf16" and not native_bf16(device):
        raise ValueError(f"--precision bf16: this {'GPU' if device.type == 'cuda' else 'processor'} has no native "
                         "bfloat16 (CPU: AVX512-BF16 or AMX), where it would be slower or unsupported; use "
                         f"{'fp16' if device.type == 'cuda' else 'fp32'}")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CUDA: Ampere and newer; CPU: oneDNN's check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or differently built torch: do not guess
        return False


def decode_workers(device: torch.device, requested: int | None) -> int:
    """Decode worker processes: ``requested``, or by default 4 beside a GPU and none on the CPU.

    On the CPU torch's threads already use every core, and a process decoding next to them
    stalls them all at each operation (even at the lowest priority): decoding in the main process
    between the networks is faster there (benchmarks/RESULTS.md, "Figures behind design choices").
    """
    if requested is not None:
        return max(0, requested)
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0


def cpu_streams(device: torch.device, precision: str, requested: int | None = None) -> int:
    """Images computed at once on the CPU, each in its own thread with its share of torch's
    threads: ``requested``, or by default 2 in bfloat16 (two one-thread streams compute more images
    per second than one two-thread stream) and 1 in float32 (whose one-thread kernels are much slower
    than two-thread ones; the figures: benchmarks/RESULTS.md, "Figures behind design choices").
    Always 1 on CUDA."""
    if device.type != "cpu":
        return 1
    if requested is not None:
        return max(1, requested)
    return min(2, torch.get_num_threads()) if precision == "bf16" else 1


def forward_batch(device: torch.device, batch_size: int) -> int:
    """Images per network call: the whole batch on CUDA, one at a time on the CPU.

    On the CPU, 512 px activations of a batch spill out of the caches: a batch takes longer per
    image than one image at a time (benchmarks/RESULTS.md, "Figures behind design choices").
    Batches still group the I/O.
    """
    return max(1, batch_size) if device.type == "cuda" else 1


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


def for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``, channels_last, in eval mode."""
    return model.to(device).to(memory_format=torch.channels_last).eval()


def images_to_device(arrays: list, device: torch.device) -> torch.Tensor:
    """A (B, 1, h, w) batch on ``device`` from B equal-size 2-D float32 arrays (see `to_device`)."""
    import numpy as np

    return to_device(torch.from_numpy(np.stack(arrays)[:, None]), device)
