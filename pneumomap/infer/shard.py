"""Sharded runs: which images a process takes, its part file, and merging the parts.

Shard ``i`` of ``n`` takes the inputs ``items[i::n]`` (input order; deterministic). It writes
its maps into the output folder (where the layout puts them, `pneumomap.submission`) and its rows
into ``WORK/.parts/<run>/part-<i>-of-<n>.json``, where
``<run>`` hashes the pipeline's post key (models, ops, thresholds, outputs) and the input list,
so parts of another configuration are never mixed in. Merging orders all rows by input
position and writes the tables, run_summary.json (in WORK) and, for the midrc layout, copies the
description file into OUT: the result is identical to a single-process run (shard 0 of 1).

Who merges:
- ``torchrun --nproc_per_node N -m pneumomap.cli infer ...``: the shard is (RANK, WORLD_SIZE);
  after its part, each rank waits at a gloo barrier and rank 0 merges.
- ``pneumomap infer ... --shard i/n`` (job arrays): every shard merges automatically if, when it
  ends, all n parts are present; so the last one to finish writes the submission. If that
  is not possible (say, a shard was rerun on another day), ``pneumomap infer ... --merge``
  with the same --pipeline/--input/--out and ``--shard i/n`` of any part merges the parts alone.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from pneumomap.fileio import atomic_write_bytes, atomic_write_text, remove_temporaries
from pneumomap.infer import artifacts as art
from pneumomap.infer import writers
from pneumomap.infer.spec import Pipeline
from pneumomap.submission import Layout

PARTS = ".parts"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def from_environment() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", 1)) > 1 and "RANK" in os.environ


def run_folder(pipeline: Pipeline, work: Path, items: list) -> Path:
    key = art.post_key(pipeline, art.node_keys(pipeline))
    ids = hashlib.sha256("\n".join(f"{i.image_id}\t{i.path}" for i in items).encode()).hexdigest()[:12]
    return Path(work) / PARTS / f"{key}-{ids}"


def part_path(folder: Path, shard: tuple[int, int]) -> Path:
    return folder / f"part-{shard[0]}-of-{shard[1]}.json"


def _barrier() -> None:
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=timedelta(days=1))
    dist.barrier()
    if created:
        dist.destroy_process_group()


def finish(pipeline: Pipeline, layout: Layout, items: list, shard: tuple[int, int],
           records: dict[int, writers.Record], part: dict[str, Any], merge: bool = True,
           description: Path | None = None) -> dict[str, Any]:
    """Write this shard's part; merge when it is this process's turn (see module doc).

    Returns the merged summary when merged here, else this part's summary.
    """
    folder = run_folder(pipeline, layout.work, items)
    body = {"shard": list(shard), "summary": part,
            "records": [[i, vars(records[i])] for i in sorted(records)]}
    atomic_write_text(part_path(folder, shard), json.dumps(body, sort_keys=True))
    if under_torchrun():
        _barrier()
        if shard[0] != 0:
            return {**part, "merged": False}
    if merge and all(part_path(folder, (i, shard[1])).is_file() for i in range(shard[1])):
        return merge_parts(pipeline, layout, items, shard[1], description)
    return {**part, "merged": False}


def merge_parts(pipeline: Pipeline, layout: Layout, items: list, count: int,
                description: Path | None = None) -> dict[str, Any]:
    """Merge the ``count`` parts of this run into the submission files; return the summary."""
    folder = run_folder(pipeline, layout.work, items)
    missing = [str(part_path(folder, (i, count))) for i in range(count) if not part_path(folder, (i, count)).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot merge: missing part(s) {', '.join(missing)}; run those shards first")
    parts = [json.loads(part_path(folder, (i, count)).read_text(encoding="utf-8")) for i in range(count)]
    records = {int(i): writers.Record(**r) for p in parts for i, r in p["records"]}
    if len(records) != len(items):
        raise ValueError(f"cannot merge: the parts hold {len(records)} of {len(items)} images")
    ordered = [records[i] for i in range(len(items))]
    for path in {layout.out, layout.work}:  # every writer of this run is done: drop what a killed run left
        remove_temporaries(path)
    layout.write_tables(ordered, rsna=pipeline.outputs.rsna is not None)
    if description is not None:
        atomic_write_bytes(layout.out / description.name, description.read_bytes())
    summary = summarize(pipeline, [p["summary"] for p in parts], ordered)
    summary.update({"format": layout.name, "out": str(layout.out.resolve()), "work": str(layout.work.resolve()),
                    "description": description.name if description is not None else None})
    atomic_write_text(layout.work / "run_summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def summarize(pipeline: Pipeline, parts: list[dict], records: list[writers.Record]) -> dict[str, Any]:
    """The run summary: images, failures, seconds per node, images per second, thresholds."""
    seconds: dict[str, float] = {}
    computed: dict[str, int] = {}
    for p in parts:
        for k, v in p["seconds"].items():
            seconds[k] = round(seconds.get(k, 0.0) + v, 4)
        for k, v in p["computed"].items():
            computed[k] = computed.get(k, 0) + v
    wall = max(p["wall_seconds"] for p in parts)
    gates = [n for n in pipeline.op_nodes if n.kind == "gate"]
    return {
        "images": len(records),
        "failures": sum(1 for r in records if r.failure),
        "seconds": seconds,
        "computed": computed,
        "wall_seconds": wall,
        "setup_seconds": max(p.get("setup_seconds", 0.0) for p in parts),
        "trace_seconds": max(p.get("trace_seconds", 0.0) for p in parts),
        "images_per_second": round(len(records) / wall, 3) if wall > 0 else None,
        "threshold": gates[0].params["threshold"] if gates else None,
        "thresholds": pipeline.thresholds,
        "shards": len(parts),
        "device": parts[0].get("device"),
        "precision": parts[0].get("precision"),
        "workers": parts[0].get("workers"),
        "streams": parts[0].get("streams"),
        "provenance": parts[0].get("provenance"),  # `pneumomap.provenance`: what produced the run
        "merged": True,
    }
