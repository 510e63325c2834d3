"""Stored per-image model outputs and run records, so that only what changed runs again.

Layout under ``OUT/.artifacts/``::

    <node>-<key>/<image_id>.npz   one model node's output for one image
    meta/<image_id>.json          original height/width of the image
    post-<key>/<image_id>.json    the image's finished `Record` (its map PNG is in OUT/maps/)

A model node's key hashes its kind, parameters, checkpoint files (config.yaml and weights),
the precision it runs at and the keys of the model nodes it reads, so a new checkpoint re-runs
that node and its dependants only. The post key hashes every model key plus every op, the
thresholds and the outputs block, so changing post-processing re-runs post-processing only,
from stored outputs.
Every stored file carries the input file's size and mtime; a changed input is recomputed.

Stored values: maps as uint8 (p * 255, rounded; the submission is 8-bit), scalars as float32.
The runner always continues from the stored (quantized) value, also right after computing it,
so a resumed or sharded run gives byte-identical files. All writes are atomic.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pneumomap.fileio import atomic_write_bytes, atomic_write_text
from pneumomap.infer.spec import CHECKPOINT_FILES, Pipeline

ARTIFACTS = ".artifacts"
META = "meta"
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file (memoised per path, size and mtime within the process)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def node_keys(pipeline: Pipeline, precision: str | None = None) -> dict[str, str]:
    """Model node name -> artifact key (see module doc); ``precision`` (the resolved inference
    precision, `pneumomap.device.inference_precision`) is part of it, so outputs computed at
    another precision are not reused. None: keys for the run's identity only (shard parts)."""
    keys: dict[str, str] = {}
    for node in pipeline.model_nodes:
        checkpoint = {f: file_hash(node.checkpoint / f) for f in CHECKPOINT_FILES}
        inputs = [keys.get(i, i) for i in node.inputs]
        keys[node.name] = _digest({"stage": node.kind, "params": node.params, "checkpoint": checkpoint,
                                   "inputs": inputs, "precision": precision, "format": 1})
    return keys


def post_key(pipeline: Pipeline, keys: dict[str, str]) -> str:
    """Key of everything that decides the submission files."""
    ops = {n.name: {"op": n.kind, "inputs": n.inputs, "params": n.params} for n in pipeline.op_nodes}
    outputs = vars(pipeline.outputs)
    return _digest({"models": keys, "ops": ops, "outputs": outputs, "format": 1})


def source_signature(path: str | os.PathLike) -> str:
    """'size:mtime_ns' of an input file ('' when it cannot be stat-ed)."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def quantize(value: Any) -> np.ndarray:
    """The stored form: maps -> uint8 (p * 255), scalars -> float32."""
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 0:
        return array
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


SCALAR_DECIMALS = 6  # every CSV writes scores with 6 decimals (`writers.format_value`)


def dequantize(array: np.ndarray) -> Any:
    """The value the pipeline continues with: float32 map in [0, 1], or a float rounded to the
    decimals the CSVs write, so that the gate decides on the very number the CSVs show."""
    if array.ndim == 0:
        return round(float(array), SCALAR_DECIMALS)
    return array.astype(np.float32) / np.float32(255.0)


class ArtifactStore:
    """Per-image npz/json files under ``root`` (None: a no-op store, nothing kept)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _path(self, folder: str, image_id: str, suffix: str) -> Path:
        return self.root / folder / f"{image_id}{suffix}"

    def has(self, folder: str, image_id: str) -> bool:
        return self.enabled and self._path(folder, image_id, ".npz").is_file()

    def load(self, folder: str, image_id: str, signature: str) -> np.ndarray | None:
        """The stored array, or None when absent, unreadable or from another version of the input."""
        if not self.enabled:
            return None
        path = self._path(folder, image_id, ".npz")
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["source"]) != signature:
                    return None
                return data["value"]
        except (OSError, KeyError, ValueError, EOFError):
            return None

    def signature_of(self, folder: str, image_id: str) -> str | None:
        """The input signature a stored array was made from, without decoding the array (None: none readable)."""
        if not self.enabled:
            return None
        try:
            with np.load(self._path(folder, image_id, ".npz"), allow_pickle=False) as data:
                return str(data["source"])
        except (OSError, KeyError, ValueError, EOFError):
            return None

    def save(self, folder: str, image_id: str, signature: str, stored: np.ndarray) -> None:
        if not self.enabled:
            return
        buffer = io.BytesIO()
        np.savez_compressed(buffer, value=stored, source=np.array(signature))
        atomic_write_bytes(self._path(folder, image_id, ".npz"), buffer.getvalue())

    def load_json(self, folder: str, image_id: str, signature: str | None = None) -> dict | None:
        if not self.enabled:
            return None
        try:
            data = json.loads(self._path(folder, image_id, ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if signature is not None and data.get("source") != signature:
            return None
        return data

    def save_json(self, folder: str, image_id: str, data: dict) -> None:
        if self.enabled:
            atomic_write_text(self._path(folder, image_id, ".json"), json.dumps(data, sort_keys=True))


def model_folder(node: str, key: str) -> str:
    return f"{node}-{key}"


def post_folder(key: str) -> str:
    return f"post-{key}"

