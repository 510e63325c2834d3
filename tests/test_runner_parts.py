"""The parts of the engine behind `pneumomap infer` and `pneumomap stage` (issue 18, item 1): model inputs
made once, the executor's explicit outputs and features, mappers fed their source's features (computed
once, or again when the source's output came from the store), and the pipeline's floor value."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pneumomap.infer import runner, spec
from pneumomap.infer.inputs import ModelInputs, prepare
from pneumomap.infer.models import Executor, node_call
from pneumomap.infer.runner import RunOptions
from pneumomap.infer.spec import Node
from pneumomap.stages import create_stage, tiny_config
from pneumomap.stages.mapper import Mapper

CPU = torch.device("cpu")
FAST = dict(workers=0, progress=False, batch_size=3, format="pneumomap")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline, phantom_inputs) -> dict:
    root = tmp_path_factory.mktemp("parts")
    return {"images": phantom_inputs(root / "data", n=4), "path": tiny_pipeline(root / "pipe")}


def _node(name: str, kind: str, inputs: list[str], output: str) -> Node:
    return Node(name=name, is_model=True, kind=kind, inputs=inputs, output=output, params={})


def _inputs(n: int, size: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, size).astype(np.float32) for _ in range(n)]


def test_the_executor_returns_each_images_output_and_the_features_it_computed():
    torch.manual_seed(0)
    classifier = create_stage("classifier", tiny_config("classifier")).eval()
    node = _node("classifier", "classifier", ["image"], "probability")
    inputs = _inputs(3)
    executor = Executor(CPU, "fp32", batch_size=3)
    outputs, features = executor(node_call(classifier, node, encodes=True), inputs)
    levels = classifier.encode(torch.from_numpy(inputs[0])[None, None])
    assert len(outputs) == len(features) == 3 and outputs[0].shape == ()
    assert [f.shape for f in features[0]] == [f.shape[1:] for f in levels]
    alone, made = executor(node_call(classifier, node, encodes=False), inputs[:1])
    assert made == [] and alone[0] == pytest.approx(float(outputs[0]), abs=1e-6)

    # a mapper decodes the features it is given: the maps of its own (the same) encoder
    mapper = Mapper.from_source(classifier, decoder_channels=[8, 8, 8, 8, 8]).eval()
    given, _ = executor(node_call(mapper, _node("mapper_whole", "mapper", ["classifier"], "map"), encodes=False),
                        inputs, features)
    own, _ = executor(lambda x, _features: (mapper.predict(x)[:, 0], None), inputs)
    assert given[0].shape == (64, 64) and np.allclose(np.stack(given), np.stack(own), atol=1e-6)


def test_calls_that_take_gradients_run_only_where_the_executor_allows_them():
    from pneumomap.stages.gradcam import GradCAM

    cam = GradCAM(create_stage("classifier", tiny_config("classifier")).eval())
    call = (lambda x, _features: (cam.predict(x), None))
    maps, _ = Executor(CPU, "fp32", batch_size=2, gradients=True)(call, _inputs(2))
    assert maps[0].shape == (1, 64, 64) and 0 <= maps[0].min() and maps[0].max() <= 1
    with pytest.raises(RuntimeError):  # inference mode: no tensor may ask for gradients
        Executor(CPU, "fp32", batch_size=2)(call, _inputs(2))


def test_model_inputs_are_made_once(tiny, monkeypatch):
    from pneumomap.stages import lungs as lungs_module
    from pneumomap.stages.lung_geometry import fixed_split
    from pneumomap.stages.reader import read_image

    image = read_image(sorted(p for p in tiny["images"].iterdir() if "corrupt" not in p.name)[0])
    _, ready = prepare(image, ((64, 64),))
    inputs = ModelInputs(image, ready)
    assert inputs.whole((64, 64)) is ready[("whole", (64, 64))]
    made = inputs.whole((32, 48))
    assert made.shape == (32, 48) and inputs.whole((32, 48)) is made

    calls = []
    real = lungs_module.lung_half_inputs
    monkeypatch.setattr(lungs_module, "lung_half_inputs", lambda *args: calls.append(1) or real(*args))
    split = fixed_split(image.pixels.shape)
    right, box = inputs.half(split, "fixed", "right", (64, 40))
    left, left_box = inputs.half(split, "fixed", "left", (64, 40))
    assert inputs.half(split, "fixed", "right", (64, 40))[0] is right and len(calls) == 1  # both sides cut at once
    assert right.shape == left.shape == (64, 40) and (box, left_box) == (split.right_box, split.left_box)
    inputs.half(split, "lungs", "right", (64, 40))  # another split of the same image: cut again
    assert len(calls) == 2


def test_mappers_decode_their_sources_features_computed_once_or_again_from_the_store(tiny, tmp_path, monkeypatch):
    """Gate closed, then opened over the same stored outputs: the sources' encoders run once per image per run
    (the second run only for the mappers, their outputs coming from the store), the mappers' own encoders never,
    and the maps equal a fresh run's; an unreadable image's map is the pipeline's floor value."""
    from pneumomap.stages.classifier import ScoreStage

    pipeline = spec.load(tiny["path"])
    closed = pipeline.with_thresholds({**pipeline.thresholds, "classifier": 1.0,
                                       "clip": {**pipeline.thresholds["clip"], "outside": 7}})
    opened = closed.with_thresholds({**closed.thresholds, "classifier": 0.0})
    encoded: dict[str, int] = {}
    score_encode, mapper_encode = ScoreStage.encode, Mapper.encode

    def counted(real):
        def encode(stage, x):
            name = f"{stage.kind}_{stage.side}" if stage.side else stage.kind
            encoded[name] = encoded.get(name, 0) + x.shape[0]
            return real(stage, x)
        return encode

    monkeypatch.setattr(ScoreStage, "encode", counted(score_encode))
    monkeypatch.setattr(Mapper, "encode", counted(mapper_encode))
    out = tmp_path / "out"
    first = runner.run(closed, tiny["images"], out, RunOptions(**FAST))
    images = first["images"] - first["failures"]
    assert encoded == {"classifier": images, "regressor_right": images, "regressor_left": images}
    assert first["computed"]["mapper_whole"] == 0
    encoded.clear()
    second = runner.run(opened, tiny["images"], out, RunOptions(**FAST))
    assert second["computed"]["classifier"] == 0 and second["computed"]["mapper_whole"] == images
    assert encoded == {"classifier": images, "regressor_right": images, "regressor_left": images}
    monkeypatch.undo()

    fresh = tmp_path / "fresh"
    runner.run(opened, tiny["images"], fresh, RunOptions(**FAST, artifacts=False))
    maps = sorted(p.name for p in (fresh / "maps").iterdir())
    assert maps == sorted(p.name for p in (out / "maps").iterdir())
    for name in maps:
        assert (out / "maps" / name).read_bytes() == (fresh / "maps" / name).read_bytes(), name
    corrupt = next(name for name in maps if "corrupt" in name)
    assert opened.floor == 7 and np.all(np.asarray(Image.open(out / "maps" / corrupt)) == 7)
