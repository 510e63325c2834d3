"""Training recipes, --set overrides, the LR schedule, losses and the flip that swaps sides (no training here)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pneumomap.train import augment, recipes
from pneumomap.train.losses import BinaryLoss, Dice, MseMae, make_loss
from pneumomap.train.schedule import lr_factor, make_scheduler


def test_reference_recipes_follow_the_design_table():
    table = {"classifier": (1e-5, "bce", "cosine", 0.5, 32), "regressor_right": (5e-5, "mse_mae", "cosine", 0.75, 50),
             "regressor_left": (5e-5, "mse_mae", "cosine", 0.75, 50), "mapper_whole": (1e-4, "dice", "cosine", 0.75, 32),
             "lungs": (1e-4, "dice", "constant", 1.0, 32)}
    for stage, (lr, loss, schedule, decay, batch) in table.items():
        r = recipes.defaults(stage)
        assert (r["lr"], r["loss"], r["schedule"], r["lr_decay"], r["batch_size"]) == (lr, loss, schedule, decay, batch)
        assert r["rotate"] == 15
    assert 12 <= recipes.defaults("classifier")["epochs"] <= 20
    assert recipes.defaults("lungs")["epochs"] == 100
    for stage in recipes.STAGES:  # every stage has a reference and a tiny recipe
        recipes.recipe_path(stage, "tiny")


def test_set_overrides_apply_with_types():
    r = recipes.resolve("classifier", "tiny", ["epochs=3", "lr=1e-3", "hflip=true", "model.backbones=[resnet10t]",
                                               "class_weights=[1, 3]", "max_images=null"])
    assert r.epochs == 3 and r.lr == 1e-3 and r.hflip is True
    assert r.model["backbones"] == ["resnet10t"] and r.model["input_size"] == [128, 128]
    assert r.class_weights == [1, 3] and r.max_images is None


def test_unknown_keys_fail_with_the_closest_name():
    with pytest.raises(recipes.RecipeError, match=r"unknown recipe key 'epoch'.*did you mean 'epochs'"):
        recipes.resolve("classifier", None, ["epoch=3"])
    with pytest.raises(recipes.RecipeError, match=r"'focal_gamma'"):
        recipes.resolve("classifier", None, ["focal_gama=1"])
    with pytest.raises(recipes.RecipeError, match="unknown recipe key 'target'"):  # classifier-only key
        recipes.resolve("lungs", None, ["target=binary"])
    with pytest.raises(recipes.RecipeError, match="expected key=value"):
        recipes.resolve("lungs", None, ["epochs"])
    with pytest.raises(recipes.RecipeError, match="positive integer"):
        recipes.resolve("lungs", None, ["epochs=0"])
    with pytest.raises(recipes.RecipeError, match="not one of"):
        recipes.resolve("lungs", None, ["schedule=step"])
    with pytest.raises(recipes.RecipeError, match="did you mean 'classifier'"):
        recipes.stage_spec("clasifier")
    with pytest.raises(recipes.RecipeError, match="encoder_from"):
        recipes.resolve("mapper_whole", None, [])


def test_recipe_dataclass_round_trips_the_recipe_files():
    """`Recipe` defaults are common.yaml's; to_dict gives each stage's keys in the files' order, so
    recipe.yaml stays the YAML of the layered files; keys and values are checked when a Recipe is built."""
    import dataclasses

    import yaml

    common = yaml.safe_load((recipes.RECIPE_DIR / "common.yaml").read_text())
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(recipes.Recipe)}
    assert {k: defaults[k] for k in common} == common
    for stage in recipes.STAGES:
        layered = recipes.defaults(stage)
        if stage.startswith("mapper"):
            layered["encoder_from"] = "x"
        recipe = recipes.Recipe.from_dict(stage, layered)
        assert list(recipe.to_dict().items()) == list(layered.items())
        assert recipes.dump(recipe) == yaml.safe_dump(layered, sort_keys=False)
    layered = recipes.defaults("classifier")
    layered.update(yaml.safe_load(recipes.recipe_path("classifier", "tiny").read_text()), epochs=3, lr=1)
    assert recipes.dump(recipes.resolve("classifier", "tiny", ["epochs=3", "lr=1"])) == yaml.safe_dump(layered,
                                                                                                     sort_keys=False)
    with pytest.raises(recipes.RecipeError, match=r"recipe: unknown recipe key 'epoch'.*did you mean 'epochs'"):
        recipes.Recipe.from_dict("lungs", {"epoch": 3})
    with pytest.raises(recipes.RecipeError, match="unknown recipe key 'target'"):
        recipes.Recipe.from_dict("lungs", {"target": "binary"})
    recipe = recipes.Recipe("lungs")
    assert recipe.target is None and "target" not in recipe.to_dict() and recipe.epochs == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lr = 1.0
    with pytest.raises(recipes.RecipeError, match="'epochs': expected a positive integer"):
        recipe.replace(epochs=0)
    for key, value, message in (("hflip", 1, "true or false"), ("workers", -1, "integer >= 0"),
                                ("max_images", 2.5, "integer >= 0"), ("train_split", None, "text"),
                                ("encoder_from", 3, "text")):
        with pytest.raises(recipes.RecipeError, match=f"recipe key '{key}': expected (an? )?{message}"):
            recipes.resolve("lungs", None, [f"{key}={'null' if value is None else value}"])
    assert recipes.resolve("lungs", None, ["max_images=null", "cache_dir=null"]).max_images is None


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 2\nbatchsize: 4\n")
    with pytest.raises(recipes.RecipeError, match=r"mine.yaml: unknown recipe key 'batchsize'.*'batch_size'"):
        recipes.resolve("lungs", str(path))
    with pytest.raises(recipes.RecipeError, match="not a recipe name"):
        recipes.resolve("lungs", "tinny")


def test_cli_reports_a_bad_key(capsys):
    from pneumomap.cli import main

    assert main(["train", "lungs", "--data", "x", "--out", "y", "--set", "lr_decai=0.5"]) == 2
    assert "did you mean 'lr_decay'" in capsys.readouterr().err


def test_schedule_decays_by_the_factor_per_epoch_smoothly():
    assert lr_factor(0.0, 0.5) == 1.0
    assert lr_factor(1.0, 0.5) == pytest.approx(0.5)
    assert lr_factor(3.0, 0.75) == pytest.approx(0.75 ** 3)
    assert 0.5 < lr_factor(0.5, 0.5) < 1.0
    values = [lr_factor(t / 10, 0.5) for t in range(40)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_factor(2.5, 0.5, "constant") == 1.0
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recipe = recipes.Recipe("lungs", lr=1e-3, min_lr=0.0, lr_decay=0.5, schedule="cosine")
    sched = make_scheduler(opt, recipe, steps_per_epoch=4)
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)


def test_weighted_and_focal_losses_equal_their_formulas():
    """Independent formulas at logits away from 0 (at 0 every weighting gives log 2): swapped or
    ignored class weights, or a focal exponent applied to the wrong probability, change the numbers."""
    import math

    from pneumomap.train.losses import MultiClassLoss

    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    p = 1 / (1 + torch.exp(-logits))
    nll = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    w = torch.where(target == 1, 10.0, 1.0)
    assert float(BinaryLoss([1.0, 10.0])(logits, target)) == pytest.approx(float((w * nll).sum() / w.sum()), rel=1e-6)
    assert float(BinaryLoss([10.0, 1.0])(logits, target)) != pytest.approx(float(BinaryLoss([1.0, 10.0])(logits, target)))
    p_true = torch.where(target == 1, p, 1 - p)
    focal = (1 - p_true) ** 2 * nll
    assert float(BinaryLoss(gamma=2.0)(logits, target)) == pytest.approx(float(focal.mean()), rel=1e-6)

    logits3 = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-2.0, 1.0, 3.0]])
    target3 = torch.tensor([0, 2, 1])
    log_p = torch.log_softmax(logits3, dim=1)[torch.arange(3), target3]
    weights = torch.tensor([1.0, 2.0, 5.0])[target3]
    assert float(MultiClassLoss()(logits3, target3)) == pytest.approx(float(-log_p.mean()), rel=1e-6)
    assert float(MultiClassLoss([1.0, 2.0, 5.0])(logits3, target3)) == pytest.approx(
        float((weights * -log_p).sum() / weights.sum()), rel=1e-6)
    focal3 = (1 - torch.exp(log_p)) ** 2 * -log_p
    assert float(MultiClassLoss(gamma=2.0)(logits3, target3)) == pytest.approx(float(focal3.mean()), rel=1e-6)
    assert math.isfinite(float(MultiClassLoss([1.0, 2.0, 5.0], gamma=1.0)(logits3, target3)))


def test_losses():
    logits, target = torch.tensor([3.0, -3.0]), torch.tensor([1.0, 0.0])
    assert BinaryLoss()(logits, target) < BinaryLoss()(-logits, target)
    assert BinaryLoss(gamma=2.0)(logits, target) < BinaryLoss()(logits, target)  # focal down-weights easy samples
    weighted = BinaryLoss([1.0, 10.0])(torch.tensor([0.0, 0.0]), target)
    assert weighted == pytest.approx(float(BinaryLoss()(torch.tensor([0.0, 0.0]), target)))  # both log(2)
    assert MseMae()(torch.tensor([0.5]), torch.tensor([0.0])) == pytest.approx((0.25 + 0.5) / 2)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    assert Dice()(mask * 20 - 10, mask) < 0.01
    with pytest.raises(ValueError, match="does not fit"):
        make_loss(SimpleNamespace(loss="ce", target="binary", focal_gamma=2.0, class_weights=None))  # unchecked


def test_flip_swaps_the_side_targets_and_mirrors_the_arrays():
    image_r, image_l = np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((2, 3), np.float32)
    sample = {"image_right": image_r, "image_left": image_l, "target_right": np.float32(0.3),
              "target_left": np.float32(0.1)}
    flipped = augment.hflip(sample)
    assert flipped["target_right"] == np.float32(0.1) and flipped["target_left"] == np.float32(0.3)
    np.testing.assert_array_equal(flipped["image_left"], image_r[:, ::-1])
    np.testing.assert_array_equal(flipped["image_right"], image_l)
    whole = augment.hflip({"image": image_r, "target": image_r > 2})
    np.testing.assert_array_equal(whole["target"], (image_r > 2)[:, ::-1])


def test_rotation_moves_image_and_mask_alike():
    image = -torch.ones(1, 32, 32)
    image[:, 4:12, 14:18] = 1.0
    mask = (image > 0).float()
    rot_image, rot_mask = augment.rotate(image, mask, 90.0)
    assert torch.equal(rot_mask > 0.5, rot_image > 0)
    assert not torch.equal(rot_mask, mask)
    assert rot_image.min() == -1.0  # uncovered corners filled with the darkest input value


def _help_sets() -> list[str]:
    """Every `--set KEY=VALUE` that `pneumomap train --help` shows (its text and the --set option's help)."""
    import argparse
    import re
    import shlex

    from pneumomap.train import cli

    parser = argparse.ArgumentParser(description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(parser)
    text = parser.format_help()
    found = [shlex.split(m)[0] for m in re.findall(r"--set\s+('[^']+'|\S+=\S+)", text)]
    found += [shlex.split(m)[0] for m in re.findall(r"e\.g\.\s+('model\.[^']+')", text)]
    return [s.rstrip(":)") for s in found if "=" in s and not s.lower().startswith("key=")]


def test_help_examples_are_valid_overrides():
    """The --help text's --set examples resolve and build their stage config (issue 13.8: model.backbone)."""
    from pneumomap.stages.base import make_config

    examples = _help_sets()
    assert any(s.startswith("model.backbones=") for s in examples), examples
    for item in examples:
        if item.startswith("encoder_from="):
            recipes.resolve("mapper_whole", None, [item])
            continue
        recipe = recipes.resolve("classifier", None, [item])
        make_config("classifier", recipes.model_config("classifier", recipe))


def test_model_keys_are_checked_with_the_closest_name(capsys):
    with pytest.raises(recipes.RecipeError, match=r"unknown recipe key 'model.backbone'.*did you mean 'model.backbones'"):
        recipes.resolve("classifier", None, ["model.backbone=convnext_tiny"])
    with pytest.raises(recipes.RecipeError, match=r"model.backbones: expected a list"):
        recipes.resolve("classifier", None, ["model.backbones=convnext_tiny"])
    with pytest.raises(recipes.RecipeError, match=r"unknown recipe key 'model.decoder_channel'.*'model.decoder_channels'"):
        recipes.resolve("mapper_whole", None, ["encoder_from=x", "model.decoder_channel=[8, 8]"])
    recipes.resolve("mapper_whole", "tiny", ["encoder_from=x"])  # the tiny recipe's model keys are the mapper's
    from pneumomap.cli import main

    assert main(["train", "classifier", "--data", "x", "--out", "y", "--set", "model.backbone=convnext_tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'model.backbones'" in err


def test_three_class_takes_the_loss_that_fits(capsys):
    """`--set target=three_class` alone trains with cross-entropy; a loss that does not fit is one line."""
    recipe = recipes.resolve("classifier", None, ["target=three_class"])
    assert recipe.loss == "ce"
    from pneumomap.train.losses import MultiClassLoss

    assert isinstance(make_loss(recipe), MultiClassLoss)
    assert recipes.resolve("classifier", None, ["target=three_class", "loss=focal"]).loss == "focal"
    assert recipes.resolve("classifier", None, []).loss == "bce"
    with pytest.raises(recipes.RecipeError, match=r"'loss': 'bce' does not fit target 'three_class'; use ce \| focal"):
        recipes.resolve("classifier", None, ["target=three_class", "loss=bce"])
    with pytest.raises(recipes.RecipeError, match=r"'loss': 'ce' does not fit target 'binary'"):
        recipes.resolve("classifier", None, ["loss=ce"])
    with pytest.raises(recipes.RecipeError, match=r"'loss': 'dice' does not fit stage regressor_left"):
        recipes.resolve("regressor_left", None, ["loss=dice"])
    with pytest.raises(recipes.RecipeError, match=r"class_weights.*a list of 3"):
        recipes.resolve("classifier", None, ["target=three_class", "class_weights=[1, 2]"])
    from pneumomap.cli import main

    assert main(["train", "classifier", "--data", "x", "--out", "y", "--set", "target=three_class",
                 "--set", "loss=bce"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
