"""Run a pipeline over a list of images in batches: the engine behind ``pneumomap infer``.

Per chunk of ``batch_size`` images (input order) the nodes run in topological order: a
model node once over the images that need it (those whose stored output is missing and,
for ``when: GATE`` nodes, that the gate passed), an op once per image. Decoding (and the
whole-image resize/normalise) runs ahead in worker processes (`decode_ahead`: at most two
batches ahead, so memory stays flat however long the input list), overlapping the networks.
Each classifier/regressor encoder runs once per image: its features feed its own head and
every mapper that decodes it (a mapper only recomputes them when its source's output came
from the store). CUDA: fp16 AMP + channels_last; CPU: channels_last, float32 (bf16 when asked:
two images at once then, `device.cpu_streams`), decoding in the main process between the
networks (`device.decode_workers`). Nothing per image outlives its chunk except its
`writers.Record` (the few formatted cells of the final tables).

Python API::

    summary = run(pipeline, inputs, out, RunOptions(...))      # what `pneumomap infer` calls
    outputs = load_outputs(pipeline, work, inputs, options)    # stored model outputs of a run
    values = postprocess(pipeline.with_thresholds(t), outputs[i])   # ops only, no network
    map8 = values[pipeline.outputs.map]; p = values[pipeline.outputs.probability]

A tuner runs ``run(..., RunOptions(ungated=True))`` once (gated nodes computed for every image,
outputs unchanged) and then `postprocess` as often as it likes. Sharding, parts and merging:
`pneumomap.infer.shard`. Where the files go: `pneumomap.submission` (``RunOptions.format``: the
MIDRC organisers' flat folder, or pneumomap's own layout; the run's own files in ``work``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pneumomap import submission
from pneumomap.infer import artifacts as art
from pneumomap.infer import shard as sharding
from pneumomap.infer import writers
from pneumomap.infer.ops import OPS, Lungs
from pneumomap.fileio import write_png
from pneumomap.infer.spec import IMAGE, Node, Pipeline, load

if TYPE_CHECKING:  # torch is imported where it is used: the decode workers import this module without it
    import torch

MISSING = object()  # a gated model output that was never computed


class RunError(RuntimeError):
    """A problem found before any image is processed (checkpoint, inputs, output folder)."""


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


@dataclass
class ImageSize:
    height: int
    width: int


@dataclass
class Item:
    index: int
    path: str
    image_id: str
    signature: str


@dataclass
class _State:
    """One image during a run."""

    item: Item
    values: dict[str, Any] = field(default_factory=dict)
    radiograph: Any = None
    inputs: dict[tuple, np.ndarray] = field(default_factory=dict)
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    failure: str | None = None


# ----------------------------------------------------------------------------- post-processing


def evaluate_op(node: Node, values: dict[str, Any]) -> Any:
    """One op node on one image's values."""
    return OPS[node.type].fn(*(values[i] for i in node.inputs), **node.params)


def postprocess(pipeline: Pipeline, stored: dict[str, Any]) -> dict[str, Any]:
    """Every node's value for one image from its stored model outputs (see `load_outputs`): no network.

    Gated model nodes are None where their gate is negative; a positive image whose gated
    output was never computed raises KeyError (run once with ``RunOptions(ungated=True)``).
    """
    values = {IMAGE: stored[IMAGE]}
    for node in pipeline.nodes.values():
        if not node.is_model:
            values[node.name] = evaluate_op(node, values)
        elif node.when is not None and not values[node.when]:
            values[node.name] = None
        elif stored.get(node.name, MISSING) is MISSING:
            raise KeyError(f"{stored.get('image_id', '?')}: no stored output of '{node.name}' (its gate was negative "
                           "when the networks ran); run the pipeline with RunOptions(ungated=True) first")
        else:
            values[node.name] = stored[node.name]
    return values


SCALAR_OUTPUTS = ("probability", "extent")  # model outputs that are one number per image


