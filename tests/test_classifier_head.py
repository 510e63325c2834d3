"""Issue 13, items 3, 5 and 7: multi-class classifiers in a pipeline, one ensemble rule, and the head on
the backbone's own feature head (timm's whole model, all its tensors used; one encoder pass)."""
from __future__ import annotations

import copy
import csv

import pytest
import timm
import torch
import yaml

from pneumomap.labels import CLASSES, POSITIVE_CLASS
from pneumomap.stages import create_stage, load_stage, tiny_config
from pneumomap.stages.encoders import Backbone, load_encoder_weights
from pneumomap.stages.mapper import Mapper


def tiny(kind: str, **overrides):
    return create_stage(kind, tiny_config(kind, **overrides)).eval()


def batch(stage, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, *stage.input_size, generator=g) * 2 - 1


def _spread_heads(stage) -> None:
    """Members that disagree (random tiny heads give logits near 0, where every ensemble rule agrees):
    member 0 leans to the first class, member 1 away from it."""
    torch.manual_seed(0)
    with torch.no_grad():
        for i, member in enumerate(stage.members):
            n = member.head.out_features
            member.head.weight.mul_(4.0)
            lean = torch.tensor([3.0]) if n == 1 else torch.linspace(3.0, -3.0, n)
            member.head.bias.copy_(lean if i == 0 else -lean)


# ----------------------------------------------------------------------------- item 7: the feature head


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_convnext"])
def test_head_reads_forward_features_and_mappers_the_features_only_maps(backbone, tmp_path):
    from safetensors.torch import save_file

    clf = tiny("classifier", backbones=[backbone])
    model = clf.encoder.model
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    reference = timm.create_model(backbone, pretrained=False, in_chans=1, features_only=True).eval()
    load_encoder_weights(reference, tmp_path / "w.safetensors")  # the same weights, as features_only
    x = batch(clf)
    with torch.no_grad():
        features = clf.encode(x)
        assert len(features) == len(reference.feature_info) + 1
        for a, b in zip(features[:-1], reference(x)):  # the maps a mapper decodes: exactly features_only's
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(features[-1], model.forward_features(x))  # the head's input
        member = clf.members[0]
        pooled = member.pool(features[-1])[:, :, None, None]
        torch.testing.assert_close(clf(x), member.head(model.forward_head(pooled, pre_logits=True).flatten(1)))
    assert member.head.in_features == model.num_features
    if backbone == "test_efficientnet":  # conv_head widens the last block's 64 channels to 256
        assert (reference.feature_info.channels()[-1], model.num_features) == (64, 256)


def test_efficientnet_conv_head_and_convnext_head_norm_decide_the_prediction():
    clf = tiny("classifier")
    x = batch(clf)
    before = clf.predict(x)
    with torch.no_grad():
        clf.encoder.model.conv_head.weight.mul_(-1.5)  # unused by a head on the last block's projection
    assert not torch.allclose(clf.predict(x), before)
    convnext = tiny("classifier", backbones=["test_convnext"])
    before = convnext.predict(x)
    with torch.no_grad():
        convnext.encoder.model.head.norm.bias.add_(1.0)  # timm's pre-logits norm
    assert not torch.allclose(convnext.predict(x), before)


def _timm_file(tmp_path, name):
    from safetensors.torch import save_file

    model = timm.create_model(name, pretrained=False)  # ImageNet-shaped: 3 channels, 1000 classes
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model.state_dict()


@pytest.mark.parametrize("name,classifier", [("efficientnet_b4", {"classifier.weight", "classifier.bias"}),
                                             ("convnext_tiny", {"head.fc.weight", "head.fc.bias"})])
def test_timm_state_dicts_load_whole(tmp_path, name, classifier):
    """Every tensor of timm's own state dict is used except its ImageNet classifier; none is missing."""
    path, full = _timm_file(tmp_path, name)
    backbone = Backbone(name, in_chans=1)
    report = load_encoder_weights(backbone.model, path)
    assert set(report.unused) == classifier
    assert set(report.loaded) == set(backbone.model.state_dict()) == set(full) - classifier
    assert len(report.adapted) == 1  # the stem, to one grey channel
    for key, value in backbone.model.state_dict().items():
        if key not in report.adapted:
            assert torch.equal(value, full[key]), key
    if name == "efficientnet_b4":
        assert {"conv_head.weight", "bn2.weight", "bn2.running_var"} <= set(report.loaded)


