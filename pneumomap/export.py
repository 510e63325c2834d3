"""Export a stage checkpoint's network for use without pneumomap: ONNX or a torch.export program.

  pneumomap export CHECKPOINT --format onnx|exported-program [--dynamic-batch] [--out FILE]

CHECKPOINT is a stage checkpoint folder (config.yaml + weights.safetensors) or a training run's
folder (its best/). What is exported is what pneumomap computes from a model input, the stage's
``predict``: input ``image``, float32 (B, 1, H, W) at the stage's input size, the radiograph
resized and rescaled to [-1, 1] (`pneumomap.stages.preprocess.to_model_input`); output the
probabilities (classifier: (B,) or (B, n_classes); regressor: the extent, (B,); lungs and mapper:
(B, 1, H, W) maps), with the checkpoint's flip TTA and ensemble inside. A mapper is exported with
the encoder stored in its checkpoint.

--format onnx           FILE.onnx through torch.onnx.export (needs onnx and onnxscript:
                        pip install 'pneumomap[export]'); checked with onnxruntime when installed.
--format exported-program  FILE.pt2 through torch.export.export + torch.export.save.
--dynamic-batch         any batch size (default: the batch of --batch, fixed).
--out FILE              default: CHECKPOINT.onnx / CHECKPOINT.pt2 beside the folder.

The exported network is run on random inputs (the batch sizes it accepts) and compared with the
eager network; the largest absolute difference is printed and written, with the input and output
description and the provenance, to FILE.json beside it. Exit status: 0 ok; 1 written but it differs
from the eager network by more than --tolerance; 2 unusable checkpoint, option or missing library.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from pneumomap.errors import UserError

MAX_BATCH = 1024  # the largest batch a --dynamic-batch export accepts


class ExportError(UserError):
    """An export that cannot be made (checkpoint, option, a missing library); the message says how to fix it."""


class Predictor(nn.Module):
    """A stage as pneumomap runs it for predictions: ``forward(image) = stage.predict(image)``."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.stage.predict(image)


class Format(abc.ABC):
    """One export format: how a network is written and how the written file is run (to check it)."""

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""

    @abc.abstractmethod
    def save(self, model: nn.Module, example: torch.Tensor, dynamic: dict | None, path: Path) -> None:
        """Write ``model`` traced on ``example`` (batch dimension ``dynamic`` or fixed) to ``path``."""

    @abc.abstractmethod
    def runner(self, path: Path) -> Callable[[np.ndarray], np.ndarray] | None:
        """A function running the written file on a batch, or None when nothing here can run it."""

    @abc.abstractmethod
    def how_to_load(self, path: Path) -> str:
        """One line of Python that loads and runs ``path`` without pneumomap."""


class Onnx(Format):
    name, suffix = "onnx", ".onnx"

    def save(self, model: nn.Module, example: torch.Tensor, dynamic: dict | None, path: Path) -> None:
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"--format onnx needs {' and '.join(missing)}: pip install 'pneumomap[export]' "
                              "(or pip install onnx onnxscript onnxruntime)")
        with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx reports its steps on stdout
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["probability"],
                              dynamic_shapes=(dynamic,) if dynamic else None, dynamo=True, external_data=False)

    def runner(self, path: Path) -> Callable[[np.ndarray], np.ndarray] | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"image": x})[0]

    def how_to_load(self, path: Path) -> str:
        return (f"onnxruntime.InferenceSession({str(path)!r}).run(None, {{'image': x}})[0]  "
                "# x: float32 numpy (B, 1, H, W)")


class ExportedProgram(Format):
    name, suffix = "exported-program", ".pt2"

    def save(self, model: nn.Module, example: torch.Tensor, dynamic: dict | None, path: Path) -> None:
        program = torch.export.export(model, (example,), dynamic_shapes=(dynamic,) if dynamic else None)
        torch.export.save(program, str(path))

    def runner(self, path: Path) -> Callable[[np.ndarray], np.ndarray] | None:
        module = torch.export.load(str(path)).module()
        return lambda x: module(torch.from_numpy(x)).detach().numpy()

    def how_to_load(self, path: Path) -> str:
        return f"torch.export.load({str(path)!r}).module()(x)  # x: float32 tensor (B, 1, H, W)"


FORMATS: dict[str, Format] = {f.name: f for f in (Onnx(), ExportedProgram())}


