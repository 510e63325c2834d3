"""The submission folder's layout, in one place: where `infer` writes and `score` / `report` read.

Two layouts (``--format``):

``midrc`` (the MIDRC XAI organisers' contract, `pneumomap infer`'s default)::

    OUT/<name>.png                          one 8-bit map per input <name>.<ext>, the image's size
    OUT/image-level-classifications.csv     fileNamePath,score  (one row <name>.<ext>,<probability> per input)
    OUT/<description>.pdf|.docx|.txt        the algorithm description (--description), at most one
    WORK/decisions.csv, failures.csv, rsna_submission.csv, run_summary.json, .artifacts/, .parts/

  OUT holds exactly what the organisers' scorer reads: it pairs the PNGs of OUT with its reference
  maps by *sorted file order*, so one stray PNG would shift every later image. WORK defaults to
  ``<OUT>-work`` beside OUT (`default_work`).

``pneumomap`` (everything in one folder, the Python API's default)::

    OUT/predictions.csv (image_id,probability), OUT/maps/<image_id>.png, and the run's own files in OUT

Records (`pneumomap.infer.writers.Record`) carry the formatted cells; a layout only places them.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

FORMATS = ("midrc", "pneumomap")
MIDRC_CSV = "image-level-classifications.csv"
MIDRC_HEADER = ("fileNamePath", "score")
PNEUMOMAP_CSV = "predictions.csv"
DESCRIPTION_SUFFIXES = (".pdf", ".docx", ".txt")
RUN_TABLES = ("decisions.csv", "failures.csv", "rsna_submission.csv", "run_summary.json")


class SubmissionError(ValueError):
    """A submission folder that cannot be read; the message names the file and what is wrong."""


def csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def default_work(out: str | Path) -> Path:
    """The midrc layout's work folder when none is given: ``<out>-work`` beside ``out``."""
    out = Path(out).absolute()
    return out.parent / f"{out.name}-work"


class Layout:
    """Where one run's files go: the scorer's files in ``out``, the run's own files in ``work``."""

    name = ""
    table_name = ""  # the per-image probability CSV in ``out``
    # ``out`` is the organisers' folder: maps, the CSV and one description, nothing else (the scorer
    # pairs its PNGs by sorted order), so the run's own files must live elsewhere
    scorer_folder = False

    def __init__(self, out: str | Path, work: str | Path | None = None):
        self.out = Path(out)
        self.work = Path(work) if work is not None else self.default_work(self.out)

    @staticmethod
    def default_work(out: Path) -> Path:
        return out

    def map_path(self, image_id: str) -> Path:
        raise NotImplementedError

    @property
    def table_path(self) -> Path:
        return self.out / self.table_name

    def probability_table(self, records: Sequence[Any]) -> str:
        """The text of the per-image probability CSV (at `table_path`)."""
        raise NotImplementedError

    def stray_files(self, image_ids: Iterable[str], description: str | None = None) -> list[Path]:
        """Files in ``out`` a scorer would take for part of this run's submission although they are not
        (``description``: the name of the run's description file, which belongs)."""
        return []

    def remove_tables(self) -> None:
        """Delete the tables of an earlier run (before maps are rewritten: a killed run leaves no stale CSV)."""
        for path in (self.table_path, *(self.work / name for name in RUN_TABLES)):
            path.unlink(missing_ok=True)

    def write_tables(self, records: Sequence[Any], rsna: bool) -> None:
        """The probability table into ``out``; decisions, failures (and RSNA boxes) into ``work``."""
        from pneumomap.fileio import atomic_write_text
        from pneumomap.infer.spec import DECISION_COLUMNS

        atomic_write_text(self.table_path, self.probability_table(records))
        atomic_write_text(self.work / "decisions.csv", csv_text(
            ["image_id", "probability", *DECISION_COLUMNS],
            ([r.image_id, r.probability, *(r.decisions.get(c, "") for c in DECISION_COLUMNS)] for r in records)))
        atomic_write_text(self.work / "failures.csv", csv_text(
            ["image_id", "path", "reason"], ([r.image_id, r.path, r.failure] for r in records if r.failure)))
        if rsna:
            atomic_write_text(self.work / "rsna_submission.csv", csv_text(
                ["patientId", "PredictionString"], ([r.image_id, r.boxes] for r in records)))


class MidrcLayout(Layout):
    """The organisers' flat folder (module doc)."""

    name = "midrc"
    table_name = MIDRC_CSV
    scorer_folder = True

    @staticmethod
    def default_work(out: Path) -> Path:
        return default_work(out)

    def map_path(self, image_id: str) -> Path:
        return self.out / f"{image_id}.png"

    def probability_table(self, records: Sequence[Any]) -> str:
        return csv_text(MIDRC_HEADER, ([Path(r.path).name, r.probability] for r in records))

    def stray_files(self, image_ids: Iterable[str], description: str | None = None) -> list[Path]:
        if not self.out.is_dir():
            return []
        ours = {f"{i}.png" for i in image_ids}
        pngs = [p for p in self.out.iterdir() if p.suffix.lower() == ".png" and p.name not in ours]
        return sorted(pngs + [p for p in description_files(self.out) if p.name != description])


