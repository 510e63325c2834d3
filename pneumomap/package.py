"""Package a pipeline as the two uploads of the MIDRC XAI Challenge: the Docker image and the program.

  pneumomap package --pipeline tuned.yaml --out submission/ [--description FILE]
                    [--base-image IMAGE] [--python-version 3.11]

writes under --out (the organisers' starting kit: QTIM-Lab/Challenges, XAI/starting_kit):

  docker/ -> docker.zip (the Dockerfile at the zip root), the image the platform builds:
      FROM --base-image (a CUDA PyTorch runtime; it provides Python, torch and torchvision), then
      `pip install --no-index` from docker/wheels/ of pneumomap's own wheel and every other runtime
      dependency, each pinned (docker/requirements.txt) to the version installed here. The wheels
      are downloaded now, with pip (PyPI must be reachable here); building the image needs no network.
  program/ -> submission.zip (the files at the zip root), extracted into /app/ingested_program and
      run as `bash entrypoint.sh INPUT OUTPUT PROGRAM` from any working directory: `pneumomap infer
      --format midrc` of program/pipeline.yaml into OUTPUT, the run's own files in a temporary folder.
      An image that cannot be read still gets its row and its floor-value map; the entrypoint then
      prints the failures and succeeds. pipeline.yaml is --pipeline byte for byte but each model
      node's `checkpoint:`, now checkpoints/<node> (a copy of the checkpoint it resolved to). The one
      description file is --description (.pdf, .docx or .txt) or, without it, algorithm_description.txt
      GENERATED from the pipeline, the checkpoints' configs and their training runs: edit it.
      With --set, pipeline.yaml is --pipeline with those items written in (a comment names them).
  provenance.json: what the uploads were made from: versions, the command line, the pipeline's and
      each checkpoint's sha256, the --set items (`pneumomap.provenance`).

Check a package locally before uploading:
  bash submission/program/entrypoint.sh IMAGES/ OUT/ submission/program   (any working directory;
      PNEUMOMAP_PYTHON=/path/to/python picks the interpreter), then `pneumomap score OUT --truth ...`
  docker build -t pneumomap-xai submission/docker
  docker run --rm --gpus all --network none -v $PWD/submission/program:/app/ingested_program:ro \\
      -v $PWD/IMAGES:/app/input_data:ro -v $PWD/OUT:/app/output pneumomap-xai \\
      bash /app/ingested_program/entrypoint.sh /app/input_data/ /app/output/ /app/ingested_program

Exit status: 0 ok, 2 unusable pipeline, description, source tree or wheel download.

Length (about 700 lines, over the ~400 the project aims at): it writes both uploads (Docker context and
program archive) and their description; splitting the description writer out is the next step (issue 18).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pneumomap.checkpoints import CONFIG_FILE, run_folder

DEFAULT_BASE_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
DEFAULT_PYTHON = "3.11"  # the default base image's Python
DEFAULT_GLIBC = "2.35"   # its Ubuntu 22.04: the newest manylinux wheels it runs
BASE_PACKAGES = ("torch", "torchvision")  # provided by the base image, with their own dependencies
PROJECT = "pneumomap"
GENERATED_DESCRIPTION = "algorithm_description.txt"
MIN_WORDS = 250
BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
BUILD_FILE_PREFIXES = ("README", "LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


class PackageError(Exception):
    """Something that makes a package impossible; the message says what and how to fix it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="the (tuned) pipeline YAML to package")
    parser.add_argument("--out", required=True, help="the folder to write docker/, docker.zip, program/ and "
                        "submission.zip into (those four are replaced; nothing else there is touched)")
    parser.add_argument("--description", default=None, help="the algorithm description (.pdf, .docx or .txt, "
                        f"{MIN_WORDS} words or more); default: {GENERATED_DESCRIPTION} generated from the pipeline "
                        "and its checkpoints, for you to edit")
    parser.add_argument("--base-image", default=DEFAULT_BASE_IMAGE, help="the Dockerfile's BASE_IMAGE: a CUDA "
                        "PyTorch runtime image providing torch and torchvision (default: %(default)s)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON, help="the base image's Python (MAJOR.MINOR): "
                        "the wheels are downloaded for it (default: %(default)s)")
    parser.add_argument("--glibc", default=DEFAULT_GLIBC, help="the base image's glibc (MAJOR.MINOR): wheels for "
                        "manylinux up to this version are accepted (default: %(default)s, Ubuntu 22.04)")
    from pneumomap.overrides import add_set_argument

    add_set_argument(parser, "a key of the pipeline, e.g. thresholds.classifier=0.8 (relative checkpoint paths: to the "
                     "pipeline file, as in it); the packaged pipeline.yaml has them written in")


