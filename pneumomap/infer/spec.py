"""pipeline.yaml: load and validate the DAG before any image is read.

Schema (see the repository's pipeline.yaml for the commented reference)::

    version: 1
    thresholds:            # every tunable number, in ONE block (the tuner rewrites only this)
      classifier: 0.9
      overestimate: {low: {dilate: 4, raise: 0.05}, high: {dilate: 12, raise: 0.15}}
    nodes:
      NAME:
        stage: lungs | classifier | regressor | mapper     # a model node ...
        checkpoint: DIR    # relative to the YAML file; DIR/best is used when present
        op: gate | choose | level | combine | overestimate | resize | mask | clip   # ... or an op
        inputs: [NODE, ...]   # positional, per the kind's signature; `image` is the input radiograph
        params: {KEY: VALUE}  # a VALUE '$a.b' refers to thresholds.a.b
        when: GATE_NODE       # model nodes only: computed only for images the gate passes
    outputs:
      probability: NODE     # predictions.csv
      map: NODE             # maps/<image_id>.png (a `clip` node)
      decisions: {gate: NODE, right_extent: NODE, ...}   # decisions.csv columns
      rsna: {threshold: $box, min_area: 16}              # rsna_submission.csv, or false

Every problem is collected and raised at once as `PipelineError`, each line naming the file,
the key path (e.g. ``nodes.mapper_right.inputs[0]``) and a hint. YAML is read with
``yaml.safe_load``; nothing in it is evaluated as Python.

Length (about 540 lines): one concern, the pipeline file's schema, kept whole so that every rule a
pipeline.yaml must follow is read in one module.
"""
from __future__ import annotations

import copy
import math
import graphlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumomap.checkpoints import CHECKPOINT_FILES, checkpoint_folder as resolve_checkpoint
from pneumomap.infer.ops import MAP8_RANGE, OPS, NodeDef, Param, Role
from pneumomap.suggest import closest

IMAGE = "image"  # the implicit source node: the input radiograph
DECISION_TYPES = {"gate": "bool", "right_extent": "extent", "left_extent": "extent",
                  "right_choice": "choice", "left_choice": "choice", "level": "level"}
DECISION_COLUMNS = tuple(DECISION_TYPES)
TOP_KEYS = ("version", "thresholds", "nodes", "outputs")
NODE_KEYS = ("stage", "op", "checkpoint", "inputs", "params", "when")
STAGE_NODES: dict[str, NodeDef] = {  # the node signature of each stage kind a `stage:` node may name (ops: `OPS`)
    "lungs": NodeDef((Role("image", (IMAGE,)),), "lungs", {}, help="lung segmentation -> lung split"),
    "classifier": NodeDef((Role("image", (IMAGE,)),), "probability",
                          # positive: the class whose probability a multi-class head gives as the node's
                          # value (absent: 'Lung Opacity'); one of the checkpoint's class_names, checked at
                          # load; binary heads ignore it. The choices are pneumomap.labels.CLASSES (not
                          # imported: it pulls in scipy)
                          {"positive": Param("enum", choices=("Lung Opacity", "No Lung Opacity / Not Normal", "Normal"),
                                             help="the class taken as p(pneumonia) from a multi-class head")},
                          help="p(pneumonia)"),
    "regressor": NodeDef((Role("image", (IMAGE,)), Role("lungs", ("lungs",))), "extent",
                         {"side": Param("enum", choices=("right", "left"), required=True)},
                         help="opacity extent of one lung"),
    "mapper": NodeDef((Role("encoder", ("probability", "extent")),), "map",
                      {"allow_other_encoder": Param("bool", help="decode the input node's encoder even when it is "
                                                    "not the one the mapper was trained on (one warning)")},
                      help="opacity map decoded from the frozen encoder of its input node"),
}


