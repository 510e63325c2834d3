"""pipeline.yaml validation: every error names the file, the key path and a hint; all at once."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pneumomap.infer import spec
from pneumomap.infer.graph import mermaid

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "pipeline.yaml"


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def problems(tmp_path: Path, raw: dict, check_checkpoints: bool = False) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(spec.PipelineError) as info:
        spec.load(path, check_checkpoints=check_checkpoints)
    message = str(info.value)
    assert str(path) in message
    return message


def test_default_pipeline_is_valid_and_topological():
    pipeline = spec.load(DEFAULT, check_checkpoints=False)
    names = list(pipeline.nodes)
    for node in pipeline.nodes.values():
        for src in node.inputs + ([node.when] if node.when else []):
            assert src == spec.IMAGE or names.index(src) < names.index(node.name)
    assert pipeline.nodes["gate"].params["threshold"] == pipeline.thresholds["classifier"]
    assert pipeline.nodes["mapper_right"].output == "lungmap"
    assert pipeline.outputs.rsna == {"threshold": 0.5, "min_area": 16}
    assert "mapper_whole" in mermaid(pipeline) and "gate -.->|when| mapper_whole" in mermaid(pipeline)


def test_the_floor_is_what_the_final_op_declares(monkeypatch):
    pipeline = spec.load(DEFAULT, check_checkpoints=False)
    assert pipeline.floor == pipeline.thresholds["clip"]["outside"]
    assert pipeline.with_thresholds({**pipeline.thresholds, "clip": {"low": 10, "high": 245, "outside": 7}}).floor == 7
    import dataclasses

    from pneumomap.infer import ops

    monkeypatch.setitem(ops.OPS, "clip", dataclasses.replace(ops.OPS["clip"], floor=None))
    assert pipeline.floor == ops.MAP8_RANGE[0] == 1  # a final op that declares no floor: the lowest map value


def test_unknown_op_and_stage_suggest(tmp_path, raw):
    raw["nodes"]["gate"]["op"] = "gaet"
    raw["nodes"]["lungs"]["stage"] = "lung"
    message = problems(tmp_path, raw)
    assert "nodes.gate.op: unknown op 'gaet' (hint: did you mean 'gate'?)" in message
    assert "nodes.lungs.stage: unknown stage 'lung' (hint: did you mean 'lungs'?)" in message


def test_misspelt_input_names_key_path_and_closest(tmp_path, raw):
    raw["nodes"]["mapper_right"]["inputs"] = ["regresor_right"]
    message = problems(tmp_path, raw)
    assert "nodes.mapper_right.inputs[0]: no node named 'regresor_right' (hint: did you mean 'regressor_right'?)" in message


def test_cycle_is_named(tmp_path, raw):
    raw["nodes"]["classifier"]["inputs"] = ["final"]
    message = problems(tmp_path, raw)
    assert "cycle: " in message
    cycle = message.split("cycle: ")[1].split(" (hint")[0].split(" -> ")
    assert cycle[0] == cycle[-1] and "classifier" in cycle and "final" in cycle


def test_wrong_types(tmp_path, raw):
    raw["nodes"]["gate"]["inputs"] = "classifier lungs"  # a string is one name: 'classifier lungs'
    raw["nodes"]["level"]["params"] = {"threshold": "high"}
    raw["nodes"]["final"]["inputs"] = ["grown", "lungs"]  # a working-frame map where the clip needs a full map
    message = problems(tmp_path, raw)
    assert "nodes.gate.inputs[0]: no node named 'classifier lungs'" in message
    assert "nodes.level.params.threshold: wrong type: expected a number, got a string 'high'" in message
    assert "nodes.final.inputs[0]: 'grown' gives map, but input 'map' of clip needs fullmap" in message


def test_missing_checkpoint_dir(tmp_path, raw):
    message = problems(tmp_path, raw, check_checkpoints=True)
    assert "nodes.lungs.checkpoint: checkpoint directory" in message and "does not exist" in message
    assert "pneumomap train lungs" in message


def test_checkpoint_dir_without_files(tmp_path, raw):
    (tmp_path / "checkpoints" / "lungs" / "best").mkdir(parents=True)
    message = problems(tmp_path, raw, check_checkpoints=True)
    assert "lungs/best lacks config.yaml, weights.safetensors" in message


def test_threshold_out_of_range_names_both_places(tmp_path, raw):
    raw["thresholds"]["classifier"] = 1.5
    raw["thresholds"]["clip"]["high"] = 300
    message = problems(tmp_path, raw)
    assert "thresholds.classifier (used by nodes.gate.params.threshold): out of range: 1.5 is not in [0.0, 1.0]" in message
    assert "thresholds.clip.high (used by nodes.final.params.high): out of range" in message


@pytest.mark.parametrize("key, value", [("outside", 0), ("high", 255), ("low", 0), ("high", 254.5)])
def test_a_map_can_never_hold_0_or_255(tmp_path, raw, key, value):
    """The final map's values stay in [1, 254]: a limit of the pipeline itself, not only of the tuner."""
    raw["thresholds"]["clip"][key] = value
    message = problems(tmp_path, raw)
    assert f"thresholds.clip.{key} (used by nodes.final.params.{key}):" in message
    if isinstance(value, int):
        assert "out of range" in message and "[1, 254]" in message


