"""The mutation score of a `mutmut run` (what `make mutate` prints).

Reads `mutmut results --all true` on stdin (lines ``    <mutant name>: <status>``), leaves out the
mutants that were not run (``not checked``: outside the Makefile's selectors), and prints killed /
survived / other (no tests, suspicious, segfault) / total with the percentage, per module and in all,
then the names of the mutants not killed.

With ``--accepted FILE`` (benchmarks/mutation_survivors.md) the surviving mutants named there in backticks
are the accepted ones: message-only (a help text, a progress bar, a warning's stack level) or equivalent
(no observable difference, e.g. ``copy=False`` -> ``copy=True``). The ``behaviour`` line is the score
without them; names listed there that were killed or no longer exist (the mutated code changed, so the
numbering did) are counted as stale.

    mutmut results --all true | python benchmarks/mutation_score.py --accepted benchmarks/mutation_survivors.md
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

KILLED = ("killed", "timeout", "caught by type check")
LINE = re.compile(r"^\s*(?P<name>\S+__mutmut_\d+): (?P<status>.+?)\s*$")
NAME_IN_TEXT = re.compile(r"`(pneumomap\.[^`\s{]+__mutmut_)(?:(\d+)|\{([\d,]+)\})`")  # name_7 or name_{3,7}


def parse_results(lines: Iterable[str]) -> dict[str, str]:
    """mutant name -> status of the mutants that were run."""
    results = {}
    for line in lines:
        match = LINE.match(line)
        if match and match["status"] != "not checked":
            results[match["name"]] = match["status"]
    return results


def module_of(name: str) -> str:
    """``pneumomap.metrics.x_roc_auc__mutmut_3`` -> ``pneumomap.metrics`` (``xǁClassǁmethod`` names too)."""
    return name.split(".x", 1)[0] if ".x" in name else name.rsplit(".", 1)[0]


def accepted_names(path: Path) -> set[str]:
    """The mutant names written in backticks in ``path``: ``...__mutmut_7``, or ``...__mutmut_{3,7}`` for several."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (the list of accepted survivors)")
    names = set()
    for prefix, one, several in NAME_IN_TEXT.findall(path.read_text(encoding="utf-8")):
        names.update(prefix + number for number in (one or several).split(","))
    return names


def _line(label: str, counts: Counter) -> str:
    killed = sum(counts[s] for s in KILLED)
    total = sum(counts.values())
    percent = 100.0 * killed / total if total else float("nan")
    return f"{label:<34}{killed:>7}{counts['survived']:>9}{total - killed - counts['survived']:>7}{total:>7}{percent:>8.1f}%"


def report(results: dict[str, str], accepted: set[str] | None = None) -> str:
    """The score table (per module, then all), with ``accepted`` the behaviour score, then the survivors."""
    if not results:
        raise SystemExit("no mutant was run: run `make mutate` (mutmut run) first")
    by_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in results.items():
        by_module[module_of(name)][status] += 1
    lines = [f"{'module':<34}{'killed':>7}{'survived':>9}{'other':>7}{'total':>7}{'score':>9}"]
    lines += [_line(module, by_module[module]) for module in sorted(by_module)]
    lines.append(_line("all", Counter(results.values())))
    survivors = sorted(n for n, s in results.items() if s not in KILLED)
    if accepted is not None:
        listed = {n for n in survivors if n in accepted}
        behaviour = Counter(s for n, s in results.items() if n not in listed)
        lines.append(_line(f"behaviour ({len(listed)} accepted out)", behaviour))
        lines.append(f"{len(accepted - listed)} name(s) of the accepted list were killed or no longer exist")
        survivors = [n for n in survivors if n not in listed]
    lines.append(f"{len(survivors)} mutant(s) not killed" + (" besides the accepted ones" if accepted is not None
                                                             else "") + (":" if survivors else ""))
    lines += [f"  {n}: {results[n]}" for n in survivors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accepted", type=Path, help="file naming the accepted (message-only, equivalent) survivors")
    args = parser.parse_args(argv)
    print(report(parse_results(sys.stdin), accepted_names(args.accepted) if args.accepted else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