def _as_format_1(state: dict, prefix: str) -> dict:
    """A state dict in the old key layout (encoder = timm features_only: no '.model.' level)."""
    return {k.replace(prefix + "model.", prefix): v for k, v in state.items()}


@pytest.mark.parametrize("kind", ["classifier", "mapper"])
def test_weights_format_1_is_refused_naming_the_file(tmp_path, kind):
    from safetensors.torch import save_file

    stage = tiny("classifier")
    prefix = "members.0.encoder."
    if kind == "mapper":
        stage, prefix = Mapper.from_source(stage, decoder_channels=[8, 8, 8, 8, 8]), "encoder."
    stage.save(tmp_path)
    state = {k: v.contiguous() for k, v in _as_format_1(stage.state_dict(), prefix).items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    with pytest.raises(RuntimeError, match=r"weights\.safetensors.*weights format 1.*[Rr]etrain"):
        load_stage(tmp_path)


def test_one_encoder_pass_and_frozen_trace_for_convnext():
    from pneumomap.stages.inference import LazyFrozen, optimize_for_inference

    clf = tiny("classifier", backbones=["test_convnext"])
    mapper = Mapper.from_source(clf, decoder_channels=[16, 16, 8, 8]).eval()
    stems = []
    clf.encoder.model.stem.register_forward_hook(lambda *_: stems.append(1))
    x = batch(clf, 2)
    with torch.no_grad():
        features = clf.encode(x)
        p, m = clf.predict(x, features), mapper.predict(x, features)
    assert len(stems) == 1
    fast = optimize_for_inference(copy.deepcopy(clf), torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(fast.predict(x), p, rtol=1e-4, atol=1e-5)
        fast_features = fast.encode(x)
        torch.testing.assert_close(mapper.predict(x, fast_features), m, rtol=1e-4, atol=1e-5)
    assert isinstance(fast.members[0].encoder, LazyFrozen)
    assert isinstance(fast.members[0].encoder.compiled, torch.jit.ScriptModule)


# ----------------------------------------------------------------------------- item 5: one ensemble rule


@pytest.mark.parametrize("n_classes", [1, 3])
def test_ensemble_forward_is_the_logit_of_the_mean_probability(n_classes):
    ens = tiny("classifier", backbones=["test_efficientnet", "test_convnext"], n_classes=n_classes)
    _spread_heads(ens)
    x = batch(ens)
    with torch.no_grad():
        singles = [ens.activation(member(x)) for member in ens.members]
        mean = (singles[0] + singles[1]) / 2
        mean = mean[:, 0] if n_classes == 1 else mean
        trained_on = ens.activation(ens(x))  # what the loss and validation see
    assert not torch.allclose(singles[0], singles[1], atol=0.1)  # the members disagree
    torch.testing.assert_close(trained_on[:, 0] if n_classes == 1 else trained_on, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ens.predict(x), mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["binary", "three_class"])
def test_training_and_validation_use_the_inference_probability(target):
    from pneumomap.train import recipes
    from pneumomap.train.tasks import make_task

    sets = ["model.backbones=[test_efficientnet, test_convnext]", "model.input_size=[64, 64]", f"target={target}"]
    if target == "three_class":
        sets.append("loss=ce")
    task = make_task("classifier", recipes.resolve("classifier", "tiny", sets))
    model = task.model.eval()
    _spread_heads(model)
    x = batch(model, 4)
    truth = torch.tensor([0, 1, 2, 0]) if target == "three_class" else torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        outputs = task.outputs(model, x)
        validated = task.batch_results(outputs, truth)["probability"]
        p = model.predict(x)
        expected = p if target == "binary" else p[:, CLASSES.index(POSITIVE_CLASS)]
        torch.testing.assert_close(validated, expected, rtol=1e-5, atol=1e-6)
        if target == "binary":  # the loss is the BCE of that same probability
            bce = torch.nn.functional.binary_cross_entropy(p.double(), truth.double())
            torch.testing.assert_close(task.loss(outputs, truth).double(), bce, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- item 3: multi-class in a pipeline


def test_class_index_and_probability_of():
    three = tiny("classifier", n_classes=3, class_names=list(CLASSES))
    assert three.class_index(None) == three.class_index(POSITIVE_CLASS) == 0 and three.class_index("Normal") == 2
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    assert three.probability_of(probs, "Normal").tolist() == pytest.approx([0.1])
    with pytest.raises(ValueError, match=r"'Lung Opacity'.*\['covid', 'normal'\]"):
        tiny("classifier", n_classes=2, class_names=["covid", "normal"]).class_index(POSITIVE_CLASS)
    with pytest.raises(ValueError, match="without class_names"):
        tiny("classifier", n_classes=4).class_index(None)
    binary = tiny("classifier")
    assert binary.class_index("Normal") is None  # a binary head ignores the name
    assert torch.equal(binary.probability_of(torch.tensor([0.3]), "Normal"), torch.tensor([0.3]))


def test_spec_validates_positive():
    from pneumomap.infer import spec

    assert spec.STAGE_NODES["classifier"].params["positive"].choices == CLASSES
    raw = {"nodes": {"classifier": {"stage": "classifier", "checkpoint": "c", "inputs": ["image"],
                                    "params": {"positive": "Pneumonia"}},
                     "gate": {"op": "gate", "inputs": ["classifier"], "params": {"threshold": 0.5}}},
           "outputs": {"probability": "classifier", "map": "classifier"}}
    with pytest.raises(spec.PipelineError, match=r"nodes\.classifier\.params\.positive: unknown value 'Pneumonia'"):
        spec.parse(raw, check_checkpoints=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_pipeline, phantom_inputs):
    root = tmp_path_factory.mktemp("multiclass")
    return tiny_pipeline(root / "pipe"), phantom_inputs(root / "data", n=3, corrupt=False)


def _with_classifier(path, tmp_path, n_classes: int, class_names, positive=None):
    """The pipeline with its classifier replaced by a multi-class head on the same encoder (the mappers
    decode it), ``params.positive`` when given."""
    from pneumomap.infer import spec

    old = load_stage(spec.load(path).nodes["classifier"].checkpoint)
    new = create_stage("classifier", tiny_config("classifier", n_classes=n_classes, class_names=list(class_names)))
    state = {k: v for k, v in old.state_dict().items() if ".head." not in k}
    missing = new.load_state_dict(state, strict=False).missing_keys
    assert sorted(missing) == ["members.0.head.bias", "members.0.head.weight"]
    new.save(tmp_path / "classifier3")
    raw = yaml.safe_load(path.read_text())
    node = raw["nodes"]["classifier"]
    node["checkpoint"] = str(tmp_path / "classifier3")
    if positive:
        node["params"] = {"positive": positive}
    return spec.parse(raw, path), new.eval()


@pytest.mark.parametrize("positive", [None, "Normal"])
def test_three_class_classifier_gives_the_positive_class_probability(pipeline, tmp_path, positive):
    """Before: every image failed at the gate ('truth value of an array is ambiguous'), exit 1."""
    from pneumomap.infer import runner
    from pneumomap.stages.preprocess import to_model_input
    from pneumomap.stages.reader import list_images, read_image

    path, images = pipeline
    pipe, stage = _with_classifier(path, tmp_path, 3, CLASSES, positive)
    summary = runner.run(pipe, images, tmp_path / "out", runner.RunOptions(workers=0, progress=False))
    assert summary["failures"] == 0
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        got = {r["image_id"]: float(r["probability"]) for r in csv.DictReader(handle)}
    column = CLASSES.index(positive or POSITIVE_CLASS)
    for image in list_images(images):
        x = torch.from_numpy(to_model_input(read_image(image).pixels, stage.input_size))[None, None]
        assert got[image.stem] == pytest.approx(float(stage.predict(x)[0, column]), abs=2e-6)


@pytest.mark.parametrize("n_classes,names,message", [
    (2, ["covid", "normal"], r"'Lung Opacity'.*not among the checkpoint's classes \['covid', 'normal'\]"),
    (4, [], "4-class head without class_names")])
def test_multiclass_head_without_the_positive_class_is_refused_at_load(pipeline, tmp_path, n_classes, names, message):
    from pneumomap.infer import runner

    path, images = pipeline
    pipe, _ = _with_classifier(path, tmp_path, n_classes, names)
    with pytest.raises(runner.RunError, match=r"nodes\.classifier\.params\.positive: .*" + message):
        runner.run(pipe, images, tmp_path / "out", runner.RunOptions(workers=0, progress=False))
    assert not (tmp_path / "out" / "predictions.csv").exists()