def test_unknown_threshold_reference_and_keys(tmp_path, raw):
    raw["nodes"]["gate"]["params"]["threshold"] = "$clasifier"
    raw["nodes"]["gate"]["params"]["treshold"] = 0.5
    raw["nodes"]["gate"]["input"] = ["classifier"]
    raw["outputs"]["probabilty"] = "classifier"
    message = problems(tmp_path, raw)
    assert "nodes.gate.params.threshold: '$clasifier' names no entry of the thresholds block (hint: did you mean 'classifier'?)" in message
    assert "nodes.gate.params.treshold: unknown parameter 'treshold' (hint: did you mean 'threshold'?)" in message
    assert "nodes.gate.input: unknown key 'input' (hint: did you mean 'inputs'?)" in message
    assert "outputs.probabilty: unknown key" in message


def test_input_count_when_and_outputs(tmp_path, raw):
    raw["nodes"]["level"]["inputs"] = ["regressor_right"]
    raw["nodes"]["mapper_whole"]["when"] = "level"
    raw["outputs"]["map"] = "masked"
    message = problems(tmp_path, raw)
    assert "nodes.level.inputs: level takes 2 input(s), got 1" in message
    assert "nodes.mapper_whole.when: 'level' is not a gate" in message
    assert "outputs.map: 'masked' gives fullmap, expected map8" in message


def test_all_errors_in_one_exception(tmp_path, raw):
    bad = copy.deepcopy(raw)
    bad["nodes"]["gate"]["op"] = "gaet"
    bad["thresholds"]["left_extent"] = -1
    bad["nodes"]["mapper_left"]["inputs"] = ["nowhere"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(spec.PipelineError) as info:
        spec.load(path, check_checkpoints=False)
    assert len(info.value.errors) >= 3


def test_yaml_is_never_evaluated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("nodes: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(spec.PipelineError, match="not valid YAML"):
        spec.load(path)


def test_replace_thresholds_keeps_the_rest(raw):
    text = DEFAULT.read_text()
    new = copy.deepcopy(raw["thresholds"])
    new["classifier"] = 0.123
    replaced = spec.replace_thresholds(text, new)
    assert yaml.safe_load(replaced)["thresholds"] == new
    assert yaml.safe_load(replaced)["nodes"] == raw["nodes"]
    before, after = text.split("thresholds:")[0], text.split("\nnodes:")[1]
    assert replaced.startswith(before) and replaced.endswith(after)


def test_with_thresholds_revalidates():
    pipeline = spec.load(DEFAULT, check_checkpoints=False)
    other = pipeline.with_thresholds({**pipeline.thresholds, "classifier": 0.2})
    assert other.nodes["gate"].params["threshold"] == 0.2
    with pytest.raises(spec.PipelineError, match="out of range"):
        pipeline.with_thresholds({**pipeline.thresholds, "classifier": 2})
