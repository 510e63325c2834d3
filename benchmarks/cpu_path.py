"""The CPU speed path of inference, side by side (issue 17, item 4): eager, the frozen TorchScript
trace pneumomap uses (`pneumomap.stages.inference.LazyFrozen`: torch.jit.trace + freeze), a
torch.export program (`torch.export.export(...).module()`) and torch.compile (inductor).

  .venv/bin/python benchmarks/cpu_path.py [--rounds 5] [--parts classifier,lungs,mapper] [--skip-compile]

Each network at the default stage sizes, as the runner feeds it on the CPU: float32, batch 1,
channels_last, no grad, random weights (speed does not depend on them):
  classifier  the EfficientNet-B4 encoder at 512x512 (the part `LazyFrozen` wraps; a regressor's is
              the same network on 512x320)
  lungs       the lung U-Net (tu-efficientnet_b4) at 512x512
  mapper      a mapper's decoder over the classifier encoder's maps at 512x512
The one-off cost of each variant (tracing, exporting, compiling, the first call) is timed apart.
Then ``--rounds`` rounds, each timing every variant in turn (a median of 3 calls each), so that a
change of the shared machine's load hits all alike; the medians of the rounds and the images per
second of each variant relative to eager are printed, with /proc/loadavg, and written as JSON
(``--json``). Every variant's output is checked against eager (largest absolute difference).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infer_speed import loadavg  # noqa: E402  (benchmarks/ is this script's folder)
from pneumomap.stages.base import create_stage  # noqa: E402
from pneumomap.stages.inference import LazyFrozen  # noqa: E402


def networks(parts: list[str]) -> dict[str, tuple[nn.Module, object]]:
    """part -> (eager module in eval and channels_last, example input) at the default sizes."""
    out: dict[str, tuple[nn.Module, object]] = {}
    x = torch.randn(1, 1, 512, 512).contiguous(memory_format=torch.channels_last)
    classifier = create_stage("classifier").eval().to(memory_format=torch.channels_last)
    encoder = classifier.members[0].encoder
    if "classifier" in parts:
        out["classifier"] = (encoder, x)
    if "lungs" in parts:
        lungs = create_stage("lungs").eval().to(memory_format=torch.channels_last)
        out["lungs"] = (lungs.net, x)
    if "mapper" in parts:
        mapper = create_stage("mapper", {"source": "classifier", "encoder": "efficientnet_b4", "input_size": [512, 512]})
        mapper = mapper.eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            features = encoder(x)
        stand_in = features[0].new_empty((1, 0, 512, 512))  # as `Mapper.decode` calls its decoder
        out["mapper"] = (mapper.decoder, [stand_in, *features[:mapper.levels]])
    return out


def variants(module: nn.Module, example: object, compile_too: bool) -> dict[str, tuple[Callable, float]]:
    """name -> (callable, one-off seconds: build + first call)."""
    def timed(build: Callable[[], Callable]) -> tuple[Callable, float]:
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn = build()
            fn(example)
        return fn, time.perf_counter() - start

    found = {"eager": timed(lambda: module), "trace+freeze": timed(lambda: LazyFrozen(module, "bench"))}
    found["torch.export"] = timed(lambda: torch.export.export(module, (example,)).module())
    if compile_too:
        found["torch.compile"] = timed(lambda: torch.compile(module))
    return found


def first(output: object) -> torch.Tensor:
    return output[-1] if isinstance(output, (list, tuple)) else output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parts", default="classifier,lungs,mapper")
    parser.add_argument("--skip-compile", action="store_true", help="leave torch.compile out (its compile is long)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {loadavg()}", flush=True)
    results = {}
    for part, (module, example) in networks(args.parts.split(",")).items():
        found = variants(module, example, not args.skip_compile)
        with torch.no_grad():
            reference = first(found["eager"][0](example))
            diffs = {name: float((first(fn(example)) - reference).abs().max()) for name, (fn, _) in found.items()}
        times: dict[str, list[float]] = {name: [] for name in found}
        for _ in range(args.rounds):
            for name, (fn, _) in found.items():
                calls = []
                with torch.no_grad():
                    for _ in range(3):
                        start = time.perf_counter()
                        fn(example)
                        calls.append(time.perf_counter() - start)
                times[name].append(statistics.median(calls))
        eager = statistics.median(times["eager"])
        results[part] = {name: {"ms": round(1000 * statistics.median(t), 1),
                                "speed_vs_eager": round(eager / statistics.median(t), 3),
                                "round_ratios": [round(e / v, 3) for e, v in zip(times["eager"], t)],
                                "one_off_s": round(found[name][1], 2), "max_abs_diff": diffs[name]}
                         for name, t in times.items()}
        print(f"\n{part} (load {loadavg()})")
        for name, r in results[part].items():
            print(f"  {name:<14} {r['ms']:>8.1f} ms  {r['speed_vs_eager']:>5.2f}x eager  rounds {r['round_ratios']}  "
                  f"one-off {r['one_off_s']:.1f} s  max diff {r['max_abs_diff']:.2g}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
