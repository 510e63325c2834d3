"""What produced a run: the record every run folder keeps (infer's run_summary.json, tune's JSON,
package, stage, train and export), as nnU-Net writes its arguments beside every prediction.

`build` returns one JSON-ready mapping::

    pneumomap, python, versions   pneumomap's version, Python's, and those of torch, timm,
                                  segmentation_models_pytorch, pydicom, numpy (null: not installed)
    command                       the command line (sys.argv)
    pipeline                      {path, sha256} of the pipeline file, or null
    overrides                     the --set items applied on top of it (or of a stage's config)
    checkpoints                   node (or stage) -> {path, config.yaml, weights.safetensors}: the
                                  sha256 of each file, the content the artifact keys hash too
    device, precision             as resolved for the run ('cpu', 'cuda:0'; 'fp32', 'fp16', 'bf16')
    date                          when the record was made (ISO 8601, seconds)

A command that hands a derived pipeline file to code that records provenance (tune, which tunes a
copy with the --set items written in) names the user's file and items with `invoked`.

The hashes come from `pneumomap.infer.artifacts.file_hash` (memoised per file, so a run that has
already hashed its checkpoints for its artifact keys pays nothing more).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pneumomap.checkpoints import CHECKPOINT_FILES, checkpoint_folder

LIBRARIES = ("torch", "timm", "segmentation_models_pytorch", "pydicom", "numpy")
_INVOKED: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("pneumomap_invoked", default=None)


@contextlib.contextmanager
def invoked(pipeline_path: str | Path, overrides: Iterable[str]) -> Iterator[None]:
    """Inside: `build` records ``pipeline_path`` and ``overrides`` as the pipeline the user gave, whatever
    copy of it (with the overrides written in) the code inside loads."""
    token = _INVOKED.set({"pipeline_path": Path(pipeline_path), "overrides": list(overrides)})
    try:
        yield
    finally:
        _INVOKED.reset(token)


def versions() -> dict[str, str | None]:
    """Installed versions of pneumomap's main libraries (None for one that is not installed)."""
    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (`pneumomap.infer.artifacts.file_hash`, memoised)."""
    from pneumomap.infer.artifacts import file_hash

    return file_hash(Path(path))


def checkpoint_record(directory: str | Path) -> dict[str, str | None]:
    """{path, config.yaml, weights.safetensors}: the checkpoint folder and its files' sha256 (None: absent).

    A training run's folder means its ``best/`` (as pipelines and `load_stage` read it)."""
    directory = checkpoint_folder(directory)
    record: dict[str, str | None] = {"path": str(directory.resolve())}
    for name in CHECKPOINT_FILES:
        record[name] = file_sha256(directory / name) if (directory / name).is_file() else None
    return record


def build(pipeline: Any = None, *, checkpoints: Mapping[str, str | Path] | None = None,
          device: Any = None, precision: str | None = None, overrides: Iterable[str] | None = None,
          pipeline_path: str | Path | None = None) -> dict[str, Any]:
    """The provenance record (module doc).

    ``pipeline``: a loaded `pneumomap.infer.spec.Pipeline` (its file, its overrides and its model
    nodes' checkpoints), or None; ``checkpoints``: more (or, without a pipeline, the) checkpoints by
    name; ``overrides``: the --set items when they are not the pipeline's (a stage's config);
    ``pipeline_path``: the pipeline file when no loaded pipeline is given. A ``device`` given as a name
    ('auto', 'cpu') is resolved, and its ``precision`` with it (`pneumomap.device.inference_precision`).
    """
    from pneumomap import __version__

    path = Path(pipeline.path) if pipeline is not None else (Path(pipeline_path) if pipeline_path else None)
    outer = _INVOKED.get()
    if outer is not None:  # the user's file and --set items, not the copy loaded inside `invoked`
        path, overrides = outer["pipeline_path"], outer["overrides"]
    named: dict[str, str | Path] = {}
    if pipeline is not None:
        named.update({node.name: node.checkpoint for node in pipeline.model_nodes if node.checkpoint is not None})
    named.update(checkpoints or {})
    if isinstance(device, str):  # as asked ('auto'): as it resolves here
        from pneumomap.device import inference_precision, resolve_device

        device = resolve_device(device)
        precision = inference_precision(device, precision or "auto")
    given = list(overrides) if overrides is not None else list(getattr(pipeline, "overrides", []) or [])
    return {
        "pneumomap": __version__,
        "python": platform.python_version(),
        "versions": versions(),
        "command": list(sys.argv),
        "pipeline": {"path": str(path.resolve()), "sha256": file_sha256(path)} if path is not None and path.is_file()
        else None,
        "overrides": given,
        "checkpoints": {name: checkpoint_record(directory) for name, directory in named.items()},
        "device": None if device is None else str(device),
        "precision": precision,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
