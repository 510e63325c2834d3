"""The one ``pneumomap`` command. Each subcommand lives in its own module, imported only when run.

A command module provides ``add_arguments(parser)`` and ``main(args) -> int`` (the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pneumomap.demo", "the whole lifecycle on phantom data: synth, train, tune, infer, score, report"),
    "synth": ("pneumomap.synth", "write a phantom RSNA-format data set (DICOMs, label CSVs, lung masks, split)"),
    "inspect": ("pneumomap.stages.inspect", "decode radiographs and print their metadata, statistics and errors"),
    "stage": ("pneumomap.stages.run", "run one stage alone over a folder of images"),
    "train": ("pneumomap.train.cli", "train one stage from an RSNA-format folder with its recipe"),
    "infer": ("pneumomap.infer.cli", "run pipeline.yaml over a test set into submission files"),
    "graph": ("pneumomap.infer.graph", "print the pipeline DAG as a Mermaid diagram"),
    "score": ("pneumomap.score", "score a submission folder (either layout) by the MIDRC metric against RSNA or reference-map truth"),
    "tune": ("pneumomap.infer.tune", "tune pipeline thresholds on validation data over stored model outputs"),
    "report": ("pneumomap.report", "write an offline HTML report of map overlays"),
    "package": ("pneumomap.package", "package a pipeline as the MIDRC XAI uploads: Docker image zip and program zip"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumomap",
        description="Chest radiographs -> pneumonia likelihoods and opacity maps. "
        "Run 'pneumomap COMMAND --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints help or a clear error for an unknown command
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"pneumomap {name}", description=module.__doc__ or help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
