"""What differs between the stage kinds is on their classes (issue 18, item 3): the input a kind takes,
its output activation and value type, its pipeline node's value and params, what CPU inference traces,
its description; and one training task per kind, chosen by the kind's registry entry. Tiny models on
random input (CPU, seconds)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pneumomap.labels import CLASSES
from pneumomap.stages import create_stage, list_stages, stage_class, tiny_config
from pneumomap.stages.base import FROM_SOURCE, LUNG_HALF, WHOLE_IMAGE
from pneumomap.stages.mapper import Mapper
from pneumomap.train import recipes
from pneumomap.train.tasks import MapperTask, Task, make_task, task_class

KINDS = list_stages()


def tiny(kind: str, **overrides):
    torch.manual_seed(0)
    return create_stage(kind, tiny_config(kind, **overrides)).eval()


def batch(stage, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, *stage.input_size, generator=torch.Generator().manual_seed(1)) * 2 - 1


NAMES = ("lungs", "classifier", "regressor", "mapper_whole", "mapper_left")


@pytest.fixture(scope="module")
def stages() -> dict[str, nn.Module]:
    """One tiny stage per kind and input (NAMES): both mappers (whole image, lung half) included."""
    regressor = tiny("regressor", side="left")
    classifier = tiny("classifier")
    return {"lungs": tiny("lungs"), "classifier": classifier, "regressor": regressor,
            "mapper_whole": Mapper.from_source(classifier, decoder_channels=[32, 16, 16, 8, 8]).eval(),
            "mapper_left": Mapper.from_source(regressor, decoder_channels=[32, 16, 16, 8, 8]).eval()}


# ----------------------------------------------------------------------------- the stage classes


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_declares_its_input_and_the_value_its_node_gives(kind):
    from pneumomap.infer.spec import STAGE_NODES

    cls = stage_class(kind)
    assert cls.region in (WHOLE_IMAGE, LUNG_HALF, FROM_SOURCE)
    if kind in STAGE_NODES:  # the pipeline's value type of the kind is the class's
        assert cls.output == STAGE_NODES[kind].output


def test_the_input_region_side_and_output_type_of_each_stage(stages):
    assert tuple(stages) == NAMES
    found = {name: (s.input_region, s.on_lung_half, s.side, s.output_type) for name, s in stages.items()}
    assert found == {"lungs": (WHOLE_IMAGE, False, None, "lungs"),
                     "classifier": (WHOLE_IMAGE, False, None, "probability"),
                     "regressor": (LUNG_HALF, True, "left", "extent"),
                     "mapper_whole": (WHOLE_IMAGE, False, None, "map"),
                     "mapper_left": (LUNG_HALF, True, "left", "lungmap")}


@pytest.mark.parametrize("name", NAMES)
def test_activation_of_the_logits_is_what_predict_gives(name, stages):
    """Training and validation take probabilities from `activation(forward(x))`: exactly `predict`'s."""
    stage = stages[name]
    x = batch(stage)
    with torch.no_grad():
        probs = stage.activation(stage(x))
    predicted = stage.predict(x)
    torch.testing.assert_close(probs.reshape(predicted.shape), predicted, rtol=0, atol=1e-6)


def test_node_output_is_the_value_a_pipeline_node_stores(stages):
    three = tiny("classifier", n_classes=3, class_names=list(CLASSES))
    x = batch(three)
    features = three.encode(x)
    with torch.no_grad():
        torch.testing.assert_close(three.node_output(x, features, {"positive": "Normal"}),
                                   three.predict(x)[:, CLASSES.index("Normal")])
        torch.testing.assert_close(three.node_output(x), three.predict(x)[:, CLASSES.index("Lung Opacity")])
        lungs = stages["lungs"]
        assert lungs.node_output(x).shape == (2, *lungs.input_size)
        torch.testing.assert_close(lungs.node_output(x), lungs.predict(x)[:, 0])
        regressor, mapper = stages["regressor"], stages["mapper_left"]
        x = batch(regressor)
        features = regressor.encode(x)
        torch.testing.assert_close(regressor.node_output(x, features, {"side": "left"}), regressor.predict(x))
        assert mapper.node_output(x, features).shape == (2, *regressor.input_size)
        torch.testing.assert_close(mapper.node_output(x, features), mapper.predict(x)[:, 0])


