"""Decode radiographs and print, per file, their metadata, the corrected image's min/max/mean and
the SHA-1 of the corrected pixel array (float32, little-endian, C order), or why it cannot be read.

Run it on a test set before a long run to see whether every file decodes. The exit status is 1
when any file could not be read, 2 when there is nothing to read (no such file or folder, no
image in it), 0 otherwise.

examples:
  pneumomap inspect scans/                 one line per file
  pneumomap inspect scans/ --json > a.jsonl  one JSON object per line
  pneumomap inspect image.dcm
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

import numpy as np

from pneumomap.stages.reader import Radiograph, UnreadableImageError, list_images, map_images

KEYS = ("path", "id", "height", "width", "photometric", "bits_stored", "transfer_syntax", "modality",
        "body_part", "view_position", "min", "max", "mean", "sha1", "flags", "error")
PROGRESS_MIN_FILES = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="FILE|DIR|LIST",
                        help="an image file, a folder (searched recursively) or a .txt list of paths")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    from pneumomap.cli import add_quiet_argument, add_workers_argument

    add_workers_argument(parser, 2, "decoding worker processes (default 2)")
    add_quiet_argument(parser)


def main(args: argparse.Namespace) -> int:
    try:
        paths = list_images(args.source)
    except UnreadableImageError as exc:
        _emit(_error_record(exc), args.json)
        print(f"pneumomap inspect: error: {exc}", file=sys.stderr)
        return 2  # nothing to inspect: unusable input
    failures = 0
    for record in _progress(map_images(summarize, paths, n_jobs=args.workers), len(paths), args.quiet):
        failures += record["error"] is not None
        _emit(record, args.json)
    if failures:
        print(f"{failures} of {len(paths)} files could not be read", file=sys.stderr)
    return 1 if failures else 0


def summarize(item: Radiograph | UnreadableImageError) -> dict[str, Any]:
    """The inspect record of one read (runs in the worker, so only the small record travels back)."""
    if isinstance(item, UnreadableImageError):
        return _error_record(item)
    meta, pixels = item.meta, item.pixels
    return {
        "path": meta.path, "id": meta.image_id, "height": meta.height, "width": meta.width,
        "photometric": meta.photometric, "bits_stored": meta.bits_stored,
        "transfer_syntax": meta.transfer_syntax, "modality": meta.modality, "body_part": meta.body_part,
        "view_position": meta.view_position,
        "min": float(pixels.min()), "max": float(pixels.max()), "mean": float(pixels.mean(dtype=np.float64)),
        "sha1": pixel_sha1(pixels), "flags": list(meta.flags), "error": None,
    }


def pixel_sha1(pixels: np.ndarray) -> str:
    """SHA-1 of the corrected pixels as float32 little-endian C-order bytes."""
    return hashlib.sha1(np.ascontiguousarray(pixels, dtype="<f4").tobytes()).hexdigest()


def _error_record(error: UnreadableImageError) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(KEYS)
    record.update(path=error.path, flags=[], error=error.reason)
    return record


def _emit(record: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(record) if as_json else _text_line(record), flush=True)


def _text_line(r: dict[str, Any]) -> str:
    if r["error"] is not None:
        return f"{r['path']}  ERROR  {r['error']}"
    tags = "/".join(str(r[k] or "-") for k in ("modality", "body_part", "view_position"))
    flags = f"  flags: {'; '.join(r['flags'])}" if r["flags"] else ""
    return (f"{r['path']}  {r['height']}x{r['width']}  {r['photometric']}  {r['bits_stored']}-bit  "
            f"{r['transfer_syntax'] or 'image file'}  {tags}  "
            f"min={r['min']:g} max={r['max']:g} mean={r['mean']:.2f}  sha1={r['sha1'][:12]}{flags}")


def _progress(records, total: int, disabled: bool):
    if disabled or total < PROGRESS_MIN_FILES:
        return records
    from tqdm import tqdm

    return tqdm(records, total=total, desc="inspect", unit="file", file=sys.stderr)
