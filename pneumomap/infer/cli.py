"""Run a pipeline.yaml over a test set into submission files.

  pneumomap infer --pipeline pipeline.yaml --input DIR|LIST --out OUT [--format midrc|pneumomap]

--format midrc (the default: what the MIDRC XAI organisers' ingestion and scorer read) writes into
OUT exactly: one <name>.png per input <name>.dcm (8-bit, the image's size, p = value / 255),
image-level-classifications.csv (fileNamePath,score) and, with --description, that one file.
The run's own files (decisions.csv, failures.csv, rsna_submission.csv, run_summary.json, the stored
model outputs in .artifacts) go to --work (default: OUT-work beside OUT).
--format pneumomap writes everything into OUT: predictions.csv (image_id,probability),
maps/<image_id>.png and the run's own files.

The image id is the file stem. Model outputs are kept under WORK/.artifacts: the same command
resumes a killed run, and after a threshold or checkpoint change only what changed runs again.
--save-probabilities also keeps each image's float map before clipping (WORK/probabilities/), for
`pneumomap ensemble`.

Several processes: `torchrun --nproc_per_node N -m pneumomap.cli infer ...` (rank 0 merges), or a
job array with --shard i/n (the last shard to finish merges; --merge merges the parts alone).
Exit status: 0 ok, 1 some images failed (see failures.csv), 2 unusable pipeline/inputs/output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pneumomap.cli import add_precision_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="pipeline.yaml", help="the pipeline YAML (default: %(default)s)")
    parser.add_argument("--input", required=True, help="a folder of images (searched recursively), a list file "
                        "(.txt/.lst, one path a line) or one image")
    parser.add_argument("--out", required=True, help="the submission folder to write")
    parser.add_argument("--format", default="midrc", choices=("midrc", "pneumomap"),
                        help="midrc: the organisers' flat folder, nothing else in it; pneumomap: predictions.csv, "
                        "maps/ and the run's files in one folder (default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder of the run's own files and stored model outputs "
                        "(default: OUT-work beside OUT for midrc, OUT itself for pneumomap)")
    parser.add_argument("--description", default=None, help="midrc: the algorithm description (.pdf, .docx or "
                        ".txt, 250 words or more) to copy into OUT")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch; on CUDA also per network "
                        "call, on the CPU the networks take one image at a time (default: %(default)s)")
    from pneumomap.cli import add_quiet_argument, add_workers_argument
    from pneumomap.overrides import add_set_argument

    add_workers_argument(parser, None, "decoding worker processes (default: 4 beside a GPU; 0 on the CPU, where "
                         "decoding runs between the networks: see the README)")
    add_precision_argument(parser)
    parser.add_argument("--streams", type=int, default=None, help="CPU: images computed at once, each in its own "
                        "thread with a share of torch's threads (default: 2 in bf16, 1 in fp32: see the README)")
    parser.add_argument("--shard", default=None, help="i/n: process the i-th of n shards (job arrays)")
    parser.add_argument("--merge", action="store_true", help="only merge the finished shards' parts into the submission")
    parser.add_argument("--no-artifacts", action="store_true", help="keep no model outputs (no resume, no fast re-runs)")
    parser.add_argument("--save-probabilities", action="store_true", help="also save each image's float map before "
                        "clipping, its lung mask and probability as WORK/probabilities/<image_id>.npz (what "
                        "`pneumomap ensemble` averages); a resumed run fills in the missing ones")
    add_quiet_argument(parser)
    add_set_argument(parser, "a key of the pipeline, e.g. thresholds.classifier=0.8 or "
                     "nodes.classifier.checkpoint=runs/cls2 (relative to the pipeline file, as in it); recorded in "
                     "run_summary.json")


def main(args: argparse.Namespace) -> int:
    from pneumomap import submission
    from pneumomap.infer import runner, shard
    from pneumomap.infer.spec import PipelineError, load

    try:
        pipeline = load(args.pipeline, overrides=args.overrides)
        parts = shard.parse_shard(args.shard) if args.shard else None
        if parts and shard.under_torchrun():
            raise runner.RunError("--shard cannot be combined with torchrun (the ranks are the shards)")
        options = runner.RunOptions(device=args.device, batch_size=args.batch_size, workers=args.workers,
                                    precision=args.precision, streams=args.streams, shard=parts,
                                    artifacts=not args.no_artifacts, progress=not args.quiet, format=args.format,
                                    work=args.work, description=args.description,
                                    save_probabilities=args.save_probabilities)
        if args.merge:
            items = runner.list_items(args.input)
            description = submission.check_description(args.description) if args.description else None
            summary = shard.merge_parts(pipeline, options.layout(args.out), items,
                                        (parts or shard.from_environment())[1], description)
        else:
            summary = runner.run(pipeline, args.input, args.out, options)
    except (PipelineError, runner.RunError, ValueError) as exc:
        print(f"pneumomap infer: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # reading inputs never raises (unreadable images are failures): writing failed
        print(f"pneumomap infer: error: cannot write the output: {exc}; nothing half-written was left: make "
              "room (or fix the folder) and run the same command again, it continues where it stopped",
              file=sys.stderr)
        return 2
    return print_summary(summary, "infer", "could not be processed")


def print_summary(summary: dict, command: str, failed: str) -> int:
    """Print a run's summary as JSON; the exit status: 1 (and a note naming failures.csv) when some images
    ``failed``, else 0."""
    print(json.dumps(summary, indent=2, sort_keys=True))
    if summary["failures"]:
        print(f"pneumomap {command}: {summary['failures']} image(s) {failed} (each still has its row and its "
              f"floor-value map); see {Path(summary['work']) / 'failures.csv'}", file=sys.stderr)
        return 1
    return 0
