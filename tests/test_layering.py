"""The architecture kept by tests (issue 18 item 5): the layering of DESIGN.md ("Dependencies point one
way: `stages` knows nothing of `train` or `infer`; `train` and `infer` never import each other"), read
from every module's imports (ast, at any depth: inside functions too), and the helpers that live once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pneumomap

PACKAGE = Path(pneumomap.__file__).resolve().parent
LAYERS = ("stages", "train", "infer")
FORBIDDEN = {"stages": {"train", "infer"}, "train": {"infer"}, "infer": {"train"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, anywhere in it: ``import a.b`` gives a.b; ``from a import b`` gives
    a and a.b (b may be a module); relative imports are resolved against ``module``; a string given to
    ``importlib.import_module`` counts too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pneumomap" and parts[1] in LAYERS else None


def breaches(path: Path) -> list[str]:
    """The imports of the module at ``path`` that its layer may not make."""
    module = module_name(path)
    own = layer(module)
    imports = imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    return sorted(name for name in imports if own and layer(name) in FORBIDDEN[own])


LAYERED = sorted(p for name in LAYERS for p in (PACKAGE / name).rglob("*.py"))


def test_every_layer_is_read():
    assert {layer(module_name(p)) for p in LAYERED} == set(LAYERS)
    assert module_name(PACKAGE / "stages" / "__init__.py") == "pneumomap.stages"


def test_imports_inside_functions_and_relative_imports_are_seen():
    source = ("import os\n"
              "def f():\n    from pneumomap.infer.cli import add_precision_argument\n"
              "class C:\n    def g(self):\n        from ..train import loop\n        from . import base\n"
              "importlib.import_module('pneumomap.infer.spec')\n")
    found = imported_modules(source, "pneumomap.stages.run")
    assert {"os", "pneumomap.infer.cli", "pneumomap.train", "pneumomap.train.loop", "pneumomap.stages.base",
            "pneumomap.infer.spec"} <= found
    assert "pneumomap.stages.x" in imported_modules("from .x import y", "pneumomap.stages", is_package=True)


@pytest.mark.parametrize("path", LAYERED, ids=module_name)
def test_a_layer_imports_only_what_it_may(path):
    module = module_name(path)
    found = breaches(path)
    assert not found, (f"{module} ({layer(module)}) imports {found}: {layer(module)} may not import "
                       f"{' or '.join(sorted(FORBIDDEN[layer(module)]))} (DESIGN.md, Layout); move what both "
                       "need below them (stages, or a small top-level module)")


# ----------------------------------------------------------------------------- helpers that live once


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _constants(path: Path) -> set:
    return {n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Constant)}


def test_checkpoint_file_names_are_spelled_only_in_checkpoints():
    from pneumomap import checkpoints

    spelled = {module_name(p) for p in _python_files() if _constants(p) & set(checkpoints.CHECKPOINT_FILES)}
    assert spelled == {"pneumomap.checkpoints"}, "use pneumomap.checkpoints' CONFIG_FILE / WEIGHTS_FILE"


def test_name_matching_lives_only_in_suggest():
    users = {module_name(p) for p in _python_files() if "difflib" in imported_modules(p.read_text(encoding="utf-8"),
                                                                                      module_name(p))}
    assert users == {"pneumomap.suggest"}, "use pneumomap.suggest.closest / did_you_mean"


def test_one_identity_function():
    """A module-level function that returns its only argument: `pneumomap.stages.reader.identity`, once."""
    found = []
    for path in _python_files():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and len(node.args.args) == 1:
                body = [b for b in node.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
                if (len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Name)
                        and body[0].value.id == node.args.args[0].arg):
                    found.append(f"{module_name(path)}.{node.name}")
    assert found == ["pneumomap.stages.reader.identity"]


def test_the_intensity_percentiles_are_set_only_in_preprocess():
    from pneumomap.stages import preprocess

    spelled = {module_name(p) for p in _python_files() if preprocess.HIGH_PERCENTILE in _constants(p)}
    assert spelled == {"pneumomap.stages.preprocess"}, "use preprocess.intensity_range"


def test_the_checkpoint_rule_is_the_same_everywhere(tmp_path):
    from pneumomap import provenance
    from pneumomap.checkpoints import BEST, CONFIG_FILE, checkpoint_folder, run_folder
    from pneumomap.infer import spec

    run, plain = tmp_path / "run", tmp_path / "plain"
    (run / BEST).mkdir(parents=True)
    (plain / BEST).mkdir(parents=True)
    (plain / CONFIG_FILE).write_text("kind: lungs\n")  # a checkpoint folder of its own: its best/ is not it
    for folder, expected in ((run, run / BEST), (plain, plain), (tmp_path / "none", tmp_path / "none")):
        assert checkpoint_folder(folder) == expected
        assert spec.resolve_checkpoint(folder) == expected
        assert provenance.checkpoint_record(folder)["path"] == str(expected.resolve())
    assert run_folder(run / BEST) == run and run_folder(plain) is None


def test_did_you_mean():
    from pneumomap.suggest import closest, did_you_mean

    assert closest("clasifier", ["lungs", "classifier"]) == "classifier"
    assert closest(3, [1, 3]) == "3"
    assert closest("zzz", ["lungs"]) is None
    assert did_you_mean("lung", ["lungs"]) == " (did you mean 'lungs'?)" and did_you_mean("zzz", ["lungs"]) == ""


def test_the_demo_trains_the_recipes_stages_each_mapper_after_its_source():
    from pneumomap import demo
    from pneumomap.train.recipes import STAGES

    assert demo.TRAIN_ORDER == tuple(STAGES)
    for mapper, source in demo.ENCODER_OF.items():
        assert STAGES[mapper].kind == "mapper" and demo.TRAIN_ORDER.index(source) < demo.TRAIN_ORDER.index(mapper)
    assert set(demo.ENCODER_OF) == {name for name, s in STAGES.items() if s.kind == "mapper"}
