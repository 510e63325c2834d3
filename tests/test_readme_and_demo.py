"""The README's promises: its two commands, its DAG diagram, and the demo's whole chain (smoke run)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands_and_ci_calls_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_diagram_is_the_one_generated_from_pipeline_yaml():
    from pneumomap.infer.graph import mermaid
    from pneumomap.infer.spec import load

    diagram = mermaid(load(ROOT / "pipeline.yaml", check_checkpoints=False)).strip()
    assert diagram in README, "README's diagram is stale: paste `pneumomap graph --pipeline pipeline.yaml`"


def test_no_placeholder_left_in_readme():
    assert not re.search(r"PLACEHOLDER|_SECTION\b|_REFERENCE\b|DEMO_RESULTS|_MINUTES\b|TRAIN_REAL|BENCH_CPU", README)


@pytest.mark.slow
def test_demo_smoke_run_writes_every_summary_key(tmp_path):
    """The whole lifecycle with 1 epoch per stage on a tiny phantom set: every command runs and
    summary.json has every figure (the learning checks themselves need the full demo)."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "pneumomap", "demo", "--out", str(out), "--n", "40",
                             "--size", "64", "--set", "epochs=1"], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("classifier_auc", "lung_dice", "map_metric_untuned", "map_metric_tuned", "map_metric_constant",
                "map_metric_lung_prior", "images_per_second"):
        assert key in summary
    assert 0.0 <= summary["lung_dice"] <= 1.0
    assert summary["map_metric_constant"] > 0 and summary["map_metric_lung_prior"] > 0
    for key in ("submission", "tuned_pipeline", "report", "rsna_submission"):
        assert Path(summary[key]).exists(), key
    assert "demo summary" in result.stdout
    assert result.returncode == (0 if all(summary["checks"].values()) else 1)
