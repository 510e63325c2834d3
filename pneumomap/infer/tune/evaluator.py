"""The map metric of many threshold candidates over stored model outputs: what `pneumomap tune` searches with.

`Evaluator.losses_of(candidates)` answers one question thousands of times: the per-image map metric of the
pipeline's own op chain at each thresholds block, exactly as `pneumomap score` computes it from the written
PNGs. What keeps it fast and its memory bounded at RSNA's size (5,000 validation images of 1024 px):

- **Image-major sweeps.** A sweep walks the images once and, for each, every candidate. Model maps stay on
  disk (`runner.load_outputs(lazy=True)`) and are read only when a candidate needs a map not known yet,
  into a small LRU; the reference codes likewise.
- **Memos by key.** Every op value is known by a key (`keys`): its name, the parameters it reads
  (`ops.NodeDef.used_params`) and its inputs' keys. Scalars (gate, choice, level) are computed eagerly, so
  a candidate that changes nothing for an image costs a dictionary look-up; a map that the gate left out
  stays None whatever the parameters (`ops.NodeDef.gives_none`), so a negative image's final map has one
  key for every candidate but the clip values; each final map's loss is kept per image by key (a few
  numbers per image, whatever the map size).
- **Histograms for the final op.** When the output op declares ``summary``/``counts`` (`ops.clip`), its
  input is summarised once as per-reference-code byte counts over the lung pixels (`ops.clip_summary`, with
  what it needs of the image prepared once, `ops.clip_context`), and each candidate's loss
  is `metrics.MapMetric.loss_of_counts` of `ops.clip_counts`: the very counts of the clipped map, so the very
  number, for 1,500 additions instead of two passes over a million pixels. Summaries (6 kB) and contexts
  (packed bits) are kept in their own caches; maps at the original size are not kept at all, so a later
  sweep finds an image's summaries and working-frame maps instead of recomputing its truth and its maps.
- **Images in parallel.** `parallel.ParallelEvaluator` forks worker processes that each own every k-th
  image and its memos for the whole search; the parent sends candidates and gathers per-image losses chunk
  by chunk.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.infer.ops import OPS
from pneumomap.infer.runner import Deferred, evaluate_op
from pneumomap.infer.spec import IMAGE, Node, Pipeline
from pneumomap.infer.tune.keys import Known, KeyTable, ModelOutput

SCALAR_TYPES = ("bool", "choice", "level", "probability", "extent")
DEFAULT_BUDGET = 1 << 30  # bytes of memoised maps and loaded model outputs, all workers together
# maps at the original image size are not kept: each is one candidate's own, and what the search reads
# again of it is its summary (`summaries`); keeping them would push out the working-frame maps they grow from
ORIGINAL_SIZE_TYPES = ("fullmap", "map8")
CHUNK = 16  # images per message between the parent and a worker (the progress bar's step)

Progress = Callable[[int], None]  # called with a number of images just evaluated (for every candidate)


class LRU:
    """Values by key, least recently used dropped beyond ``budget`` bytes."""

    def __init__(self, budget: int):
        self.items: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.budget, self.size = budget, 0

    def get(self, key: Any) -> Any:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        if key in self.items:
            self.size -= self.sizes[key]
        self.items[key], self.sizes[key] = value, _nbytes(value)
        self.size += self.sizes[key]
        while self.size > self.budget and len(self.items) > 1:
            old, _ = self.items.popitem(last=False)
            self.size -= self.sizes.pop(old)


def _nbytes(value: Any) -> int:
    """Memory of a memoised value: an array's bytes (a tuple's: its arrays'), a `LungRegions` by its masks."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    split = getattr(value, "split", None)
    mask = getattr(split, "mask", None)
    return 4 * mask.size if isinstance(mask, np.ndarray) else 1024


def params_keys(pipeline: Pipeline) -> dict[str, Any]:
    """Per op node, a hashable form of its parameters; for an op whose input selects its parameters
    (`ops.NodeDef.selected_by`), one form per selectable entry."""
    keys: dict[str, Any] = {}
    for node in pipeline.op_nodes:
        if OPS[node.kind].selected_by is None:
            keys[node.name] = json.dumps(node.params, sort_keys=True)
        else:
            keys[node.name] = {name: json.dumps(value, sort_keys=True) for name, value in node.params.items()}
    return keys


