"""Training recipes: YAML defaults per stage, user recipe files and ``--set key=value`` overrides.

Resolution order (later wins): ``recipes/common.yaml`` <- ``recipes/<stage>.yaml`` (DESIGN.md's
table) <- ``--recipe FILE`` (or a named recipe such as ``tiny`` = ``recipes/tiny/<stage>.yaml``)
<- ``--set``. Only keys of the first two layers exist; anything else fails with the closest name,
``model.*`` keys included (the fields of the stage's config, e.g. ``model.backbones``).
The loss follows the classifier's target unless set: ``target=three_class`` alone takes ``ce``;
a loss that does not fit the target or the stage is an error.
The result is a `Recipe`, a frozen dataclass checked when built; its `to_dict` is the run's recipe.yaml.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pneumomap.suggest import did_you_mean

RECIPE_DIR = Path(__file__).with_name("recipes")


@dataclass(frozen=True)
class StageSpec:
    """What a training stage name means: the stage kind it builds and, for mappers, the input."""
    kind: str                  # lungs | classifier | regressor | mapper
    side: str | None = None    # right | left for per-lung stages, None for whole-image stages
    source: str | None = None  # mappers: the training stage whose encoder is borrowed
    metric: str = "dice"       # validation metric that picks DIR/best
    higher_is_better: bool = True

    @property
    def region(self) -> str:
        """The input the stage's network takes, as its stage class declares it (`Stage.region`: the whole
        image or one lung half, the spec's ``side``); a mapper takes the input of its ``source``."""
        from pneumomap.stages.base import FROM_SOURCE, stage_class

        region = stage_class(self.kind).region
        return stage_spec(self.source).region if region == FROM_SOURCE else region


STAGES: dict[str, StageSpec] = {
    "lungs": StageSpec("lungs"),
    "classifier": StageSpec("classifier", metric="auc"),
    "regressor_right": StageSpec("regressor", side="right", metric="mae", higher_is_better=False),
    "regressor_left": StageSpec("regressor", side="left", metric="mae", higher_is_better=False),
    "mapper_whole": StageSpec("mapper", source="classifier"),
    "mapper_right": StageSpec("mapper", side="right", source="regressor_right"),
    "mapper_left": StageSpec("mapper", side="left", source="regressor_left"),
}


class RecipeError(ValueError):
    """A recipe file or override that cannot be used; the message says which key and how to fix it."""




def stage_spec(stage: str) -> StageSpec:
    if stage not in STAGES:
        raise RecipeError(f"unknown stage '{stage}'{did_you_mean(stage, STAGES)}; stages: {', '.join(STAGES)}")
    return STAGES[stage]


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of key: value, got {type(data).__name__}")
    return data


def defaults(stage: str) -> dict:
    """The reference recipe of ``stage``: common keys overlaid with the stage's table values."""
    stage_spec(stage)
    recipe = _load_yaml(RECIPE_DIR / "common.yaml")
    recipe.update(_load_yaml(RECIPE_DIR / f"{stage}.yaml"))
    return recipe