@dataclass(frozen=True)
class Deferred:
    """A stored model map not read yet (``load_outputs(lazy=True)``): `load` gives the node's value."""

    store: art.ArtifactStore
    folder: str
    image_id: str
    signature: str
    node: Node
    lung_thresholds: dict

    def load(self) -> Any:
        array = self.store.load(self.folder, self.image_id, self.signature)
        if array is None:
            raise RunError(f"{self.image_id}: the stored output {self.store.root / self.folder} changed or vanished "
                           "while in use; run again")
        return _value(self.node, array, self.lung_thresholds)


def load_outputs(pipeline: Pipeline, work: str | Path, inputs: str | Path | list,
                 options: RunOptions | None = None, lazy: bool = False) -> list[dict[str, Any]]:
    """The stored model outputs of a run whose work folder is ``work`` (its ``--out`` in pneumomap's
    layout), one dict per input image (input order).

    Keys: each model node (value, or MISSING when never computed), ``image`` (`ImageSize`),
    ``image_id``. Images without stored outputs (unreadable, or not run yet) are left out.
    ``options``: the run's device and precision (those outputs are looked up). ``lazy``: maps stay on
    disk as `Deferred` (their file checked, not decoded), scalars are read: memory independent of the maps.
    """
    from pneumomap.device import resolve_device

    options = options or RunOptions()
    store = art.ArtifactStore(Path(work) / art.ARTIFACTS)
    keys = art.node_keys(pipeline, run_precision(resolve_device(options.device), options.precision))
    thresholds = _lung_thresholds(pipeline)
    result = []
    for item in list_items(inputs):
        meta = store.load_json(art.META, item.image_id, item.signature)
        if meta is None:
            continue
        stored: dict[str, Any] = {IMAGE: ImageSize(meta["height"], meta["width"]), "image_id": item.image_id}
        for node in pipeline.model_nodes:
            folder = art.model_folder(node.name, keys[node.name])
            if lazy and node.output not in SCALAR_OUTPUTS:
                found = store.signature_of(folder, item.image_id) == item.signature
                stored[node.name] = (Deferred(store, folder, item.image_id, item.signature, node, thresholds)
                                     if found else MISSING)
                continue
            array = store.load(folder, item.image_id, item.signature)
            stored[node.name] = MISSING if array is None else _value(node, array, thresholds)
        if all(stored[n.name] is not MISSING for n in pipeline.model_nodes if n.when is None):
            result.append(stored)
    return result


def _value(node: Node, stored: np.ndarray, lung_thresholds: dict[str, float]) -> Any:
    """A node's value from its stored array (lungs: the split of the stored probabilities)."""
    value = art.dequantize(stored)
    if node.type == "lungs":
        from pneumomap.stages import lung_geometry

        return Lungs(lung_geometry.split_lungs(value, lung_thresholds[node.name]))
    return value


def run_precision(device: torch.device, precision: str) -> str:
    """`device.inference_precision`, its refusal as a `RunError`."""
    from pneumomap.device import inference_precision

    try:
        return inference_precision(device, precision)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def _lung_thresholds(pipeline: Pipeline) -> dict[str, float]:
    from pneumomap.stages.base import read_config

    return {n.name: read_config(n.checkpoint)[1].threshold for n in pipeline.model_nodes if n.type == "lungs"}


# ----------------------------------------------------------------------------- inputs


def list_items(inputs: str | Path | list) -> list[Item]:
    """The input images (a folder, a list file or a list of paths) with ids; ids must be unique."""
    from pneumomap.stages.reader import UnreadableImageError, list_images

    try:
        paths = list_images(inputs) if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    except UnreadableImageError as exc:
        raise RunError(f"--input: {exc}") from None
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise RunError(f"--input: two images have the id '{path.stem}' (the file stem): {seen[path.stem]} and "
                           f"{path}; ids must be unique, rename one")
        seen[path.stem] = path
    return [Item(i, str(p), p.stem, art.source_signature(p)) for i, p in enumerate(paths)]


