"""Stage programs with tiny backbones on random input (CPU, seconds): shapes, ranges, checkpoints,
the shared frozen encoder, TTA, ensembles, multi-class heads, local weights, default configs."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml

from pneumomap.stages import ConfigError, create_stage, list_stages, load_stage, tiny_config
from pneumomap.stages import encoders
from pneumomap.stages.gradcam import GradCAM
from pneumomap.stages.mapper import Mapper

torch.manual_seed(0)


def batch(stage, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, *stage.input_size, generator=g) * 2 - 1


def tiny(kind: str, **overrides):
    return create_stage(kind, tiny_config(kind, **overrides)).eval()


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kind", list_stages())  # every registered kind
def test_config_roundtrips_through_yaml(kind):
    cfg = tiny_config(kind)
    again = type(cfg).from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert create_stage(kind).config == type(cfg)()  # None -> the full-size defaults (config only, no forward)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key.*'backbone'"):
        tiny_config("classifier", backbone="resnet18")
    with pytest.raises(ConfigError, match=r"\.n_classes: expected int, got str"):
        tiny_config("classifier", n_classes="two")
    with pytest.raises(ConfigError, match=r"input_size\[1\]: expected int"):
        tiny_config("classifier", input_size=[64, 6.5])
    with pytest.raises(ConfigError, match="side"):
        tiny_config("regressor", side="middle")
    with pytest.raises(ConfigError, match="side"):
        tiny_config("mapper", source="regressor")
    with pytest.raises(KeyError, match="unknown stage kind"):
        create_stage("segmenter")
    assert list_stages() == ["classifier", "lungs", "mapper", "regressor"]


# ----------------------------------------------------------------------------- shapes and ranges


def test_lungs_shapes_and_splits():
    lungs = tiny("lungs")
    x = batch(lungs)
    assert lungs(x).shape == (2, 1, 64, 64)
    p = lungs.predict(x)
    assert p.shape == (2, 1, 64, 64) and 0 <= p.min() and p.max() <= 1
    # a probability map with the bigger lung on the image's left = the patient's right
    probs = torch.zeros(1, 1, 64, 64)
    probs[0, 0, 10:55, 6:28] = 0.9
    probs[0, 0, 14:50, 38:56] = 0.8
    (split,) = lungs.splits(probs)
    assert not split.fallback and split.right.sum() > split.left.sum()
    assert split.right_box[1] < split.left_box[1]
    (blank,) = lungs.splits(torch.zeros(1, 1, 64, 64))
    assert blank.fallback


def test_lung_half_inputs_in_original_coordinates():
    from pneumomap.stages.lung_geometry import fixed_split
    from pneumomap.stages.lungs import lung_half_inputs, paste_half

    pixels = np.random.default_rng(0).random((200, 160)).astype(np.float32)
    halves = lung_half_inputs(pixels, fixed_split((64, 64)), size=(64, 40))
    (rx, rbox), (lx, lbox) = halves["right"], halves["left"]
    assert rx.shape == lx.shape == (64, 40) and rx.dtype == np.float32
    assert -1 <= rx.min() and rx.max() <= 1
    assert rbox[1] < lbox[1] and rbox[2] <= 200 and lbox[3] <= 160
    pasted = paste_half(np.ones((64, 40), np.float32), rbox, (200, 160))
    assert pasted.shape == (200, 160) and pasted.sum() == (rbox[2] - rbox[0]) * (rbox[3] - rbox[1])


def test_lung_half_inputs_equal_normalizing_the_whole_image_then_cropping():
    from pneumomap.stages.lung_geometry import crop
    from pneumomap.stages.lung_geometry import fixed_split
    from pneumomap.stages.lungs import lung_half_inputs
    from pneumomap.stages.preprocess import normalize

    rng = np.random.default_rng(1)
    for pixels in (rng.integers(0, 4096, (180, 150)).astype(np.float32), rng.normal(size=(180, 150)).astype(np.float32)):
        pixels[5, 5] = 1e5  # an outlier outside the boxes
        for side, (x, box) in lung_half_inputs(pixels, fixed_split((64, 64)), size=(64, 40)).items():
            assert np.array_equal(x, crop(normalize(pixels), box, (64, 40))), side


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_convnext"])
def test_classifier_binary(backbone):
    clf = tiny("classifier", backbones=[backbone])
    x = batch(clf, 3)
    assert clf(x).shape == (3, 1)
    p = clf.predict(x)
    assert p.shape == (3,) and ((0 <= p) & (p <= 1)).all()


def test_multiclass_head_is_a_config_change(tmp_path):
    clf = tiny("classifier", n_classes=4, class_names=["covid", "tb", "pneumonia", "normal"])
    x = batch(clf)
    p = clf.predict(x)
    assert p.shape == (2, 4) and torch.allclose(p.sum(1), torch.ones(2))
    clf.save(tmp_path)
    assert torch.equal(load_stage(tmp_path).predict(x), p)


@pytest.mark.parametrize("side", ["right", "left"])
def test_regressor(side):
    reg = tiny("regressor", side=side)
    assert reg.input_size == (64, 40) and reg.side == side
    p = reg.predict(batch(reg, 3))
    assert p.shape == (3,) and ((0 <= p) & (p <= 1)).all()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("n_classes", [1, 3])
def test_gradcam_maps(method, n_classes):
    clf = tiny("classifier", n_classes=n_classes)
    x = batch(clf, 3)
    cam = GradCAM(clf, method).predict(x)
    assert cam.shape == (3, 1, 64, 64) and cam.min() >= 0 and cam.max() <= 1
    assert not any(p.grad is not None for p in clf.parameters())  # no gradients left behind


# ----------------------------------------------------------------------------- options


def test_flip_tta_undoes_the_flip():
    clf = tiny("classifier", flip_tta=True)
    x = batch(clf, 3)
    flipped = torch.flip(x, dims=(-1,))
    assert torch.allclose(clf.predict(x), clf.predict(flipped), atol=1e-6)
    plain = tiny("classifier")
    plain.load_state_dict(clf.state_dict())
    assert torch.allclose(clf.predict(x), (plain.predict(x) + plain.predict(flipped)) / 2, atol=1e-6)
    cam = GradCAM(clf).predict(x)
    assert torch.allclose(cam, torch.flip(GradCAM(clf).predict(flipped), dims=(-1,)), atol=1e-5)


def test_overrides_and_channels_last():
    clf = create_stage("classifier", tiny_config("classifier"), flip_tta=True).eval()
    assert clf.config.flip_tta and clf.config.backbones == ("test_efficientnet",)
    x = batch(clf)
    expected = clf.predict(x)
    clf = clf.to(memory_format=torch.channels_last)
    assert torch.allclose(clf.predict(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)


def test_ensemble_is_the_mean_of_member_probabilities():
    ens = tiny("classifier", backbones=["test_efficientnet", "test_convnext"])
    x = batch(ens)
    singles = [torch.sigmoid(member(x))[:, 0] for member in ens.members]
    assert torch.allclose(ens.predict(x), (singles[0] + singles[1]) / 2, atol=1e-6)
    assert ens.encoder is ens.members[0].encoder


# ----------------------------------------------------------------------------- checkpoints


def _mapper(source, channels):
    return Mapper.from_source(source, decoder_channels=channels).eval()


STAGES = {
    "lungs": lambda: tiny("lungs"),
    "classifier": lambda: tiny("classifier", backbones=["test_efficientnet", "test_convnext"], flip_tta=True),
    "regressor": lambda: tiny("regressor", side="left"),
    "mapper-classifier": lambda: _mapper(tiny("classifier", flip_tta=True), [32, 16, 16, 8, 8]),
    "mapper-regressor": lambda: _mapper(tiny("regressor", side="left"), [16, 16, 8, 8, 8]),
    "mapper-convnext": lambda: _mapper(tiny("classifier", backbones=["test_convnext"]), [32, 16, 16, 8]),
}


def test_every_registered_kind_has_checkpoint_cases():
    assert {name.split("-")[0] for name in STAGES} == set(list_stages())


@pytest.mark.parametrize("name", list(STAGES))
def test_checkpoint_roundtrip_is_bit_identical(name, tmp_path):
    stage = STAGES[name]()
    x = batch(stage)
    before = stage.predict(x)
    stage.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "weights.safetensors"]
    loaded = load_stage(tmp_path / "ckpt")
    assert type(loaded) is type(stage) and loaded.config == stage.config and not loaded.training
    assert torch.equal(loaded.predict(x), before)
    if stage.kind == "mapper":
        assert before.shape == (2, 1, *stage.input_size) and 0 <= before.min() and before.max() <= 1
        assert not any(p.requires_grad for p in loaded.encoder.parameters())


def test_load_stage_accepts_a_training_run_folder(tmp_path):
    clf = tiny("classifier")
    clf.save(tmp_path / "run" / "best")
    assert isinstance(load_stage(tmp_path / "run"), type(clf))
    assert type(clf).load(tmp_path / "run" / "best").config == clf.config
    with pytest.raises(TypeError, match="holds a 'classifier' stage"):
        Mapper.load(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no stage checkpoint"):
        load_stage(tmp_path / "nothing")


# ----------------------------------------------------------------------------- the shared frozen encoder


def test_mapper_shares_and_freezes_the_encoder():
    clf = tiny("classifier")
    mapper = Mapper.from_source(clf, decoder_channels=[32, 16, 16, 8, 8])
    assert mapper.encoder is clf.encoder  # a reference, not a copy
    assert not any(p.requires_grad for p in mapper.encoder.parameters())
    mapper.train()
    assert mapper.training and mapper.decoder.training and not mapper.encoder.training
    encoder_before = {k: v.clone() for k, v in mapper.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in mapper.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW(mapper.trainable_parameters(), lr=1e-2)
    x = batch(clf, 4)
    target = (torch.rand(4, 1, 64, 64) > 0.5).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(mapper(x), target)
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in mapper.encoder.parameters())
    for key, value in mapper.encoder.state_dict().items():  # weights and BN running statistics
        assert value.numpy().tobytes() == encoder_before[key].numpy().tobytes(), key
    assert any(not torch.equal(v, decoder_before[k]) for k, v in mapper.decoder.state_dict().items())


def test_encoder_runs_once_for_classifier_mapper_and_gradcam():
    clf = tiny("classifier")
    mapper = Mapper.from_source(clf, decoder_channels=[32, 16, 16, 8, 8]).eval()
    calls = []
    clf.encoder.register_forward_hook(lambda *_: calls.append(1))
    x = batch(clf)
    features = clf.encode(x)
    p = clf.predict(x, features=features)
    m = mapper.predict(x, features=features)
    cam = GradCAM(clf).predict(x, features=features)
    assert len(calls) == 1
    assert torch.allclose(p, clf.predict(x)) and torch.allclose(m, mapper.predict(x))
    assert torch.allclose(cam, GradCAM(clf).predict(x))
    assert len(calls) == 4


def test_attach_checks_the_source():
    mapper = create_stage("mapper", tiny_config("mapper", decoder_channels=[8, 8, 8, 8, 8]))
    with pytest.raises(ValueError, match="source is 'classifier'"):
        mapper.attach_encoder(tiny("regressor"))
    with pytest.raises(ValueError, match="encoder"):
        mapper.attach_encoder(tiny("classifier", backbones=["test_convnext"]))
    side = create_stage("mapper", tiny_config("mapper", source="regressor", side="left", input_size=[64, 40]))
    with pytest.raises(ValueError, match="side"):
        side.attach_encoder(tiny("regressor", side="right"))


# ----------------------------------------------------------------------------- pretrained weights


@pytest.fixture
def timm_weights(tmp_path):
    """A full 3-channel timm test_efficientnet (classifier head included) saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_efficientnet", pretrained=False)
    path = tmp_path / "test_efficientnet.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model