class BaseEvaluator:
    """The questions tune asks, in terms of `losses_of` (per-image losses of candidate thresholds)."""

    pipeline: Pipeline
    evaluations: int = 0

    @property
    def n_images(self) -> int:
        raise NotImplementedError

    def losses_of(self, candidates: Sequence[dict], indices: Sequence[int] | None = None,
                  progress: Progress | None = None) -> np.ndarray:
        """(candidates, images) per-image metric of each thresholds block over ``indices`` (default all)."""
        raise NotImplementedError

    def metrics_of(self, candidates: Sequence[dict], indices: Sequence[int] | None = None,
                   progress: Progress | None = None) -> list[float]:
        """The mean metric of each candidate over ``indices`` (what `pneumomap score` reports)."""
        self.evaluations += len(candidates)
        return [float(row.mean()) for row in self.losses_of(candidates, indices, progress)]

    def metric(self, thresholds: dict, indices: Sequence[int] | None = None) -> float:
        return self.metrics_of([thresholds], indices)[0]

    def losses(self, thresholds: dict, indices: Sequence[int] | None = None) -> np.ndarray:
        return self.losses_of([thresholds], indices)[0]

    def close(self) -> None:
        """Stop any worker processes."""

    def __enter__(self) -> "BaseEvaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class _Step:
    """One node of a candidate pipeline, with what its key needs precomputed."""

    node: Node
    definition: Any  # ops.NodeDef (None for a model node)
    params: Any  # params_keys' entry
    inputs: tuple[str, ...]
    is_model: bool
    gate: str | None
    scalar: bool


