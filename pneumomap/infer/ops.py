"""Post-processing ops of the pipeline DAG: pure functions of their inputs and YAML parameters.

Every op is registered in `OPS` with its signature (input roles and their value types, the
output type, the parameters with type and range); `pneumomap.infer.spec` validates a
pipeline.yaml against these signatures and the runner calls ``OPS[name].fn(*inputs, **params)``.

Value types flowing between nodes:

=============  ==========================================================================
``image``      `ImageMeta` of the input (original ``height``/``width``); pixels only for models
``lungs``      `LungRegions`: the lung split at the lung model's resolution (the *working frame*)
``probability`` / ``extent``  a float in [0, 1] (classifier / extent regressor)
``bool``       gate decision;  ``choice``: 'lung' | 'whole' | 'max' | 'none';  ``level``: 'low' | 'high'
``map``        float32 opacity probabilities in the working frame (whole-image mapper output)
``lungmap``    float32 probabilities of one lung crop (a per-lung mapper output)
``fullmap``    float32 probabilities at the original image size
``map8``       uint8 map at the original size, ready to write
=============  ==========================================================================

``None`` stands for "not computed because the gate said negative": map ops pass it on, the `resize` op
turns it into zeros, so a negative image ends as the floor values of `clip`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

CHOICES = ("lung", "whole", "max", "none")
LEVELS = ("low", "high")


# ----------------------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Param:
    """One parameter: the type of its value, 'float' | 'int' | 'bool' | 'enum' | 'amounts' (a {dilate, raise} mapping)."""

    type: str
    low: float | None = None
    high: float | None = None
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    help: str = ""


@dataclass(frozen=True)
class Role:
    """One positional input: its name and the value types it accepts."""

    name: str
    types: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class NodeDef:
    """The signature of a node kind (an op or a stage)."""

    inputs: tuple[Role, ...]
    output: str
    params: dict[str, Param] = field(default_factory=dict)
    fn: Callable[..., Any] | None = None
    help: str = ""
    check: Callable[[dict[str, Any]], str | None] | None = None  # a rule across parameters: its message, or None
    # (input role, its value when absent): the op reads only ``params[<that input's value>]`` (overestimate
    # reads the amounts of its level), so that what a result depends on can be known without running it
    selected_by: tuple[str, str] | None = None
    # a final op whose metric follows from a histogram (clip): ``context(map shape, <other inputs>, codes)``
    # once per image, ``summary(map, context)`` once per map input, then ``counts(summary, **params)`` =
    # `metrics.joint_counts` of the op's output with those codes
    context: Callable[..., Any] | None = None
    summary: Callable[..., np.ndarray] | None = None
    counts: Callable[..., np.ndarray] | None = None
    # input roles that, all None (gated out), make the output None whatever the parameters (combine, overestimate)
    none_if_all_none: tuple[str, ...] = ()
    # a final op's value where there is no lung (and an unreadable image's whole map), from its parameters
    floor: Callable[[dict[str, Any]], int] | None = None
    # the lungs role whose lung pixels are all that ``summary`` reads of the map (clip: 'lungs')
    summary_lungs: str | None = None
    # (map role, lungs role) of an op that changes only pixels outside those lungs (mask): a summary over the
    # same lungs' pixels reads the same values from its map input, so tune summarises that and skips this op
    keeps_lung_pixels: tuple[str, str] | None = None

    def gives_none(self, inputs: Sequence[Any]) -> bool:
        """Whether the output is None for these input values (by position; missing optional inputs are None)."""
        if not self.none_if_all_none:
            return False
        names = [r.name for r in self.inputs]
        return all(inputs[names.index(role)] is None for role in self.none_if_all_none
                   if names.index(role) < len(inputs))

    def used_params(self, params: dict[str, Any], inputs: Sequence[Any]) -> Any:
        """The part of ``params`` a node reads, given its inputs' values (or keys) by position."""
        if self.selected_by is None:
            return params
        role, default = self.selected_by
        index = [r.name for r in self.inputs].index(role)
        return params.get(inputs[index] if index < len(inputs) else default)


# ----------------------------------------------------------------------------- values


