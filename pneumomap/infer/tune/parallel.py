"""The evaluator over forked worker processes: each owns every k-th image and its memos for the whole
search; the parent sends candidates and gathers per-image losses chunk by chunk (`ParallelEvaluator`)."""
from __future__ import annotations

import multiprocessing
import os
import traceback
from typing import Any, Sequence

import numpy as np

from pneumomap.infer.tune.evaluator import CHUNK, BaseEvaluator, Evaluator


class EvaluationError(RuntimeError):
    """A worker failed while evaluating; the message holds its traceback."""


def default_workers() -> int:
    """The search's processes: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _serve(connection: Any, evaluator: Evaluator) -> None:
    """A worker's loop: (candidates, image indices) in, per-image losses out, until None."""
    import torch

    torch.set_num_threads(1)  # one process per CPU: torch's own threads would only fight over them (resize)
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
        evaluator.contexts.budget //= workers
        evaluator.summaries.budget //= workers
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
