"""The stage base class, stage configs and the registry (`create_stage`, `load_stage`).

In the style of timm's ``register_model`` / ``create_model``: each stage class registers
itself under its ``kind``; ``create_stage(kind, config)`` builds one from a config (a typed
dataclass, a plain dict or None for the full-size defaults) and ``load_stage(dir)`` rebuilds
one from a checkpoint directory::

    DIR/config.yaml          kind, format, config (the dataclass as plain YAML)
    DIR/weights.safetensors  the stage's state_dict

Every stage class also declares ``tiny``: the overrides that make a CPU-test-sized variant
(`tiny_config(kind)`), kept beside the real defaults like MONAI's tiny-network configs.

What differs between the kinds is declared or implemented on their classes, so callers (the
pipeline runner, ``pneumomap stage``, training) ask the stage instead of branching on its kind:
``region`` / `Stage.input_region` (which input it takes: the whole image, one lung half, or its
source's), `Stage.side`, ``output`` / `Stage.output_type` (the value a pipeline node of the kind
gives), `Stage.activation` (logits -> probabilities), `Stage.node_output` (that value from a batch),
`Stage.check_node_params`, `Stage.inference_parts` (what to trace for CPU inference) and
`Stage.describe` (sentences of an algorithm description).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

import torch
import yaml
from torch import nn

from pneumomap.checkpoints import CONFIG_FILE, WEIGHTS_FILE, checkpoint_folder

FORMAT = 1

C = TypeVar("C", bound="StageConfig")
S = TypeVar("S", bound="Stage")


class ConfigError(ValueError):
    """A stage config that cannot be used; the message names the key and the fix."""


@dataclasses.dataclass
class StageConfig:
    """Base of the stage configs: flat dataclasses of YAML-friendly fields.

    Tuples are written to YAML as lists and read back as tuples. Subclasses check their
    values in ``validate`` (called after construction) and raise `ConfigError`.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values that the type alone does not (choices, lengths); raise ConfigError."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None, where: str = "config") -> C:
        """Build from a mapping, checking keys and types; errors name ``where.key``."""
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; "
                              f"allowed keys: {names}")
        values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (checked like from_dict)."""
        return type(self).from_dict({**self.to_dict(), **changes})


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (and turn lists into tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {choices}")


def check_size(name: str, size: tuple[int, ...]) -> None:
    """Raise ConfigError unless ``size`` is a positive (h, w)."""
    if len(size) != 2 or min(size) < 8:
        raise ConfigError(f"{name}: expected (height, width) of at least 8 pixels, got {list(size)}")


def size_text(size: Any) -> str:
    """'512 x 320 pixels (height x width)' for an (h, w) pair; anything else as it is (descriptions)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return f"{size[0]} x {size[1]} pixels (height x width)"
    return str(size)


def timm_name(encoder: str) -> str:
    """The timm model name of an encoder name (smp's 'tu-<timm name>' without its prefix)."""
    return encoder[3:] if encoder.startswith("tu-") else encoder


WHOLE_IMAGE = "whole"    # a stage's input: the whole radiograph (`preprocess.to_model_input`)
LUNG_HALF = "lung_half"  # one lung's half crop, the stage's `Stage.side` (`lungs.lung_half_inputs`)
FROM_SOURCE = "source"   # the input of the stage whose encoder it decodes (a mapper; `Stage.input_region` resolves it)