class _Plan:
    """A candidate pipeline prepared for key computation (once per candidate, not per image)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        own = params_keys(pipeline)
        self.steps = [_Step(n, None if n.is_model else OPS[n.kind], own.get(n.name), tuple(n.inputs), n.is_model,
                            n.when, n.output in SCALAR_TYPES) for n in pipeline.nodes.values()]
        self.final = pipeline.nodes[pipeline.outputs.map]
        self.final_definition = None if self.final.is_model else OPS[self.final.kind]


class Evaluator(BaseEvaluator):
    """One process's evaluation of ``stored`` (`runner.load_outputs`, maps may be `runner.Deferred`).

    Values are memoised by key id (`keys.KeyTable`: `keys.Known`, `keys.ModelOutput`, `keys.ImageKey`,
    `keys.OpKey`), so hashing one is cheap.
    """

    def __init__(self, pipeline: Pipeline, stored: list[dict], truth: Callable[[int], np.ndarray],
                 metric: metrics.MapMetric, budget: int = DEFAULT_BUDGET):
        """``truth(i)``: the reference codes of image ``i`` (`metrics.reference_codes`) at its size."""
        self.pipeline, self.stored, self.truth_of, self.map_metric = pipeline, stored, truth, metric
        self.memo: list[dict[int, Any]] = [{} for _ in stored]  # per image: scalar op values by key id
        self.losses_memo: list[dict[int, float]] = [{} for _ in stored]  # per image: loss by final key id
        self.arrays = LRU(budget * 3 // 8)  # (image, key id) -> op maps in the working frame
        self.loaded = LRU(budget // 4)  # (image, node) -> model maps read from disk
        self.codes = LRU(budget // 16)  # image -> reference codes
        self.contexts = LRU(budget * 3 // 16)  # (image, ...) -> the final op's per-image context (`ops.clip_context`)
        self.summaries = LRU(budget // 8)  # (image, input key ids) -> the final op's summary (a few kB)
        self.table = KeyTable()

    @property
    def n_images(self) -> int:
        return len(self.stored)

    def losses_of(self, candidates, indices=None, progress=None) -> np.ndarray:
        plans = [_Plan(self.pipeline.with_thresholds(t)) for t in candidates]
        chosen = list(range(self.n_images) if indices is None else indices)
        out = np.empty((len(plans), len(chosen)))
        for column, i in enumerate(chosen):
            for row, plan in enumerate(plans):
                out[row, column] = self.loss(plan, i)
            if progress is not None and (column + 1) % CHUNK == 0:
                progress(CHUNK)
        if progress is not None and len(chosen) % CHUNK:
            progress(len(chosen) % CHUNK)
        return out

    def loss(self, plan: _Plan, i: int) -> float:
        """Image ``i``'s map metric under the plan's pipeline (memoised by the final map's key)."""
        keys = self.keys(plan, i)
        final = plan.final
        key = keys[final.name]
        memo = self.losses_memo[i]
        if key not in memo:
            definition = plan.final_definition
            if definition is not None and definition.counts is not None:
                summary = self._summary(plan, i, keys, final)
                memo[key] = self.map_metric.loss_of_counts(definition.counts(summary, **final.params))
            else:
                memo[key] = self.map_metric.loss(self.value(plan, i, keys, final.name), self.codes_of(i))
        return memo[key]

    def final_map(self, thresholds: dict, i: int) -> np.ndarray:
        """The output map of image ``i`` (what `runner.postprocess` gives)."""
        plan = _Plan(self.pipeline.with_thresholds(thresholds))
        return self.value(plan, i, self.keys(plan, i), plan.final.name)

    def codes_of(self, i: int) -> np.ndarray:
        codes = self.codes.get(i)
        if codes is None:
            codes = self.truth_of(i)
            self.codes.put(i, codes)
        return codes

    def _summary(self, plan: _Plan, i: int, keys: dict[str, int], node: Node) -> np.ndarray:
        """The final op's summary of its inputs: its first input the map, the others fixed per image."""
        cache_key = (i,) + tuple(keys[s] for s in node.inputs)
        summary = self.summaries.get(cache_key)
        if summary is None:
            definition = OPS[node.kind]
            prob_map = self.value(plan, i, keys, self._summarised(plan, keys, node))
            context_key = (i, "context", prob_map.shape) + tuple(keys[s] for s in node.inputs[1:])
            context = self.contexts.get(context_key)
            if context is None:
                others = [self.value(plan, i, keys, s) for s in node.inputs[1:]]
                context = definition.context(prob_map.shape, *others, self.codes_of(i))
                self.contexts.put(context_key, context)
            summary = definition.summary(prob_map, context)
            self.summaries.put(cache_key, summary)
        return summary

    @staticmethod
    def _summarised(plan: _Plan, keys: dict[str, int], node: Node) -> str:
        """The node whose map the final op's summary reads: its map input, or further up past ops that change
        only pixels outside the same lungs (`ops.NodeDef.keeps_lung_pixels`: mask), pixels the summary never reads
        (`ops.NodeDef.summary_lungs`); the values read, so the summary, are the same, for one pass less."""
        definition = OPS[node.kind]
        name = node.inputs[0]
        if definition.summary_lungs is None:
            return name
        lungs = keys[node.inputs[[r.name for r in definition.inputs].index(definition.summary_lungs)]]
        while not (source := plan.pipeline.nodes[name]).is_model:
            keeps = OPS[source.kind].keeps_lung_pixels
            roles = [r.name for r in OPS[source.kind].inputs]
            if keeps is None or keys[source.inputs[roles.index(keeps[1])]] != lungs:
                break
            name = source.inputs[roles.index(keeps[0])]
        return name

    def keys(self, plan: _Plan, i: int) -> dict[str, int]:
        """Node name -> key id for image ``i`` (scalar ops computed on the way)."""
        memo, table = self.memo[i], self.table
        meaning = table.meaning
        keys: dict[str, int] = {IMAGE: table.image}
        for step in plan.steps:
            name = step.node.name
            if step.is_model:
                gated = step.gate is not None and not meaning[keys[step.gate]].value  # a gate's key is Known
                keys[name] = table.none if gated else table.model(name)
                continue
            inputs = tuple(keys[s] for s in step.inputs)
            known = [m.value if type(m := meaning[k]) is Known else k for k in inputs]  # scalar values, else key ids
            definition = step.definition
            if definition.none_if_all_none and definition.gives_none(known):
                keys[name] = table.none
                continue
            own = step.params if definition.selected_by is None else definition.used_params(step.params, known)
            key = table.op(name, own, inputs)
            if step.scalar:
                if key not in memo:
                    memo[key] = evaluate_op(step.node, {s: self.value(plan, i, keys, s) for s in step.inputs})
                key = table.known(memo[key])
            keys[name] = key
        return keys

    def value(self, plan: _Plan, i: int, keys: dict[str, int], name: str) -> Any:
        key = keys[name]
        meaning = self.table.meaning[key]
        kind = type(meaning)
        if kind is Known:
            return meaning.value
        if key == self.table.image:
            return self.stored[i][IMAGE]
        if kind is ModelOutput:
            return self._model_value(i, name)
        hit = self.arrays.get((i, key))
        if hit is not None:
            return hit
        node = plan.pipeline.nodes[name]
        result = evaluate_op(node, {s: self.value(plan, i, keys, s) for s in node.inputs})
        if node.output not in ORIGINAL_SIZE_TYPES:
            self.arrays.put((i, key), result)
        return result

    def _model_value(self, i: int, name: str) -> Any:
        value = self.stored[i][name]
        if not isinstance(value, Deferred):
            return value
        hit = self.loaded.get((i, name))
        if hit is None:
            hit = value.load()
            self.loaded.put((i, name), hit)
        return hit