def test_node_params_are_checked_against_the_checkpoint():
    regressor = tiny("regressor", side="left")
    regressor.check_node_params({"side": "left"})
    regressor.check_node_params({})
    with pytest.raises(ValueError, match=r"params.side is 'right' but the checkpoint is the 'left' regressor"):
        regressor.check_node_params({"side": "right"})
    three = tiny("classifier", n_classes=3, class_names=list(CLASSES))
    three.check_node_params({"positive": "Normal"})
    with pytest.raises(ValueError, match=r"class 'covid' \(the node's params.positive\)"):
        three.check_node_params({"positive": "covid"})
    tiny("classifier").check_node_params({"positive": "covid"})  # a binary head has one output: any name


@pytest.mark.parametrize("name", NAMES)
def test_inference_traces_the_parts_the_stage_names(name, stages):
    from pneumomap.stages.inference import LazyFrozen, optimize_for_inference

    stage = copy.deepcopy(stages[name])
    parts = stage.inference_parts()
    assert parts and all(isinstance(getattr(owner, attr), nn.Module) for owner, attr, _ in parts)
    optimize_for_inference(stage, torch.device("cpu"))
    assert all(isinstance(getattr(owner, attr), LazyFrozen) and getattr(owner, attr).what == label
               for owner, attr, label in parts)


def test_each_kind_describes_itself_from_its_saved_config():
    def text(kind: str, config: dict, inputs: list[str] = ()) -> str:
        return " ".join(stage_class(kind).describe(config, list(inputs)))

    lungs = text("lungs", {"encoder": "tu-efficientnet_b4", "threshold": 0.5, "crop_size": [512, 320]})
    assert "timm backbone efficientnet_b4 " in lungs and "512 x 320 pixels (height x width)" in lungs
    assert text("classifier", {"backbones": ["a", "b"], "flip_tta": True}).startswith(
        "It is an ensemble of 2 networks averaged: a, b. Its prediction is averaged with")
    assert "predicts 3 classes" in text("classifier", {"backbones": ["a"], "n_classes": 3})
    assert "patient's left lung" in text("regressor", {"backbones": ["a"], "side": "left"})
    assert "of node 'cls'" in text("mapper", {"encoder": "tu-x"}, ["cls"])
    assert "?" in text("lungs", {})  # a value config.yaml lacks
    assert [k for k in KINDS if stage_class(k).explanation()] == ["mapper"]


# ----------------------------------------------------------------------------- one training task per kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_kind_has_its_training_task(kind):
    cls = task_class(kind)
    assert issubclass(cls, Task) and cls.kind == kind


def test_an_unknown_kind_has_no_task():
    with pytest.raises(KeyError, match="no training task for stage kind 'nope'"):
        task_class("nope")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny classifier and regressor checkpoints, for the mappers' encoder_from."""
    folder = tmp_path_factory.mktemp("sources")
    for stage in ("classifier", "regressor_right", "regressor_left"):
        make_task(stage, recipes.resolve(stage, "tiny")).model.save(folder / stage)
    return folder


@pytest.mark.parametrize("stage", list(recipes.STAGES))
def test_training_builds_the_input_the_stage_takes_at_inference(stage, sources):
    """The training stage's task is its kind's, and its datasets cut the input its model takes in a
    pipeline: the input of a kind is decided once, by the stage class (`StageSpec.region`)."""
    from pneumomap.train.datasets import RSNA_PREPARERS

    spec = recipes.STAGES[stage]
    sets = [f"encoder_from={sources / spec.source}"] if spec.source else []
    task = make_task(stage, recipes.resolve(stage, "tiny", sets))
    assert type(task) is task_class(spec.kind) and task.model.kind == spec.kind
    assert task.model.input_region == spec.region and task.model.side == spec.side
    if spec.kind != "lungs":  # the lung stage trains on image/mask pairs (`LungsTask.datasets`)
        assert (spec.kind, spec.region) in RSNA_PREPARERS
    assert isinstance(task, MapperTask) == (spec.kind == "mapper")


def test_the_regressor_task_trains_on_the_extents_predict_gives():
    task = make_task("regressor_left", recipes.resolve("regressor_left", "tiny"))
    model = task.model.eval()
    x = batch(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(task.outputs(model, x), model.predict(x))
    results = task.batch_results(task.outputs(model, x), torch.tensor([0.0, 0.5, 1.0]))
    assert task.summarise({k: v.numpy() for k, v in results.items()}) == {
        "mae": pytest.approx(float((results["prediction"] - results["target"]).abs().mean()))}