@dataclass
class LungRegions:
    """A lung split (`pneumomap.stages.lung_geometry.LungSplit`) plus resized-mask memo."""

    split: Any
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.split.mask.shape)

    def mask_at(self, shape: tuple[int, int], side: str = "mask") -> np.ndarray:
        """The lung mask (``side`` 'mask' | 'right' | 'left') resized (nearest) to ``shape``."""
        key = (side, tuple(shape))
        if key not in self._cache:
            from pneumomap.stages.preprocess import resize

            mask = getattr(self.split, side)
            self._cache[key] = mask if mask.shape == tuple(shape) else resize(mask.astype(bool), shape, order=0)
        return self._cache[key]


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from pneumomap.stages.preprocess import resize

    return resize(array.astype(np.float32, copy=False), tuple(shape))  # float32, the same array at its size


# ----------------------------------------------------------------------------- ops


def gate(score: float, threshold: float) -> bool:
    """Positive when ``score >= threshold``; nodes gated on a negative are not computed."""
    return bool(score >= threshold)


def choose(extent: float, threshold: float, above: str = "lung", below: str = "whole") -> str:
    """Per-lung choice of how the lung's map is formed: ``above`` when extent >= threshold."""
    return above if extent >= threshold else below


def level(right_extent: float, left_extent: float, threshold: float) -> str:
    """'high' when the mean of the two extents is >= threshold, else 'low'."""
    return "high" if (right_extent + left_extent) / 2.0 >= threshold else "low"


def combine(lungs: LungRegions, whole: np.ndarray | None, right: np.ndarray | None = None,
            left: np.ndarray | None = None, right_choice: str = "lung", left_choice: str = "lung"
            ) -> np.ndarray | None:
    """Whole-image map (resized to the lungs' frame) with each lung's region formed by its choice.

    'lung': the per-lung map pasted into that lung's box; 'whole': the whole-image map; 'max':
    the pixelwise maximum of both; 'none': zero. None when no map was computed (gated negative).
    """
    if whole is None and right is None and left is None:
        return None
    frame = lungs.shape
    base = np.zeros(frame, np.float32) if whole is None else _resize(whole, frame)
    out = base.copy()
    for side, lung_map, how in (("right", right, right_choice), ("left", left, left_choice)):
        if how == "whole" or (lung_map is None and how == "lung"):
            continue
        r0, c0, r1, c1 = getattr(lungs.split, f"{side}_box")
        region = lungs.mask_at(frame, side)[r0:r1, c0:c1]
        if how == "none":
            value = np.zeros((r1 - r0, c1 - c0), np.float32)
        else:
            value = _resize(lung_map, (r1 - r0, c1 - c0)) if lung_map is not None else base[r0:r1, c0:c1]
            if how == "max":
                value = np.maximum(value, base[r0:r1, c0:c1])
        out[r0:r1, c0:c1] = np.where(region, value, out[r0:r1, c0:c1])
    return out


def overestimate(prob_map: np.ndarray | None, level: str = "low", low: dict | None = None,
                 high: dict | None = None) -> np.ndarray | None:
    """Grow the map: grey dilation by a disk of ``dilate`` px, then add ``raise`` (clipped to 1).

    The disk is skimage's fast sequence decomposition (close to a disk), applied by `dilate_disk`.

    The amounts come from ``low`` or ``high`` as chosen by ``level``: missed opacity costs far
    more than a false alarm in the challenge's metric.
    """
    if prob_map is None:
        return None
    amounts = (high if level == "high" else low) or {}
    radius, lift = int(amounts.get("dilate", 0)), float(amounts.get("raise", 0.0))
    out = dilate_disk(prob_map, radius) if radius > 0 else prob_map.astype(np.float32, copy=True)
    if lift:
        out = np.clip(out + np.float32(lift), 0.0, 1.0, out=out)
    return out