def main(args: argparse.Namespace) -> int:
    from pneumomap import provenance
    from pneumomap.fileio import atomic_write_text
    from pneumomap.infer.spec import PipelineError, load
    from pneumomap.overrides import write_pipeline

    try:
        started = datetime.datetime.now()
        pipeline = load(args.pipeline, overrides=args.overrides)
        with tempfile.TemporaryDirectory() as given:  # the pipeline with the --set items written in
            path = write_pipeline(pipeline, Path(given) / "pipeline.yaml") if args.overrides else args.pipeline
            result = package(path, args.out, description=args.description, base_image=args.base_image,
                             python_version=args.python_version, glibc=args.glibc)
        record = provenance.build(pipeline)  # beside the uploads: what they were made from
        atomic_write_text(Path(args.out) / "provenance.json", json.dumps(record, indent=2) + "\n")
    except (PackageError, PipelineError, OSError) as exc:  # OSError: a file that cannot be read or written
        print(f"pneumomap package: error: {exc}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"pneumomap package: warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    seconds = (datetime.datetime.now() - started).total_seconds()
    print(f"pneumomap package: {out}/ in {seconds:.0f} s")
    print(f"  docker.zip      {_size(result.docker_zip):>9}  Dockerfile, requirements.txt and {result.wheels} wheels "
          f"(pneumomap {result.version} + {result.wheels - 1} dependencies) over {args.base_image}")
    print(f"  submission.zip  {_size(result.program_zip):>9}  entrypoint.sh, pipeline.yaml, {result.checkpoints} "
          f"checkpoint(s), {result.description}" + (" (GENERATED: edit it, then package again with "
                                                     "--description)" if result.generated else ""))
    print(f"  check it: bash {out / 'program' / 'entrypoint.sh'} IMAGES/ OUT/ {out / 'program'}")
    return 0


@dataclass
class Result:
    docker_zip: Path
    program_zip: Path
    wheels: int
    version: str
    checkpoints: int
    description: str
    generated: bool
    warnings: list[str] = field(default_factory=list)


def package(pipeline: str | Path, out: str | Path, description: str | Path | None = None,
            base_image: str = DEFAULT_BASE_IMAGE, python_version: str = DEFAULT_PYTHON,
            glibc: str = DEFAULT_GLIBC) -> Result:
    """Write both uploads (module doc) into ``out``; raise `PackageError` / `PipelineError` when impossible."""
    out = Path(out)
    _check_version("--python-version", python_version)
    _check_version("--glibc", glibc)
    docker, program = out / "docker", out / "program"
    for folder, marker in ((docker, "Dockerfile"), (program, "entrypoint.sh")):
        if folder.exists() and any(folder.iterdir()) and not (folder / marker).is_file():
            raise PackageError(f"{folder} exists and is not a previous package (no {marker}); choose another --out")
    program_info = build_program(pipeline, program, description)
    program_zip = zip_folder(program, out / "submission.zip")
    image_info = build_image(docker, base_image, python_version, glibc)
    docker_zip = zip_folder(docker, out / "docker.zip")
    return Result(docker_zip, program_zip, image_info["wheels"], image_info["version"], program_info["checkpoints"],
                  program_info["description"], program_info["generated"],
                  program_info["warnings"] + image_info["warnings"])


def _check_version(option: str, value: str) -> None:
    if not re.fullmatch(r"\d+\.\d+", value):
        raise PackageError(f"{option} {value!r}: write MAJOR.MINOR, e.g. 3.11")


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError


def _fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def zip_folder(folder: Path, path: Path) -> Path:
    """``folder``'s files at the root of the zip ``path`` (sorted; wheels stored, the rest deflated)."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            compression = zipfile.ZIP_STORED if file.suffix == ".whl" else zipfile.ZIP_DEFLATED
            archive.write(file, file.relative_to(folder).as_posix(), compress_type=compression)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the program


ENTRYPOINT = """#!/usr/bin/env bash
# The MIDRC XAI program, written by `pneumomap package`. The platform runs
#   bash /app/ingested_program/entrypoint.sh /app/input_data/ /app/output/ /app/ingested_program
# from a working directory of its own. OUTPUT receives one <name>.png per input, the
# image-level-classifications.csv and the description; the run's own files go to a temporary
# folder. PNEUMOMAP_PYTHON picks the interpreter (default: python3).
set -u
if [ "$#" -lt 2 ]; then
  echo "usage: bash entrypoint.sh INPUT OUTPUT [PROGRAM]" >&2
  exit 2
fi
INPUT="$1"
OUTPUT="$2"
GIVEN="${3:-$(dirname -- "${BASH_SOURCE[0]}")}"
PROGRAM="$(cd -- "$GIVEN" && pwd)" || { echo "entrypoint.sh: no program folder $GIVEN" >&2; exit 2; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pneumomap-work.XXXXXX")" || exit 2
trap 'rm -rf -- "$WORK"' EXIT
status=0
"${PNEUMOMAP_PYTHON:-python3}" -m pneumomap infer --format midrc --pipeline "$PROGRAM/pipeline.yaml" \\
  --input "$INPUT" --out "$OUTPUT" --work "$WORK" --description "$PROGRAM/"DESCRIPTION --quiet || status=$?
# 1 means some images failed, each with its row and map, only when infer wrote its tables (Python
# itself also exits with 1, on an uncaught error or a missing module)
if [ "$status" -eq 1 ] && [ -f "$WORK/failures.csv" ] && [ -f "$OUTPUT/image-level-classifications.csv" ]; then
  echo "entrypoint.sh: warning: some images could not be processed; each still has its row and its" \\
       "floor-value map in $OUTPUT. The failures:" >&2
  cat -- "$WORK/failures.csv" >&2 || true
  exit 0
elif [ "$status" -ne 0 ]; then
  echo "entrypoint.sh: pneumomap infer failed with exit status $status" >&2
  exit "$status"
fi
"""


def build_program(pipeline_path: str | Path, program: Path, description: str | Path | None = None) -> dict:
    """The program folder (module doc); returns its description's name, whether it was generated,
    the number of checkpoints and the warnings. The packaged pipeline is loaded back and checked."""
    from pneumomap import submission
    from pneumomap.infer import spec

    pipeline_path = Path(pipeline_path)
    if description is not None:
        try:
            description = submission.check_description(description)
        except (ValueError, FileNotFoundError) as exc:
            raise PackageError(str(exc)) from None
    pipeline = spec.load(pipeline_path)
    warnings: list[str] = []
    _fresh(program)
    new_values = {}
    for node in pipeline.model_nodes:
        if not re.fullmatch(r"[\w-][\w.-]*", node.name):
            raise PackageError(f"nodes.{node.name}: the node's name cannot be a folder name (checkpoints/<node>); "
                               "rename it with letters, digits, '_', '-' and '.'")
        shutil.copytree(node.checkpoint, program / "checkpoints" / node.name)
        new_values[node.name] = f"checkpoints/{node.name}"
    # bytes, not text mode: the file's own line endings stay as they are
    text = pipeline_path.read_bytes().decode("utf-8")
    try:
        packaged_text = spec.replace_checkpoints(text, pipeline.raw.get("nodes", {}), new_values)
    except ValueError as exc:
        raise PackageError(f"{pipeline_path}: {exc}") from None
    packaged_path = program / "pipeline.yaml"
    packaged_path.write_bytes(packaged_text.encode("utf-8"))
    check_program_pipeline(pipeline, packaged_path)

    if description is None:
        name, generated = GENERATED_DESCRIPTION, True
        (program / name).write_text(describe(pipeline, text), encoding="utf-8")
    else:
        name, generated = description.name, False
        shutil.copyfile(description, program / name)
        if description.suffix.lower() == ".txt":
            words = submission.count_words(description.read_text(encoding="utf-8", errors="replace"))
            if words < MIN_WORDS:
                warnings.append(f"--description {description}: {words} words; the organisers ask for at least "
                                f"{MIN_WORDS}")
    found = [p.name for p in submission.description_files(program)]
    if found != [name]:
        raise PackageError(f"{program}: the description files would be {found}; the organisers accept exactly one")
    entry = program / "entrypoint.sh"
    entry.write_text(ENTRYPOINT.replace("DESCRIPTION", shlex.quote(name)), encoding="utf-8")
    entry.chmod(0o755)
    return {"description": name, "generated": generated, "checkpoints": len(new_values), "warnings": warnings}


def check_program_pipeline(original: Any, packaged_path: Path) -> None:
    """The packaged pipeline loads and each model node resolves to its copied checkpoint, which holds
    the same files as the original one."""
    from pneumomap.infer import spec

    packaged = spec.load(packaged_path)
    folder = packaged_path.parent.resolve()
    for node in original.model_nodes:
        copy = folder / "checkpoints" / node.name
        got = packaged.nodes[node.name].checkpoint
        if got != spec.resolve_checkpoint(copy):
            raise PackageError(f"{packaged_path}: nodes.{node.name} resolves to {got}, not to its copy {copy}")
        source = {p.relative_to(node.checkpoint): p.stat().st_size for p in node.checkpoint.rglob("*") if p.is_file()}
        copied = {p.relative_to(copy): p.stat().st_size for p in copy.rglob("*") if p.is_file()}
        if source != copied:
            raise PackageError(f"{copy}: the copy of {node.checkpoint} differs from it")
    if packaged.thresholds != original.thresholds or packaged.raw.get("outputs") != original.raw.get("outputs"):
        raise PackageError(f"{packaged_path}: the thresholds or outputs changed while packaging")


# ----------------------------------------------------------------------------- the description


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _model_sentence(node: Any) -> str:
    """What one model node is: kind, backbones, input size, from its checkpoint's config.yaml."""
    from pneumomap.infer.spec import STAGE_NODES
    from pneumomap.stages.base import size_text, stage_class

    saved = _read_yaml(node.checkpoint / CONFIG_FILE) or {}
    cfg = saved.get("config") if isinstance(saved, dict) else None
    cfg = cfg if isinstance(cfg, dict) else {}
    role = STAGE_NODES[node.kind].help
    parts = [f"Node '{node.name}' is a {node.kind} stage ({role})."]
    parts += stage_class(node.kind).describe(cfg, list(node.inputs))
    if "input_size" in cfg:
        parts.append(f"Its input is {size_text(cfg['input_size'])}.")
    if node.when:
        parts.append(f"It runs only for images that gate '{node.when}' passes.")
    parts.append(_training_sentence(node))
    return " ".join(parts)


def _training_sentence(node: Any) -> str:
    from pneumomap.train.recipes import STAGES as TRAINING

    run = run_folder(node.checkpoint)
    history = _read_json(run / "history.json") if run else None
    recipe = _read_yaml(run / "recipe.yaml") if run else None
    if not isinstance(history, list) and not isinstance(recipe, dict):
        return ("No training run folder with history.json or recipe.yaml was found beside this checkpoint: "
                "[EDIT: describe how it was trained, on which images, for how many epochs].")
    parts = []
    if isinstance(recipe, dict):
        bits = []
        if "epochs" in recipe:
            bits.append(f"{recipe['epochs']} epochs planned")
        if "loss" in recipe:
            bits.append(f"loss {recipe['loss']}")
        if "lr" in recipe:
            bits.append(f"AdamW at learning rate {recipe['lr']:g}" + (f" ({recipe['schedule']} schedule)"
                                                                    if recipe.get("schedule") else "")
                        if isinstance(recipe["lr"], (int, float)) else f"learning rate {recipe['lr']}")
        if "batch_size" in recipe:
            bits.append(f"batch size {recipe['batch_size']}")
        augment = []
        if recipe.get("rotate"):
            augment.append(f"random rotations up to {recipe['rotate']} degrees")
        if recipe.get("hflip"):
            augment.append("left-right mirroring")
        if augment:
            bits.append("augmentation by " + " and ".join(augment))
        if recipe.get("train_split") or recipe.get("val_split"):
            bits.append(f"training on the '{recipe.get('train_split')}' split and validation on the "
                        f"'{recipe.get('val_split')}' split of the training data")
        if recipe.get("max_images"):
            bits.append(f"at most {recipe['max_images']} images each")
        if bits:
            parts.append("Training recipe (recipe.yaml): " + "; ".join(bits) + ".")
    if isinstance(history, list) and history and all(isinstance(r, dict) for r in history):
        parts.append(f"It was trained for {len(history)} epoch(s) (history.json).")
        kinds = [s for s in TRAINING.values() if s.kind == node.kind]
        if kinds:
            key, higher = f"val_{kinds[0].metric}", kinds[0].higher_is_better
            scored = [r for r in history if isinstance(r.get(key), (int, float))]
            if scored:
                best = (max if higher else min)(scored, key=lambda r: r[key])
                parts.append(f"The checkpoint used is the best epoch by validation {kinds[0].metric}: epoch "
                             f"{best.get('epoch', '?')}, {kinds[0].metric} {best[key]:.4g}.")
    parts.append("[EDIT: name the training data set and its size.]")
    return " ".join(parts)


def _op_sentence(node: Any) -> str:
    from pneumomap.infer.ops import OPS

    params = ", ".join(f"{k} = {json.dumps(v)}" for k, v in node.params.items())
    inputs = ", ".join(f"'{i}'" for i in node.inputs)
    return (f"'{node.name}' ({node.kind}: {OPS[node.kind].help}) takes {inputs}"
            + (f", with {params}" if params else "") + ".")


def _flat(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def tune_header(text: str) -> list[str]:
    """The ``# tune:`` lines at the top of a tuned pipeline, without the prefix."""
    from pneumomap.infer.tune import HEADER

    lines = []
    for line in text.splitlines():
        if not line.startswith(HEADER):
            break
        lines.append(line[len(HEADER):].strip())
    return lines


def _explainability(pipeline: Any, gated: list[str]) -> str:
    from pneumomap.stages.base import stage_class

    kinds = {n.kind for n in pipeline.nodes.values()}
    text = ("The opacity map is the explanation of the image-level result: it shows where in the lungs the pipeline "
            "finds the opacities that make the image positive.")
    text += "".join(stage_class(kind).explanation() for kind in dict.fromkeys(n.kind for n in pipeline.model_nodes))
    if gated:
        text += (f" Images that the gate {', '.join(repr(g) for g in gated)} does not pass are treated as negative: "
                 "the networks that depend on the gate are not run for them and their map holds the floor value.")
    if "mask" in kinds:
        text += " Outside the lung mask the map holds the lowest value."
    if "overestimate" in kinds:
        text += (" The map is deliberately grown (dilated and raised), because under the challenge's pixel-wise "
                 "log loss a missed opacity costs more than a false alarm.")
    if "clip" in kinds:
        text += " The values are clipped so that no pixel claims certainty."
    return text


def describe(pipeline: Any, text: str) -> str:
    """A draft algorithm description (at least `MIN_WORDS` words) generated from ``pipeline``, its text
    (for the tune header), the checkpoints' configs and their training runs, marked for the user to edit."""
    from pneumomap import submission

    models, ops = pipeline.model_nodes, pipeline.op_nodes
    date = datetime.date.today().isoformat()
    gated = sorted({n.when for n in models if n.when})
    out = [
        f"[GENERATED by `pneumomap package` on {date} from {pipeline.path.name}. This is a draft written from the "
        "pipeline file, the checkpoints' configurations and their training logs: check every statement, replace each "
        "[EDIT: ...] note and delete this paragraph before you submit.]",
        "",
        "Pneumonia likelihood and opacity maps from chest radiographs with a pipeline of separately trained networks",
        "",
        "1. Overview",
        f"For every chest radiograph the program outputs the probability that the image shows pneumonia and a map "
        f"of the same size as the image whose value at each pixel is the likelihood that the pixel shows lung "
        f"opacity (an 8-bit PNG, probability = value / 255). It runs a directed acyclic graph of {len(models)} "
        f"neural-network stages and {len(ops)} deterministic post-processing operations, written in a pipeline "
        f"file and executed by the open-source pneumomap package. Each radiograph is decoded from its DICOM file, "
        f"its intensities are rescaled so that the 0.5th and 99.5th percentiles map to -1 and +1, and it is resized "
        f"by area averaging to each network's input size; the maps are brought back to the original size at the end.",
        "",
        "2. Networks",
        *[f"- {_model_sentence(node)}" for node in models],
        "",
        "3. Decisions and post-processing (in the order they run)",
        *[f"- {_op_sentence(node)}" for node in ops],
        f"The image-level score is the output of node '{pipeline.outputs.probability}' and the map is the output of "
        f"node '{pipeline.outputs.map}'.",
        "",
        "4. Thresholds",
        "Every tunable number of the pipeline is in one block of the pipeline file: "
        + "; ".join(f"{k} = {json.dumps(v)}" for k, v in _flat(pipeline.thresholds)) + ".",
    ]
    header = tune_header(text)
    if header:
        out += ["The thresholds were tuned on validation images with `pneumomap tune`, which records:",
                *[f"  {line}" for line in header]]
    else:
        out.append("The pipeline file records no threshold tuning (no `pneumomap tune` header): "
                   "[EDIT: say how the thresholds were chosen].")
    out += [
        "",
        "5. Explainability",
        _explainability(pipeline, gated),
        "",
        "6. Training data and validation",
        "[EDIT: the data sets used for training, validation and tuning (for example the RSNA Pneumonia Detection "
        "Challenge radiographs and lung masks), how they were split, any pretraining of the backbones, and the "
        "results you measured on held-out images.]",
    ]
    result = "\n".join(out) + "\n"
    if submission.count_words(result) < MIN_WORDS:  # a very small pipeline: say what a reader will still need
        result += ("\n7. Notes for the editor\n[EDIT: this pipeline is small, so the generated text is short. The "
                   "organisers ask for at least 250 words: describe the motivation of the design, the preprocessing "
                   "of the radiographs, the architecture of each network and why it was chosen, the losses and "
                   "optimisation used in training, how the thresholds were chosen, how the maps should be read, what "
                   "the method cannot do (for example images of children, lateral views or devices), and what you "
                   "would change with more data or time. Mention the software used and its version.]\n")
    return result


# ----------------------------------------------------------------------------- the image


DOCKERFILE = """# The MIDRC XAI image, written by `pneumomap package` on {date}: pneumomap {version}.
# The base image provides Python {python}, CUDA, torch and torchvision (the platform gives one GPU).
# Everything else is installed from wheels/ without network: pneumomap's own wheel and its
# dependencies, pinned in requirements.txt to the versions it was checked with.
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
COPY requirements.txt /opt/pneumomap/requirements.txt
COPY wheels/ /opt/pneumomap/wheels/
RUN python3 -c "import sys; v = '%d.%d' % sys.version_info[:2]; sys.exit(None if v == '{python}' else \\
'the wheels are for Python {python} but the base image has Python ' + v + ': package with --python-version ' + v)" \\
 && python3 -c "import torch, torchvision" \\
 && python3 -m pip install --no-cache-dir --no-index --find-links /opt/pneumomap/wheels \\
      -r /opt/pneumomap/requirements.txt \\
 && python3 -c "import pneumomap.infer.runner, pneumomap.stages.base" \\
 && python3 -m pneumomap infer --help > /dev/null
"""


def target_environment(python_version: str) -> dict[str, str]:
    """Marker variables of the image: CPython ``python_version`` on x86-64 Linux."""
    from packaging.markers import default_environment

    env = dict(default_environment())
    full = python_version if python_version.count(".") >= 2 else f"{python_version}.0"
    env.update(python_version=".".join(python_version.split(".")[:2]), python_full_version=full,
               implementation_name="cpython", implementation_version=full,
               platform_python_implementation="CPython", os_name="posix", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64")
    return env


def dependency_closure(root: str = PROJECT, exclude: Iterable[str] = BASE_PACKAGES,
                       python_version: str | None = None) -> dict[str, tuple[str, str]]:
    """Every distribution ``root`` needs at run time, from the installed metadata (importlib.metadata):
    canonical name -> (name, installed version), ``root`` itself left out. Requirements are followed
    with their markers evaluated for the image (``python_version``, Linux x86-64) and their extras;
    the walk stops at ``exclude`` (the base image's torch and torchvision), so their own dependencies
    enter only when another package needs them too (numpy, pillow). Raises `PackageError` naming each
    needed distribution that is not installed here."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = target_environment(python_version or "%d.%d" % sys.version_info[:2])
    excluded = {canonicalize_name(n) for n in exclude}
    found: dict[str, importlib.metadata.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    missing: list[str] = []
    queue: list[tuple[str, frozenset[str], str]] = [(root, frozenset(), "")]
    while queue:
        name, extras, parent = queue.pop(0)
        key = canonicalize_name(name)
        if key in excluded or (key in extras_seen and extras <= extras_seen[key]):
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{name} (required by {parent})")
            extras_seen[key] = set(extras)
            continue
        extras_seen[key] = extras_seen.get(key, set()) | set(extras)
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e})
                                                  for e in ("", *sorted(extras_seen[key]))):
                continue
            queue.append((req.name, frozenset(req.extras), dist.metadata["Name"] or name))
    if missing:
        raise PackageError(f"needed in the image (Python {env['python_version']}, Linux) but not installed here: "
                           f"{', '.join(sorted(set(missing)))}; install them (pip install ...) or package with "
                           "--python-version of this interpreter")
    found.pop(canonicalize_name(root), None)
    return {key: (dist.metadata["Name"] or key, dist.version) for key, dist in sorted(found.items())}


def platforms(glibc: str = DEFAULT_GLIBC) -> list[str]:
    """pip's --platform values for an x86-64 Linux with this glibc: manylinux2014 and older, and each
    manylinux_2_N up to it."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise PackageError(f"--glibc {glibc}: manylinux wheels need glibc 2.17 or newer")
    return (["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
            + [f"manylinux_2_{n}_x86_64" for n in range(5, minor + 1)])


def download_wheels(pins: dict[str, tuple[str, str]], dest: Path, python_version: str,
                    glibc: str = DEFAULT_GLIBC) -> list[Path]:
    """``pip download`` one wheel per pin for the image's Python and platform into ``dest``."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    local = [f"{name}=={version}" for name, version in pins.values() if "+" in version]
    if local:
        raise PackageError(f"installed here from a local build, not on PyPI: {', '.join(local)}; install a "
                           "released version (pip install NAME==VERSION) and package again")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               *[arg for p in platforms(glibc) for arg in ("--platform", p)],
               "-d", str(dest), *[f"{name}=={version}" for name, version in pins.values()]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise PackageError(f"pip download of the {len(pins)} dependency wheels for Python {python_version} "
                           f"(manylinux, glibc <= {glibc}) failed; PyPI must be reachable where you run "
                           f"`pneumomap package` (the image build itself needs no network):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
    lacking = [f"{name}=={version}" for key, (name, version) in pins.items() if key not in have]
    if lacking:
        raise PackageError(f"pip download gave no wheel for {', '.join(lacking)} (Python {python_version}, "
                           f"manylinux glibc <= {glibc})")
    return wheels


def source_tree() -> Path:
    """The repository pneumomap is installed from: the parent of the ``pneumomap`` package directory."""
    import pneumomap

    package_dir = Path(pneumomap.__file__).resolve().parent
    root = package_dir.parent
    try:
        importlib.metadata.distribution(PROJECT)
    except importlib.metadata.PackageNotFoundError:
        raise PackageError(f"{PROJECT} is not installed (it runs from {package_dir}); install it from its "
                           "repository with `pip install -e REPOSITORY` and package again") from None
    if not any((root / f).is_file() for f in ("pyproject.toml", "setup.py")):
        raise PackageError(f"{PROJECT} is installed at {package_dir}, not from a source tree (no pyproject.toml in "
                           f"{root}); install it from its repository with `pip install -e REPOSITORY`")
    return root


def _build_isolation_needed(root: Path) -> bool:
    """True unless this environment already has every build requirement of ``root``'s pyproject.toml."""
    import tomllib

    from packaging.requirements import Requirement

    try:
        build = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8")).get("build-system", {})
    except (OSError, ValueError):
        return True
    for line in build.get("requires", ["setuptools"]):
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            return True
        if not req.specifier.contains(version, prereleases=True):
            return True
    return False


def build_own_wheel(dest: Path) -> Path:
    """pneumomap's wheel (``pip wheel --no-deps``) built from a copy of its source tree: the build files
    at the root and the package itself, so nothing is written into the repository."""
    root = source_tree()
    with tempfile.TemporaryDirectory(prefix="pneumomap-wheel-") as tmp:
        tree = Path(tmp) / root.name
        tree.mkdir()
        for entry in root.iterdir():
            if entry.is_file() and (entry.name in BUILD_FILES or entry.name.upper().startswith(BUILD_FILE_PREFIXES)):
                shutil.copy2(entry, tree / entry.name)
        shutil.copytree(root / PROJECT, tree / PROJECT, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        built = Path(tmp) / "wheel"
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(built), str(tree)]
        if not _build_isolation_needed(root):
            command[4:4] = ["--no-build-isolation"]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(built.glob(f"{PROJECT}-*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
            raise PackageError(f"building the {PROJECT} wheel from {root} failed:\n{tail}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], dest / wheels[0].name))


def build_image(docker: Path, base_image: str = DEFAULT_BASE_IMAGE, python_version: str = DEFAULT_PYTHON,
                glibc: str = DEFAULT_GLIBC) -> dict:
    """docker/: Dockerfile, requirements.txt and wheels/ (module doc); returns the wheel count, pneumomap's
    version and warnings."""
    from packaging.utils import parse_wheel_filename

    pins = dependency_closure(PROJECT, BASE_PACKAGES, python_version)
    _fresh(docker)
    wheels_dir = docker / "wheels"
    own = build_own_wheel(wheels_dir)
    version = str(parse_wheel_filename(own.name)[1])
    download_wheels(pins, wheels_dir, python_version, glibc)
    wheels = sorted(wheels_dir.glob("*.whl"))
    lines = [f"{PROJECT}=={version}", *[f"{name}=={v}" for name, v in pins.values()]]
    (docker / "requirements.txt").write_text(
        "# pneumomap and every runtime dependency but torch and torchvision (the base image's), pinned to\n"
        "# the versions installed where `pneumomap package` ran; their wheels are in wheels/.\n"
        + "\n".join(lines) + "\n", encoding="utf-8")
    (docker / "Dockerfile").write_text(DOCKERFILE.format(
        date=datetime.date.today().isoformat(), version=version, python=python_version, base_image=base_image),
        encoding="utf-8")
    warnings = []
    torch_here = _installed_version("torch")
    if torch_here and torch_here.split("+")[0] not in base_image:
        warnings.append(f"torch here is {torch_here}; the image runs the torch of {base_image}. Check the package "
                        "in the image (module doc) before uploading")
    return {"wheels": len(wheels), "version": version, "warnings": warnings}


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