def _prepare(image: Any, sizes: tuple[tuple[int, int], ...]) -> tuple[Any, dict]:
    """Worker side: the decoded image plus its whole-image model inputs."""
    from pneumomap.stages.preprocess import to_model_input
    from pneumomap.stages.reader import UnreadableImageError

    if isinstance(image, UnreadableImageError):
        return image, {}
    try:
        return image, {("whole", s): to_model_input(image.pixels, s) for s in sizes}
    except Exception as exc:  # e.g. pixels no model can take: isolate the image, like a read error
        return UnreadableImageError(image.meta.path, f"preprocessing: {type(exc).__name__}: {exc}"), {}


def decode_ahead(paths: list[str], sizes: tuple[tuple[int, int], ...], workers: int, ahead: int
                 ) -> Iterator[tuple[Any, dict]]:
    """Each image (or its error) with its whole-image model inputs, in input order, decoded in
    ``workers`` processes with at most ``ahead`` images in flight (`reader.map_images`)."""
    from pneumomap.stages.reader import map_images

    return map_images(functools.partial(_prepare, sizes=sizes), paths, n_jobs=workers, ahead=ahead)


# ----------------------------------------------------------------------------- models


def load_models(pipeline: Pipeline, names: set[str], device: torch.device) -> dict[str, Any]:
    """Load the stages of ``names`` (and the encoders their mappers decode); errors before any image."""
    from pneumomap.device import for_inference
    from pneumomap.stages.base import load_stage

    wanted = _with_sources(pipeline, names)
    models: dict[str, Any] = {}
    encoder_hashes: dict[str, str] = {}  # source node -> encoder_sha256 of its member-0 encoder
    for node in pipeline.model_nodes:
        if node.name not in wanted:
            continue
        try:
            stage = load_stage(node.checkpoint)
        except Exception as exc:  # missing/corrupt files, wrong format: all fatal, before any image
            raise RunError(f"nodes.{node.name}.checkpoint: cannot load {node.checkpoint}: {exc}") from None
        if stage.kind != node.type:
            raise RunError(f"nodes.{node.name}.checkpoint: {node.checkpoint} holds a {stage.kind!r} stage, "
                           f"the node says stage: {node.type}")
        if node.type == "regressor" and stage.config.side != node.params["side"]:
            raise RunError(f"nodes.{node.name}: params.side is {node.params['side']!r} but the checkpoint "
                           f"{node.checkpoint} is the {stage.config.side!r} regressor")
        if node.type == "classifier":
            try:  # the class taken as the node's probability from a multi-class head
                stage.class_index(node.params.get("positive"))
            except ValueError as exc:
                raise RunError(f"nodes.{node.name}.params.positive: {exc} ({node.checkpoint})") from None
        if node.type == "mapper":
            _attach_mapper(pipeline, node, stage, models[node.inputs[0]], encoder_hashes)
        models[node.name] = for_inference(stage, device)
    from pneumomap.stages.inference import optimize_for_inference

    for name in models:  # after every mapper has attached to the eager encoder it decodes
        optimize_for_inference(models[name], device)
    return models


