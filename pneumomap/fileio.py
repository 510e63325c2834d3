"""Atomic file writing: a reader never sees a half-written file, a killed run leaves none."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    2-5x faster (1024 px map with one opacity: 7.9 -> 3.5 ms, 23.9 -> 23.7 kB).
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


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files `atomic_open` leaves behind when its process is killed mid-write
    (``.NAME.XXXXXXXX.tmp``) anywhere below ``folder``; call it only when no writer is active."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
