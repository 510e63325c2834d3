"""``--set KEY=VALUE``: dotted-path overrides of a YAML document, as MONAI bundles take them.

One parser for every command that takes ``--set`` (train's recipe, the pipeline of infer, tune and
package, a stage checkpoint's config): ``KEY`` is a dotted path into the document
(``thresholds.classifier``, ``nodes.classifier.checkpoint``), ``VALUE`` is read as YAML (numbers,
true/false, null, ``[lists]``, ``{mappings}``; ``1e-3`` is a number too). The document is
changed first and then validated exactly like the file itself, by its owner; what may be added
rather than replaced is the owner's rule too (`apply`'s ``may_add``).

`apply_text` writes the same change into the YAML text, keeping its comments wherever each
override replaces an existing value; a file written from it (tune's and package's copy of an
overridden pipeline) loads as the overridden document.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from pneumomap.errors import UserError
from pneumomap.suggest import did_you_mean

Path_ = tuple[str, ...]


class OverrideError(UserError, ValueError):
    """A ``--set`` item that cannot be applied; the message names it and the fix."""


def add_set_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--set KEY=VALUE`` option (repeatable) into ``args.overrides``; ``what`` says what KEY points into."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {what} (repeatable; KEY a dotted path, VALUE read as YAML)")


def parse_value(text: str) -> Any:
    """A --set value as YAML (numbers, true/false, null, [lists]); '1e-3' is a float too (YAML 1.1 says str)."""
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse(items: Iterable[str]) -> list[tuple[Path_, Any]]:
    """['a.b=1', ...] -> [(('a', 'b'), 1), ...] in the given order."""
    parsed = []
    for item in items or []:
        key, sep, text = item.partition("=")
        path = tuple(part.strip() for part in key.split("."))
        if not sep or not all(path):
            raise OverrideError(f"--set {item}: expected key=value, the key a dotted path (e.g. --set thresholds.classifier=0.8)")
        parsed.append((path, parse_value(text)))
    return parsed


def nested(items: Iterable[str]) -> dict:
    """['a=1', 'model.backbones=[resnet10t]'] -> {'a': 1, 'model': {'backbones': ['resnet10t']}}."""
    result: dict = {}
    for path, value in parse(items):
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return result


def apply(document: Any, items: Iterable[str], may_add: Callable[[Path_], bool] = lambda path: False,
          where: str = "the document") -> Any:
    """A deep copy of ``document`` with each override set at its path.

    Every key on the way must exist, a mapping, except where ``may_add(path)`` says that ``path``
    may be created (an absent node parameter, say: the owner's validation checks it next); an
    unknown key raises `OverrideError` naming the closest existing one.
    """
    document = copy.deepcopy(document)
    for path, value in parse(items):
        node = document
        for depth, part in enumerate(path):
            here = path[:depth + 1]
            dotted = ".".join(here)
            if not isinstance(node, dict):
                raise OverrideError(f"--set {'.'.join(path)}: {'.'.join(path[:depth]) or 'the top level'} of "
                                    f"{where} is not a mapping of keys")
            if part not in node and not may_add(here):
                raise OverrideError(f"--set {'.'.join(path)}: {where} has no key '{dotted}'"
                                    + did_you_mean(dotted, [".".join((*path[:depth], str(k))) for k in node]))
            if depth == len(path) - 1:
                node[part] = copy.deepcopy(value)
            else:
                if node.get(part) is None:  # absent, or written empty (`params:`)
                    node[part] = {}
                node = node[part]
    return document


def yaml_child(node: Any, key: str) -> Any:
    """The value node of ``key`` in a composed YAML mapping node (None when absent or not a mapping)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


def _flow(value: Any) -> str:
    """``value`` as one flow-style YAML value (JSON is valid YAML; a plain string when it reads back)."""
    if isinstance(value, str) and value and yaml.safe_load(value) == value and "#" not in value \
            and not value[0].isspace() and not value[-1].isspace():
        return value
    return json.dumps(value)


def apply_text(text: str, items: Iterable[str]) -> str:
    """``text`` (a YAML document) with the overrides written in.

    Where every override replaces an existing scalar or flow-style value, only those values change
    and the comments stay; otherwise (a new key, a block-style list or mapping replaced) the
    document is written anew, without its comments.
    """
    parsed = list(dict(parse(items)).items())  # the last value of a key set twice
    if not parsed:
        return text
    document = yaml.compose(text, Loader=yaml.SafeLoader)
    spans = []
    for path, value in parsed:
        node = document
        for part in path:
            node = yaml_child(node, part)
        if node is None or not (isinstance(node, yaml.ScalarNode) or node.flow_style):
            overridden = apply(yaml.safe_load(text), [f"{'.'.join(p)}={json.dumps(v)}" for p, v in parsed],
                               may_add=lambda _: True)
            return yaml.safe_dump(overridden, sort_keys=False, default_flow_style=None)
        spans.append((node.start_mark.index, node.end_mark.index, _flow(value)))
    for start, end, rendered in sorted(spans, reverse=True):
        text = text[:start] + rendered + text[end:]
    return text


def write_pipeline(pipeline: Any, dest: str | os.PathLike) -> Path:
    """Write ``pipeline`` (loaded with ``--set`` items, `pneumomap.infer.spec.load`) as a pipeline file at
    ``dest``: its file's text with the items written in (`apply_text`) under a comment naming them and
    the file, relative checkpoint paths rewritten to resolve from ``dest``'s folder. For the commands
    that hand a pipeline file on (tune, package); returns ``dest``."""
    from pneumomap.fileio import atomic_write_text
    from pneumomap.infer.tune import HEADER, relocate_checkpoints

    dest = Path(dest)
    text = apply_text(pipeline.path.read_text(encoding="utf-8"), pipeline.overrides)
    lines = relocate_checkpoints(text, pipeline, dest).splitlines(keepends=True)
    tuned = next((i for i, line in enumerate(lines) if not line.startswith(HEADER)), len(lines))
    note = [f"# {pipeline.path.resolve()} with these overrides (pneumomap --set):\n",
            *(f"# --set {item}\n" for item in pipeline.overrides)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, "".join(lines[:tuned] + note + lines[tuned:]))  # after a tune header, which tune replaces
    return dest
