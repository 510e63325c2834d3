"""docs/contracts.md matches the code: every signature in its ```python blocks names a function, class,
method or field that exists, with parameters that exist (in their order) and none that is required
left out; every name in backticks in its table of modules exists in that module."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"
SECTION_MODULES = re.compile(r"`(pneumomap(?:\.\w+)*)`")
CALL = re.compile(r"^(?:def\s+)?([A-Za-z_][\w.]*)\(")
CLASS = re.compile(r"^(?:@dataclass(?:\([^)]*\))?\s+)?class\s+(\w+)(?:\([^)]*\))?:(.*)$")
TABLE_ROW = re.compile(r"^\|\s*`(pneumomap/[\w/]+\.py)`\s*\|(.*)\|\s*$")
NAMED = re.compile(r"`([A-Za-z_]\w*)(\(([^`]*)\))?(?:\s*->[^`]*)?`")  # `name`, `name(params)`, `name(...) -> x`


@dataclass
class Signature:
    """One line of a ```python block that names something in the code."""

    line: int
    text: str
    modules: list[ModuleType]
    owner: str | None        # the class a method or field line is indented under
    name: str                # dotted from the module, e.g. 'load_rsna', 'Truth.codes'
    params: str | None       # the text between the parentheses; None for a field or class line


def _strip_comment(text: str) -> str:
    return re.sub(r"\s+#.*$", "", text)


def _parenthesised(text: str, start: int) -> str:
    """The text between the '(' at ``start`` and its matching ')'."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    raise ValueError("no closing parenthesis")


def signatures(text: str) -> Iterator[Signature]:
    """Every signature line of the ```python blocks, with the modules its section names."""
    modules: list[ModuleType] = []
    in_python = in_block = False
    owner: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("## "):
            modules = [importlib.import_module(m) for m in SECTION_MODULES.findall(raw)]
            continue
        if raw.startswith("```"):
            in_block = not in_block
            in_python = in_block and raw.strip() == "```python"
            owner = None
            continue
        if not in_python or not raw.strip() or raw.lstrip().startswith("#") or raw.strip() == "@dataclass" \
                or raw.strip().startswith("@dataclass("):
            continue
        line = _strip_comment(raw).rstrip()
        indented = raw.startswith(" ")
        match = CLASS.match(line.strip())
        if match and not indented:
            owner = match.group(1)
            yield Signature(number, raw, modules, None, owner, None)
            for field in filter(None, (f.strip() for f in match.group(2).split(";"))):
                yield Signature(number, raw, modules, owner, f"{owner}.{field.split(':')[0].strip()}", None)
            continue
        if not indented:
            owner = None
        call = CALL.match(line.strip())
        if call:
            name = f"{owner}.{call.group(1)}" if owner and indented else call.group(1)
            params = _parenthesised(line.strip(), call.end() - 1)
            yield Signature(number, raw, modules, owner if indented else None, name, params)
        elif indented and owner:
            for field in filter(None, (f.strip() for f in line.split(";"))):
                yield Signature(number, raw, modules, owner, f"{owner}.{field.split(':')[0].strip()}", None)
        else:
            raise AssertionError(f"{DOC}:{number}: a ```python line that is neither a class, a field nor a "
                                 f"signature: {raw.strip()!r}")


def _resolve(sig: Signature) -> Any:
    """The object ``sig.name`` names in one of its section's modules (a field: its class, checked by name)."""
    head, *rest = sig.name.split(".")
    for module in sig.modules:
        if head == module.__name__.rsplit(".", 1)[-1] and rest:  # 'metrics.map_metric' in pneumomap.metrics
            head, *rest = rest
        if hasattr(module, head):
            obj = getattr(module, head)
            for part in rest:
                obj = getattr(obj, part, None) if part in _members(obj) else None
            return obj
    return None


def _members(cls: Any) -> set[str]:
    """Names a class (or module) offers: attributes, annotations, dataclass fields, __init__ parameters."""
    names = set(dir(cls))
    if isinstance(cls, type):
        for klass in cls.__mro__:
            names |= set(getattr(klass, "__annotations__", {}))
        if dataclasses.is_dataclass(cls):
            names |= {f.name for f in dataclasses.fields(cls)}
        try:
            names |= set(inspect.signature(cls).parameters)
        except (TypeError, ValueError):
            pass
    return names


def _documented(params: str) -> list[str]:
    tree = ast.parse(f"def _({params}): pass").body[0]
    args = tree.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *([args.vararg] if args.vararg else []),
                            *args.kwonlyargs, *([args.kwarg] if args.kwarg else []))]