class Stage(nn.Module):
    """A stage program: an nn.Module built from a config, saved and loaded as one directory.

    Subclasses set ``kind``, ``config_class``, ``tiny``, ``region`` and ``output`` and are registered
    with `register_stage`. Inputs are (B, 1, h, w) float tensors in [-1, 1] (`to_model_input`).
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type[StageConfig]] = StageConfig
    tiny: ClassVar[dict[str, Any]] = {}
    region: ClassVar[str] = WHOLE_IMAGE  # the kind's input: WHOLE_IMAGE, LUNG_HALF or FROM_SOURCE
    output: ClassVar[str] = ""  # the value type a pipeline node of the kind gives (`pneumomap.infer.spec`'s types)

    def __init__(self, config: StageConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the model input."""
        return tuple(self.config.input_size)  # type: ignore[attr-defined]

    @property
    def input_region(self) -> str:
        """What this stage's network takes: `WHOLE_IMAGE` or `LUNG_HALF` (its `side`'s crop)."""
        return self.region

    @property
    def on_lung_half(self) -> bool:
        """Whether the input is one lung's half crop (cut by `lungs.lung_half_inputs`), not the whole image."""
        return self.input_region == LUNG_HALF

    @property
    def side(self) -> str | None:
        """The patient's lung a per-lung stage works on ('right' or 'left'); None for whole-image stages."""
        return None

    @property
    def output_type(self) -> str:
        """The value type of this stage's pipeline node (``output``; a lung-half mapper: 'lungmap')."""
        return self.output

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (as `forward` gives them) -> probabilities: a sigmoid (score stages: or a softmax)."""
        return torch.sigmoid(logits.float())

    def node_output(self, x: torch.Tensor, features: list[torch.Tensor] | None = None,
                    params: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The per-image value a pipeline node of this kind stores, for the batch ``x`` (``features``: the
        encoder features to reuse, see the subclass; ``params``: the node's params)."""
        raise NotImplementedError(f"{type(self).__name__} does not run as a pipeline node")

    def check_node_params(self, params: Mapping[str, Any]) -> None:
        """Raise ValueError, naming the param, when a pipeline node's ``params`` do not fit this checkpoint."""

    def inference_parts(self) -> list[tuple[nn.Module, str, str]]:
        """(owner, attribute, label) of the heavy networks worth tracing for CPU inference
        (`pneumomap.stages.inference.optimize_for_inference`)."""
        return []

    @classmethod
    def describe(cls, config: Mapping[str, Any], inputs: list[str]) -> list[str]:
        """Sentences saying what a pipeline node of this kind is, from its checkpoint's config as read
        from config.yaml (unvalidated: a missing value reads '?') and the node's ``inputs``."""
        return []

    @classmethod
    def explanation(cls) -> str:
        """What a pipeline with a node of this kind adds to the explainability paragraph of an algorithm
        description ('' for nothing)."""
        return ""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.yaml`` and ``weights.safetensors`` (atomically) into ``directory``."""
        from safetensors.torch import save

        from pneumomap.fileio import atomic_write_bytes, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"kind": self.kind}))
        text = yaml.safe_dump({"kind": self.kind, "format": FORMAT, "config": self.config.to_dict()},
                              sort_keys=False)
        atomic_write_text(directory / CONFIG_FILE, text)
        return directory

    @classmethod
    def load(cls: type[S], directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> S:
        """Rebuild the stage saved in ``directory`` (weights bit-identical), in eval mode."""
        stage = load_stage(directory, map_location)
        if not isinstance(stage, cls):
            raise TypeError(f"{directory}: holds a {stage.kind!r} stage, not {cls.kind!r}")
        return stage


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[S]) -> type[S]:
    """Class decorator: make ``cls`` available to create_stage/load_stage under ``cls.kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"stage kind {cls.kind!r} registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def list_stages() -> list[str]:
    """The registered stage kinds."""
    _import_all()
    return sorted(_REGISTRY)


def stage_class(kind: str) -> type[Stage]:
    """The class registered under ``kind``; a clear error for an unknown kind."""
    _import_all()
    if kind not in _REGISTRY:
        raise KeyError(f"unknown stage kind {kind!r}; known kinds: {sorted(_REGISTRY)}")
    return _REGISTRY[kind]


def _import_all() -> None:
    # the stage modules register themselves on import
    from pneumomap.stages import classifier, lungs, mapper, regressor  # noqa: F401


def make_config(kind: str, config: Mapping[str, Any] | StageConfig | None = None,
                where: str = "config") -> StageConfig:
    """The config object of ``kind`` from a dict, a config object or None (full-size defaults)."""
    cls = stage_class(kind).config_class
    if config is None:
        return cls()
    if isinstance(config, StageConfig):
        if not isinstance(config, cls):
            raise ConfigError(f"{where}: a {kind!r} stage needs a {cls.__name__}, got {type(config).__name__}")
        return config
    return cls.from_dict(config, where)


