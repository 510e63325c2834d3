"""The engine behind `pneumomap infer` and `pneumomap stage`: images through a job, decoded ahead.

A `Job` says what a group of images needs computed (`Job.process`: its networks batched over
the group) and what each image leaves behind (`Job.finish`: its files written, a record
returned). `run_images` feeds it the images as `ImageState`s, in input order, decoded ahead in
worker processes (`inputs.decode_ahead`), overlapping the networks: in chunks of ``batch_size``
images, or on the CPU ``streams`` images at a time, each in its own thread with its share of
torch's threads (`device.cpu_streams`; decoding then runs in this thread meanwhile). Nothing per
image outlives its chunk except the job's record. `Tally` adds up the seconds of each step and the
images each network computed (with several streams, the seconds per node add up the streams' times).

The jobs: `pneumomap.infer.runner` (a pipeline's nodes, stored outputs, the submission files) and
`pneumomap.infer.stage_cli` (one stage's outputs per image).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from pneumomap.infer.inputs import ImageSize, Item, ModelInputs
from pneumomap.infer.spec import IMAGE

if TYPE_CHECKING:
    import torch


@dataclass
class ImageState:
    """One image while it is processed: its values by node name (``image``: its `ImageSize`), its decoded
    model inputs, the encoder features its networks computed (by node, for the mappers that decode them)
    and, once something went wrong, why."""

    item: Item
    values: dict[str, Any] = field(default_factory=dict)
    inputs: ModelInputs | None = None
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    failure: str | None = None

    def accept(self, image: Any, ready: dict) -> bool:
        """Take the decoded image and its ready model inputs (`inputs.prepare`); an unreadable image fails
        with the reader's reason. Whether it was readable."""
        from pneumomap.stages.reader import UnreadableImageError

        if isinstance(image, UnreadableImageError):
            self.failure = image.reason
            return False
        self.inputs = ModelInputs(image, ready)
        self.values[IMAGE] = self.inputs.size
        return True

    @property
    def size(self) -> ImageSize:
        return self.values[IMAGE]


class Job(Protocol):
    """What the engine runs over the images."""

    def accept(self, state: ImageState, image: Any, ready: dict) -> None:
        """Give ``state`` its decoded image (`ImageState.accept`, plus what the job keeps of it)."""

    def process(self, states: list[ImageState]) -> None:
        """Compute the values of ``states`` (a chunk, or one image of a stream)."""

    def finish(self, state: ImageState) -> Any:
        """Write what ``state`` leaves behind; its record."""


class Tally:
    """Seconds per step and images computed per network, added up safely from several threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.computed: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def count(self, name: str, seconds: float = 0.0, images: int = 0) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.computed[name] += images

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.count(name, seconds=time.perf_counter() - start)


def run_images(job: Job, todo: list[Item], decoded: Iterator, ahead: set[int], records: dict[int, Any],
               bar: Any, tally: Tally, batch_size: int, streams: int = 1) -> None:
    """Every image of ``todo`` through ``job``; its record into ``records`` (by input index). ``decoded``:
    `inputs.decode_ahead` over the images whose indices are in ``ahead`` (in input order); the others are
    not decoded (the job decodes one itself when it must, see `pneumomap.infer.runner`)."""
    def take(states: list[ImageState]) -> None:
        with tally.timed("read"):
            for st in states:
                if st.item.index in ahead:
                    job.accept(st, *next(decoded))

    if streams > 1:
        _streams(job, todo, take, records, bar, streams)
        return
    for start in range(0, len(todo), batch_size):
        states = [ImageState(item) for item in todo[start:start + batch_size]]
        take(states)
        job.process(states)
        for st in states:
            records[st.item.index] = job.finish(st)
        bar.update(len(states))


def _streams(job: Job, todo: list[Item], take: Any, records: dict[int, Any], bar: Any, streams: int) -> None:
    """``streams`` images at a time, each in its own thread through the job, torch's threads shared out
    among them; images are decoded in this thread meanwhile (`device.cpu_streams`)."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def one(st: ImageState) -> Any:
        job.process([st])
        return job.finish(st)

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
                st = ImageState(item)
                take([st])
                pending.append((item.index, pool.submit(one, st)))
                while len(pending) > streams:  # the streams busy, one image decoded and waiting
                    collect()
            while pending:
                collect()
    finally:
        torch.set_num_threads(threads)
