"""The on-disk cache of prepared training samples: reused (no decode after the first build), invalidated when an
image, a lung mask, the labels or the preprocessing changes, shared between stages, equal to the uncached samples."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumomap.labels import load_rsna
from pneumomap.synth import generate
from pneumomap.train import cache, datasets, recipes
from pneumomap.train.cli import train

RECIPE = {"train_split": "train", "val_split": "val", "max_images": None, "rotate": 0, "hflip": False,
          "workers": 0}
SIZES = {"classifier": (64, 64), "regressor_right": (64, 40), "mapper_whole": (64, 64), "mapper_left": (64, 40),
         "lungs": (64, 64)}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_data")
    generate(root, 10, seed=7, size=64)
    return root


@pytest.fixture
def data(source, tmp_path) -> Path:
    """A private copy (tests change its files)."""
    shutil.copytree(source, tmp_path / "rsna")
    return tmp_path / "rsna"


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Paths decoded by the training datasets, in order."""
    calls: list[str] = []
    read = datasets.read_image

    def counting(path):
        calls.append(str(path))
        return read(path)

    monkeypatch.setattr(datasets, "read_image", counting)
    return calls


def build(stage: str, data: Path, cache_dir: Path | None, size=None, **recipe):
    spec = recipes.STAGES[stage]
    size = size or SIZES[stage]
    maker = datasets.rsna_lung_datasets if spec.kind == "lungs" else datasets.rsna_datasets
    base = recipes.resolve(stage, "tiny", ["encoder_from=x"] if spec.kind == "mapper" else [])
    return maker(data, spec, base.replace(**{**RECIPE, **recipe}), size, cache_dir)


def n_images(data: Path) -> int:
    dataset = load_rsna(data)
    return len(dataset.ids_in("train")) + len(dataset.ids_in("val"))


def samples(pair) -> list[dict]:
    return [d.raw(i) for d in pair for i in range(len(d))]


@pytest.mark.parametrize("stage", list(SIZES))
def test_cached_samples_equal_the_uncached_ones_at_the_stored_precision(data, tmp_path, stage):
    cached = samples(build(stage, data, tmp_path / "cache"))
    plain = samples(build(stage, data, None))
    assert len(cached) == len(plain) == n_images(data)
    for a, b in zip(cached, plain):
        assert set(a) == set(b)
        for key in a:
            if key.startswith("image"):
                assert a[key].dtype == np.float16
                np.testing.assert_array_equal(a[key], b[key].astype(np.float16))
                assert np.abs(a[key].astype(np.float32) - b[key]).max() <= 1e-3
            else:
                np.testing.assert_array_equal(a[key], b[key])
    train_set = build(stage, data, tmp_path / "cache")[0]
    item = train_set[0]  # the augmentation path reads the cached sample
    assert item["image"].dtype.is_floating_point and item["image"].shape[-2:] == SIZES[stage]


def test_second_build_and_every_epoch_decode_nothing(data, tmp_path, decodes):
    train_set, val_set = build("regressor_right", data, tmp_path / "cache")
    assert len(decodes) == n_images(data)
    decodes.clear()
    train_set, val_set = build("regressor_right", data, tmp_path / "cache")  # a new run
    for _ in range(2):  # two epochs
        for dataset in (train_set, val_set):
            for i in range(len(dataset)):
                dataset[i]
    assert decodes == []


def test_training_decodes_each_image_once(data, tmp_path, decodes):
    sets = ["workers=0", "batch_size=4", "rotate=15", "hflip=true", "epochs=2", "model.input_size=[64, 40]"]
    summary = train("regressor_left", data, tmp_path / "run", recipes.resolve("regressor_left", "tiny", sets),
                    device="cpu")
    assert summary["epochs"] == 2 and len(decodes) == n_images(data)
    assert (tmp_path / "run" / "cache").is_dir()  # the default place: under the run
    decodes.clear()
    train("regressor_left", data, tmp_path / "again", recipes.resolve("regressor_left", "tiny", sets), device="cpu")
    assert len(decodes) == n_images(data)  # another run, another cache
    decodes.clear()
    train("regressor_left", data, tmp_path / "shared",
          recipes.resolve("regressor_left", "tiny", sets + [f"cache_dir={tmp_path / 'run' / 'cache'}"]), device="cpu")
    assert decodes == []  # the first run's cache, shared


