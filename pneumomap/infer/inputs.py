"""What a run reads: the input images with their ids, decoded ahead in worker processes, and their model inputs.

`list_items` lists the images (a folder, a list file or a list of paths; the id is the file stem, unique).
`decode_ahead` decodes them in input order in worker processes with at most ``ahead`` in flight, each
with its whole-image model inputs already made (`prepare` is the worker side), so memory stays flat
however long the input list. `ModelInputs` holds one decoded image's model inputs, each made once
however many networks take it: the whole image at a size and the lung-half crops of a lung split.

torch is not imported here: the decode workers import this module.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pneumomap.errors import UserError
from pneumomap.infer import artifacts as art

Box = tuple[int, int, int, int]
WHOLE = "whole"  # the key of a whole-image input: (WHOLE, (h, w))


class RunError(UserError, RuntimeError):
    """A problem found before any image is processed (checkpoint, inputs, output folder)."""


@dataclass
class ImageSize:
    height: int
    width: int


@dataclass
class Item:
    """One input image: its place in the input list, path, id (file stem) and file signature (size, mtime)."""

    index: int
    path: str
    image_id: str
    signature: str


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


def prepare(image: Any, sizes: tuple[tuple[int, int], ...]) -> tuple[Any, dict]:
    """Worker side: the decoded image (or its `UnreadableImageError`) plus its whole-image model inputs."""
    from pneumomap.stages.preprocess import to_model_input
    from pneumomap.stages.reader import UnreadableImageError

    if isinstance(image, UnreadableImageError):
        return image, {}
    try:
        return image, {(WHOLE, s): to_model_input(image.pixels, s) for s in sizes}
    except Exception as exc:  # e.g. pixels no model can take: isolate the image, like a read error
        return UnreadableImageError(image.meta.path, f"preprocessing: {type(exc).__name__}: {exc}"), {}


def decode_ahead(paths: list[str], sizes: tuple[tuple[int, int], ...], workers: int, ahead: int
                 ) -> Iterator[tuple[Any, dict]]:
    """Each image (or its error) with its whole-image model inputs, in input order, decoded in
    ``workers`` processes with at most ``ahead`` images in flight (`reader.map_images`)."""
    from pneumomap.stages.reader import map_images

    return map_images(functools.partial(prepare, sizes=sizes), paths, n_jobs=workers, ahead=ahead)


def decode_now(path: str, sizes: tuple[tuple[int, int], ...]) -> tuple[Any, dict]:
    """`prepare` of one image read in this process (an image that was not decoded ahead)."""
    from pneumomap.stages.reader import read_or_error

    return prepare(read_or_error(path), sizes)


class ModelInputs:
    """One decoded image (``radiograph``) and its model inputs, each made once: the whole image at a size
    (`preprocess.to_model_input`; those made by the decode worker come in ``ready``) and the two lung-half
    crops of a lung split (`lungs.lung_half_inputs`, with their boxes in the image's pixels)."""

    def __init__(self, radiograph: Any, ready: dict | None = None) -> None:
        self.radiograph = radiograph
        self._made: dict[tuple, Any] = dict(ready or {})

    @property
    def size(self) -> ImageSize:
        return ImageSize(self.radiograph.meta.height, self.radiograph.meta.width)

    def whole(self, size: tuple[int, int]) -> np.ndarray:
        """The whole image as a model input of ``size`` (h, w)."""
        key = (WHOLE, tuple(size))
        if key not in self._made:
            from pneumomap.stages.preprocess import to_model_input

            self._made[key] = to_model_input(self.radiograph.pixels, key[1])
        return self._made[key]

    def half(self, split: Any, split_name: str, side: str, size: tuple[int, int]) -> tuple[np.ndarray, Box]:
        """(model input of ``size``, box) of the ``side`` lung's half crop by ``split`` (a `LungSplit`, named
        ``split_name``: the node or rule it came from, so that two splits of one image are kept apart)."""
        key = ("crop", split_name, tuple(size), side)
        if key not in self._made:
            from pneumomap.stages.lungs import lung_half_inputs

            for each, made in lung_half_inputs(self.radiograph.pixels, split, tuple(size)).items():
                self._made[("crop", split_name, tuple(size), each)] = made
        return self._made[key]