class PipelineError(ValueError):
    """All problems of one pipeline file; ``errors`` holds one line per problem."""

    def __init__(self, path: str | Path, errors: list[str]):
        self.path, self.errors = str(path), errors
        super().__init__(f"{path}: {len(errors)} problem(s) in the pipeline:\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass
class Node:
    name: str
    is_model: bool  # a `stage:` node (a network); else an `op:` node
    kind: str  # the registry key: the stage kind (`STAGE_NODES`) or the op (`OPS`)
    inputs: list[str]
    output: str  # value type
    params: dict[str, Any]  # resolved ($refs replaced by threshold values, defaults filled)
    checkpoint: Path | None = None
    when: str | None = None


@dataclass
class Outputs:
    probability: str
    map: str
    decisions: dict[str, str]
    rsna: dict[str, Any] | None  # {'threshold': float, 'min_area': int} or None


@dataclass
class Pipeline:
    path: Path
    nodes: dict[str, Node]  # topological order
    thresholds: dict[str, Any]
    outputs: Outputs
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the --set items applied to the file's document

    @property
    def model_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.is_model]

    @property
    def op_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.is_model]

    @property
    def floor(self) -> int:
        """The map value where no lung is found (and of an unreadable image's whole map): what the final op
        declares (`ops.NodeDef.floor`: `clip`'s ``outside``), else the lowest value a map may hold."""
        node = self.nodes[self.outputs.map]
        definition = None if node.is_model else OPS[node.kind]
        return int(definition.floor(node.params)) if definition is not None and definition.floor else MAP8_RANGE[0]

    def with_thresholds(self, thresholds: dict[str, Any], check_checkpoints: bool = False) -> "Pipeline":
        """The same pipeline with another thresholds block (validated again)."""
        raw = copy.deepcopy(self.raw)
        raw["thresholds"] = copy.deepcopy(thresholds)
        pipeline = parse(raw, self.path, check_checkpoints=check_checkpoints)
        pipeline.overrides = list(self.overrides)
        return pipeline


def load(path: str | Path, check_checkpoints: bool = True, overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a pipeline file; raise `PipelineError` listing every problem.

    ``overrides``: ``--set KEY=VALUE`` items (`pneumomap.overrides`) applied to the document before
    it is validated, exactly as if the file said so; kept in ``Pipeline.overrides``.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(path, [f"cannot read the file: {exc.strerror or exc}"
                                   " (hint: pass --pipeline with the path of a pipeline.yaml)"]) from None
    except yaml.YAMLError as exc:
        raise PipelineError(path, [f"not valid YAML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise PipelineError(path, [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    if overrides:
        raw = apply_overrides(raw, overrides, path)
    pipeline = parse(raw, path, check_checkpoints=check_checkpoints)
    pipeline.overrides = list(overrides or [])
    return pipeline


def may_override(key: tuple[str, ...]) -> bool:
    """Whether ``--set`` may add ``key`` when the file lacks it: a key of an existing node (its
    `NODE_KEYS` and parameters, checked by `parse`) or of ``outputs``; never a new node, top-level
    key or thresholds entry (nothing would check that a new threshold is used)."""
    return (key[0] == "nodes" and len(key) >= 3) or (key[0] == "outputs" and len(key) >= 2)


def apply_overrides(raw: Any, overrides: list[str], path: str | Path = "<pipeline>") -> Any:
    """The loaded document ``raw`` with ``--set`` items applied (`may_override`); `PipelineError` otherwise."""
    from pneumomap.overrides import OverrideError, apply

    try:
        return apply(raw, overrides, may_add=may_override, where="the pipeline")
    except OverrideError as exc:
        raise PipelineError(path, [str(exc)]) from None


def replace_thresholds(text: str, thresholds: dict[str, Any]) -> str:
    """A pipeline file's text with only its top-level ``thresholds:`` block replaced.

    Everything else, comments included, is kept byte for byte (the tuner's writer).
    """
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.startswith("thresholds:")), None)
    block = yaml.safe_dump({"thresholds": thresholds}, sort_keys=False, default_flow_style=None)
    if start is None:
        return text + ("" if text.endswith("\n") else "\n") + block
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1  # keep the comments and blank lines that introduce the next block
    return "".join(lines[:start]) + block + "".join(lines[end:])


def replace_checkpoints(text: str, raw_nodes: dict, new_values: dict[str, str]) -> str:
    """A pipeline file's text with the ``checkpoint:`` value of each node in ``new_values`` replaced.

    ``raw_nodes`` is the loaded ``nodes:`` mapping of the same text (``Pipeline.raw["nodes"]``).
    Each value is found by its position in the YAML document (block or flow style, plain or
    quoted), so two nodes with the same old path can get different new ones; everything else,
    comments included, is kept byte for byte. The new value keeps the old one's quotes (plain
    when that reads back as the same string, else double-quoted). Raises ValueError when a
    node has no string checkpoint in ``text`` or two nodes share one YAML scalar (an alias).
    """
    import json
    import re

    if not new_values:
        return text
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"the pipeline is not valid YAML: {exc}") from None

    from pneumomap.overrides import yaml_child as child

    def reads_back(plain: str) -> bool:  # written as a plain scalar, it loads as that same string
        try:
            return yaml.safe_load(plain) == plain
        except yaml.YAMLError:
            return False

    spans: list[tuple[int, int, str]] = []
    seen: dict[int, str] = {}
    for name, new in new_values.items():
        body = raw_nodes.get(name) if isinstance(raw_nodes, dict) else None
        old = body.get("checkpoint") if isinstance(body, dict) else None
        scalar = child(child(child(document, "nodes"), str(name)), "checkpoint")
        if not isinstance(old, str) or not isinstance(scalar, yaml.ScalarNode) or scalar.value != old:
            raise ValueError(f"nodes.{name}.checkpoint: no checkpoint path {old!r} found in the pipeline text")
        if id(scalar) in seen:
            raise ValueError(f"nodes.{name}.checkpoint: shares one YAML value (an alias) with nodes.{seen[id(scalar)]}; "
                             "write each checkpoint path out")
        seen[id(scalar)] = str(name)
        new = str(new)
        if scalar.style == "'":
            rendered = "'" + new.replace("'", "''") + "'"
        elif scalar.style is None and re.fullmatch(r"[\w.~/+-]+", new) and reads_back(new):
            rendered = new
        else:
            rendered = json.dumps(new)  # a JSON string is a double-quoted YAML scalar
        spans.append((scalar.start_mark.index, scalar.end_mark.index, rendered))
    for start, end, rendered in sorted(spans, reverse=True):
        text = text[:start] + rendered + text[end:]
    return text