def test_local_timm_weights_are_loaded_and_adapted_to_one_channel(timm_weights):
    path, model = timm_weights
    clf = tiny("classifier", pretrained=[str(path)])
    stem = clf.encoder.model.conv_stem.weight
    assert stem.shape[1] == 1
    assert torch.allclose(stem, model.conv_stem.weight.sum(1, keepdim=True))
    full = model.state_dict()
    mine = clf.encoder.model.state_dict()
    assert set(full) - set(mine) == {"classifier.weight", "classifier.bias"}  # only timm's classifier is left out
    for key, value in mine.items():
        if key != "conv_stem.weight":
            assert torch.equal(value, full[key]), key


def test_checkpoint_of_a_pretrained_stage_needs_no_weights_file(tmp_path, timm_weights):
    path, _ = timm_weights
    clf = tiny("classifier", pretrained=[str(path)])
    clf.save(tmp_path / "ckpt")
    path.unlink()  # the checkpoint alone must suffice
    loaded = load_stage(tmp_path / "ckpt")
    assert loaded.config == clf.config
    x = batch(clf)
    assert torch.equal(loaded.predict(x), clf.predict(x))


def test_local_smp_and_stage_weights(tmp_path, timm_weights):
    _, model = timm_weights
    # an smp-style checkpoint (keys under 'encoder.model.') into the lungs U-Net
    smp_state = {f"encoder.model.{k}": v for k, v in model.state_dict().items()}
    smp_state["decoder.blocks.0.conv1.0.weight"] = torch.zeros(3)
    torch.save(smp_state, tmp_path / "smp.pth")
    lungs = tiny("lungs", pretrained=str(tmp_path / "smp.pth"))
    full = model.state_dict()
    for key, value in lungs.net.encoder.model.state_dict().items():
        if key != "conv_stem.weight":
            assert torch.equal(value, full[key]), key
    # a pneumomap stage's weights file as the backbone of a new stage (ConvNeXt: FeatureListNet keys)
    source = tiny("classifier", backbones=["test_convnext"])
    source.save(tmp_path / "ckpt")
    clf = tiny("classifier", backbones=["test_convnext"], pretrained=[str(tmp_path / "ckpt" / "weights.safetensors")])
    for (k, a), b in zip(clf.encoder.state_dict().items(), source.encoder.state_dict().values()):
        assert torch.equal(a, b), k


