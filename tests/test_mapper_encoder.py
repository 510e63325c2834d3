"""A mapper meets only the encoder it was trained on (issue 13.2): the hash recorded at training,
checked by the pipeline at load (opt-in: params.allow_other_encoder), by `pneumomap stage mapper`
and by --resume."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pneumomap.cli import main as cli_main
from pneumomap.infer import runner, spec
from pneumomap.stages import create_stage, load_stage, tiny_config
from pneumomap.stages.mapper import EncoderMismatchError, Mapper, encoder_sha256

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_pipeline) -> dict:
    """The tiny pipeline plus a 'retrained' classifier (same architecture, other weights)."""
    root = tmp_path_factory.mktemp("mapper_encoder")
    path = tiny_pipeline(root / "pipe")
    torch.manual_seed(99)
    create_stage("classifier", tiny_config("classifier")).save(root / "retrained")
    return {"root": root, "path": path, "retrained": root / "retrained"}


def _variant(pipe: dict, name: str, classifier: Path | None = None, mapper: str | None = None,
             params: dict | None = None) -> spec.Pipeline:
    """A copy of the tiny pipeline (beside it) with other checkpoints / mapper_whole params."""
    raw = yaml.safe_load(pipe["path"].read_text())
    if classifier is not None:
        raw["nodes"]["classifier"]["checkpoint"] = str(classifier)
    if mapper is not None:
        raw["nodes"]["mapper_whole"]["checkpoint"] = mapper
    if params is not None:
        raw["nodes"]["mapper_whole"]["params"] = params
    path = pipe["path"].with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec.load(path)


def test_the_hash_is_of_the_weights_only():
    clf = create_stage("classifier", tiny_config("classifier"))
    digest = encoder_sha256(clf.encoder)
    assert len(digest) == 64 and digest == encoder_sha256(clf.encoder)
    copy = create_stage("classifier", tiny_config("classifier"))
    copy.load_state_dict(clf.state_dict())
    copy.to(memory_format=torch.channels_last)  # layout is not content
    assert encoder_sha256(copy.encoder) == digest
    with torch.no_grad():  # a head change is not an encoder change
        copy.members[0].head.weight.add_(1.0)
    assert encoder_sha256(copy.encoder) == digest
    with torch.no_grad():
        next(copy.encoder.parameters()).view(-1)[0] += 1e-3
    assert encoder_sha256(copy.encoder) != digest


def test_training_records_the_source_encoder(pipe):
    checkpoint = pipe["root"] / "pipe" / "checkpoints"
    mapper = load_stage(checkpoint / "mapper_whole")
    assert mapper.config.source_encoder_sha256 == encoder_sha256(load_stage(checkpoint / "classifier").encoder)
    config = yaml.safe_load((checkpoint / "mapper_right" / "config.yaml").read_text())["config"]
    assert config["source_encoder_sha256"] == encoder_sha256(load_stage(checkpoint / "regressor_right").encoder)


def test_the_pipeline_refuses_a_mapper_on_a_retrained_encoder(pipe):
    pipeline = _variant(pipe, "retrained", classifier=pipe["retrained"])
    with pytest.raises(runner.RunError) as caught:
        runner.load_models(pipeline, {"mapper_whole"}, CPU)
    message = str(caught.value)
    mapper = pipeline.nodes["mapper_whole"].checkpoint
    assert message.startswith("nodes.mapper_whole: ")
    assert str(mapper) in message and str(pipe["retrained"]) in message  # both checkpoints
    assert f"pneumomap train mapper_whole --data DATA --out RUN --set encoder_from={pipe['retrained']}" in message
    assert "allow_other_encoder: true" in message
    # the other mappers decode untouched encoders: fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = runner.load_models(pipeline, {"mapper_right", "mapper_left"}, CPU)
    assert {"mapper_right", "mapper_left", "regressor_right", "regressor_left"} <= set(models)


def test_the_opt_in_decodes_it_with_one_warning(pipe):
    pipeline = _variant(pipe, "allowed", classifier=pipe["retrained"], params={"allow_other_encoder": True})
    assert pipeline.nodes["mapper_whole"].params == {"allow_other_encoder": True}
    with pytest.warns(UserWarning) as caught:
        models = runner.load_models(pipeline, {"mapper_whole", "mapper_right", "mapper_left"}, CPU)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "nodes.mapper_whole" in text and "allow_other_encoder" in text and str(pipe["retrained"]) in text
    assert encoder_sha256(models["mapper_whole"].encoder) == encoder_sha256(load_stage(pipe["retrained"]).encoder)
    # the same pipeline on the encoder it was trained on: no warning
    same = _variant(pipe, "allowed_same", params={"allow_other_encoder": True})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.load_models(same, {"mapper_whole"}, CPU)


def test_an_older_checkpoint_is_compared_through_its_stored_encoder(pipe):
    """Without a recorded hash, the encoder copy the mapper checkpoint stores is its training-time one."""
    old = pipe["root"] / "pipe" / "checkpoints" / "mapper_old"
    if not old.exists():
        shutil.copytree(pipe["root"] / "pipe" / "checkpoints" / "mapper_whole", old)
        config = yaml.safe_load((old / "config.yaml").read_text())
        del config["config"]["source_encoder_sha256"]
        (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert load_stage(old).config.source_encoder_sha256 is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = runner.load_models(_variant(pipe, "old", mapper="checkpoints/mapper_old"), {"mapper_whole"}, CPU)
    assert models["mapper_whole"].config.source_encoder_sha256 == encoder_sha256(models["classifier"].members[0].encoder)
    with pytest.raises(runner.RunError, match="trained on another encoder"):
        runner.load_models(_variant(pipe, "old_retrained", classifier=pipe["retrained"], mapper="checkpoints/mapper_old"),
                           {"mapper_whole"}, CPU)


def test_the_opt_in_is_validated_and_absent_by_default(pipe):
    assert spec.load(pipe["path"]).nodes["mapper_whole"].params == {}  # nothing added to the graph or artifact keys
    with pytest.raises(spec.PipelineError, match=r"nodes\.mapper_whole\.params\.allow_other_encoder: wrong type"):
        _variant(pipe, "bad", params={"allow_other_encoder": "yes"})
    with pytest.raises(spec.PipelineError, match="allow_other_encoder"):
        _variant(pipe, "typo", params={"allow_other_encoders": True})


def test_attach_encoder_api():
    clf = create_stage("classifier", tiny_config("classifier"))
    other = create_stage("classifier", tiny_config("classifier"))
    mapper = Mapper.from_source(clf, decoder_channels=[8, 8, 8, 8, 8])
    assert mapper.attach_encoder(clf) is True
    with pytest.raises(EncoderMismatchError, match="trained on encoder sha256") as caught:
        mapper.attach_encoder(other)
    assert caught.value.trained == encoder_sha256(clf.encoder) and caught.value.found == encoder_sha256(other.encoder)
    assert mapper.encoder is clf.encoder  # a refused attach changes nothing
    assert mapper.attach_encoder(other, allow_other_encoder=True) is False
    assert mapper.encoder is other.encoder
    assert mapper.config.source_encoder_sha256 == encoder_sha256(clf.encoder)  # still the trained one


def test_stage_mapper_refuses_a_checkpoint_whose_encoder_was_replaced(tmp_path):
    """`pneumomap stage mapper` runs the stored encoder: it must be the trained one."""
    clf = create_stage("classifier", tiny_config("classifier"))
    other = create_stage("classifier", tiny_config("classifier"))
    mapper = Mapper.from_source(clf, decoder_channels=[8, 8, 8, 8, 8])
    mapper.save(tmp_path / "good")
    mapper.attach_encoder(other, allow_other_encoder=True)
    mapper.save(tmp_path / "swapped")  # the decoder trained on clf, the copy of other's encoder stored
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("L", (64, 64), 100).save(images / "a.png")
    args = ["stage", "mapper", "--input", str(images), "--device", "cpu"]
    assert cli_main([*args, "--checkpoint", str(tmp_path / "good"), "--out", str(tmp_path / "out_good")]) == 0
    assert cli_main([*args, "--checkpoint", str(tmp_path / "swapped"), "--out", str(tmp_path / "out_bad")]) == 2
    assert not (tmp_path / "out_bad" / "maps").exists()


def test_train_records_the_hash_and_resume_keeps_the_encoder(tmp_path):
    from pneumomap.synth import generate
    from pneumomap.train import recipes
    from pneumomap.train.cli import train

    generate(tmp_path / "data", 12, seed=3, size=64)
    sets = ["workers=0", "batch_size=4", "rotate=0", "epochs=1", "max_images=4"]

    def run(stage, out, *more, resume=False):
        return train(stage, tmp_path / "data", tmp_path / out, recipes.resolve(stage, "tiny", [*sets, *more]),
                     resume=resume, device="cpu")

    run("classifier", "cls", "model.input_size=[64, 64]")
    retrained = load_stage(tmp_path / "cls" / "best")
    with torch.no_grad():
        next(retrained.encoder.parameters()).view(-1)[0] += 1e-3
    retrained.save(tmp_path / "cls2" / "best")
    run("mapper_whole", "map", f"encoder_from={tmp_path / 'cls' / 'best'}")
    trained = load_stage(tmp_path / "cls" / "best").encoder
    for folder in ("best", "last"):
        assert load_stage(tmp_path / "map" / folder).config.source_encoder_sha256 == encoder_sha256(trained)
    assert encoder_sha256(load_stage(tmp_path / "cls2" / "best").encoder) != encoder_sha256(trained)
    with pytest.raises(recipes.RecipeError, match="--resume: .* trained on another encoder than encoder_from"):
        run("mapper_whole", "map", f"encoder_from={tmp_path / 'cls2' / 'best'}", "epochs=2", resume=True)
    run("mapper_whole", "map", f"encoder_from={tmp_path / 'cls' / 'best'}", "epochs=2", resume=True)
    assert load_stage(tmp_path / "map" / "last").config.source_encoder_sha256 == encoder_sha256(trained)
