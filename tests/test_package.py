"""`pneumomap package`: the program folder (pipeline, checkpoints, description, entrypoint), the
dependency closure of the image, and (slow) the wheels installed into a torch-only environment."""
from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from pneumomap import cli, package, submission
from pneumomap.infer import spec
from pneumomap.infer.tiny import DEFAULT_PIPELINE

TUNE_HEADER = ["# tune: tuned by `pneumomap tune` on 2024-05-01; only the thresholds block below was changed.",
               "# tune: mean map log loss: 0.31000 before (untuned thresholds) -> 0.20500 after."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    """The repository's pipeline.yaml (comments and all, with a tune header) over tiny random-weight
    checkpoints; the classifier's is a training run folder (best/, history.json, recipe.yaml)."""
    root = tmp_path_factory.mktemp("package")
    folder = root / "user"
    tiny_pipeline(folder)
    run = folder / "runs" / "cls"
    (run).mkdir(parents=True)
    shutil.move(folder / "checkpoints" / "classifier", run / "best")
    (run / "history.json").write_text(json.dumps(
        [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0, "val_auc": a} for e, a in [(1, 0.6), (2, 0.8), (3, 0.7)]]))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"epochs": 3, "loss": "bce", "lr": 1e-5, "schedule": "cosine",
                                                     "batch_size": 8, "rotate": 15, "hflip": True,
                                                     "train_split": "train", "val_split": "val"}))
    text = DEFAULT_PIPELINE.read_text(encoding="utf-8")
    text = text.replace("checkpoint: checkpoints/classifier", "checkpoint: runs/cls   # the training run: best/ is used")
    text = text.replace("checkpoint: checkpoints/", "checkpoint: ./checkpoints/")  # every value changes when packaged
    path = folder / "tuned.yaml"
    path.write_text("\n".join(TUNE_HEADER) + "\n" + text, encoding="utf-8")
    images = phantom_inputs(root / "data", n=4, size=64)
    program = root / "program"
    info = package.build_program(path, program)
    return {"root": root, "path": path, "images": images, "program": program, "info": info}


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _infer_midrc(tiny: dict, out: Path) -> subprocess.CompletedProcess:
    """`pneumomap infer --format midrc` of the user's own pipeline with the packaged description."""
    description = tiny["program"] / package.GENERATED_DESCRIPTION
    return _run([sys.executable, "-m", "pneumomap", "infer", "--format", "midrc", "--pipeline", tiny["path"],
                 "--input", tiny["images"], "--out", out, "--work", out.parent / (out.name + "-work"),
                 "--description", description, "--quiet"])


# ----------------------------------------------------------------------------- the pipeline


def test_replace_checkpoints_keeps_everything_else():
    text = ("# a comment\nnodes:\n  a:   # node a\n    stage: lungs\n    checkpoint: ck   # same old path\n"
            "  b: {stage: classifier, checkpoint: 'ck', inputs: [image]}\n  c:\n    stage: mapper\n"
            "    checkpoint: \"other\"\noutputs: {}\n")
    raw = yaml.safe_load(text)["nodes"]
    new = spec.replace_checkpoints(text, raw, {"a": "checkpoints/a", "b": "it's here", "c": "x: y"})
    assert new == text.replace("checkpoint: ck ", "checkpoint: checkpoints/a ").replace(
        "'ck'", "'it''s here'").replace('"other"', '"x: y"')
    assert {k: v["checkpoint"] for k, v in yaml.safe_load(new)["nodes"].items()} == {
        "a": "checkpoints/a", "b": "it's here", "c": "x: y"}
    flow = "nodes:\n  a: {checkpoint: ck}\n"
    assert spec.replace_checkpoints(flow, yaml.safe_load(flow)["nodes"], {"a": "p,q"}) == 'nodes:\n  a: {checkpoint: "p,q"}\n'
    alias = "nodes:\n  a: {checkpoint: &k ck}\n  b: {checkpoint: *k}\n"
    with pytest.raises(ValueError, match="alias"):
        spec.replace_checkpoints(alias, yaml.safe_load(alias)["nodes"], {"a": "1", "b": "2"})
    with pytest.raises(ValueError, match="no checkpoint"):
        spec.replace_checkpoints(flow, {"a": {"checkpoint": "elsewhere"}}, {"a": "x"})