class PneumomapLayout(Layout):
    """Everything in one folder, maps in ``maps/`` (module doc)."""

    name = "pneumomap"
    table_name = PNEUMOMAP_CSV

    def map_path(self, image_id: str) -> Path:
        return self.out / "maps" / f"{image_id}.png"

    def probability_table(self, records: Sequence[Any]) -> str:
        return csv_text(["image_id", "probability"], ([r.image_id, r.probability] for r in records))


LAYOUTS: dict[str, type[Layout]] = {cls.name: cls for cls in (MidrcLayout, PneumomapLayout)}


def make_layout(format: str, out: str | Path, work: str | Path | None = None) -> Layout:
    """The layout ``format`` (one of FORMATS) of a run into ``out`` (``work``: see the module doc)."""
    if format not in LAYOUTS:
        raise ValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    return LAYOUTS[format](out, work)


# ----------------------------------------------------------------------------- the description file


def description_files(folder: Path) -> list[Path]:
    """The files the organisers' scorer takes for the algorithm description (it wants exactly one)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and any(s in p.name for s in DESCRIPTION_SUFFIXES))


def check_description(path: str | Path) -> Path:
    """A description file the organisers accept: it exists and ends in .pdf, .docx or .txt."""
    path = Path(path)
    if path.suffix.lower() not in DESCRIPTION_SUFFIXES:
        raise ValueError(f"--description {path}: the organisers accept a .pdf, .docx or .txt file")
    if not path.is_file():
        raise FileNotFoundError(f"--description {path}: no such file")
    return path


def count_words(text: str) -> int:
    """Words as the organisers' scorer counts them (``\\b\\w+\\b``)."""
    import re

    return len(re.findall(r"\b\w+\b", text))


# ----------------------------------------------------------------------------- reading


@dataclass
class Submission:
    """A submission folder as `score` and `report` read it, whatever its layout."""

    folder: Path
    layout: Layout
    probabilities: dict[str, float]  # image id (file stem) -> probability
    names: dict[str, str] = field(default_factory=dict)  # image id -> file name in the table (midrc)

    def map_path(self, image_id: str) -> Path:
        return self.layout.map_path(image_id)

    def map_ids(self) -> list[str]:
        """Ids of the maps present, in the sorted file order the organisers' scorer pairs them by."""
        folder = self.layout.map_path("x").parent
        return [p.stem for p in sorted(folder.glob("*.png"), key=lambda p: p.name)] if folder.is_dir() else []

    def work_file(self, name: str) -> Path | None:
        path = self.layout.work / name
        return path if path.is_file() else None

    def threshold(self) -> float | None:
        """The run's classifier threshold (run_summary.json in the work folder), if known."""
        path = self.work_file("run_summary.json")
        if path is None:
            return None
        value = json.loads(path.read_text(encoding="utf-8")).get("threshold")
        return None if value is None else float(value)


def read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV file that must have the ``required`` columns (SubmissionError naming it otherwise)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise SubmissionError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def _number(path: Path, line: int, text: str) -> float:
    import math

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SubmissionError(f"{path}:{line}: score {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SubmissionError(f"{path}:{line}: score {text!r} is not finite")
    return value


def read_submission(folder: str | Path, work: str | Path | None = None) -> Submission:
    """Read either layout: ``image-level-classifications.csv`` means midrc, ``predictions.csv`` pneumomap."""
    folder = Path(folder)
    if (folder / MIDRC_CSV).is_file():
        layout: Layout = MidrcLayout(folder, work)
        path = folder / MIDRC_CSV
        probabilities, names = {}, {}
        for line, row in enumerate(read_csv(path, MIDRC_HEADER), start=2):
            image_id = Path(row["fileNamePath"]).stem
            if image_id in probabilities:
                raise SubmissionError(f"{path}:{line}: a second row for {row['fileNamePath']!r}")
            probabilities[image_id] = _number(path, line, row["score"])
            names[image_id] = row["fileNamePath"]
        return Submission(folder, layout, probabilities, names)
    if (folder / PNEUMOMAP_CSV).is_file():
        path = folder / PNEUMOMAP_CSV
        probabilities = {}
        for line, row in enumerate(read_csv(path, ("image_id", "probability")), start=2):
            if row["image_id"] in probabilities:
                raise SubmissionError(f"{path}:{line}: a second row for {row['image_id']!r}")
            probabilities[row["image_id"]] = _number(path, line, row["probability"])
        return Submission(folder, PneumomapLayout(folder, work), probabilities)
    raise SubmissionError(f"{folder}: neither {MIDRC_CSV} (the MIDRC layout) nor {PNEUMOMAP_CSV} (pneumomap's) "
                          "is there; pass the --out folder of `pneumomap infer`")