def test_a_changed_image_is_prepared_again(data, tmp_path, decodes):
    build("classifier", data, tmp_path / "cache")
    dataset = load_rsna(data)
    pid = dataset.ids_in("train")[0]
    path = dataset.image_path(pid)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    decodes.clear()
    build("classifier", data, tmp_path / "cache")
    assert decodes == [str(path)]


def test_a_changed_mask_is_prepared_again_and_read_anew(data, tmp_path, decodes):
    build("mapper_whole", data, tmp_path / "cache")
    dataset = load_rsna(data)
    pid = next(p for p in dataset.ids_in("train") if dataset.boxes[p])
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(dataset.mask_path(pid))  # no lungs: no opacity target
    decodes.clear()
    train_set, _ = build("mapper_whole", data, tmp_path / "cache")
    assert decodes == [str(dataset.image_path(pid))]
    index = dataset.ids_in("train").index(pid)
    assert train_set.raw(index)["target"].sum() == 0


def test_changed_labels_and_preprocessing_are_prepared_again(data, tmp_path, decodes, monkeypatch):
    build("regressor_right", data, tmp_path / "cache")
    labels = data / "stage_2_train_labels.csv"
    lines = labels.read_text().splitlines()
    dataset = load_rsna(data)
    pid = dataset.ids_in("train")[0]
    lines = [line for line in lines if not line.startswith(pid)] + [f"{pid},1.0,1.0,62.0,62.0,1"]
    labels.write_text("\n".join(lines) + "\n")
    (data / "stage_2_detailed_class_info.csv").write_text(
        (data / "stage_2_detailed_class_info.csv").read_text().replace(f"{pid},{dataset.cls[pid]}",
                                                                       f"{pid},Lung Opacity"))
    decodes.clear()
    build("regressor_right", data, tmp_path / "cache")
    assert decodes == [str(dataset.image_path(pid))]  # the box changed: its extents, nothing else
    decodes.clear()
    build("regressor_right", data, tmp_path / "cache", size=(48, 32))  # another input size: new columns
    assert len(decodes) == n_images(data)
    monkeypatch.setattr(cache, "_CODE_DIGEST", "changed-code")  # the preparation code changed
    decodes.clear()
    build("regressor_right", data, tmp_path / "cache")
    assert len(decodes) == n_images(data)


def test_stages_with_the_same_input_share_its_column(data, tmp_path, decodes):
    build("classifier", data, tmp_path / "cache")
    build("mapper_whole", data, tmp_path / "cache")
    build("lungs", data, tmp_path / "cache")
    folders = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert folders == ["class-binary", "image-64x64", "lungmask-64x64", "opacity-64x64"]
    image_column = next((tmp_path / "cache").glob("image-64x64-*"))
    values = (image_column / cache.VALUES_FILE).stat().st_size
    assert values == n_images(data) * 64 * 64 * 2  # one float16 row per image, not one per stage
    build("regressor_right", data, tmp_path / "cache")
    build("mapper_left", data, tmp_path / "cache")
    halves = sorted(p.name for p in (tmp_path / "cache").glob("half-*"))
    assert len(halves) == 2  # right and left halves, shared by the regressor and the per-lung mapper


def test_unreadable_images_are_remembered_and_still_counted(data, tmp_path, decodes):
    dataset = load_rsna(data)
    victim = dataset.ids_in("train")[1]
    dataset.image_path(victim).write_bytes(b"DICM but not really an image")
    with pytest.warns(UserWarning, match="skipping unreadable training image"):
        train_set, _ = build("classifier", data, tmp_path / "cache")
    assert train_set.skipped == 1 and len(train_set) == len(dataset.ids_in("train")) - 1
    decodes.clear()
    with pytest.warns(UserWarning, match="skipping unreadable training image"):
        train_set, _ = build("classifier", data, tmp_path / "cache")
    assert decodes == [] and train_set.skipped == 1


def test_parallel_build_writes_the_same_rows(data, tmp_path):
    one = samples(build("mapper_left", data, tmp_path / "serial"))
    two = samples(build("mapper_left", data, tmp_path / "parallel", workers=2))
    for a, b in zip(one, two):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
