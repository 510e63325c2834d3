"""DDP under torchrun on the CPU (gloo): two ranks train one stage and end with identical weights.

Run as a script by torchrun (see the test): each rank trains, then writes a digest of its own
weights and buffers to OUT/rank<r>.sha1; only rank 0 writes the run's files.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path



def _digest(module) -> str:
    sha = hashlib.sha1()
    for key, value in sorted(module.state_dict().items()):
        sha.update(key.encode())
        sha.update(value.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def worker(data: str, out: str) -> None:
    import torch

    from pneumomap.train import ddp, recipes
    from pneumomap.train.datasets import rsna_datasets
    from pneumomap.train.loop import fit
    from pneumomap.train.tasks import make_task

    recipe = recipes.resolve("classifier", "tiny", ["workers=0", "batch_size=2", "epochs=2",
                                                    "model.input_size=[64, 64]", "hflip=true"])
    device = torch.device("cpu")
    assert ddp.setup(device) and ddp.world_size() == 2
    torch.manual_seed(recipe.seed + ddp.rank())  # different initial weights: DDP must make them agree
    task = make_task("classifier", recipe)
    train_set, val_set = rsna_datasets(data, task.spec, recipe, task.input_size)
    fit(task, train_set, val_set, recipe, out, device)
    Path(out, f"rank{ddp.rank()}.sha1").write_text(_digest(task.model))
    ddp.teardown()


def test_two_process_torchrun_ranks_agree(tmp_path):
    from pneumomap.synth import generate

    data, out = tmp_path / "data", tmp_path / "out"
    generate(data, 10, seed=5, size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(data), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(out / f"rank{r}.sha1").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    assert (out / "best" / "weights.safetensors").is_file() and (out / "history.json").is_file()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