def _attach_mapper(pipeline: Pipeline, node: Node, mapper: Any, source: Any, encoder_hashes: dict[str, str]) -> None:
    """Attach a mapper node's stage to its source's encoder: refused (`RunError` naming both checkpoints
    and the fix) unless it is the encoder the decoder was trained on or the node has
    ``params: {allow_other_encoder: true}`` (then one warning)."""
    import warnings

    from pneumomap.stages.mapper import EncoderMismatchError, encoder_sha256

    name = node.inputs[0]
    source_checkpoint = pipeline.nodes[name].checkpoint
    if name not in encoder_hashes:
        encoder_hashes[name] = encoder_sha256(source.encoder)
    allow = bool(node.params.get("allow_other_encoder", False))
    try:
        same = mapper.attach_encoder(source, allow_other_encoder=allow, source_sha256=encoder_hashes[name])
    except EncoderMismatchError as exc:
        stage = "mapper_whole" if mapper.config.source == "classifier" else f"mapper_{mapper.config.side}"
        raise RunError(
            f"nodes.{node.name}: the mapper {node.checkpoint} was trained on another encoder than the one of "
            f"'{name}' ({source_checkpoint}): {exc}. Its decoder would read features it never saw (the "
            f"'{name}' stage was retrained?). Retrain the mapper on this encoder (`pneumomap train {stage} "
            f"--data DATA --out RUN --set encoder_from={source_checkpoint}`) and point the node at RUN, point "
            f"nodes.{name} at the checkpoint the mapper was trained with, or set `params: {{allow_other_encoder: "
            f"true}}` on nodes.{node.name} to decode it anyway") from None
    except ValueError as exc:
        raise RunError(f"nodes.{node.name}: cannot decode the encoder of '{name}': {exc}") from None
    if not same:
        warnings.warn(f"nodes.{node.name}: the mapper {node.checkpoint} decodes the encoder of '{name}' "
                      f"({source_checkpoint}, sha256 {encoder_hashes[name][:12]}), not the one its decoder was trained "
                      f"on (sha256 {mapper.trained_encoder_sha256()[:12]}): allowed by params.allow_other_encoder",
                      UserWarning, stacklevel=3)


def _with_sources(pipeline: Pipeline, names: set[str]) -> set[str]:
    """``names`` plus the nodes whose encoders their mappers decode: the stages a run loads."""
    return set(names) | {pipeline.nodes[n].inputs[0] for n in names if pipeline.nodes[n].type == "mapper"}


def whole_image_sizes(pipeline: Pipeline, names: set[str]) -> tuple[tuple[int, int], ...]:
    """The whole-image input sizes of the lungs/classifier stages a run loads for ``names``, read
    from their checkpoints' configs (so that decoding can start before the models load)."""
    from pneumomap.stages.base import read_config

    sizes = set()
    for name in _with_sources(pipeline, names):
        node = pipeline.nodes[name]
        if node.type in ("lungs", "classifier"):
            try:
                sizes.add(tuple(read_config(node.checkpoint)[1].input_size))
            except Exception:  # load_models reports it, with the node's name
                continue
    return tuple(sorted(sizes))


# ----------------------------------------------------------------------------- the run


