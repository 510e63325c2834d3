"""The one ``pneumomap`` command. Each subcommand lives in its own module, imported only when run.

A command module provides ``add_arguments(parser)`` and ``main(args) -> int`` (the exit status).

Here, once for every subcommand: the options that are the same everywhere (``--version``;
``--log-level`` and ``--log-file``, before or after the subcommand), the logging configuration,
the exit-status convention (0 ok, 1 some images failed, 2 unusable input or configuration: a user
error, `pneumomap.errors.is_user_error`, ends in one message and status 2, never a traceback) and
the shared spellings of the options several commands take (`add_workers_argument`,
`add_quiet_argument`, `add_precision_argument`; an old spelling stays as a hidden alias that prints a deprecation note).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Sequence

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pneumomap.demo", "the whole lifecycle on phantom data: synth, train, tune, infer, score, report"),
    "synth": ("pneumomap.synth", "write a phantom RSNA-format data set (DICOMs, label CSVs, lung masks, split)"),
    "inspect": ("pneumomap.stages.inspect", "decode radiographs and print their metadata, statistics and errors"),
    "stage": ("pneumomap.infer.stage_cli", "run one stage alone over a folder of images"),
    "train": ("pneumomap.train.cli", "train one stage from an RSNA-format folder with its recipe"),
    "fill-masks": ("pneumomap.fillmasks", "predict the lung masks that were not drawn, once, with a trained lung stage"),
    "infer": ("pneumomap.infer.cli", "run pipeline.yaml over a test set into submission files"),
    "ensemble": ("pneumomap.ensemble", "average the saved probabilities of several infer runs into one submission"),
    "graph": ("pneumomap.infer.graph", "print the pipeline DAG as a Mermaid diagram"),
    "score": ("pneumomap.score", "score a submission folder (either layout) by the MIDRC metric against RSNA or reference-map truth"),
    "tune": ("pneumomap.infer.tune.cli", "tune pipeline thresholds on validation data over stored model outputs"),
    "report": ("pneumomap.report", "write an offline HTML report of map overlays"),
    "package": ("pneumomap.package", "package a pipeline as the MIDRC XAI uploads: Docker image zip and program zip"),
    "export": ("pneumomap.export", "export a stage checkpoint's network as ONNX or a torch.export program"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EPILOG = ("exit status of every command: 0 ok; 1 some images failed (each listed, the outputs complete "
          "otherwise); 2 unusable input or configuration (one message, no traceback)")


def _global_options(parser: argparse.ArgumentParser) -> None:
    """The options every subcommand accepts, before or after its name."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=None,
                        help="the lowest level of log messages shown on stderr (default: WARNING)")
    parser.add_argument("--log-file", default=None, help="also append the log messages to this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumomap",
        description="Chest radiographs -> pneumonia likelihoods and opacity maps. "
        "Run 'pneumomap COMMAND --help' for the options of a command.", epilog=EPILOG,
    )
    parser.add_argument("--version", action="store_true", help="print the versions of pneumomap and its libraries")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def version_line() -> str:
    """'pneumomap X (python Y, torch Z, ...)' without importing any of them."""
    from pneumomap import __version__
    from pneumomap.provenance import versions

    import platform

    found = ", ".join(f"{name} {version or 'not installed'}" for name, version in versions().items())
    return f"pneumomap {__version__} (python {platform.python_version()}, {found})"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_HANDLERS: list[logging.Handler] = []  # what configure_logging installed (removed by reset_logging)
_LEVEL: list[int] = []  # the root level before configure_logging


def configure_logging(level: str | None = None, log_file: str | None = None) -> None:
    """The logging configuration of a command: records of ``level`` (default WARNING) and above on
    stderr and, with ``log_file``, appended to that file. Replaces what an earlier call installed."""
    reset_logging()
    root = logging.getLogger()
    _LEVEL.append(root.level)
    _HANDLERS.append(_Stderr())
    if log_file:
        try:
            _HANDLERS.append(logging.FileHandler(log_file, encoding="utf-8"))
        except OSError as exc:
            from pneumomap.errors import UserError

            raise UserError(f"--log-file {log_file}: cannot write there: {exc.strerror or exc}") from None
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in _HANDLERS:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(getattr(logging, level or "WARNING"))


def reset_logging() -> None:
    """Undo `configure_logging` (a command run in-process leaves the logging as it found it)."""
    root = logging.getLogger()
    for handler in _HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _HANDLERS.clear()
    if _LEVEL:
        root.setLevel(_LEVEL.pop())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    found = argparse.ArgumentParser(prog="pneumomap", add_help=False, allow_abbrev=False)
    _global_options(found)
    found.add_argument("--version", action="store_true")
    options, rest = found.parse_known_args(argv[:split])
    rest += argv[split:]
    if options.version:
        print(version_line())
        return 0
    if not rest or rest[0] not in COMMANDS:
        parser = build_parser()
        if not rest:
            parser.print_help()
            return 2
        parser.parse_args(rest)  # prints help or a clear error for an unknown command
        return 2
    name = rest[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"pneumomap {name}", description=module.__doc__ or help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    module.add_arguments(parser)
    _global_options(parser.add_argument_group("logging (also before the command)"))
    args = parser.parse_args(rest[1:])
    try:
        configure_logging(options.log_level or args.log_level, options.log_file or args.log_file)
        return int(module.main(args) or 0)
    except Exception as exc:
        from pneumomap.errors import is_user_error

        if not is_user_error(exc):
            raise
        logging.getLogger("pneumomap").debug("user error", exc_info=True)
        print(f"pneumomap {name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        reset_logging()


# ----------------------------------------------------------------------------- shared options


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: does what the new one does, hidden from --help, and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same ``dest``), with a deprecation note when used."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, default=argparse.SUPPRESS, **kwargs)


def add_workers_argument(parser: argparse.ArgumentParser, default: int | None, help_text: str) -> None:
    """``--workers N``: the processes that decode images (or write them); ``--jobs`` is its old spelling."""
    parser.add_argument("--workers", type=int, default=default, metavar="N", help=help_text)
    deprecated_alias(parser, "--jobs", "--workers", "workers", type=int, metavar="N")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (`pneumomap.device.inference_precision`), shared by infer, tune and stage;
    kept free of torch so that ``--help`` stays instant."""
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="auto: fp16 autocast on CUDA, fp32 on the CPU; bf16: bfloat16 autocast (CPUs with "
                        "AVX512-BF16/AMX: the fast CPU setting, two images at once, see the README; or CUDA); fp32: "
                        "full precision everywhere; tune with the precision you will infer with (default: %(default)s)")


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bar; ``--no-progress`` is its old spelling."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    deprecated_alias(parser, "--no-progress", "--quiet", "quiet", nargs=0, const=True)


if __name__ == "__main__":
    sys.exit(main())