def test_wrong_weights_file_is_an_error(tmp_path, timm_weights):
    path, _ = timm_weights
    with pytest.raises(ValueError, match="not in this file|no tensor"):
        tiny("classifier", backbones=["test_convnext"], pretrained=[str(path)])
    with pytest.raises(FileNotFoundError, match="not found"):
        tiny("classifier", pretrained=[str(tmp_path / "missing.pth")])


def test_random_weights_are_logged_once(caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(encoders, "_random_logged", False)
    with caplog.at_level(logging.WARNING, logger="pneumomap.stages.encoders"):
        clf = tiny("classifier")
        tiny("lungs")
        tiny("regressor")
    lines = [r for r in caplog.records if "random" in r.getMessage()]
    assert len(lines) == 1
    monkeypatch.setattr(encoders, "_random_logged", False)
    caplog.clear()
    clf.save(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pneumomap.stages.encoders"):
        load_stage(tmp_path)  # every weight comes from the checkpoint: nothing to say
    assert not [r for r in caplog.records if "random" in r.getMessage()]


# ----------------------------------------------------------------------------- full-size defaults


def test_default_configs_construct():
    """EfficientNet-B4 at 512 (and ConvNeXt-tiny) build; no forward pass at full size."""
    clf = create_stage("classifier")
    assert clf.input_size == (512, 512) and clf.config.backbones == ("efficientnet_b4",)
    assert clf.members[0].head.in_features == 1792  # EfficientNet-B4's conv_head, not the last block's 448
    assert create_stage("classifier", backbones=["convnext_tiny"]).members[0].head.in_features == 768
    reg = create_stage("regressor")
    assert reg.input_size == (512, 320)
    lungs = create_stage("lungs")
    assert lungs.input_size == (512, 512) and lungs.config.encoder == "tu-efficientnet_b4"
    mapper = Mapper.from_source(clf)
    assert mapper.encoder is clf.encoder and mapper.config.encoder == "efficientnet_b4"