# ----------------------------------------------------------------------------- validation


class _Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str, hint: str = "") -> None:
        self.items.append(f"{key}: {message}" + (f" (hint: {hint})" if hint else ""))


def _closest(name: Any, candidates, what: str) -> str:
    """The hint for an unknown ``name``: the closest candidate (`pneumomap.suggest`), else them all."""
    match = closest(name, candidates)
    if match:
        return f"did you mean '{match}'?"
    return f"{what}: {', '.join(map(str, candidates))}" if candidates else ""


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {prefix: tree} if prefix else {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_value(param: Param, value: Any, where: str, errors: _Errors) -> Any:
    """Validate one parameter value against its signature; return it (normalised) or None."""
    def bad(message: str, hint: str = "") -> None:
        errors.add(where, message, hint)

    if param.type in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (param.type == "int" and not isinstance(value, int)):
            want = "an integer" if param.type == "int" else "a number"
            return bad(f"wrong type: expected {want}, got {_type_name(value)} {value!r}", f"write e.g. {param.default if param.default is not None else 0.5}")
        if not math.isfinite(value):
            return bad(f"not a finite number: {value!r}", f"write e.g. {param.default if param.default is not None else 0.5}")
        if (param.low is not None and value < param.low) or (param.high is not None and value > param.high):
            return bad(f"out of range: {value!r} is not in [{param.low}, {param.high}]",
                       f"use a value between {param.low} and {param.high}")
        return float(value) if param.type == "float" else int(value)
    if param.type == "bool":
        if not isinstance(value, bool):
            return bad(f"wrong type: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if param.type == "enum":
        if value not in param.choices:
            return bad(f"unknown value {value!r}", _closest(value, param.choices, "choose one of"))
        return value
    if param.type == "amounts":
        if not isinstance(value, dict):
            return bad(f"wrong type: expected a mapping {{dilate, raise}}, got {_type_name(value)}", param.help)
        out = {}
        sub = {"dilate": Param("int", 0, 256, 0), "raise": Param("float", 0.0, 1.0, 0.0)}
        for key, val in value.items():
            if key not in sub:
                errors.add(f"{where}.{key}", f"unknown key '{key}'", _closest(key, sub, "allowed keys"))
                continue
            out[key] = _check_value(sub[key], val, f"{where}.{key}", errors)
        return {**{k: p.default for k, p in sub.items()}, **out}
    raise AssertionError(param.type)


def _resolve_params(where: str, params: Any, definition: NodeDef, thresholds: dict[str, Any],
                    errors: _Errors) -> dict[str, Any]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        errors.add(where, f"wrong type: expected a mapping, got {_type_name(params)}", "write params: {key: value}")
        return {}
    flat = _flatten(thresholds)
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in definition.params:
            errors.add(f"{where}.{key}", f"unknown parameter '{key}'",
                       _closest(key, definition.params, "parameters of this kind") or "this kind takes no parameters")
            continue
        at = f"{where}.{key}"
        if isinstance(value, str) and value.startswith("$"):
            ref = value[1:]
            if ref not in flat:
                errors.add(at, f"'{value}' names no entry of the thresholds block",
                           _closest(ref, [k for k in flat], "thresholds entries"))
                continue
            at, value = f"thresholds.{ref} (used by {at})", flat[ref]
        out[key] = _check_value(definition.params[key], value, at, errors)
    for key, param in definition.params.items():
        if key not in out and key not in params:
            if param.required:
                errors.add(f"{where}.{key}", "missing required parameter",
                           f"add `{key}: ...` ({param.type}" + (f" in [{param.low}, {param.high}])" if param.low is not None else ")"))
            elif param.default is not None:  # no default: the key stays absent unless given
                out[key] = copy.deepcopy(param.default)
    return out


def _check_checkpoint(name: str, value: Any, base: Path, kind: str, errors: _Errors, check: bool) -> Path | None:
    where = f"nodes.{name}.checkpoint"
    if not isinstance(value, str) or not value:
        errors.add(where, "missing checkpoint" if value is None else f"wrong type: expected a path, got {_type_name(value)}",
                   f"give the directory written by `pneumomap train {kind} --out DIR` (relative to the YAML file)")
        return None
    path = resolve_checkpoint((base / value).resolve() if not Path(value).is_absolute() else Path(value))
    if check:
        if not path.is_dir():
            errors.add(where, f"checkpoint directory {path} does not exist",
                       f"train it with `pneumomap train {kind} --out {value}` or fix the path (relative to {base.resolve()})")
        else:
            missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
            if missing:
                errors.add(where, f"checkpoint {path} lacks {', '.join(missing)}",
                           "a stage checkpoint holds config.yaml + weights.safetensors (or DIR/best does)")
    return path


def parse(raw: Any, path: str | Path = "<pipeline>", check_checkpoints: bool = True) -> Pipeline:
    """Validate a loaded YAML document (see module doc); raise `PipelineError` with every problem."""
    path = Path(path)
    errors = _Errors()
    if not isinstance(raw, dict):
        raise PipelineError(path, [f"(top level): wrong type: expected a mapping with keys {', '.join(TOP_KEYS)}, "
                                   f"got {_type_name(raw)}"])
    for key in raw:
        if key not in TOP_KEYS:
            errors.add(str(key), f"unknown top-level key '{key}'", _closest(key, TOP_KEYS, "allowed keys"))
    if raw.get("version", 1) != 1:
        errors.add("version", f"unsupported version {raw.get('version')!r}", "this pneumomap reads version: 1")
    thresholds = raw.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        errors.add("thresholds", f"wrong type: expected a mapping, got {_type_name(thresholds)}")
        thresholds = {}
    raw_nodes = raw.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        errors.add("nodes", "missing or empty" if not raw_nodes else f"wrong type: expected a mapping, got {_type_name(raw_nodes)}",
                   "list the stages and ops under `nodes:` (see the repository's pipeline.yaml)")
        raw_nodes = {}

    nodes: dict[str, Node] = {}
    base = path.parent
    for name, body in raw_nodes.items():
        name = str(name)
        where = f"nodes.{name}"
        if name == IMAGE:
            errors.add(where, f"'{IMAGE}' is reserved for the input radiograph", "rename the node")
            continue
        if not isinstance(body, dict):
            errors.add(where, f"wrong type: expected a mapping, got {_type_name(body)}", "give `stage:` or `op:` and `inputs:`")
            continue
        for key in body:
            if key not in NODE_KEYS:
                errors.add(f"{where}.{key}", f"unknown key '{key}'", _closest(key, NODE_KEYS, "allowed keys"))
        if ("stage" in body) == ("op" in body):
            errors.add(where, "a node needs exactly one of `stage:` or `op:`",
                       f"stages: {', '.join(STAGE_NODES)}; ops: {', '.join(OPS)}")
            continue
        key = "stage" if "stage" in body else "op"  # the YAML key: a model node or an op node
        table = STAGE_NODES if key == "stage" else OPS
        kind = body[key]
        if kind not in table:
            errors.add(f"{where}.{key}", f"unknown {key} '{kind}'", _closest(kind, table, f"known {key}s"))
            continue
        definition = table[kind]
        inputs = body.get("inputs", [])
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            errors.add(f"{where}.inputs", f"wrong type: expected a list of node names, got {_type_name(inputs)}",
                       "write inputs: [node_a, node_b]")
            inputs = []
        checkpoint = None
        if key == "stage":
            checkpoint = _check_checkpoint(name, body.get("checkpoint"), base, kind, errors, check_checkpoints)
        elif "checkpoint" in body:
            errors.add(f"{where}.checkpoint", "an op has no checkpoint", "remove the key")
        when = body.get("when")
        if when is not None and (key != "stage" or not isinstance(when, str)):
            errors.add(f"{where}.when", "`when:` takes the name of a gate node and is for model nodes only"
                       if key == "stage" else "`when:` is for model nodes only", "remove it or name a gate node")
            when = None
        params = _resolve_params(f"{where}.params", body.get("params"), definition, thresholds, errors)
        if definition.check is not None and None not in params.values():
            problem = definition.check(params)
            if problem:
                errors.add(f"{where}.params", problem, "see the op's parameters in the README's pipeline.yaml reference")
        nodes[name] = Node(name, key == "stage", kind, list(inputs), definition.output, params, checkpoint, when)

    order = _check_graph(nodes, raw_nodes, errors)
    if order is not None:
        _check_types(nodes, order, errors)
    outputs = _check_outputs(raw.get("outputs"), nodes, thresholds, errors)
    if errors.items:
        raise PipelineError(path, [f"{e}" for e in errors.items])
    return Pipeline(path, {n: nodes[n] for n in order}, copy.deepcopy(thresholds), outputs, copy.deepcopy(raw))


def _check_graph(nodes: dict[str, Node], raw_nodes: dict, errors: _Errors) -> list[str] | None:
    names = [IMAGE, *raw_nodes]
    graph: dict[str, list[str]] = {}
    for node in nodes.values():
        deps = []
        for i, src in enumerate(node.inputs):
            if src not in names:
                errors.add(f"nodes.{node.name}.inputs[{i}]", f"no node named '{src}'", _closest(src, names, "nodes"))
            elif src == node.name:
                errors.add(f"nodes.{node.name}.inputs[{i}]", "a node cannot be its own input", "name another node")
            else:
                deps.append(src)
        if node.when is not None:
            if node.when not in nodes:
                errors.add(f"nodes.{node.name}.when", f"no node named '{node.when}'", _closest(node.when, list(nodes), "nodes"))
            else:
                deps.append(node.when)
        graph[node.name] = [d for d in deps if d != IMAGE]
    sorter = graphlib.TopologicalSorter(graph)
    try:
        order = [n for n in sorter.static_order() if n in nodes]
    except graphlib.CycleError as exc:
        cycle = list(reversed(exc.args[1]))
        errors.add(f"nodes.{cycle[0]}.inputs", "cycle: " + " -> ".join(cycle),
                   "a node's inputs must come before it; remove one edge of the cycle")
        return None
    return order


def _check_types(nodes: dict[str, Node], order: list[str], errors: _Errors) -> None:
    types = {IMAGE: IMAGE}
    for name in order:
        node = nodes[name]
        definition = (STAGE_NODES if node.is_model else OPS)[node.kind]
        roles = definition.inputs
        required = sum(not r.optional for r in roles)
        if not required <= len(node.inputs) <= len(roles):
            names = ", ".join(r.name + ("?" if r.optional else "") for r in roles)
            errors.add(f"nodes.{name}.inputs", f"{node.kind} takes {required}"
                       + (f" to {len(roles)}" if len(roles) != required else "") + f" input(s), got {len(node.inputs)}",
                       f"inputs are [{names}]")
        for i, (role, src) in enumerate(zip(roles, node.inputs)):
            have = types.get(src)
            if have is None:
                continue  # already reported (unknown input)
            if have not in role.types:
                errors.add(f"nodes.{name}.inputs[{i}]", f"'{src}' gives {have}, but input '{role.name}' of "
                           f"{node.kind} needs {' or '.join(role.types)}",
                           f"connect a node that outputs {' or '.join(role.types)}")
        if node.is_model and node.kind == "mapper" and node.inputs and node.inputs[0] in nodes:
            source = nodes[node.inputs[0]]
            if not source.is_model:
                errors.add(f"nodes.{name}.inputs[0]", f"'{source.name}' is an op; a mapper decodes the encoder "
                           "of a classifier or regressor node", "name the classifier or regressor node")
            node.output = "lungmap" if source.kind == "regressor" else "map"
        if node.when is not None and node.when in nodes and types.get(node.when) != "bool":
            errors.add(f"nodes.{name}.when", f"'{node.when}' is not a gate (it gives {types.get(node.when)})",
                       "name an `op: gate` node")
        types[name] = node.output


def _check_outputs(raw: Any, nodes: dict[str, Node], thresholds: dict, errors: _Errors) -> Outputs:
    empty = Outputs("", "", {}, None)
    if not isinstance(raw, dict):
        errors.add("outputs", "missing" if raw is None else f"wrong type: expected a mapping, got {_type_name(raw)}",
                   "add outputs: {probability: <classifier node>, map: <clip node>}")
        return empty

    def node_of(key: str, value: Any, want: str) -> str:
        if value not in nodes:
            errors.add(key, f"no node named {value!r}", _closest(value, list(nodes), "nodes"))
        elif nodes[value].output != want:
            errors.add(key, f"'{value}' gives {nodes[value].output}, expected {want}",
                       f"name a node that outputs {want}")
        return str(value)

    for key in raw:
        if key not in ("probability", "map", "decisions", "rsna"):
            errors.add(f"outputs.{key}", f"unknown key '{key}'", _closest(key, ("probability", "map", "decisions", "rsna"), "allowed keys"))
    probability = node_of("outputs.probability", raw.get("probability"), "probability")
    prob_map = node_of("outputs.map", raw.get("map"), "map8")
    decisions = raw.get("decisions") or {}
    if not isinstance(decisions, dict):
        errors.add("outputs.decisions", f"wrong type: expected a mapping, got {_type_name(decisions)}")
        decisions = {}
    for col, src in decisions.items():
        if col not in DECISION_TYPES:
            errors.add(f"outputs.decisions.{col}", f"unknown column '{col}'", _closest(col, DECISION_COLUMNS, "columns"))
        else:
            node_of(f"outputs.decisions.{col}", src, DECISION_TYPES[col])
    rsna_raw = raw.get("rsna", False)
    rsna = None
    if rsna_raw not in (False, None):
        definition = NodeDef((), "", {"threshold": Param("float", 0.0, 1.0, 0.5), "min_area": Param("int", 0, None, 0)})
        if rsna_raw is True:
            rsna_raw = {}
        rsna = _resolve_params("outputs.rsna", rsna_raw, definition, thresholds, errors)
    return Outputs(probability, prob_map, dict(decisions), rsna)