def create_stage(kind: str, config: Mapping[str, Any] | StageConfig | None = None, **overrides: Any) -> Stage:
    """Build a stage of ``kind`` ('lungs', 'classifier', 'regressor', 'mapper') from ``config``.

    ``config`` is a config object, a dict of its fields, or None for the full-size defaults;
    keyword ``overrides`` replace single fields. Weights are random unless the config names
    a local pretrained file. The module is returned in training mode (like timm).
    """
    cfg = make_config(kind, config)
    if overrides:
        cfg = cfg.replace(**overrides)
    return stage_class(kind)(cfg)


def tiny_config(kind: str, **overrides: Any) -> StageConfig:
    """A CPU-test-sized config of ``kind`` (timm ``test_*`` backbones, 64 px), plus ``overrides``."""
    cls = stage_class(kind)
    return cls.config_class.from_dict({**cls.tiny, **overrides}, f"tiny_config({kind!r})")


def read_config(directory: str | os.PathLike) -> tuple[str, StageConfig]:
    """(kind, config) of a checkpoint directory, validated; errors name the file."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stage checkpoint here (expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                "a training run keeps its checkpoint in OUT/best")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{path}: expected a mapping with 'kind' and 'config'")
    extra = sorted(set(data) - {"kind", "format", "config"})
    if extra:
        raise ConfigError(f"{path}: unknown top-level key(s) {extra}")
    if data.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"{path}: checkpoint format {data['format']} is not supported (this version reads {FORMAT})")
    return data["kind"], make_config(data["kind"], data.get("config"), where=f"{path}: config")


def load_stage(directory: str | os.PathLike, map_location: str | torch.device = "cpu",
               overrides: list[str] | None = None) -> Stage:
    """Rebuild a saved stage from ``directory`` alone (config.yaml + weights.safetensors), in eval mode.

    A directory holding ``best/`` (a training run) means ``directory/best``. ``overrides``: ``--set
    KEY=VALUE`` items (`pneumomap.overrides`) applied to the saved config before it is validated, as
    if config.yaml said so (e.g. ``flip_tta=true``); one that changes the network's shape is refused.
    """
    from safetensors.torch import load_file

    directory = checkpoint_folder(directory)
    kind, cfg = read_config(directory)
    if overrides:
        cfg = override_config(kind, cfg, overrides, directory / CONFIG_FILE)
    from pneumomap.stages.encoders import weights_follow

    with weights_follow():  # the checkpoint holds every weight: no backbone file is read
        stage = stage_class(kind)(_without_pretrained(cfg))
    stage.config = cfg  # as saved (the pretrained file names stay as provenance)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the config beside it is a {kind!r} stage)")
    state = load_file(str(weights), device=str(map_location))
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(f"{weights}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}): a diverged "
                         "training run; use another epoch's checkpoint")
    try:
        stage.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        if overrides:
            raise ConfigError(f"--set {' '.join(overrides)}: changes the network of {directory}; its weights do not "
                              "fit it (override only what does not change the weights, e.g. flip_tta)") from None
        raise RuntimeError(f"{weights}: does not match its {CONFIG_FILE}: {exc}") from None
    return stage.to(map_location).eval()


def override_config(kind: str, cfg: StageConfig, overrides: list[str], where: str | os.PathLike) -> StageConfig:
    """``cfg`` with ``--set`` items applied to its fields, validated like the file; `ConfigError` otherwise."""
    from pneumomap.overrides import OverrideError, apply

    try:
        data = apply(cfg.to_dict(), overrides, where=f"the {kind} config of {where}")
    except OverrideError as exc:
        raise ConfigError(str(exc)) from None
    return make_config(kind, data, where=f"{where}: config (with --set)")


def _without_pretrained(cfg: StageConfig) -> StageConfig:
    """The config with its pretrained-file fields emptied (kept in config.yaml as provenance)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.name == "pretrained":
            value = getattr(cfg, f.name)
            changes[f.name] = () if isinstance(value, tuple) else None
    if not changes:
        return cfg
    return dataclasses.replace(cfg, **changes)
