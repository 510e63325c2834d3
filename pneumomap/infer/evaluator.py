"""The map metric of many threshold candidates over stored model outputs: what `pneumomap tune` searches with.

`Evaluator.losses_of(candidates)` answers one question thousands of times: the per-image map metric of the
pipeline's own op chain at each thresholds block, exactly as `pneumomap score` computes it from the written
PNGs. What keeps it fast and its memory bounded at RSNA's size (5,000 validation images of 1024 px):

- **Image-major sweeps.** A sweep walks the images once and, for each, every candidate. Model maps stay on
  disk (`runner.load_outputs(lazy=True)`) and are read only when a candidate needs a map not known yet,
  into a small LRU; the reference codes likewise.
- **Memos by key.** Every op value is known by a key: its name, the parameters it reads
  (`ops.NodeDef.used_params`) and its inputs' keys. Scalars (gate, choice, level) are computed eagerly, so
  a candidate that changes nothing for an image costs a dictionary look-up; each final map's loss is kept
  per image by key (a few numbers per image, whatever the map size).
- **Histograms for the final op.** When the output op declares ``summary``/``counts`` (`ops.clip`), its
  input is summarised once as per-reference-code byte counts (`ops.clip_summary`), and each candidate's loss
  is `metrics.MapMetric.loss_of_counts` of `ops.clip_counts`: the very counts of the clipped map, so the very
  number, for 1,500 additions instead of two passes over a million pixels.
- **Images in parallel.** `ParallelEvaluator` forks worker processes that each own every k-th image and its
  memos for the whole search; the parent sends candidates and gathers per-image losses chunk by chunk.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from pneumomap import metrics
from pneumomap.infer.ops import OPS
from pneumomap.infer.runner import Deferred, evaluate_op
from pneumomap.infer.spec import IMAGE, Pipeline

SCALAR_TYPES = ("bool", "choice", "level", "probability", "extent")
DEFAULT_BUDGET = 1 << 30  # bytes of memoised maps and loaded model outputs, all workers together
CHUNK = 16  # images per message between the parent and a worker (the progress bar's step)

Progress = Callable[[int], None]  # called with a number of images just evaluated (for every candidate)


class EvaluationError(RuntimeError):
    """A worker failed while evaluating; the message holds its traceback."""


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
    """Memory of a memoised value: an array's bytes, a `Lungs` by its masks."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    split = getattr(value, "split", None)
    mask = getattr(split, "mask", None)
    return 4 * mask.size if isinstance(mask, np.ndarray) else 1024


def params_keys(pipeline: Pipeline) -> dict[str, Any]:
    """Per op node, a hashable form of its parameters; for an op whose input selects its parameters
    (`ops.NodeDef.selected_by`), one form per selectable entry."""
    keys: dict[str, Any] = {}
    for node in pipeline.op_nodes:
        if OPS[node.type].selected_by is None:
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