def recipe_path(stage: str, recipe: str) -> Path:
    """A recipe argument -> file: an existing path, or a name of recipes/<name>/<stage>.yaml."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPE_DIR / recipe / f"{stage}.yaml"
    if named.is_file():
        return named
    names = sorted(p.name for p in RECIPE_DIR.iterdir() if p.is_dir())
    raise RecipeError(f"--recipe {recipe}: no such file, and not a recipe name{did_you_mean(recipe, names)}; "
                      f"names: {', '.join(names)}")


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> None:
    """Overlay ``update`` on ``base`` in place; keys must exist in ``base`` (except under ``model``)."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base and not prefix.startswith("model."):  # model keys: checked by the stage config
            raise RecipeError(f"{where}: unknown recipe key '{dotted}'{did_you_mean(dotted, _keys(base, prefix))}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, where, f"{dotted}.")
        else:
            base[key] = copy.deepcopy(value)


def _keys(tree: dict, prefix: str = "") -> list[str]:
    return [f"{prefix}{k}" for k in tree]


def parse_set(items: list[str]) -> dict:
    """['a=1', 'model.backbones=[resnet10t]'] -> nested dict; values parsed as YAML (`pneumomap.overrides`)."""
    from pneumomap.overrides import OverrideError, nested

    try:
        return nested(items)
    except OverrideError as exc:
        raise RecipeError(str(exc)) from None


def resolve(stage: str, recipe: str | None = None, overrides: list[str] | None = None) -> "Recipe":
    """The full `Recipe` of a training run; raises RecipeError naming a bad key or value."""
    resolved = defaults(stage)
    given: set[str] = set()  # top-level keys set by the user (recipe file or --set)
    if recipe:
        path = recipe_path(stage, recipe)
        update = _load_yaml(path)
        _merge(resolved, update, str(path))
        given |= set(update)
    update = parse_set(overrides or [])
    _merge(resolved, update, "--set")
    given |= set(update)
    target = target_of(resolved.get("target"))
    if "loss" not in given and target is not None:
        resolved["loss"] = target.losses[0]  # the loss that fits the target
    return Recipe.from_dict(stage, resolved)


_CHOICES = {
    "schedule": ("cosine", "constant"),
    "target": ("binary", "three_class", "extent"),
    "loss": ("bce", "focal", "ce", "mse_mae", "dice"),
    "cache": (True, False),
}
_POSITIVE = ("epochs", "batch_size", "accumulate")
_FLAGS = ("hflip", "amp", "channels_last")        # true | false
_COUNTS = ("seed", "patience", "workers")         # integers >= 0; max_images too, or null
_TEXTS = ("train_split", "val_split")             # split.csv values; cache_dir and encoder_from too, or null


@dataclass(frozen=True)
class Target:
    """A classifier's training target (recipe key ``target``): what it learns and the losses that fit."""
    losses: tuple[str, ...]   # the first is the loss taken when the recipe leaves ``loss`` unset
    detailed: bool = False    # the detailed class (`pneumomap.labels.CLASSES`, one output each), not RSNA Target


TARGETS: dict[str, Target] = {"binary": Target(("bce", "focal")), "three_class": Target(("ce", "focal"), detailed=True)}


def target_of(name: str | None) -> Target | None:
    """The classifier `Target` of a recipe's ``target`` value; None for none (or ``extent``, no classifier's)."""
    return TARGETS.get(name)


def model_config(stage: str, recipe: "Recipe") -> dict:
    """The stage config a recipe builds (``model`` plus what the stage and target imply: a regressor's
    side, a three-class classifier's classes; `pneumomap.train.tasks.Task.model_config` of its kind).
    Mappers: the overrides of `Mapper.from_source`."""
    from pneumomap.train.tasks import task_class

    return task_class(stage_spec(stage).kind).model_config(stage, recipe)


def check_model_keys(stage: str, recipe: "Recipe") -> None:
    """``model.*``: known fields of the stage config (closest name suggested)."""
    from pneumomap.stages.base import stage_class

    spec = stage_spec(stage)
    fields = [f.name for f in dataclasses.fields(stage_class(spec.kind).config_class)]
    for key in recipe.model:
        if key not in fields:
            raise RecipeError(f"unknown recipe key 'model.{key}'{did_you_mean(f'model.{key}', [f'model.{f}' for f in fields])}; "
                              f"the {spec.kind} config's keys: {', '.join(fields)}")


def dump(recipe: "Recipe") -> str:
    """The recipe.yaml text of a run (the keys of its stage, in the order of the recipe files)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _only(*kinds: str) -> dict:
    """Field metadata: a recipe key that only stages of ``kinds`` have (e.g. the classifier's ``target``)."""
    return {"kinds": kinds}


@dataclass(frozen=True)
class Recipe:
    """The resolved recipe of one training stage (``stage``, a name of `STAGES`); checked when built.

    The defaults are those of recipes/common.yaml (a test keeps them equal); keys marked `_only` exist
    for the named stage kinds alone. `to_dict` gives the recipe.yaml mapping, `from_dict` reads one."""

    stage: str
    model: dict = field(default_factory=dict)  # stage config keys (`model_config`)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-2
    schedule: str = "cosine"
    lr_decay: float = 1.0
    min_lr: float = 0.0
    loss: str = "dice"
    rotate: float = 15
    hflip: bool = False
    accumulate: int = 1
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    patience: int = 0
    workers: int = 2
    cache: bool = True
    cache_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    max_images: int | None = None
    encoder_from: str | None = None
    target: str | None = field(default=None, metadata=_only("classifier"))
    focal_gamma: float = field(default=2.0, metadata=_only("classifier"))
    class_weights: list | None = field(default=None, metadata=_only("classifier"))

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def keys_of(cls, stage: str) -> list[str]:
        """The recipe keys of ``stage``, in recipe.yaml order."""
        kind = stage_spec(stage).kind
        return [f.name for f in dataclasses.fields(cls)
                if f.name != "stage" and kind in f.metadata.get("kinds", (kind,))]

    def keys(self) -> list[str]:
        return self.keys_of(self.stage)

    def to_dict(self) -> dict:
        """The recipe.yaml mapping: this stage's keys and their values."""
        return {key: getattr(self, key) for key in self.keys()}

    @classmethod
    def from_dict(cls, stage: str, data: dict, where: str = "recipe") -> "Recipe":
        """A recipe of ``stage`` from a mapping; unknown keys fail with the closest name, values are checked."""
        keys = cls.keys_of(stage)
        for key in data:
            if key not in keys:
                raise RecipeError(f"{where}: unknown recipe key '{key}'{did_you_mean(key, keys)}")
        return cls(stage, **data)

    def replace(self, **changes) -> "Recipe":
        """A copy with some keys changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Types and ranges of the values; errors name the key and the accepted values."""
        present = self.keys()
        for key, choices in _CHOICES.items():
            if key in present and getattr(self, key) not in choices:
                raise RecipeError(f"recipe key '{key}': {getattr(self, key)!r} is not one of "
                                  f"{', '.join(map(str, choices))}")
        for key in _POSITIVE:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise RecipeError(f"recipe key '{key}': expected a positive integer, got {value!r}")
        for key in ("lr", "weight_decay", "lr_decay", "min_lr", "rotate"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise RecipeError(f"recipe key '{key}': expected a number >= 0, got {value!r}")
        for key in _FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"recipe key '{key}': expected true or false, got {getattr(self, key)!r}")
        for key in (*_COUNTS, "max_images"):
            value = getattr(self, key)
            if not (value is None and key == "max_images") and (type(value) is not int or value < 0):
                raise RecipeError(f"recipe key '{key}': expected an integer >= 0, got {value!r}")
        for key in (*_TEXTS, "cache_dir", "encoder_from"):
            value = getattr(self, key)
            if not isinstance(value, str) and not (value is None and key not in _TEXTS):
                raise RecipeError(f"recipe key '{key}': expected a text value, got {value!r}")
        if not isinstance(self.model, dict):
            raise RecipeError(f"recipe key 'model': expected a mapping of stage config keys, got {self.model!r}")
        from pneumomap.train.tasks import task_class

        task_class(stage_spec(self.stage).kind).check_recipe(self.stage, self)  # model keys and values, loss