def test_packaged_pipeline_points_at_the_copies(tiny):
    program, original = tiny["program"], spec.load(tiny["path"])
    assert sorted(p.name for p in program.iterdir()) == ["algorithm_description.txt", "checkpoints",
                                                         "entrypoint.sh", "pipeline.yaml"]
    packaged = spec.load(program / "pipeline.yaml")
    assert original.nodes["classifier"].checkpoint.name == "best"  # the run folder resolved to its best/
    for node in original.model_nodes:
        copy = (program / "checkpoints" / node.name).resolve()
        assert packaged.nodes[node.name].checkpoint == copy
        assert sorted(p.name for p in copy.iterdir()) == sorted(spec.CHECKPOINT_FILES)
        for name in spec.CHECKPOINT_FILES:
            assert (copy / name).read_bytes() == (node.checkpoint / name).read_bytes()
    # the YAML byte for byte but the checkpoint values (comments, tune header, thresholds)
    before = tiny["path"].read_text(encoding="utf-8").splitlines()
    after = (program / "pipeline.yaml").read_text(encoding="utf-8").splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == len(original.model_nodes)
    assert all("checkpoint: checkpoints/" in b and b.split("checkpoint:")[0] == a.split("checkpoint:")[0]
               for a, b in changed)
    assert "    checkpoint: checkpoints/classifier   # the training run: best/ is used" in after
    assert after[:2] == TUNE_HEADER
    assert packaged.thresholds == original.thresholds


def test_generated_description(tiny):
    text = (tiny["program"] / package.GENERATED_DESCRIPTION).read_text(encoding="utf-8")
    assert tiny["info"] == {"description": package.GENERATED_DESCRIPTION, "generated": True, "checkpoints": 7,
                            "warnings": []}
    assert submission.count_words(text) >= package.MIN_WORDS
    assert text.startswith("[GENERATED by `pneumomap package`") and "[EDIT:" in text
    assert "test_efficientnet" in text  # the backbones, from each checkpoint's config.yaml
    assert "64 x 40 pixels" in text and "64 x 64 pixels" in text  # input sizes
    # the classifier's training run: epochs from history.json, best epoch by val_auc, the recipe
    assert "trained for 3 epoch(s)" in text and "epoch 2, auc 0.8" in text and "learning rate 1e-05" in text
    assert "classifier = 0.9" in text  # thresholds
    assert "mean map log loss: 0.31000 before (untuned thresholds) -> 0.20500 after." in text  # tune header
    for node in ("lungs", "regressor_right", "mapper_whole", "gate", "final"):
        assert f"'{node}'" in text


def test_user_description(tiny, tmp_path):
    short = tmp_path / "my method.txt"
    short.write_text("A short description. " * 10)
    info = package.build_program(tiny["path"], tmp_path / "program", short)
    assert info["description"] == "my method.txt" and not info["generated"]
    assert any("30 words" in w for w in info["warnings"])
    assert submission.description_files(tmp_path / "program") == [tmp_path / "program" / "my method.txt"]
    entrypoint = tmp_path / "program" / "entrypoint.sh"
    assert '--description "$PROGRAM/"\'my method.txt\'' in entrypoint.read_text()
    assert _run(["bash", "-n", entrypoint]).returncode == 0
    with pytest.raises(package.PackageError, match=r"\.pdf, \.docx or \.txt"):
        package.build_program(tiny["path"], tmp_path / "p2", tmp_path / "method.md")
    with pytest.raises(package.PackageError, match="no such file"):
        package.build_program(tiny["path"], tmp_path / "p2", tmp_path / "absent.pdf")


def test_command_refuses_unusable_inputs(tiny, tmp_path, capsys):
    out = tmp_path / "sub"
    assert cli.main(["package", "--pipeline", str(tmp_path / "absent.yaml"), "--out", str(out)]) == 2
    assert "cannot read the file" in capsys.readouterr().err
    assert cli.main(["package", "--pipeline", str(tiny["path"]), "--out", str(out),
                     "--description", str(tmp_path / "about.md")]) == 2
    assert ".pdf, .docx or .txt" in capsys.readouterr().err
    assert cli.main(["package", "--pipeline", str(tiny["path"]), "--out", str(out), "--python-version", "3"]) == 2
    (out / "program").mkdir(parents=True)
    (out / "program" / "mine.txt").write_text("not ours")
    assert cli.main(["package", "--pipeline", str(tiny["path"]), "--out", str(out)]) == 2
    assert "not a previous package" in capsys.readouterr().err
    assert (out / "program" / "mine.txt").read_text() == "not ours"


# ----------------------------------------------------------------------------- the image's dependencies


def test_dependency_closure_of_pneumomap():
    pins = package.dependency_closure()
    for name in ("timm", "pydicom", "segmentation-models-pytorch", "numpy", "pyyaml", "safetensors",
                 "scikit-image", "python-gdcm", "huggingface-hub"):
        assert name in pins, name
        assert pins[name][1] == importlib.metadata.version(pins[name][0])
    assert not {"torch", "torchvision", "triton", "sympy", "pneumomap", "pytest"} & set(pins)
    assert not any(name.startswith("nvidia-") for name in pins)