class Evaluator(BaseEvaluator):
    """One process's evaluation of ``stored`` (`runner.load_outputs`, maps may be `runner.Deferred`).

    A node's key is ``('=', value)`` for a known scalar (gate, choice, level, or None for a gated-out
    map), ``('model', name)`` for a stored model output, else ``(name, params read, input keys)``.
    """

    def __init__(self, pipeline: Pipeline, stored: list[dict], truth: Callable[[int], np.ndarray],
                 metric: metrics.MapMetric, budget: int = DEFAULT_BUDGET):
        """``truth(i)``: the reference codes of image ``i`` (`metrics.reference_codes`) at its size."""
        self.pipeline, self.stored, self.truth_of, self.map_metric = pipeline, stored, truth, metric
        self.memo: list[dict] = [{} for _ in stored]  # per image: scalar op values and losses by key
        self.arrays = LRU(budget // 2)  # (image, key) -> op maps and final-op summaries
        self.loaded = LRU(budget // 4)  # (image, node) -> model maps read from disk
        self.codes = LRU(budget // 4)  # image -> reference codes
        self.interned: dict = {}

    @property
    def n_images(self) -> int:
        return len(self.stored)

    def losses_of(self, candidates, indices=None, progress=None) -> np.ndarray:
        pipelines = [self.pipeline.with_thresholds(t) for t in candidates]
        params = [params_keys(p) for p in pipelines]
        chosen = list(range(self.n_images) if indices is None else indices)
        out = np.empty((len(pipelines), len(chosen)))
        for column, i in enumerate(chosen):
            for row, (pipeline, own) in enumerate(zip(pipelines, params)):
                out[row, column] = self.loss(pipeline, i, own)
            if progress is not None and (column + 1) % CHUNK == 0:
                progress(CHUNK)
        if progress is not None and len(chosen) % CHUNK:
            progress(len(chosen) % CHUNK)
        return out

    def loss(self, pipeline: Pipeline, i: int, params: dict[str, Any]) -> float:
        """Image ``i``'s map metric under ``pipeline`` (memoised by the final map's key)."""
        keys = self.keys(pipeline, i, params)
        final = pipeline.nodes[pipeline.outputs.map]
        loss_key = self._intern(("loss", keys[final.name]))
        memo = self.memo[i]
        if loss_key not in memo:
            definition = None if final.is_model else OPS[final.type]
            if definition is not None and definition.counts is not None:
                summary = self._summary(pipeline, i, keys, final.name)
                memo[loss_key] = self.map_metric.loss_of_counts(definition.counts(summary, **final.params))
            else:
                memo[loss_key] = self.map_metric.loss(self.value(pipeline, i, keys, final.name), self.codes_of(i))
        return memo[loss_key]

    def final_map(self, thresholds: dict, i: int) -> np.ndarray:
        """The output map of image ``i`` (what `runner.postprocess` gives)."""
        pipeline = self.pipeline.with_thresholds(thresholds)
        keys = self.keys(pipeline, i, params_keys(pipeline))
        return self.value(pipeline, i, keys, pipeline.outputs.map)

    def codes_of(self, i: int) -> np.ndarray:
        codes = self.codes.get(i)
        if codes is None:
            codes = self.truth_of(i)
            self.codes.put(i, codes)
        return codes

    def _intern(self, key: tuple) -> tuple:
        return self.interned.setdefault(key, key)

    def _summary(self, pipeline: Pipeline, i: int, keys: dict[str, tuple], name: str) -> np.ndarray:
        node = pipeline.nodes[name]
        cache_key = (i, "summary", tuple(keys[s] for s in node.inputs))
        summary = self.arrays.get(cache_key)
        if summary is None:
            values = [self.value(pipeline, i, keys, s) for s in node.inputs]
            summary = OPS[node.type].summary(*values, self.codes_of(i))
            self.arrays.put(cache_key, summary)
        return summary

    def keys(self, pipeline: Pipeline, i: int, params: dict[str, Any]) -> dict[str, tuple]:
        memo = self.memo[i]
        keys: dict[str, tuple] = {IMAGE: (IMAGE,)}
        for node in pipeline.nodes.values():
            if node.is_model:
                gated = node.when is not None and not keys[node.when][1]
                keys[node.name] = ("=", None) if gated else ("model", node.name)
                continue
            inputs = tuple(keys[s] for s in node.inputs)
            own = OPS[node.type].used_params(params[node.name], [k[1] if k[0] == "=" else k for k in inputs])
            key = self._intern((node.name, own, inputs))
            if key not in memo and node.output in SCALAR_TYPES:
                self.value(pipeline, i, keys, node.name, key)
            keys[node.name] = self._intern(("=", memo[key])) if key in memo else key
        return keys

    def value(self, pipeline: Pipeline, i: int, keys: dict[str, tuple], name: str, key: tuple | None = None) -> Any:
        key = keys[name] if key is None else key
        if key[0] == "=":
            return key[1]
        if key == (IMAGE,):
            return self.stored[i][IMAGE]
        if key[0] == "model":
            return self._model_value(i, name)
        if key in self.memo[i]:
            return self.memo[i][key]
        hit = self.arrays.get((i, key))
        if hit is not None:
            return hit
        node = pipeline.nodes[name]
        result = evaluate_op(node, {s: self.value(pipeline, i, keys, s) for s in node.inputs})
        if isinstance(result, np.ndarray):
            self.arrays.put((i, key), result)
        else:
            self.memo[i][key] = result
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


# ----------------------------------------------------------------------------- images in parallel


def default_workers() -> int:
    """The search's processes: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _serve(connection: Any, evaluator: Evaluator) -> None:
    """A worker's loop: (candidates, image indices) in, per-image losses out, until None."""
    while True:
        message = connection.recv()
        if message is None:
            return
        candidates, indices = message
        try:
            connection.send(("ok", evaluator.losses_of(candidates, indices)))
        except BaseException:  # the parent raises it with the worker's traceback
            connection.send(("error", traceback.format_exc()))


class ParallelEvaluator(BaseEvaluator):
    """`Evaluator` over forked worker processes; worker w owns images w, w + k, w + 2k, ... and their memos.

    Needs the 'fork' start method (the workers inherit the stored outputs, truth and pipeline without
    pickling); where it is missing, or for one worker, use `Evaluator` itself (`make_evaluator` decides).
    """

    def __init__(self, evaluator: Evaluator, workers: int):
        context = multiprocessing.get_context("fork")
        self.pipeline, self.n = evaluator.pipeline, evaluator.n_images
        self.owner = np.arange(self.n) % workers
        evaluator.arrays.budget //= workers
        evaluator.loaded.budget //= workers
        evaluator.codes.budget //= workers
        self.connections, self.processes = [], []
        for _ in range(workers):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(child, evaluator), daemon=True)
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)

    @property
    def n_images(self) -> int:
        return self.n

    def losses_of(self, candidates, indices=None, progress=None) -> np.ndarray:
        from multiprocessing.connection import wait

        chosen = np.arange(self.n) if indices is None else np.asarray(list(indices), dtype=np.intp)
        out = np.empty((len(candidates), len(chosen)))
        queues = []  # per worker: the chunks (positions in `chosen`) still to send
        for worker in range(len(self.processes)):
            positions = np.flatnonzero(self.owner[chosen] == worker)
            queues.append([positions[j:j + CHUNK] for j in range(0, len(positions), CHUNK)])
        in_flight: dict[Any, np.ndarray] = {}
        for worker, connection in enumerate(self.connections):
            self._send_next(connection, queues[worker], chosen, candidates, in_flight)
        while in_flight:
            for connection in wait(list(in_flight)):
                status, payload = connection.recv()
                positions = in_flight.pop(connection)
                if status != "ok":
                    self.close()
                    raise EvaluationError(f"a tune worker failed:\n{payload}")
                out[:, positions] = payload
                if progress is not None:
                    progress(len(positions))
                self._send_next(connection, queues[self.connections.index(connection)], chosen, candidates,
                                in_flight)
        return out

    @staticmethod
    def _send_next(connection: Any, queue: list, chosen: np.ndarray, candidates: Sequence[dict],
                   in_flight: dict) -> None:
        if queue:
            positions = queue.pop(0)
            connection.send((list(candidates), chosen[positions].tolist()))
            in_flight[connection] = positions

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
                connection.close()
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        self.connections, self.processes = [], []


def make_evaluator(evaluator: Evaluator, workers: int | None = None) -> BaseEvaluator:
    """``evaluator`` over ``workers`` processes (default: the CPUs), or itself for one worker, few
    images, or no 'fork' start method."""
    workers = default_workers() if workers is None else int(workers)
    workers = min(workers, max(1, evaluator.n_images // CHUNK))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return evaluator
    return ParallelEvaluator(evaluator, workers)
