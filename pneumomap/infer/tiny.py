"""Random-weight checkpoints for a pipeline's model nodes: the tiny CPU variant for tests and
the full-size architecture for speed benchmarks.

``write_pipeline(folder, tiny=True)`` saves one stage checkpoint per model node of the
repository's pipeline.yaml under ``folder/checkpoints/<node>`` (tiny: timm ``test_*``
backbones at 64 px, `pneumomap.stages.base.tiny_config`; full: the stage defaults, e.g.
EfficientNet-B4 at 512 px) and writes ``folder/pipeline.yaml``: the same DAG and thresholds
with those checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pneumomap.fileio import atomic_write_text

DEFAULT_PIPELINE = Path(__file__).resolve().parents[2] / "pipeline.yaml"


def write_pipeline(folder: str | Path, tiny: bool = True, source: str | Path = DEFAULT_PIPELINE,
                   thresholds: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Random-weight checkpoints for every model node of ``source`` + a pipeline using them."""
    import torch

    from pneumomap.stages.base import create_stage, tiny_config
    from pneumomap.stages.mapper import Mapper

    folder = Path(folder)
    raw = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    torch.manual_seed(seed)
    stages: dict[str, Any] = {}
    for name, body in raw["nodes"].items():
        if "stage" not in body:
            continue
        kind = body["stage"]
        overrides = {"side": body["params"]["side"]} if kind == "regressor" else {}
        if kind == "mapper":
            extra = {"decoder_channels": tiny_config("mapper").decoder_channels} if tiny else {}
            stage = Mapper.from_source(stages[body["inputs"][0]], **extra)
        else:
            stage = create_stage(kind, tiny_config(kind, **overrides) if tiny else None, **({} if tiny else overrides))
        stages[name] = stage
        stage.save(folder / "checkpoints" / name)
        body["checkpoint"] = f"checkpoints/{name}"
    if thresholds:
        raw["thresholds"] = {**raw["thresholds"], **thresholds}
    path = folder / "pipeline.yaml"
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return path


def write_inputs(folder: str | Path, n: int = 8, size: int = 128, seed: int = 0, corrupt: bool = True) -> Path:
    """A folder of ``n`` phantom DICOMs (`pneumomap.synth`) plus, with ``corrupt``, one file that
    looks like a DICOM but is not (it sorts into the middle of the list)."""
    import shutil

    from pneumomap import synth
    from pneumomap.labels import IMAGES_DIR

    folder = Path(folder)
    synth.generate(folder / "rsna", n=n, seed=seed, size=size)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = sorted((folder / "rsna" / IMAGES_DIR).glob("*.dcm"))
    for path in files:
        shutil.copy2(path, images / path.name)
    if corrupt:
        middle = files[len(files) // 2].stem
        (images / f"{middle}0-corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"not really a dicom file" * 10)
    return images