def test_dependency_closure_markers_and_extras(tmp_path, monkeypatch):
    def dist(name: str, *requires: str) -> None:
        info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\n" f"Name: {name}\nVersion: 1.0\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))

    dist("fake-root", "numpy", "torch>=2", "fake-dep[feat]", 'colorama; sys_platform == "win32"',
         'surely-not-installed-xyz; python_version < "3.8"')
    dist("fake-dep", 'idna; extra == "feat"', 'h11; extra == "other"')
    monkeypatch.syspath_prepend(str(tmp_path))
    pins = package.dependency_closure("fake-root", python_version="3.11")
    assert set(pins) == {"numpy", "fake-dep", "idna"}  # torch: the base image's; colorama: Windows only
    with pytest.raises(package.PackageError, match="surely-not-installed-xyz"):
        package.dependency_closure("fake-root", python_version="3.7")


def test_platforms():
    tags = package.platforms("2.28")
    assert "manylinux2014_x86_64" in tags and "manylinux_2_28_x86_64" in tags and "manylinux_2_29_x86_64" not in tags


# ----------------------------------------------------------------------------- the program


def test_entrypoint_equals_infer_midrc(tiny, tmp_path):
    """bash entrypoint.sh IN OUT PROGRAM from another working directory, with relative paths: the same
    files as `pneumomap infer --format midrc`; the unreadable image is a warning, the exit status 0."""
    elsewhere, temp = tmp_path / "elsewhere", tmp_path / "tmp"
    elsewhere.mkdir()
    temp.mkdir()
    env = {**os.environ, "PNEUMOMAP_PYTHON": sys.executable, "TMPDIR": str(temp)}
    rel = lambda p: os.path.relpath(p, elsewhere)  # noqa: E731
    done = _run(["bash", rel(tiny["program"] / "entrypoint.sh"), rel(tiny["images"]), rel(tmp_path / "out"),
                 rel(tiny["program"])], cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr
    assert "warning: some images could not be processed" in done.stderr and "corrupt" in done.stderr
    assert list(temp.iterdir()) == []  # the work folder is removed
    reference = _infer_midrc(tiny, tmp_path / "reference")
    assert reference.returncode == 1, reference.stderr
    got, want = _files(tmp_path / "out"), _files(tmp_path / "reference")
    assert got == want
    n_inputs = len(list(tiny["images"].iterdir()))
    assert len([n for n in got if n.endswith(".png")]) == n_inputs
    assert submission.description_files(tmp_path / "out") == [tmp_path / "out" / package.GENERATED_DESCRIPTION]
    with open(tmp_path / "out" / submission.MIDRC_CSV, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == n_inputs

    # any other failure of infer is fatal
    done = _run(["bash", tiny["program"] / "entrypoint.sh", tmp_path / "absent", tmp_path / "out2", tiny["program"]],
                cwd=elsewhere, env=env)
    assert done.returncode == 2 and "pneumomap infer failed" in done.stderr
    # exit status 1 without infer's tables is Python's own (a traceback, no pneumomap): fatal too
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'No module named pneumomap' >&2\nexit 1\n")
    broken.chmod(0o755)
    done = _run(["bash", tiny["program"] / "entrypoint.sh", tiny["images"], tmp_path / "out3", tiny["program"]],
                cwd=elsewhere, env={**env, "PNEUMOMAP_PYTHON": str(broken)})
    assert done.returncode == 1 and "pneumomap infer failed with exit status 1" in done.stderr


# ----------------------------------------------------------------------------- the whole package (slow)


def _fake_base_image(root: Path) -> Path:
    """A venv whose only extra site dir (a .pth) holds torch, torchvision and their own dependencies,
    symlinked from this environment: what the base image provides. Returns its python."""
    venv.create(root / "venv", with_pip=False, symlinks=True)
    python = root / "venv" / "bin" / "python"
    site_packages = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    base = root / "base-site"  # outside the venv: pip never uninstalls from there
    base.mkdir()
    names = set(package.BASE_PACKAGES)
    for name in package.BASE_PACKAGES:
        names |= {v[0] for v in package.dependency_closure(name, exclude=()).values()}
    for name in sorted(names):
        dist = importlib.metadata.distribution(name)
        assert dist.files, f"{name}: no RECORD of its files"
        for top in {Path(str(f)).parts[0] for f in dist.files}:  # package dirs, modules, the .dist-info
            source = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and source.exists() and not (base / top).exists():
                (base / top).symlink_to(source)
    (site_packages / "base_image.pth").write_text(f"{base}\n")
    return python


def _clean_env(**extra: str) -> dict:
    """This environment without pip's settings (no local wheel folders) and without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, **extra}


@pytest.mark.slow
def test_package_installs_in_a_torch_only_environment(tiny, tmp_path, capsys):
    """The whole command: wheels downloaded for this interpreter, then `pip install --no-index` of
    requirements.txt (the Dockerfile's step) into a venv holding only torch and torchvision, which then
    runs the entrypoint to the same files as this environment."""
    version = "%d.%d" % sys.version_info[:2]
    probe = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp_path / "probe",
                  f"idna=={importlib.metadata.version('idna')}"])
    if probe.returncode != 0:
        pytest.skip(f"PyPI is not reachable: {probe.stderr.strip().splitlines()[-1:]}")
    out = tmp_path / "submission"
    assert cli.main(["package", "--pipeline", str(tiny["path"]), "--out", str(out),
                     "--python-version", version]) == 0
    printed = capsys.readouterr().out
    assert "docker.zip" in printed and "submission.zip" in printed and "wheels" in printed
    with zipfile.ZipFile(out / "docker.zip") as archive:
        names = archive.namelist()
    assert "Dockerfile" in names and "requirements.txt" in names
    wheels = [n for n in names if n.startswith("wheels/") and n.endswith(".whl")]
    assert any(n.startswith("wheels/pneumomap-") for n in wheels)
    assert not any(n.startswith(("wheels/torch-", "wheels/torchvision-")) for n in wheels)
    dockerfile = (out / "docker" / "Dockerfile").read_text()
    assert dockerfile.splitlines()[4] == f"ARG BASE_IMAGE={package.DEFAULT_BASE_IMAGE}"
    assert "FROM ${BASE_IMAGE}" in dockerfile and "--no-index" in dockerfile
    with zipfile.ZipFile(out / "submission.zip") as archive:
        assert {"entrypoint.sh", "pipeline.yaml", package.GENERATED_DESCRIPTION} <= set(archive.namelist())
        assert "checkpoints/lungs/weights.safetensors" in archive.namelist()

    python = _fake_base_image(tmp_path / "base")
    env = _clean_env()
    done = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--find-links",
                 out / "docker" / "wheels", "-r", out / "docker" / "requirements.txt"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    where = _run([python, "-c", "import pneumomap, torch; print(pneumomap.__file__); print(torch.__file__)"],
                 env=env, cwd=tmp_path)
    assert where.stdout.splitlines()[0].startswith(str(tmp_path / "base" / "venv")), where
    assert where.stdout.splitlines()[1].startswith(str(tmp_path / "base" / "base-site")), where

    program = tmp_path / "unzipped"
    with zipfile.ZipFile(out / "submission.zip") as archive:
        archive.extractall(program)
    done = _run(["bash", program / "entrypoint.sh", tiny["images"], tmp_path / "out", program], cwd=tmp_path / "base",
                env={**env, "PNEUMOMAP_PYTHON": str(python)})
    assert done.returncode == 0, done.stderr
    reference = _infer_midrc(tiny, tmp_path / "reference")
    assert reference.returncode == 1, reference.stderr
    assert _files(tmp_path / "out") == _files(tmp_path / "reference")


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    done = subprocess.run(["docker", "info"], capture_output=True, text=True)
    return None if done.returncode == 0 else "no running Docker daemon: " + (done.stderr.strip().splitlines() or [""])[-1]


@pytest.mark.slow
@pytest.mark.skipif(_docker_unavailable() is not None, reason=str(_docker_unavailable()))
def test_docker_image_runs_the_program(tiny, tmp_path):
    """Build the image (pulls the base image) and run the entrypoint in it as the platform does."""
    out = tmp_path / "submission"
    assert cli.main(["package", "--pipeline", str(tiny["path"]), "--out", str(out)]) == 0
    tag = f"pneumomap-package-test:{os.getpid()}"
    build = _run(["docker", "build", "-t", tag, out / "docker"])
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        result = tmp_path / "output"
        result.mkdir()
        done = _run(["docker", "run", "--rm", "--network", "none",
                     "-v", f"{out / 'program'}:/app/ingested_program:ro", "-v", f"{tiny['images']}:/app/input_data:ro",
                     "-v", f"{result}:/app/output", "-w", "/tmp", tag, "bash", "/app/ingested_program/entrypoint.sh",
                     "/app/input_data/", "/app/output/", "/app/ingested_program"])
        assert done.returncode == 0, done.stderr
        names = sorted(p.name for p in result.iterdir())
        assert submission.MIDRC_CSV in names and package.GENERATED_DESCRIPTION in names
        assert len([n for n in names if n.endswith(".png")]) == len(list(tiny["images"].iterdir()))
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