def dilate_disk(values: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation (float32) by skimage's sequence decomposition of a disk, equal to skimage's
    `dilation` (edges reflected at each step): each 3x3 footprint as the maximum of views of the
    image padded by one edge pixel, the square one row-wise then column-wise (several times faster than
    skimage's: benchmarks/RESULTS.md, "Figures behind design choices")."""
    from skimage.morphology import disk

    current = values.astype(np.float32, copy=True)
    h, w = current.shape
    padded = np.empty((h + 2, w + 2), np.float32)
    for footprint, repeats in disk(radius, decomposition="sequence"):
        views = [(int(y), int(x)) for y, x in zip(*np.nonzero(footprint))]  # offsets + 1 into `padded`
        for _ in range(int(repeats)):
            padded[1:-1, 1:-1] = current
            padded[0, 1:-1], padded[-1, 1:-1] = current[0], current[-1]
            padded[:, 0], padded[:, -1] = padded[:, 1], padded[:, -2]
            if footprint.all():  # the square is separable
                rows = np.maximum(padded[:, :-2], padded[:, 1:-1])
                np.maximum(rows, padded[:, 2:], out=rows)
                np.maximum(rows[:-2], rows[1:-1], out=current)
                np.maximum(current, rows[2:], out=current)
                continue
            np.copyto(current, padded[views[0][0]:views[0][0] + h, views[0][1]:views[0][1] + w])
            for y, x in views[1:]:
                np.maximum(current, padded[y:y + h, x:x + w], out=current)
    return current


def to_image_size(prob_map: np.ndarray | None, image: Any) -> np.ndarray:
    """The map at the original image size (zeros when the map was gated out)."""
    shape = (int(image.height), int(image.width))
    if prob_map is None:
        return np.zeros(shape, np.float32)
    from pneumomap.stages.preprocess import to_original

    out = np.asarray(to_original(prob_map.astype(np.float32), *shape), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def mask(prob_map: np.ndarray, lungs: LungRegions) -> np.ndarray:
    """No opacity outside the lungs (the lung mask resized, nearest, to the map's size)."""
    return np.where(lungs.mask_at(prob_map.shape), prob_map.astype(np.float32, copy=False), np.float32(0.0))


def clip(prob_map: np.ndarray, lungs: LungRegions, low: int = 10, high: int = 245, outside: int = 1) -> np.ndarray:
    """8-bit map: round(p * 255) clipped to [low, high] inside the lungs, ``outside`` elsewhere."""
    scaled = prob_map.astype(np.float64)
    scaled *= 255.0
    values = np.clip(np.rint(scaled, out=scaled), low, high, out=scaled).astype(np.uint8)
    return np.where(lungs.mask_at(prob_map.shape), values, np.uint8(outside))


def clip_context(map_shape: tuple[int, int], lungs: LungRegions, codes: np.ndarray) -> tuple:
    """What `clip_summary` needs of an image besides its map, computed once per image and kept small (a few
    hundred kB at 1024 px, so that thousands of images' contexts stay in memory): the lung mask's bounding
    box at the map's size, the mask inside it as packed bits, the lung pixels' codes times 257 (None when
    all are 0, as on every negative RSNA image) and the outside pixels' count per code."""
    from pneumomap.metrics import N_CODES

    inside = lungs.mask_at(map_shape)
    codes = np.asarray(codes)
    outside = np.bincount(codes[~inside].ravel(), minlength=N_CODES)[:N_CODES]
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:  # no lung pixel: every pixel is outside
        return (0, 0, 0, 0), np.zeros(0, np.uint8), None, outside
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
    in_box = inside[box[0]:box[1], box[2]:box[3]]
    lung_codes = codes[box[0]:box[1], box[2]:box[3]][in_box]
    offsets = lung_codes.astype(np.uint16) * np.uint16(257) if lung_codes.any() else None
    return box, np.packbits(in_box), offsets, outside


def clip_summary(prob_map: np.ndarray, context: tuple) -> np.ndarray:
    """int32 (N_CODES, 257) of `clip`'s input against the reference codes (`clip_context`): per code, the
    lung pixels at each byte ``rint(p * 255)`` (columns 0-255, clamped to that range) and the pixels
    outside the lungs (column 256). Every `clip` of this input has its `metrics.joint_counts` in `clip_counts`."""
    from pneumomap.metrics import N_CODES

    (r0, r1, c0, c1), packed, offsets, outside = context
    in_box = np.unpackbits(packed, count=(r1 - r0) * (c1 - c0)).view(bool).reshape(r1 - r0, c1 - c0)
    scaled = np.multiply(prob_map[r0:r1, c0:c1][in_box], 255.0, dtype=np.float64)  # as `clip`: float64, so
    np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled)  # rint rounds as it does
    column = scaled.astype(np.uint16)
    if offsets is not None:
        column += offsets  # at most 5 * 257 + 255: fits
    counts = np.bincount(column, minlength=N_CODES * 257)[:N_CODES * 257].reshape(N_CODES, 257)
    counts[:, 256] += outside
    return counts.astype(np.int32)


def clip_counts(summary: np.ndarray, low: int = 10, high: int = 245, outside: int = 1) -> np.ndarray:
    """`metrics.joint_counts` of ``clip(map, lungs, low, high, outside)`` from `clip_summary` of (map, lungs):
    bytes below ``low`` counted at ``low``, above ``high`` at ``high``, the outside pixels at ``outside``."""
    inside = summary[:, :256]
    counts = np.zeros(inside.shape, np.int64)
    counts[:, low:high + 1] = inside[:, low:high + 1]
    counts[:, low] += inside[:, :low].sum(axis=1)
    counts[:, high] += inside[:, high + 1:].sum(axis=1)
    counts[:, outside] += summary[:, 256]
    return counts


# ----------------------------------------------------------------------------- registry

_UNIT = dict(low=0.0, high=1.0)
# The final map's values: never 0 or 255, so that no scorer takes log(0) whatever its clipping
# (p = 0 or 1 where the truth disagrees is an infinite loss before clipping).
MAP8_RANGE = (1, 254)
_SCORE = ("probability", "extent")
_AMOUNTS = Param("amounts", default={"dilate": 0, "raise": 0.0},
                 help="{dilate: radius in px of the working frame (int >= 0), raise: added probability in [0, 1]}")
_CHOICE = dict(type="enum", choices=CHOICES)

OPS: dict[str, NodeDef] = {
    "gate": NodeDef(
        (Role("score", _SCORE),), "bool", {"threshold": Param("float", **_UNIT, required=True)}, gate,
        "positive when score >= threshold; nodes with `when: <this node>` skip negatives"),
    "choose": NodeDef(
        (Role("extent", ("extent",)),), "choice",
        {"threshold": Param("float", **_UNIT, required=True),
         "above": Param(**_CHOICE, default="lung"), "below": Param(**_CHOICE, default="whole")}, choose,
        "per-lung choice of the map source by the extent threshold"),
    "level": NodeDef(
        (Role("right_extent", ("extent",)), Role("left_extent", ("extent",))), "level",
        {"threshold": Param("float", **_UNIT, required=True)}, level,
        "over-estimation level: 'high' when the mean extent >= threshold"),
    "combine": NodeDef(
        (Role("lungs", ("lungs",)), Role("whole", ("map",)), Role("right", ("lungmap",), True),
         Role("left", ("lungmap",), True), Role("right_choice", ("choice",), True),
         Role("left_choice", ("choice",), True)), "map", {}, combine,
        "whole-image map with each lung formed by its choice", none_if_all_none=("whole", "right", "left")),
    "overestimate": NodeDef(
        (Role("map", ("map",)), Role("level", ("level",), True)), "map",
        {"low": _AMOUNTS, "high": _AMOUNTS}, overestimate, "dilate and raise the map by the level's amounts",
        selected_by=("level", "low"), none_if_all_none=("map",)),
    "resize": NodeDef((Role("map", ("map",)), Role("image", ("image",))), "fullmap", {}, to_image_size,
                      "resize the map to the original image size"),
    "mask": NodeDef((Role("map", ("fullmap",)), Role("lungs", ("lungs",))), "fullmap", {}, mask,
                    "zero outside the lung mask", keeps_lung_pixels=("map", "lungs")),
    "clip": NodeDef(
        (Role("map", ("fullmap",)), Role("lungs", ("lungs",))), "map8",
        {"low": Param("int", *MAP8_RANGE, 10), "high": Param("int", *MAP8_RANGE, 245),
         "outside": Param("int", *MAP8_RANGE, 1)},
        clip, "8-bit values in [low, high] inside the lungs, `outside` elsewhere; never 0 or 255",
        check=lambda p: f"low ({p['low']}) is above high ({p['high']})" if p["low"] > p["high"] else None,
        context=clip_context, summary=clip_summary, counts=clip_counts, floor=lambda p: p["outside"],
        summary_lungs="lungs"),
}