def export(checkpoint: str | Path, format: str = "onnx", out: str | Path | None = None, *, dynamic_batch: bool = False,
           batch: int = 1, tolerance: float = 1e-4, seed: int = 0, overrides: list[str] | None = None) -> dict[str, Any]:
    """Export ``checkpoint``'s stage (module doc) into ``out``; returns what FILE.json holds.

    ``max_abs_difference`` is the largest difference from the eager network on random inputs (None
    when nothing here can run the file: onnxruntime not installed); ``matches`` whether it is within
    ``tolerance``.
    """
    from pneumomap import provenance
    from pneumomap.fileio import atomic_write_text
    from pneumomap.stages.base import load_stage

    if format not in FORMATS:
        raise ExportError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if batch < 1 or (dynamic_batch and batch > MAX_BATCH):
        raise ExportError(f"--batch {batch}: give 1 to {MAX_BATCH}")
    kind = FORMATS[format]
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.resolve().with_name(checkpoint.resolve().name + kind.suffix)
    stage = load_stage(checkpoint, map_location="cpu", overrides=overrides)
    model = Predictor(stage).eval()
    height, width = stage.input_size
    generator = torch.Generator().manual_seed(seed)

    def random_input(n: int) -> torch.Tensor:
        return torch.rand(n, 1, height, width, generator=generator) * 2 - 1  # the [-1, 1] of a model input

    # a dynamic batch is traced at 2: a batch of 1 would be specialised to 1
    dynamic = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)} if dynamic_batch else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        kind.save(model, random_input(2 if dynamic_batch else batch), dynamic, out)
    run = kind.runner(out)
    difference = None
    if run is not None:
        differences = []
        for n in ((1, 3) if dynamic_batch else (batch,)):
            x = random_input(n)
            with torch.no_grad():
                expected = model(x).float().numpy()
            got = run(x.numpy())
            if got.shape != expected.shape:
                raise ExportError(f"{out}: gives shape {list(got.shape)} for a batch of {n}, eager {list(expected.shape)}")
            differences.append(float(np.max(np.abs(got.astype(np.float64) - expected))))
        difference = max(differences)
    with torch.no_grad():
        output_shape = list(model(random_input(1)).shape[1:])
    record = {
        "file": str(out.resolve()), "format": format, "stage": stage.kind, "checkpoint": str(checkpoint.resolve()),
        "input": {"name": "image", "shape": ["B" if dynamic_batch else batch, 1, height, width], "dtype": "float32",
                  "range": [-1, 1], "preprocessing": "the radiograph resized to (H, W) and rescaled to [-1, 1] "
                  "(pneumomap.stages.preprocess.to_model_input)"},
        "output": {"name": "probability", "shape": ["B" if dynamic_batch else batch, *output_shape],
                   "meaning": f"the {stage.kind} stage's predict(): probabilities in [0, 1]"},
        "max_abs_difference": difference, "tolerance": tolerance,
        "matches": None if difference is None else difference <= tolerance,
        "load": kind.how_to_load(out),
        "provenance": provenance.build(checkpoints={stage.kind: checkpoint}, device=torch.device("cpu"),
                                       precision="fp32", overrides=overrides or []),
    }
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=2) + "\n")
    return record


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pneumomap.overrides import add_set_argument

    parser.add_argument("checkpoint", type=Path, help="stage checkpoint folder (config.yaml + weights.safetensors) "
                        "or a training run's folder")
    parser.add_argument("--format", required=True, choices=list(FORMATS), help="onnx (FILE.onnx) or exported-program "
                        "(FILE.pt2, torch.export)")
    parser.add_argument("--out", type=Path, default=None, help="the file to write (default: CHECKPOINT.onnx or "
                        "CHECKPOINT.pt2 beside the checkpoint folder); FILE.json is written beside it")
    parser.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: --batch only)")
    parser.add_argument("--batch", type=int, default=1, help="the fixed batch size without --dynamic-batch (default 1)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="the largest difference from the eager network "
                        "accepted (default: %(default)s)")
    add_set_argument(parser, "a key of the checkpoint's config, e.g. flip_tta=false (not one that changes the network)")


def main(args: argparse.Namespace) -> int:
    record = export(args.checkpoint, args.format, args.out, dynamic_batch=args.dynamic_batch, batch=args.batch,
                    tolerance=args.tolerance, overrides=args.overrides)
    print(f"wrote {record['file']} ({record['stage']}, input {record['input']['shape']}, output "
          f"{record['output']['shape']}) and {record['file']}.json")
    if record["max_abs_difference"] is None:
        print("not checked: onnxruntime is not installed (pip install onnxruntime)", file=sys.stderr)
        return 0
    print(f"largest difference from the eager network on random inputs: {record['max_abs_difference']:.3g}")
    print(f"load it: {record['load']}")
    if not record["matches"]:
        print(f"pneumomap export: {record['file']} differs from the eager network by more than --tolerance "
              f"{record['tolerance']:g}", file=sys.stderr)
        return 1
    return 0
