"""benchmarks/gpu_check.sh's CPU smoke run (issue 16): every step of the GPU check runs CPU-sized, the
table and the JSON name every row, the GPU-only ones as skipped with their reason."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ["data", "(a) decode+preprocess, 1 workers", "(a) decode+preprocess, 2 workers",
            "(b) pure forward, batch 4", "(c) infer end to end, batch 4"]
SKIPPED = ["GPU busy, batch 4", "AMP fp16 vs fp32: largest probability difference",
           "AMP fp16 vs fp32: map metric change", "torchrun 1 rank: train classifier, 1 epoch",
           "torchrun 2 ranks on one device = 1 process", "cuda tests"]


@pytest.mark.slow
def test_gpu_check_smoke_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "work")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result == json.loads((tmp_path / "work" / "gpu_check.json").read_text())
    assert result["mode"] == "smoke" and result["details"]["device"] == "cpu"
    rows = {row["check"]: row for row in result["rows"]}
    assert set(rows) == {*MEASURED, "gate threshold", *SKIPPED}
    table = done.stdout[done.stdout.index("gpu_check (CPU smoke run"):]
    for name, row in rows.items():
        assert name in table
        if name in SKIPPED:
            assert row["status"] == "skipped" and row["note"], row
        else:
            assert row["status"] in ("ok", "below target"), row  # a CPU is far below a GPU's targets
    assert rows["data"]["value"] == 8
    assert all(rows[name]["value"] > 0 for name in MEASURED)
    assert 0 < rows["gate threshold"]["value"] < 1
    # the gate at the median of the 8 probabilities passes exactly half of them
    assert result["details"]["infer"]["4"]["passed"] == 0.5
    assert "50% past the gate" in rows["(c) infer end to end, batch 4"]["note"]
    assert "fp16 needs CUDA" in rows["AMP fp16 vs fp32: map metric change"]["note"]
