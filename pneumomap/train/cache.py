"""On-disk cache of prepared training samples: memory-mapped numpy columns, built once, shared by stages.

Layout::

    CACHE/<column>-<digest>/values.bin   one row per item: float16 model inputs, uint8 masks, float32 scalars
    CACHE/<column>-<digest>/index.json   column, shape, dtype, capacity; rows {item: [row, fingerprint]};
                                         failed {item: [fingerprint, reason]} (unreadable images)
    CACHE/.lock                          held while a run builds; another run waits for it

A *column* holds one key of the prepared sample (a `Field`): the whole-image input at 512x512, the right lung
half at 512x320, a mapper's target mask, ... Its folder name is a digest of what it holds and of the code that
prepares it (`code_digest`), so another input size, another target or changed preprocessing is another column.
A row stays valid while the fingerprint of what it depends on is unchanged: the image's size and mtime, the
lung mask's path (drawn or predicted), size and mtime, the image's labels. New or stale items are prepared
again, in parallel (DataLoader worker processes writing their rows straight into the memory map) with a
progress bar; the rest is read from disk, so no epoch after the first decodes an image. Stages that take the
same input share its columns when they share CACHE (``--cache DIR``): lungs, classifier and mapper_whole the
whole image; the regressors and the per-lung mappers both lung halves. Clear it by deleting the folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from pneumomap.fileio import FolderLockedError, atomic_write_text, exclusive_lock

log = logging.getLogger(__name__)

DEPENDENCIES = ("image", "mask", "labels")
SAVE_EVERY_S = 30.0  # the index is written this often while building (a killed build keeps what it wrote)
INDEX_FILE, VALUES_FILE, LOCK_FILE = "index.json", "values.bin", ".lock"
FORMAT = 1


@dataclass(frozen=True)
class Field:
    """One key of a prepared sample as a cache column: what it holds, its shape and type, what it depends on."""

    key: str                  # the sample key ("image", "target_right", ...)
    column: str               # what the values are, with their parameters ("image-512x512", "half-right-512x320")
    shape: tuple[int, ...]    # of one item's value; () for a scalar
    dtype: str                # float16 (model inputs), uint8 (masks), float32 (scalar targets)
    deps: tuple[str, ...]     # what a row depends on, of DEPENDENCIES

    def __post_init__(self) -> None:
        unknown = set(self.deps) - set(DEPENDENCIES)
        if unknown:
            raise ValueError(f"field {self.key}: unknown dependencies {sorted(unknown)}; use {DEPENDENCIES}")


class Preparer(Protocol):
    """What the cache needs of a stage's preparation (`pneumomap.train.datasets`)."""

    def fields(self) -> list[Field]: ...
    def item(self, key: Any) -> str: ...                 # the item's identity (its image path)
    def sources(self, key: Any) -> dict[str, str]: ...   # a text per dependency the fields name
    def attempt(self, key: Any) -> dict | str: ...       # the prepared sample, or why the image is unreadable


Rows = tuple[int, ...]  # an item's row in each column, in `fields` order


_CODE_DIGEST: str | None = None


