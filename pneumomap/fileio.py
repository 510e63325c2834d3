"""Atomic file writing: a reader never sees a half-written file, a killed run leaves none.

Temporary files are named ``.pneumomap-<host>-<pid>-<random>.tmp`` beside their target: short
(any file name can be written), recognisably ours (`remove_temporaries` deletes nothing else) and
naming their writer (a live writer's files are never deleted). `exclusive_lock` keeps a second
run from writing into the same folder.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO, Iterator

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
TEMP_PREFIX = ".pneumomap-"
TEMP_SUFFIX = ".tmp"


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def encode_png(array, bits: int = 8) -> bytes:
    """A 2-D uint8 (or uint16 with bits=16) array as greyscale PNG bytes.

    zlib's run-length strategy: on opacity maps and masks as small as the default deflate and
    faster (benchmarks/RESULTS.md, "Figures behind design choices").
    """
    import io
    import zlib

    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    dtype = np.uint8 if bits == 8 else np.uint16
    if array.dtype != dtype:
        raise TypeError(f"encode_png expects {dtype.__name__}, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_type=zlib.Z_RLE)
    return buffer.getvalue()


def write_png(path: str | os.PathLike, array, bits: int = 8) -> bytes:
    """Write `encode_png` of ``array`` to ``path``, atomically; returns the bytes written."""
    try:
        data = encode_png(array, bits)
    except TypeError as exc:
        raise TypeError(f"{path}: {exc}") from None
    atomic_write_bytes(path, data)
    return data


def _writer_alive(name: str) -> bool:
    """Whether the process that wrote the temporary file ``name`` may still be writing it."""
    try:
        host, pid = name[len(TEMP_PREFIX):].split("-")[:2]
        pid_number = int(pid)
    except ValueError:
        return False
    if host != _HOST:
        return True  # another machine's writer (a shared folder): not ours to judge
    if pid_number == os.getpid():
        return False  # this process calls it only when its own writers are done
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files `atomic_open` left below ``folder`` when its process was killed
    mid-write: only pneumomap's own (``.pneumomap-*.tmp``), and only those of writers no longer alive."""
    removed = 0
    for path in Path(folder).rglob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if _writer_alive(path.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


class FolderLockedError(RuntimeError):
    """Another process holds the lock of a folder (the message names it)."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``path`` (released when the process ends, even killed);
    raise `FolderLockedError` naming the holder (pid, host, start, command) when another process has it."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderLockedError(f"{what} is being written by another pneumomap run ({holder}; lock file "
                                    f"{path}); wait for it to end, or write elsewhere") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.datetime.now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)[:300]}))
        handle.flush()
        yield
    finally:
        handle.close()
