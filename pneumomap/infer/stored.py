"""A run's stored model outputs, and the post-processing over them that needs no network.

`RunStore` is one configuration's view of the artifact store (`pneumomap.infer.artifacts`) of a work
folder: each model node's per-image outputs under its key, each image's size, the finished records.
`load_outputs` reads a finished run's outputs back (what `pneumomap tune` searches over) and
`postprocess` computes every node's value of one image from them, ops only::

    outputs = load_outputs(pipeline, work, inputs, options)        # stored model outputs of a run
    values = postprocess(pipeline.with_thresholds(t), outputs[i])   # ops only, no network
    map8 = values[pipeline.outputs.map]; p = values[pipeline.outputs.probability]

A node's value continues from its stored (quantized) output, also right after computing it, so a
resumed or sharded run gives byte-identical files (`artifacts` module doc).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumomap.infer import artifacts as art
from pneumomap.infer.inputs import ImageSize, Item, RunError, list_items
from pneumomap.infer.ops import OPS, LungRegions
from pneumomap.infer.spec import IMAGE, Node, Pipeline

if TYPE_CHECKING:
    from pneumomap.infer.runner import RunOptions

MISSING = object()  # a gated model output that was never computed
SCALAR_OUTPUTS = ("probability", "extent")  # model outputs that are one number per image


def evaluate_op(node: Node, values: dict[str, Any]) -> Any:
    """One op node on one image's values."""
    return OPS[node.kind].fn(*(values[i] for i in node.inputs), **node.params)


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


def lung_thresholds(pipeline: Pipeline) -> dict[str, float]:
    """Lung node name -> its checkpoint's probability threshold (stored probabilities -> the lung split)."""
    from pneumomap.stages.base import read_config

    return {n.name: read_config(n.checkpoint)[1].threshold for n in pipeline.model_nodes if n.output == "lungs"}


def node_value(node: Node, stored: np.ndarray, thresholds: dict[str, float]) -> Any:
    """A node's value from its stored array (a lung node: the split of the stored probabilities)."""
    value = art.dequantize(stored)
    if node.output == "lungs":
        from pneumomap.stages import lung_geometry

        return LungRegions(lung_geometry.split_lungs(value, thresholds[node.name]))
    return value


class RunStore:
    """The stored outputs of one configuration (``pipeline`` at ``precision``) in the artifact folder
    ``root`` (None: keep nothing): per model node and image its output, per image its size (``meta``),
    and the records of finished images (the post-processing's folder, `post`)."""

    def __init__(self, pipeline: Pipeline, root: Path | None, precision: str) -> None:
        self.pipeline = pipeline
        self.artifacts = art.ArtifactStore(root)
        self.keys = art.node_keys(pipeline, precision)
        self.post = art.post_folder(art.post_key(pipeline, self.keys))
        self.thresholds = lung_thresholds(pipeline)

    def folder(self, node: Node) -> str:
        return art.model_folder(node.name, self.keys[node.name])

    def size(self, item: Item) -> ImageSize | None:
        """The image's size as stored when it was decoded (None: not stored, or another version of the file)."""
        meta = self.artifacts.load_json(art.META, item.image_id, item.signature)
        return None if meta is None else ImageSize(int(meta["height"]), int(meta["width"]))

    def save_size(self, item: Item, size: ImageSize) -> None:
        self.artifacts.save_json(art.META, item.image_id, {"height": size.height, "width": size.width,
                                                           "source": item.signature})

    def value(self, node: Node, item: Item) -> Any:
        """The node's stored value for the image, or MISSING."""
        array = self.artifacts.load(self.folder(node), item.image_id, item.signature)
        return MISSING if array is None else node_value(node, array, self.thresholds)

    def save(self, node: Node, item: Item, output: np.ndarray) -> Any:
        """Store a computed output; the value the pipeline continues with (that of the stored form)."""
        stored = art.quantize(output)
        self.artifacts.save(self.folder(node), item.image_id, item.signature, stored)
        return node_value(node, stored, self.thresholds)

    def deferred(self, node: Node, item: Item) -> Any:
        """A `Deferred` of the node's stored map (its file's signature checked, not decoded), or MISSING."""
        found = self.artifacts.signature_of(self.folder(node), item.image_id) == item.signature
        return Deferred(self, node, item) if found else MISSING

    def missing(self, items: list[Item], ungated: bool) -> tuple[list[Item], set[str]]:
        """(the images that must be decoded, the model nodes that may have to run) for ``items``: the
        nodes without a stored output; an image is decoded unless only gated nodes miss (``ungated``:
        gated nodes count like the others)."""
        decode, needed = [], set()
        model_nodes = self.pipeline.model_nodes
        gated = {n.name for n in model_nodes if n.when and not ungated}
        for item in items:
            # outputs stored for another version of the input file (its size and mtime in the meta record
            # differ) are all missing: this one runs every node again
            stale = self.size(item) is None
            missing = {n.name for n in model_nodes
                       if stale or not self.artifacts.has(self.folder(n), item.image_id)}
            needed |= missing
            if missing - gated:
                decode.append(item)
        return decode, needed

    def record(self, item: Item) -> dict | None:
        """The image's stored finished record (this post-processing's), or None."""
        return self.artifacts.load_json(self.post, item.image_id, item.signature)

    def save_record(self, item: Item, data: dict) -> None:
        self.artifacts.save_json(self.post, item.image_id, {**data, "source": item.signature})


@dataclass(frozen=True)
class Deferred:
    """A stored model map not read yet (``load_outputs(lazy=True)``): `load` gives the node's value."""

    store: RunStore
    node: Node
    item: Item

    def load(self) -> Any:
        value = self.store.value(self.node, self.item)
        if value is MISSING:
            where = self.store.artifacts.root / self.store.folder(self.node)
            raise RunError(f"{self.item.image_id}: the stored output {where} changed or vanished while in use; run again")
        return value


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
    from pneumomap.infer.models import run_precision

    device, precision = ("auto", "auto") if options is None else (options.device, options.precision)
    store = RunStore(pipeline, Path(work) / art.ARTIFACTS, run_precision(resolve_device(device), precision))
    result = []
    for item in list_items(inputs):
        size = store.size(item)
        if size is None:
            continue
        stored: dict[str, Any] = {IMAGE: size, "image_id": item.image_id}
        for node in pipeline.model_nodes:
            lazily = lazy and node.output not in SCALAR_OUTPUTS
            stored[node.name] = store.deferred(node, item) if lazily else store.value(node, item)
        if all(stored[n.name] is not MISSING for n in pipeline.model_nodes if n.when is None):
            result.append(stored)
    return result
