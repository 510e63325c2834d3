"""One convention for every subcommand (issue 17): --version, --log-level/--log-file before or after the
command, exit status 2 with one message and no traceback on unusable input, and the old spellings of
options kept as hidden aliases that say they are deprecated."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pneumomap import cli
from pneumomap.errors import UserError, is_user_error

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real"


def test_version(capsys):
    from pneumomap import __version__

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pneumomap {__version__} (") and "torch " in out and "timm " in out
    assert "segmentation_models_pytorch " in out and "pydicom " in out and "numpy " in out


def test_log_level_and_file_before_or_after_the_command(tmp_path, capsys, monkeypatch):
    """The level and file hold while the command runs (before or after its name), and are undone after."""
    seen = {}

    def fake_main(args):
        logging.getLogger("pneumomap.test").info("hello from the command")
        seen["level"] = logging.getLogger().level
        return 0

    import pneumomap.infer.graph as graph

    monkeypatch.setattr(graph, "main", fake_main)
    log = tmp_path / "run.log"
    before = logging.getLogger().level
    assert cli.main(["--log-level", "info", "graph", "--log-file", str(log)]) == 0
    assert seen["level"] == logging.INFO and "hello from the command" in log.read_text()
    assert "INFO pneumomap.test: hello from the command" in capsys.readouterr().err
    assert logging.getLogger().level == before  # undone
    assert cli.main(["graph", "--log-level", "ERROR"]) == 0 and seen["level"] == logging.ERROR
    assert cli.main(["graph"]) == 0 and seen["level"] == logging.WARNING  # the default
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    blocker = root / "a_file"
    blocker.write_text("not a folder")
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("nodes: [1, 2\n")
    return {"root": root, "missing": root / "missing", "blocker": blocker, "bad_yaml": bad_yaml}


# each subcommand with input it cannot use; every one must end in status 2 and one message
BAD = {
    "synth": lambda p: ["--out", p["blocker"] / "data", "--n", "2", "--size", "64"],
    "inspect": lambda p: [p["missing"]],
    "stage": lambda p: ["classifier", "--checkpoint", p["missing"], "--input", REAL, "--out", p["root"] / "s"],
    "train": lambda p: ["classifier", "--data", p["missing"], "--out", p["root"] / "t", "--recipe", "tiny"],
    "infer": lambda p: ["--pipeline", p["bad_yaml"], "--input", REAL, "--out", p["root"] / "i"],
    "graph": lambda p: ["--pipeline", p["missing"]],
    "score": lambda p: ["--pred", p["missing"], "--truth", p["missing"]],
    "tune": lambda p: ["--pipeline", p["bad_yaml"], "--val", p["missing"], "--out", p["root"] / "tuned"],
    "report": lambda p: ["--pred", p["missing"], "--images", REAL, "--out", p["root"] / "r"],
    "package": lambda p: ["--pipeline", p["missing"], "--out", p["root"] / "p"],
    "export": lambda p: [p["missing"], "--format", "exported-program"],
    "demo": lambda p: ["--out", p["blocker"] / "demo"],
    "fill-masks": lambda p: ["--data", p["missing"], "--lungs", p["missing"]],
    "ensemble": lambda p: [p["missing"], "--pipeline", p["bad_yaml"], "--out", p["root"] / "e"],
}


def test_every_command_is_listed():
    assert set(BAD) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD))
def test_unusable_input_exits_2_without_a_traceback(command, paths, capsys):
    status = cli.main([command, *map(str, BAD[command](paths))])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and f"pneumomap {command}" in err and "error" in err


def test_a_user_error_in_a_fresh_process_has_no_traceback(tmp_path):
    """`train` with a --data folder that is not there used to end in a traceback."""
    done = subprocess.run([sys.executable, "-m", "pneumomap", "train", "classifier", "--data", str(tmp_path / "none"),
                           "--out", str(tmp_path / "t"), "--recipe", "tiny"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "stage_2_train_labels.csv" in done.stderr


def test_user_errors_are_recognised_by_class():
    from pneumomap.infer.spec import PipelineError
    from pneumomap.train.recipes import RecipeError

    assert is_user_error(UserError("x")) and is_user_error(PipelineError("p.yaml", ["bad"]))
    assert is_user_error(RecipeError("x")) and is_user_error(FileNotFoundError("x"))

    class Sub(RecipeError):
        pass

    assert is_user_error(Sub("x"))
    assert not is_user_error(RuntimeError("a bug")) and not is_user_error(KeyError("a bug"))


def test_a_bug_is_not_hidden(monkeypatch):
    import pneumomap.infer.graph as graph

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(graph, "main", broken)
    with pytest.raises(KeyError):
        cli.main(["graph"])


def test_old_spellings_still_work_and_warn(tmp_path, capsys):
    assert cli.main(["inspect", str(REAL), "--jobs", "0", "--no-progress", "--json"]) == 0
    err = capsys.readouterr().err
    assert "--jobs is deprecated" in err and "use --workers" in err
    assert "--no-progress is deprecated" in err and "use --quiet" in err
    assert cli.main(["synth", "--out", str(tmp_path / "a"), "--n", "2", "--size", "64", "--jobs", "1"]) == 0
    assert "--jobs is deprecated" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path / "b"), "--n", "2", "--size", "64", "--workers", "1",
                     "--quiet"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert (tmp_path / "a" / "stage_2_train_labels.csv").read_bytes() == \
        (tmp_path / "b" / "stage_2_train_labels.csv").read_bytes()


def test_old_spellings_are_hidden_from_help(capsys):
    for command in ("inspect", "synth", "infer", "stage"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "--workers" in text and "--quiet" in text, command
        assert "--jobs" not in text and "--no-progress" not in text, command


def _command_lines(text: str) -> list[list[str]]:
    """The `pneumomap COMMAND ...` lines of the bash blocks of a Markdown text, as tokens (comments cut)."""
    import re
    import shlex

    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not re.match(r"\s*(pneumomap|torchrun) ", line):
                continue
            tokens = shlex.split(line.split(" #")[0])
            if "pneumomap" in tokens:  # also `torchrun ... -m pneumomap infer ...`
                lines.append(tokens[tokens.index("pneumomap") + 1:])
    return lines


def test_readme_command_lines_use_current_options():
    """Every option a README command line gives exists, under its current (not a deprecated) spelling."""
    import argparse
    import importlib

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    checked = 0
    for tokens in _command_lines(readme):
        flags = [t.split("=")[0] for t in tokens if t.startswith("--")]
        command = next((t for t in tokens if not t.startswith("-")), None)
        known = {"--version", "--log-level", "--log-file", "--help"}
        if command in cli.COMMANDS:
            parser = argparse.ArgumentParser()
            importlib.import_module(cli.COMMANDS[command][0]).add_arguments(parser)
            known |= {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"README: `pneumomap {' '.join(tokens)}` uses {unknown}"
        checked += 1
    assert checked >= 30