class _Runner:
    def __init__(self, pipeline: Pipeline, layout: submission.Layout, options: RunOptions, device: torch.device):
        self.pipeline, self.layout, self.options, self.device = pipeline, layout, options, device
        self.store = art.ArtifactStore(layout.work / art.ARTIFACTS if options.artifacts else None)
        self.keys = art.node_keys(pipeline, options.precision)
        self.post = art.post_folder(art.post_key(pipeline, self.keys))
        self.lung_thresholds = _lung_thresholds(pipeline)
        self.models: dict[str, Any] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.computed: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()  # the counters, when images run in several threads (`streams`)
        self.sources = {n.inputs[0] for n in pipeline.model_nodes if n.type == "mapper"}
        self.whole_sizes: tuple = ()
        self.saved_inputs: tuple[str, str] | None = None  # (map node, lungs node) whose values are saved
        if options.save_probabilities:
            try:
                self.saved_inputs = writers.probability_inputs(pipeline)
            except ValueError as exc:
                raise RunError(f"--save-probabilities: {exc}") from None

    def folder(self, node: Node) -> str:
        return art.model_folder(node.name, self.keys[node.name])

    # -- planning

    def finished(self, item: Item) -> writers.Record | None:
        """The image's record when its map file is the one this configuration's post-processing wrote
        (its hash is in the stored record: a map from another run's thresholds is post-processed again)."""
        data = self.store.load_json(self.post, item.image_id, item.signature)
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
        return f"{self.post}:{item.signature}"

    def plan(self, items: list[Item]) -> tuple[list[Item], set[str]]:
        """(images to decode ahead, model nodes that may have to run)."""
        decode, needed = [], set()
        gated = {n.name for n in self.pipeline.model_nodes if n.when and not self.options.ungated}
        for item in items:
            # outputs stored for another version of the input file (its size and mtime in the meta record
            # differ) are all missing: this one runs every node again
            stale = self.store.load_json(art.META, item.image_id, item.signature) is None
            missing = {n.name for n in self.pipeline.model_nodes
                       if stale or not self.store.has(self.folder(n), item.image_id)}
            needed |= missing
            if missing - gated:
                decode.append(item)
        return decode, needed

    # -- one chunk

    def process(self, states: list[_State]) -> None:
        for st in states:  # the image size: set when decoded (`accept`), else from the store
            if IMAGE in st.values or st.failure is not None:
                continue
            meta = self.store.load_json(art.META, st.item.image_id, st.item.signature)
            if meta is None:  # no stored size (gated outputs stored, meta lost): decode it
                self.ensure_image(st)
            else:
                st.values[IMAGE] = ImageSize(int(meta["height"]), int(meta["width"]))
        for node in self.pipeline.nodes.values():
            start = time.perf_counter()
            live = [st for st in states if st.failure is None]
            if node.is_model:
                self.run_model(node, live)
            else:
                for st in live:
                    try:
                        st.values[node.name] = evaluate_op(node, st.values)
                    except Exception as exc:  # isolate: one bad image does not stop the run
                        st.failure = f"{node.name}: {type(exc).__name__}: {exc}"
            self.count(node.name, seconds=time.perf_counter() - start)

    def count(self, name: str, seconds: float = 0.0, images: int = 0) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.computed[name] += images

    def ensure_image(self, st: _State) -> None:
        """Decode an image that was not decoded ahead (gate flipped since the outputs were stored)."""
        from pneumomap.stages.reader import read_or_error

        if st.radiograph is None and st.failure is None:
            self.accept(st, *_prepare(read_or_error(st.item.path), self.whole_sizes))

    def accept(self, st: _State, image: Any, inputs: dict) -> None:
        from pneumomap.stages.reader import UnreadableImageError

        if isinstance(image, UnreadableImageError):
            st.failure = image.reason
            return
        st.radiograph, st.inputs = image, dict(inputs)
        st.values[IMAGE] = ImageSize(image.meta.height, image.meta.width)
        self.store.save_json(art.META, st.item.image_id, {"height": image.meta.height, "width": image.meta.width,
                                                          "source": st.item.signature})

    def run_model(self, node: Node, states: list[_State]) -> None:
        need = []
        for st in states:
            gated_out = node.when is not None and not st.values[node.when]
            if gated_out and not self.options.ungated:
                st.values[node.name] = None
                continue
            stored = self.store.load(self.folder(node), st.item.image_id, st.item.signature)
            if stored is None:
                need.append(st)
            else:
                st.values[node.name] = None if gated_out else _value(node, stored, self.lung_thresholds)
        for st in need:
            self.ensure_image(st)
        need = [st for st in need if st.failure is None]
        if not need:
            return
        outputs = self.compute(node, need)
        for st, output in zip(need, outputs):
            if not np.isfinite(output).all():  # never a NaN in a CSV or a map
                st.failure = f"{node.name}: the network's output is not finite (NaN or infinite)"
                continue
            stored = art.quantize(output)
            self.store.save(self.folder(node), st.item.image_id, st.item.signature, stored)
            gated_out = node.when is not None and not st.values[node.when]
            st.values[node.name] = None if gated_out else _value(node, stored, self.lung_thresholds)
        self.count(node.name, images=len(need))

    def model_input(self, node: Node, st: _State) -> np.ndarray:
        """The (h, w) input of a classifier/regressor/lungs node (a mapper uses its source's)."""
        stage = self.models[node.name]
        size = tuple(stage.input_size)
        if node.type != "regressor":
            key = ("whole", size)
            if key not in st.inputs:
                from pneumomap.stages.preprocess import to_model_input

                st.inputs[key] = to_model_input(st.radiograph.pixels, size)
            return st.inputs[key]
        lungs_node = node.inputs[1]
        key = ("crop", lungs_node, size, node.params["side"])
        if key not in st.inputs:
            from pneumomap.stages.lungs import lung_half_inputs

            halves = lung_half_inputs(st.radiograph.pixels, st.values[lungs_node].split, size)
            for side, (array, _box) in halves.items():
                st.inputs[("crop", lungs_node, size, side)] = array
        return st.inputs[key]

    def compute(self, node: Node, states: list[_State]) -> list[np.ndarray]:
        """``node``'s outputs for ``states``, in network calls of `device.forward_batch` images."""
        import torch

        from pneumomap.device import autocast, forward_batch, images_to_device

        source = self.pipeline.nodes[node.inputs[0]] if node.type == "mapper" else node
        x = images_to_device([self.model_input(source, st) for st in states], self.device)
        step = forward_batch(self.device, self.options.batch_size)
        outputs: list[np.ndarray] = []
        with torch.inference_mode(), autocast(self.device, precision=self.options.precision):
            for lo in range(0, len(states), step):
                out = self.forward(node, source, states[lo:lo + step], x[lo:lo + step])
                outputs.extend(out.float().cpu().numpy())
        return outputs

    def forward(self, node: Node, source: Node, states: list[_State], x: torch.Tensor) -> torch.Tensor:
        """One network call: lung probabilities, a mapper's map or a classifier/regressor's scores."""
        stage = self.models[node.name]
        if node.type == "lungs":
            return stage.predict(x)[:, 0]
        if node.type == "mapper":
            return stage.predict(x, self.features(source, states, x))[:, 0]
        features = stage.encode(x)
        if node.name in self.sources:
            for i, st in enumerate(states):
                st.features[node.name] = [f[i] for f in features]
        if node.type == "classifier":  # a multi-class head: p of the node's params.positive class
            return stage.probability_of(stage.predict(x, features), node.params.get("positive"))
        return stage.predict(x, features)

    def features(self, source: Node, states: list[_State], x: torch.Tensor) -> list[torch.Tensor]:
        """The source encoder's features of ``states`` (computed now for those that have none)."""
        import torch

        todo = [i for i, st in enumerate(states) if source.name not in st.features]
        if todo:
            fresh = self.models[source.name].encode(x[todo])
            for j, i in enumerate(todo):
                states[i].features[source.name] = [f[j] for f in fresh]
        levels = zip(*(st.features[source.name] for st in states))
        # torch.stack returns NCHW: back to channels_last, the layout of the decoder's weights
        return [torch.stack(level).contiguous(memory_format=torch.channels_last) if level[0].dim() == 3
                else torch.stack(level) for level in levels]

    # -- results

    def take(self, states: list[_State], decoded: Iterator, ahead: set[int]) -> None:
        """Give ``states`` their decoded images, those that were decoded ahead (in input order)."""
        start = time.perf_counter()
        for st in states:
            if st.item.index in ahead:
                self.accept(st, *next(decoded))
        self.count("read", seconds=time.perf_counter() - start)

    def finish(self, st: _State) -> writers.Record:
        """Write the image's map and return its record (timed as 'write')."""
        start = time.perf_counter()
        try:
            return self._finish(st)
        finally:
            self.count("write", seconds=time.perf_counter() - start)

    def _finish(self, st: _State) -> writers.Record:
        item = st.item
        saved = writers.probability_path(self.layout.work, item.image_id)
        if st.failure is not None:
            if self.saved_inputs:
                saved.unlink(missing_ok=True)  # an earlier run's file is not this run's result
            floor = self.pipeline.nodes[self.pipeline.outputs.map].params.get("outside", 1)
            write_png(self.layout.map_path(item.image_id), writers.fallback_map(item.path, floor))
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
        self.store.save_json(self.post, item.image_id, {"record": vars(record), "source": item.signature,
                                                        "map_sha256": hashlib.sha256(png).hexdigest()})
        return record


