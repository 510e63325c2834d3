"""Sides end to end: an opacity in the patient's RIGHT lung (the IMAGE's LEFT) reaches only the
image-left lung of the final PNG, and one in the patient's left lung only the image-right lung.

The tiny pipeline runs through `runner.run` on a synthetic radiograph with two lungs; the networks'
outputs are controlled (`predict` replaced on the loaded stages) and side-blind: the same function
of its input for every node of a kind. So where the opacity lands is decided by the pipeline itself:
the lung split, the lung-half crops each regressor/mapper gets, `combine`'s pasting, the resize back.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from pneumomap.infer import runner, spec

H, W = 160, 200  # not square: a transposition shows
LUNG_ROWS, LUNG_RADII = 80, (55, 35)
IMAGE_LEFT_COL, IMAGE_RIGHT_COL = 55, 145  # the patient's right lung is on the image's left
BLOB_RADIUS = 12


def _ellipse(center: tuple[int, int], radii: tuple[int, int]) -> np.ndarray:
    rows, cols = np.ogrid[:H, :W]
    return ((rows - center[0]) / radii[0]) ** 2 + ((cols - center[1]) / radii[1]) ** 2 <= 1.0


def _lungs() -> tuple[np.ndarray, np.ndarray]:
    """(image-left lung, image-right lung) masks."""
    return _ellipse((LUNG_ROWS, IMAGE_LEFT_COL), LUNG_RADII), _ellipse((LUNG_ROWS, IMAGE_RIGHT_COL), LUNG_RADII)


def _blob(column: int) -> np.ndarray:
    return _ellipse((LUNG_ROWS - 10, column), (BLOB_RADIUS, BLOB_RADIUS))


def _radiograph(path, blob_column: int) -> None:
    """Body grey, two dark lungs, a bright opacity inside the lung at ``blob_column``."""
    pixels = np.full((H, W), 128, np.uint8)
    image_left, image_right = _lungs()
    pixels[image_left | image_right] = 20
    pixels[_blob(blob_column)] = 255
    Image.fromarray(pixels).save(path)


def _control(models: dict) -> dict:
    """Side-blind outputs of the loaded stages (inputs in [-1, 1]: lungs -1, body about 0, opacity +1)."""
    def lungs(x):
        return (x < -0.5).float()

    def classifier(x, features=None):
        return torch.full((x.shape[0],), 0.95)

    def extent(x, features=None):  # the fraction of the crop that is opacity
        return (x > 0.5).float().mean(dim=(1, 2, 3))

    def opacity(x, features=None):  # the mapper's map: the opacity it sees in its own input
        return x.clamp(0.0, 1.0).float()

    for name, model in models.items():
        model.predict = {"lungs": lungs, "classifier": classifier, "regressor": extent, "mapper": opacity}[model.kind]
    return models


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_pipeline):
    root = tmp_path_factory.mktemp("sides")
    return root, tiny_pipeline(root / "pipe")


@pytest.mark.parametrize("route", ["lung", "whole"])  # the per-lung mappers, or the whole-image mapper
@pytest.mark.parametrize("patient_side", ["right", "left"])
def test_an_opacity_reaches_only_its_own_lung(pipe, tmp_path, monkeypatch, route, patient_side):
    root, path = pipe
    real = runner.load_models
    monkeypatch.setattr(runner, "load_models", lambda *args: _control(real(*args)))
    pipeline = spec.load(path)
    thresholds = {**pipeline.thresholds, "classifier": 0.5, "right_extent": 0.0 if route == "lung" else 1.0,
                  "left_extent": 0.0 if route == "lung" else 1.0,
                  "overestimate": {"low": {"dilate": 0, "raise": 0.0}, "high": {"dilate": 0, "raise": 0.0}},
                  "clip": {"low": 1, "high": 254, "outside": 1}}
    pipeline = pipeline.with_thresholds(thresholds)
    images = tmp_path / "images"
    images.mkdir()
    column = IMAGE_LEFT_COL if patient_side == "right" else IMAGE_RIGHT_COL
    _radiograph(images / "x.png", column)

    out = tmp_path / "out"
    runner.run(pipeline, images, out, runner.RunOptions(device="cpu", workers=0, progress=False, artifacts=False,
                                                        format="pneumomap"))
    final = np.asarray(Image.open(out / "maps" / "x.png"))
    assert final.shape == (H, W)
    with open(out / "decisions.csv", newline="") as handle:
        decisions = next(csv.DictReader(handle))
    assert decisions["gate"] in ("1", "True", "true")
    assert {decisions["right_choice"], decisions["left_choice"]} == {route}

    image_left, image_right = _lungs()
    own, other = (image_left, image_right) if patient_side == "right" else (image_right, image_left)
    blob = _blob(column)
    hot = final > 128
    assert hot.any()
    assert final[blob].mean() > 200  # the opacity is there, where it is in the image
    assert not hot[~own].any()  # and nowhere outside its own lung
    assert final[other].max() <= 5  # the other lung is at the floor
    assert hot[:, : W // 2].any() == (patient_side == "right")  # the patient's right = the image's left
    # the extent regressors saw the opacity on its side only
    extents = {side: float(decisions[f"{side}_extent"]) for side in ("right", "left")}
    assert extents[patient_side] > 0.02 and extents["left" if patient_side == "right" else "right"] == 0.0