def parameter_problem(documented: list[str], real: inspect.Signature) -> str | None:
    """Why ``documented`` does not match ``real``: a parameter that does not exist, one out of order,
    or a required one left out (optional ones may be left out); None when it matches."""
    names = [n for n in real.parameters if n not in ("self", "cls")]
    documented = [n for n in documented if n not in ("self", "cls")]
    missing = [n for n in documented if n not in names]
    if missing:
        return f"no parameter(s) {missing}; the parameters are {names}"
    if documented != sorted(documented, key=names.index):
        return f"parameters out of order; they are {names}"
    required = [n for n, p in real.parameters.items() if n not in ("self", "cls") and p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    left_out = [n for n in required if n not in documented]
    return f"required parameter(s) {left_out} left out" if left_out else None


SIGNATURES = list(signatures(DOC.read_text(encoding="utf-8")))


def test_the_reader_finds_the_signatures():
    names = {s.name for s in SIGNATURES}
    assert {"read_image", "map_images", "ImageMeta.image_id", "RsnaDataset.image_path", "load_truth",
            "create_stage"} <= names
    assert len(SIGNATURES) > 40


def test_parameter_problems_are_found():
    def real(a, b, c=1, *, d=2): ...

    sig = inspect.signature(real)
    assert parameter_problem(["a", "b"], sig) is None
    assert parameter_problem(["a", "b", "d"], sig) is None
    assert "no parameter" in parameter_problem(["a", "b", "background"], sig)
    assert "out of order" in parameter_problem(["b", "a"], sig)
    assert "left out" in parameter_problem(["a"], sig)


@pytest.mark.parametrize("sig", SIGNATURES, ids=lambda s: f"line{s.line}-{s.name}")
def test_a_documented_signature_matches_the_code(sig):
    where = f"{DOC.name}:{sig.line}: {sig.text.strip()!r}"
    assert sig.modules, f"{where}: its section names no module (`pneumomap....` in the heading)"
    if sig.params is None and "." in sig.name:  # a field
        owner, field = sig.name.rsplit(".", 1)
        cls = _resolve(Signature(sig.line, sig.text, sig.modules, None, owner, None))
        assert cls is not None and field in _members(cls), f"{where}: {owner} has no field {field!r}"
        return
    obj = _resolve(sig)
    assert obj is not None, f"{where}: {sig.name} is not in {[m.__name__ for m in sig.modules]}"
    if sig.params is not None:
        try:
            documented = _documented(sig.params)
        except SyntaxError:
            pytest.fail(f"{where}: the parameters do not read as a Python parameter list")
        problem = parameter_problem(documented, inspect.signature(obj))
        assert problem is None, f"{where}: {problem}"


def _expand(pattern: str) -> list[str]:
    """'a/{b,c}.py' -> ['a/b.py', 'a/c.py'] (one brace group)."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    return [pattern[:match.start()] + part + pattern[match.end():] for part in match.group(1).split(",")]


def test_every_module_in_the_table_exists():
    text = DOC.read_text(encoding="utf-8")
    paths = [path for path in re.findall(r"^\|\s*`(pneumomap/[^`]+)`", text, re.M)]
    assert len(paths) > 10
    root = DOC.parents[1]
    gone = [p for p in paths if not all(any(root.glob(each)) for each in _expand(p))]
    assert not gone, f"{DOC.name}: table of modules names {gone}, which are not in the repository"


def _table_names() -> list[tuple[str, str, str | None]]:
    """(module, name, parameters or None) of each backticked name in the table of modules."""
    found = []
    for raw in DOC.read_text(encoding="utf-8").splitlines():
        row = TABLE_ROW.match(raw)
        if row:
            module = row.group(1)[:-3].replace("/", ".")
            found += [(module, m.group(1), m.group(3)) for m in NAMED.finditer(row.group(2))]
    return found


@pytest.mark.parametrize("module, name, params", _table_names(), ids=lambda v: str(v))
def test_a_name_in_the_table_of_modules_exists(module, name, params):
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"{DOC.name}: table of modules: `{module}` has no {name!r}"
    if params is not None and callable(obj):
        try:
            documented = _documented(params)
        except SyntaxError:
            return  # a call with values (an example such as resolve_device("auto")), not a signature
        problem = parameter_problem(documented, inspect.signature(obj))
        assert problem is None, f"{DOC.name}: table of modules: {module}.{name}({params}): {problem}"
