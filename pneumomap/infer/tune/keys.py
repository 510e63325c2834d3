"""The evaluator's memo keys: what a node's value for one image is known by, whatever the candidate.

Two candidates that give a node the same key give it the same value, so the evaluator computes it once.
A key is one of four small typed tuples (NamedTuples hash and compare as plain tuples, so a look-up costs
what a flat tuple's does), interned to a small integer by `KeyTable` so that an op's key, which holds its
inputs' keys, stays flat:

- `Known`: a value known without computing a map: a scalar op's result (gate, choice, level), or None
  for a map that the gate left out (`ops.NodeDef.gives_none`);
- `ModelOutput`: a stored model output (`runner.load_outputs`);
- `ImageKey`: the image itself (its metadata);
- `OpKey`: an op's output: its node, the parameters it reads for these inputs (`ops.NodeDef.used_params`:
  overestimate reads only its level's amounts) and its inputs' key ids.

Each kind is interned in its own table: a NamedTuple equals any tuple of the same items, so one table
would take ``Known('whole')`` and ``ModelOutput('whole')`` for one key.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Union


class Known(NamedTuple):
    """A value known without a map: a scalar op's result, or None (a gated-out map)."""

    value: Any


class ModelOutput(NamedTuple):
    """A model node's stored output."""

    node: str


class ImageKey(NamedTuple):
    """The input image (its metadata)."""


class OpKey(NamedTuple):
    """An op's output: its node, the parameters it reads (a hashable form) and its inputs' key ids."""

    node: str
    params: Any
    inputs: tuple[int, ...]


Key = Union[Known, ModelOutput, ImageKey, OpKey]


class KeyTable:
    """Keys interned to integers (the same key, the same integer; ``meaning[id]`` gives the key back)."""

    def __init__(self) -> None:
        self.meaning: list[Key] = []
        self._known: dict[Any, int] = {}
        self._models: dict[str, int] = {}
        self._ops: dict[tuple, int] = {}  # OpKey's items -> id
        self.image = self._new(ImageKey())
        self.none = self.known(None)

    def _new(self, key: Key) -> int:
        self.meaning.append(key)
        return len(self.meaning) - 1

    def known(self, value: Any) -> int:
        """The id of `Known(value)`."""
        found = self._known.get(value)
        if found is None:
            found = self._known[value] = self._new(Known(value))
        return found

    def model(self, node: str) -> int:
        """The id of `ModelOutput(node)`."""
        found = self._models.get(node)
        if found is None:
            found = self._models[node] = self._new(ModelOutput(node))
        return found

    def op(self, node: str, params: Any, inputs: tuple[int, ...]) -> int:
        """The id of ``OpKey(node, params, inputs)`` (looked up as the plain tuple: the same hash, no
        NamedTuple made unless the key is new)."""
        key = (node, params, inputs)
        found = self._ops.get(key)
        if found is None:
            found = self._ops[key] = self._new(OpKey(*key))
        return found