def _run_chunks(runner: _Runner, todo: list[Item], decoded: Iterator, ahead: set[int],
                records: dict[int, writers.Record], bar: Any, batch_size: int) -> None:
    """Chunks of ``batch_size`` images, each node over the chunk in turn (batched network calls)."""
    for chunk in _chunks(todo, batch_size):
        states = [_State(item) for item in chunk]
        runner.take(states, decoded, ahead)
        runner.process(states)
        for st in states:
            records[st.item.index] = runner.finish(st)
        bar.update(len(states))


def _run_streams(runner: _Runner, todo: list[Item], decoded: Iterator, ahead: set[int],
                 records: dict[int, writers.Record], bar: Any, streams: int) -> None:
    """``streams`` images at a time, each in its own thread through every node, torch's threads
    shared out among them; images are decoded in this thread meanwhile (`device.cpu_streams`).
    The seconds per node then add up the streams' times."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def one(st: _State) -> writers.Record:
        runner.process([st])
        return runner.finish(st)

    pending: collections.deque = collections.deque()

    def collect() -> None:
        index, future = pending.popleft()
        records[index] = future.result()
        bar.update(1)

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))
    try:
        with ThreadPoolExecutor(streams, thread_name_prefix="pneumomap-stream") as pool:
            for item in todo:
                st = _State(item)
                runner.take([st], decoded, ahead)
                pending.append((item.index, pool.submit(one, st)))
                while len(pending) > streams:  # the streams busy, one image decoded and waiting
                    collect()
            while pending:
                collect()
    finally:
        torch.set_num_threads(threads)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


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
    from pneumomap import provenance
    from pneumomap.device import cpu_streams, decode_workers, resolve_device

    index, count = shard
    items = all_items[index::count]
    device = resolve_device(options.device)
    options = replace(options, precision=run_precision(device, options.precision))
    workers = decode_workers(device, options.workers)
    streams = cpu_streams(device, options.precision, options.streams)
    runner = _Runner(pipeline, layout, options, device)
    started = time.perf_counter()

    records: dict[int, writers.Record] = {}
    todo = []
    for item in items:
        record = runner.finished(item)
        if record is None:
            todo.append(item)
        else:
            records[item.index] = record
    if todo:  # the tables are written anew at the end: until then none may stand beside newer maps
        layout.remove_tables()
    decode, needed = runner.plan(todo)
    runner.whole_sizes = whole_image_sizes(pipeline, needed)
    batch_size = max(1, options.batch_size)
    # decode ahead: the chunk being computed plus the next one (bounded, see decode_ahead); the
    # workers start now and decode the first images while the models load
    decoded = decode_ahead([i.path for i in decode], runner.whole_sizes, workers, ahead=2 * batch_size + workers)
    ahead = {item.index for item in decode}
    try:
        runner.models = load_models(pipeline, needed, device)
    except BaseException:
        decoded.close()  # nothing more to decode
        raise
    setup = time.perf_counter() - started  # listing, hashing checkpoints, planning, loading models
    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(records), unit="img", desc="infer", disable=not options.progress,
               dynamic_ncols=True)
    with contextlib.closing(bar), contextlib.closing(decoded):
        if streams > 1:
            _run_streams(runner, todo, decoded, ahead, records, bar, streams)
        else:
            _run_chunks(runner, todo, decoded, ahead, records, bar, batch_size)
    elapsed = time.perf_counter() - started
    from pneumomap.stages.inference import trace_seconds

    part = {
        "images": len(items),
        "failures": sum(1 for r in records.values() if r.failure),
        "seconds": {k: round(v, 4) for k, v in runner.seconds.items()},
        "computed": {n.name: runner.computed.get(n.name, 0) for n in pipeline.model_nodes},
        "wall_seconds": round(elapsed, 4),
        "setup_seconds": round(setup, 4),
        "trace_seconds": round(sum(trace_seconds(m) for m in runner.models.values()), 4),
        "device": str(device),
        "precision": options.precision,
        "workers": workers,
        "streams": streams,
        "provenance": provenance.build(pipeline, device=device, precision=options.precision),
    }
    return sharding.finish(pipeline, layout, all_items, (index, count), records, part, merge=options.merge,
                           description=description)