def code_digest() -> str:
    """sha256 of the modules that decode and prepare a sample: changed code means new columns."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        from pneumomap import labels
        from pneumomap.stages import lung_geometry, lungs, preprocess, reader
        from pneumomap.train import datasets

        digest = hashlib.sha256()
        for module in (reader, preprocess, lung_geometry, lungs, labels, datasets):
            digest.update(Path(module.__file__).read_bytes())
        _CODE_DIGEST = digest.hexdigest()[:16]
    return _CODE_DIGEST


def file_signature(path: str | os.PathLike) -> str:
    """'path:size:mtime_ns' of a file, the path absolute ('path:missing' when it cannot be stat-ed)."""
    path = os.path.abspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}:missing"
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def fingerprint(sources: dict[str, str], deps: Sequence[str]) -> str:
    return hashlib.sha1(json.dumps([sources[d] for d in deps]).encode()).hexdigest()[:16]


class Column:
    """The values of one `Field` for many items: a raw memory-mapped file and its JSON index."""

    def __init__(self, root: Path, field: Field) -> None:
        self.field = field
        self.identity = {"column": field.column, "shape": list(field.shape), "dtype": field.dtype,
                         "code": code_digest(), "format": FORMAT}
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        self.dir = Path(root) / f"{field.column}-{digest}"
        self.row_bytes = int(np.prod(field.shape, dtype=np.int64)) * np.dtype(field.dtype).itemsize
        self.index: dict[str, Any] = {**self.identity, "capacity": 0, "rows": {}, "failed": {}}
        self._array: np.memmap | None = None
        self._array_mode = ""

    def __getstate__(self) -> dict:  # worker processes open their own map
        return {**self.__dict__, "_array": None, "_array_mode": ""}

    # ---------------------------------------------------------------- index
    def load(self) -> None:
        path = self.dir / INDEX_FILE
        if path.is_file():
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("%s: unreadable cache index (%s); the column is rebuilt", path, exc)
                index = {}
            if all(index.get(k) == v for k, v in self.identity.items()):
                self.index = index
        self._close()

    def save(self) -> None:
        atomic_write_text(self.dir / INDEX_FILE, json.dumps(self.index))

    def lookup(self, item: str, stamp: str) -> int | str | None:
        """The item's row when valid (same fingerprint ``stamp``), the reason it failed when it failed with this
        fingerprint, else None."""
        row = self.index["rows"].get(item)
        if row is not None and row[1] == stamp:
            return int(row[0])
        failed = self.index["failed"].get(item)
        if failed is not None and failed[0] == stamp:
            return str(failed[1])
        return None

    def allocate(self, item: str) -> int:
        """The item's row to (re)write: its old one, or a new one at the end."""
        row = self.index["rows"].get(item)
        if row is not None:
            return int(row[0])
        self.index["capacity"] += 1
        return self.index["capacity"] - 1

    def record(self, item: str, row: int, stamp: str, failure: str | None) -> None:
        """The item's row is written (``failure`` None) or it could not be prepared, with fingerprint ``stamp``."""
        if failure is None:
            self.index["rows"][item] = [row, stamp]
            self.index["failed"].pop(item, None)
        else:
            self.index["failed"][item] = [stamp, failure]

    def reserve(self) -> None:
        """Grow values.bin to the index's capacity (never shrinks it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / VALUES_FILE
        with open(path, "ab") as handle:
            if handle.tell() < self.index["capacity"] * self.row_bytes:
                handle.truncate(self.index["capacity"] * self.row_bytes)
        self._close()

    # ---------------------------------------------------------------- values
    def _close(self) -> None:
        self._array, self._array_mode = None, ""

    def _map(self, mode: str) -> np.memmap:
        if self._array is None or self._array_mode != mode:
            capacity = self.index["capacity"]
            self._array = np.memmap(self.dir / VALUES_FILE, dtype=self.field.dtype, mode=mode,
                                    shape=(max(capacity, 1), *self.field.shape))
            self._array_mode = mode
        return self._array

    def write(self, row: int, value: Any) -> None:
        value = np.asarray(value)
        if value.shape != self.field.shape:
            raise ValueError(f"cache column {self.field.column}: value of shape {value.shape}, "
                             f"expected {self.field.shape}")
        self._map("r+")[row] = value.astype(self.field.dtype)

    def read(self, row: int) -> np.ndarray:
        return np.array(self._map("r")[row])


class SampleCache:
    """The columns of one stage's prepared samples under ``root``; `build` fills them, `read` gives a sample."""

    def __init__(self, root: str | os.PathLike, fields: list[Field]) -> None:
        self.root = Path(root)
        self.fields = list(fields)
        self.columns = [Column(self.root, f) for f in self.fields]

    def build(self, keys: Sequence[Any], prepare: Preparer, workers: int = 0, desc: str = "caching") -> list:
        """Per key: its rows (`Rows`), or the reason it could not be prepared (warned once per key).

        Valid rows are reused; the others are prepared in ``workers`` processes (0: here) and written."""
        with self._locked():
            for column in self.columns:
                column.load()
            results: list = [None] * len(keys)
            todo: list[tuple[int, Rows, tuple[str, ...]]] = []
            for i, key in enumerate(keys):
                item, sources = prepare.item(key), prepare.sources(key)
                stamps = tuple(fingerprint(sources, f.deps) for f in self.fields)
                found = [c.lookup(item, p) for c, p in zip(self.columns, stamps)]
                if all(isinstance(f, int) for f in found):
                    results[i] = tuple(found)
                elif all(isinstance(f, str) for f in found) and len(set(found)) == 1:
                    results[i] = found[0]
                else:
                    todo.append((i, tuple(c.allocate(item) for c in self.columns), stamps))
            if todo:
                self._fill(keys, prepare, todo, results, workers, desc)
        for key, result in zip(keys, results):
            if isinstance(result, str):
                warnings.warn(f"skipping unreadable training image: {result}", stacklevel=3)
        return results

    def _fill(self, keys, prepare: Preparer, todo, results: list, workers: int, desc: str) -> None:
        from tqdm import tqdm

        from pneumomap.stages.reader import identity

        for column in self.columns:
            column.reserve()
        job = _Writing([(keys[i], rows) for i, rows, _ in todo], prepare, self.columns)
        loader = DataLoader(job, batch_size=None, num_workers=min(workers, len(todo)), collate_fn=identity)
        saved = time.monotonic()
        try:
            for (i, rows, stamps), failure in zip(todo, tqdm(loader, total=len(todo), desc=desc, unit="img",
                                                             leave=False, disable=len(todo) < 32)):
                item = prepare.item(keys[i])
                for column, row, stamp in zip(self.columns, rows, stamps):
                    column.record(item, row, stamp, failure)
                results[i] = rows if failure is None else failure
                if time.monotonic() - saved > SAVE_EVERY_S:
                    self._save()
                    saved = time.monotonic()
        finally:
            self._save()

    def _save(self) -> None:
        for column in self.columns:
            column.save()

    def read(self, rows: Rows) -> dict:
        """The prepared sample (cached precision) of an item's rows."""
        return {f.key: c.read(r) for f, c, r in zip(self.fields, self.columns, rows)}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold CACHE/.lock; wait (saying so once) while another run builds in the same cache."""
        told = False
        with ExitStack() as stack:
            while True:
                try:
                    stack.enter_context(exclusive_lock(self.root / LOCK_FILE, f"training cache {self.root}"))
                    break
                except FolderLockedError as exc:
                    if not told:
                        log.warning("waiting: %s", exc)
                        told = True
                    time.sleep(1.0)
            yield


class _Writing(Dataset):
    """Prepares item j and writes its rows (in a worker process); yields None or the failure reason."""

    def __init__(self, jobs: list[tuple[Any, Rows]], prepare: Preparer, columns: list[Column]) -> None:
        self.jobs, self.prepare, self.columns = jobs, prepare, columns

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> str | None:
        key, rows = self.jobs[j]
        sample = self.prepare.attempt(key)
        if isinstance(sample, str):
            return sample
        for column, row in zip(self.columns, rows):
            column.write(row, sample[column.field.key])
        return None
