"""Run a pipeline over a list of images in batches: what ``pneumomap infer`` calls.

Per chunk of ``batch_size`` images (input order) the nodes run in topological order: a
model node once over the images that need it (those whose stored output is missing and,
for ``when: GATE`` nodes, that the gate passed), an op once per image. Decoding (and the
whole-image resize/normalise) runs ahead in worker processes, at most two batches ahead, so
memory stays flat however long the input list, overlapping the networks. Each
classifier/regressor encoder runs once per image: its features feed its own head and every
mapper that decodes it (a mapper only recomputes them when its source's output came from the
store). CUDA: fp16 AMP + channels_last; CPU: channels_last, float32 (bf16 when asked: two images
at once then, `device.cpu_streams`), decoding in the main process between the networks
(`device.decode_workers`). Nothing per image outlives its chunk except its `writers.Record`
(the few formatted cells of the final tables).

Python API::

    summary = run(pipeline, inputs, out, RunOptions(...))      # what `pneumomap infer` calls
    outputs = load_outputs(pipeline, work, inputs, options)    # stored model outputs of a run
    values = postprocess(pipeline.with_thresholds(t), outputs[i])   # ops only, no network
    map8 = values[pipeline.outputs.map]; p = values[pipeline.outputs.probability]

A tuner runs ``run(..., RunOptions(ungated=True))`` once (gated nodes computed for every image,
outputs unchanged) and then `postprocess` as often as it likes. Sharding, parts and merging:
`pneumomap.infer.shard`. Where the files go: `pneumomap.submission` (``RunOptions.format``: the
MIDRC organisers' flat folder, or pneumomap's own layout; the run's own files in ``work``).

The parts, one concern each: `pneumomap.infer.inputs` (listing, decoding ahead, model inputs),
`pneumomap.infer.models` (loading and calling the networks), `pneumomap.infer.stored` (stored
outputs, `load_outputs`, `postprocess`), `pneumomap.infer.engine` (the loop over images, shared
with ``pneumomap stage``). Here: the options, the pipeline's job, each image's files and `run`.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumomap import submission
from pneumomap.fileio import write_png
from pneumomap.infer import artifacts as art
from pneumomap.infer import shard as sharding
from pneumomap.infer import writers
from pneumomap.infer.engine import ImageState, Tally, run_images
from pneumomap.infer.inputs import ImageSize, Item, RunError, decode_ahead, decode_now, list_items
from pneumomap.infer.models import (Executor, decodes_source, encoder_call, load_models, node_call, run_precision,
                                    whole_image_sizes)
from pneumomap.infer.ops import LungRegions
from pneumomap.infer.spec import IMAGE, Node, Pipeline, load
from pneumomap.infer.stored import (MISSING, SCALAR_OUTPUTS, Deferred, RunStore, evaluate_op,
                                    load_outputs, postprocess)

# the API of a run, here or from the parts (their names stay importable from here)
__all__ = ["run", "RunOptions", "RunError", "check_output", "load_outputs", "postprocess", "evaluate_op", "Deferred",
           "MISSING", "SCALAR_OUTPUTS", "Item", "ImageSize", "list_items", "decode_ahead", "load_models",
           "whole_image_sizes", "run_precision"]

if TYPE_CHECKING:  # torch is imported where it is used
    import torch


@dataclass
class RunOptions:
    device: str = "auto"
    batch_size: int = 8  # images per chunk (and per network call on CUDA; one at a time on the CPU)
    workers: int | None = None  # decode processes; None: `device.decode_workers` (4 beside a GPU, 0 on the CPU)
    precision: str = "auto"  # auto | fp32 | fp16 | bf16: `device.inference_precision`
    streams: int | None = None  # CPU: images computed at once in threads; None: `device.cpu_streams`
    shard: tuple[int, int] | None = None  # (index, count); None: from torchrun's RANK/WORLD_SIZE or (0, 1)
    artifacts: bool = True  # keep per-image model outputs under OUT/.artifacts (resume, re-runs)
    ungated: bool = False  # compute gated model nodes for every image too (for tuning); outputs unchanged
    progress: bool = True
    merge: bool = True  # merge the parts into the submission when all are present
    format: str = "pneumomap"  # output layout, `pneumomap.submission.FORMATS` (the CLI's default is midrc)
    work: Path | None = None  # the run's own files (artifacts, parts, tables); None: the layout's default
    description: Path | None = None  # midrc: the algorithm description file copied into the output folder
    save_probabilities: bool = False  # WORK/probabilities/<id>.npz per image, for ensembles (`writers` module doc)

    def layout(self, out: str | Path) -> submission.Layout:
        return submission.make_layout(self.format, out, self.work)


# ----------------------------------------------------------------------------- each image's files


class ImageFiles:
    """What an image leaves behind: its map PNG, its record (stored, with the map's hash: a resumed run
    skips the image) and, with ``save_probabilities``, its float map before clipping."""

    def __init__(self, pipeline: Pipeline, layout: submission.Layout, store: RunStore,
                 save_probabilities: bool) -> None:
        self.pipeline, self.layout, self.store = pipeline, layout, store
        self.saved_inputs: tuple[str, str] | None = None  # (map node, lungs node) whose values are saved
        if save_probabilities:
            try:
                self.saved_inputs = writers.probability_inputs(pipeline)
            except ValueError as exc:
                raise RunError(f"--save-probabilities: {exc}") from None

    def finished(self, item: Item) -> writers.Record | None:
        """The image's record when its map file is the one this configuration's post-processing wrote
        (its hash is in the stored record: a map from another run's thresholds is post-processed again)."""
        data = self.store.record(item)
        if data is None or "map_sha256" not in data:
            return None
        try:
            written = hashlib.sha256(self.layout.map_path(item.image_id).read_bytes()).hexdigest()
        except OSError:
            return None
        if written != data["map_sha256"]:
            return None
        record = writers.Record(**data["record"])
        if self.saved_inputs and record.failure is None and writers.saved_key(
                writers.probability_path(self.layout.work, item.image_id)) != self.saved_key(item):
            return None  # done, but its probabilities were not saved by this configuration: post-process again
        return record

    def saved_key(self, item: Item) -> str:
        """What a saved-probabilities file was made from: this configuration's post-processing and the input."""
        return f"{self.store.post}:{item.signature}"

    def write(self, st: ImageState) -> writers.Record:
        """Write the image's map (an unreadable image's: the pipeline's floor value) and return its record."""
        item = st.item
        saved = writers.probability_path(self.layout.work, item.image_id)
        if st.failure is not None:
            if self.saved_inputs:
                saved.unlink(missing_ok=True)  # an earlier run's file is not this run's result
            write_png(self.layout.map_path(item.image_id), writers.fallback_map(item.path, self.pipeline.floor))
            return writers.failure_record(item.image_id, item.path, st.failure)
        outputs = self.pipeline.outputs
        map8 = st.values[outputs.map]
        if self.saved_inputs:
            full, lungs = (st.values[name] for name in self.saved_inputs)
            writers.save_probabilities(saved, full, lungs.mask_at(full.shape), float(st.values[outputs.probability]),
                                       item.path, self.saved_key(item))
        png = write_png(self.layout.map_path(item.image_id), map8)
        record = writers.make_record(item.image_id, item.path, st.values[outputs.probability],
                                     {c: st.values[n] for c, n in outputs.decisions.items()}, map8, outputs.rsna)
        self.store.save_record(item, {"record": vars(record), "map_sha256": hashlib.sha256(png).hexdigest()})
        return record


# ----------------------------------------------------------------------------- the pipeline's job


class PipelineJob:
    """A pipeline's nodes over a chunk of images (`engine.Job`): each model node once over the images that
    need it (stored outputs reused, gated-out images skipped), each op per image, one image's error
    isolated to it."""

    def __init__(self, pipeline: Pipeline, store: RunStore, files: ImageFiles, models: dict[str, Any],
                 executor: Executor, whole_sizes: tuple[tuple[int, int], ...], ungated: bool, tally: Tally) -> None:
        self.pipeline, self.store, self.files, self.models = pipeline, store, files, models
        self.executor, self.whole_sizes, self.ungated, self.tally = executor, whole_sizes, ungated, tally
        self.source_of = {n.name: n.inputs[0] for n in pipeline.model_nodes if decodes_source(n)}  # mapper -> source
        self.sources = set(self.source_of.values())

    def accept(self, st: ImageState, image: Any, ready: dict) -> None:
        if st.accept(image, ready):
            self.store.save_size(st.item, st.size)

    def decode(self, st: ImageState) -> None:
        """Decode an image that was not decoded ahead (its gate flipped since the outputs were stored)."""
        if st.inputs is None and st.failure is None:
            self.accept(st, *decode_now(st.item.path, self.whole_sizes))

    def process(self, states: list[ImageState]) -> None:
        for st in states:  # the image size: set when decoded (`accept`), else from the store
            if IMAGE in st.values or st.failure is not None:
                continue
            size = self.store.size(st.item)
            if size is None:  # no stored size (gated outputs stored, meta lost): decode it
                self.decode(st)
            else:
                st.values[IMAGE] = size
        for node in self.pipeline.nodes.values():
            with self.tally.timed(node.name):
                live = [st for st in states if st.failure is None]
                if node.is_model:
                    self.run_model(node, live)
                    continue
                for st in live:
                    try:
                        st.values[node.name] = evaluate_op(node, st.values)
                    except Exception as exc:  # isolate: one bad image does not stop the run
                        st.failure = f"{node.name}: {type(exc).__name__}: {exc}"

    def run_model(self, node: Node, states: list[ImageState]) -> None:
        """``node``'s value for ``states``: stored, computed (and stored), or None where the gate is negative."""
        need = []
        for st in states:
            gated_out = node.when is not None and not st.values[node.when]
            if gated_out and not self.ungated:
                st.values[node.name] = None
                continue
            value = self.store.value(node, st.item)
            if value is MISSING:
                need.append(st)
            else:
                st.values[node.name] = None if gated_out else value
        for st in need:
            self.decode(st)
        need = [st for st in need if st.failure is None]
        if not need:
            return
        outputs, features = self.compute(node, need)
        for i, (st, output) in enumerate(zip(need, outputs)):
            if features:  # this node's encoder features, for the mappers that decode it
                st.features[node.name] = features[i]
            if not np.isfinite(output).all():  # never a NaN in a CSV or a map
                st.failure = f"{node.name}: the network's output is not finite (NaN or infinite)"
                continue
            value = self.store.save(node, st.item, output)
            gated_out = node.when is not None and not st.values[node.when]
            st.values[node.name] = None if gated_out else value
        self.tally.count(node.name, images=len(need))

    def compute(self, node: Node, states: list[ImageState]) -> tuple[list[np.ndarray], list[list[torch.Tensor]]]:
        """``node``'s outputs for ``states`` and, when a mapper decodes its encoder, each image's features.

        A mapper decodes its source's features: those the source computed in this chunk, else computed
        now from the source's input (its output came from the store)."""
        stage = self.models[node.name]
        source = self.source_of.get(node.name)
        if source is None:
            inputs = [self.model_input(node, st) for st in states]
            return self.executor(node_call(stage, node, encodes=node.name in self.sources), inputs)
        inputs = [self.model_input(self.pipeline.nodes[source], st) for st in states]
        features = [st.features.get(source) for st in states]
        todo = [i for i, f in enumerate(features) if f is None]
        if todo:
            _, fresh = self.executor(encoder_call(self.models[source]), [inputs[i] for i in todo])
            for i, made in zip(todo, fresh):
                features[i] = made
        return self.executor(node_call(stage, node, encodes=False), inputs, features)

    def model_input(self, node: Node, st: ImageState) -> np.ndarray:
        """The input of a model node's network for one image: the whole image, or its lung-half crop by the
        split of the node's lungs input (a mapper takes its source's: see `compute`)."""
        stage = self.models[node.name]
        if not stage.on_lung_half:
            return st.inputs.whole(stage.input_size)
        lungs = next(name for name in node.inputs if isinstance(st.values.get(name), LungRegions))
        return st.inputs.half(st.values[lungs].split, lungs, stage.side, stage.input_size)[0]

    def finish(self, st: ImageState) -> writers.Record:
        """Write the image's files and return its record (timed as 'write')."""
        with self.tally.timed("write"):
            return self.files.write(st)




# ----------------------------------------------------------------------------- the run


def check_output(layout: submission.Layout, items: list[Item], description: Path | None = None,
                 inputs: str | Path | list | None = None) -> None:
    """Fail early when the output or work folder cannot be written, lies in the input folder, or when
    the output folder holds files a scorer would take for part of this submission (the organisers
    pair PNGs by sorted order)."""
    from pneumomap.fileio import atomic_write_text

    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
        source = Path(inputs).resolve()
        for flag, folder in (("--out", layout.out), ("--work", layout.work)):
            target = folder.resolve()
            if target == source or source in target.parents:
                raise RunError(f"{flag} {folder}: is inside the input folder {inputs}; its maps would be read as "
                               "inputs by the next run: write outside it")

    for flag, folder in (("--out", layout.out), ("--work", layout.work)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".pneumomap-write-test"
            atomic_write_text(probe, "ok")
            probe.unlink()
        except OSError as exc:
            raise RunError(f"{flag} {folder}: cannot write there: {exc.strerror or exc}") from None
    if layout.scorer_folder and layout.work.resolve() == layout.out.resolve():
        raise RunError(f"--work {layout.work}: the {layout.name} layout keeps the run's own files out of --out (the "
                       "scorer's folder holds the maps, the CSV and the description only); name another folder")
    stray = layout.stray_files((i.image_id for i in items), description.name if description is not None else None)
    if stray:
        shown = ", ".join(p.name for p in stray[:5]) + (f" ... ({len(stray)} in all)" if len(stray) > 5 else "")
        raise RunError(f"--out {layout.out}: holds files that are not part of this run's submission: {shown}; the "
                       "organisers' scorer would read them (it pairs the PNGs with its reference maps by sorted "
                       "order, and accepts one description file): remove them or write to an empty folder")


def run(pipeline: Pipeline | str | Path, inputs: str | Path | list, out: str | Path,
        options: RunOptions | None = None) -> dict[str, Any]:
    """Run the pipeline over ``inputs`` into ``out``; return the run summary (see module doc).

    Raises `RunError` (or `PipelineError`) before any image is processed when the pipeline,
    a checkpoint, the inputs or the output folder is unusable, or another run writes there.
    """
    from pneumomap.fileio import FolderLockedError, exclusive_lock

    options = options or RunOptions()
    pipeline = load(pipeline) if not isinstance(pipeline, Pipeline) else pipeline
    try:
        layout = options.layout(out)
        description = submission.check_description(options.description) if options.description else None
    except (ValueError, FileNotFoundError) as exc:
        raise RunError(str(exc)) from None
    if description is not None and not layout.scorer_folder:
        raise RunError(f"--description: the {layout.name} layout holds no algorithm description (--format midrc does)")
    all_items = list_items(inputs)
    check_output(layout, all_items, description, inputs)
    index, count = options.shard or sharding.from_environment()
    with contextlib.ExitStack() as stack:  # one writer per shard: a second run is refused, not interleaved
        try:
            stack.enter_context(exclusive_lock(layout.work / f".pneumomap-{index}-of-{count}.lock",
                                               f"--work {layout.work}"))
        except FolderLockedError as exc:
            raise RunError(str(exc)) from None
        return _run_shard(pipeline, layout, options, all_items, (index, count), description)


def _run_shard(pipeline: Pipeline, layout: submission.Layout, options: RunOptions, all_items: list[Item],
               shard: tuple[int, int], description: Path | None) -> dict[str, Any]:
    """`run` once the inputs are listed, the folders checked and locked."""
    from tqdm import tqdm

    from pneumomap import provenance
    from pneumomap.device import cpu_streams, decode_workers, resolve_device
    from pneumomap.stages.inference import trace_seconds

    index, count = shard
    items = all_items[index::count]
    device = resolve_device(options.device)
    options = replace(options, precision=run_precision(device, options.precision))
    workers = decode_workers(device, options.workers)
    streams = cpu_streams(device, options.precision, options.streams)
    store = RunStore(pipeline, layout.work / art.ARTIFACTS if options.artifacts else None, options.precision)
    files = ImageFiles(pipeline, layout, store, options.save_probabilities)
    started = time.perf_counter()

    records: dict[int, writers.Record] = {}
    todo = []
    for item in items:
        record = files.finished(item)
        if record is None:
            todo.append(item)
        else:
            records[item.index] = record
    if todo:  # the tables are written anew at the end: until then none may stand beside newer maps
        layout.remove_tables()
    decode, needed = store.missing(todo, options.ungated)
    sizes = whole_image_sizes(pipeline, needed)
    batch_size = max(1, options.batch_size)
    # decode ahead: the chunk being computed plus the next one (bounded, see decode_ahead); the
    # workers start now and decode the first images while the models load
    decoded = decode_ahead([i.path for i in decode], sizes, workers, ahead=2 * batch_size + workers)
    try:
        models = load_models(pipeline, needed, device)
    except BaseException:
        decoded.close()  # nothing more to decode
        raise
    tally = Tally()
    job = PipelineJob(pipeline, store, files, models, Executor(device, options.precision, options.batch_size),
                      sizes, options.ungated, tally)
    setup = time.perf_counter() - started  # listing, hashing checkpoints, planning, loading models

    bar = tqdm(total=len(items), initial=len(records), unit="img", desc="infer", disable=not options.progress,
               dynamic_ncols=True)
    with contextlib.closing(bar), contextlib.closing(decoded):
        run_images(job, todo, decoded, {item.index for item in decode}, records, bar, tally, batch_size, streams)
    elapsed = time.perf_counter() - started
    part = {
        "images": len(items),
        "failures": sum(1 for r in records.values() if r.failure),
        "seconds": {k: round(v, 4) for k, v in tally.seconds.items()},
        "computed": {n.name: tally.computed.get(n.name, 0) for n in pipeline.model_nodes},
        "wall_seconds": round(elapsed, 4),
        "setup_seconds": round(setup, 4),
        "trace_seconds": round(sum(trace_seconds(m) for m in models.values()), 4),
        "device": str(device),
        "precision": options.precision,
        "workers": workers,
        "streams": streams,
        "provenance": provenance.build(pipeline, device=device, precision=options.precision),
    }
    return sharding.finish(pipeline, layout, all_items, (index, count), records, part, merge=options.merge,
                           description=description)
