"""Write an offline HTML report of opacity-map overlays on the radiographs.

OUT/index.html with its images in OUT/img/ (no external URLs: open it from disk, copy the folder anywhere).
The submission is read through `pneumomap.submission` (either layout; --work: the run's work folder of a MIDRC
layout). With --truth (an RSNA-format folder or reference maps, `pneumomap.truth`), the cases with the worst and
the best per-image map metric (`pneumomap score`'s, --metric, default the organisers' midrc loss) come first
(truth boxes drawn in green when the truth has boxes), then a seeded random sample of the rest; without truth,
the random sample only. Each case shows its id, probability and the pipeline's decisions (the run's
decisions.csv) when present.
"""
from __future__ import annotations

import argparse
import html
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np

from pneumomap import metrics, score
from pneumomap.fileio import atomic_write_bytes, atomic_write_text
from pneumomap.submission import read_submission
from pneumomap.truth import DEFAULT_BOX_LEVEL, Truth, load_truth

DISPLAY_SIZE = 512  # longest side of an overlay image, pixels
OPACITY_RGB = np.array([255.0, 32.0, 0.0])
BOX_RGB = (0, 230, 0)
MAX_ALPHA = 0.6


@dataclass
class Case:
    """One image of the report."""

    image_id: str
    probability: float
    image_path: Path | None
    metrics: dict = field(default_factory=dict)      # per-image score row, when truth is given
    decisions: dict = field(default_factory=dict)    # row of decisions.csv
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    image_file: str | None = None                    # relative to the report folder
    note: str = ""


# ----------------------------------------------------------------------------- pictures

def to_grey(pixels: np.ndarray) -> np.ndarray:
    """Corrected pixels -> float [0, 1] by the intensity range the models see (the 0.5 / 99.5
    percentiles, `pneumomap.stages.preprocess.intensity_range`)."""
    from pneumomap.stages.preprocess import intensity_range

    low, high = intensity_range(pixels)
    return np.clip((pixels.astype(np.float32) - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def blend(grey: np.ndarray, prob: np.ndarray | None) -> np.ndarray:
    """uint8 RGB: grey radiograph with the opacity probability laid over in red (alpha = MAX_ALPHA * p)."""
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    if prob is not None:
        alpha = (MAX_ALPHA * prob)[..., None]
        rgb = rgb * (1.0 - alpha) + OPACITY_RGB * alpha
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _fit(prob_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 map resized (bilinear) to ``shape`` when it is not already that size."""
    from PIL import Image

    if prob_map.shape == shape:
        return prob_map
    return np.asarray(Image.fromarray(prob_map).resize((shape[1], shape[0]), Image.BILINEAR))


def overlay_png(pixels: np.ndarray, prob_map: np.ndarray | None, boxes: np.ndarray,
                size: int = DISPLAY_SIZE) -> bytes:
    """PNG bytes of the overlay, scaled so its longest side is at most ``size``, boxes outlined."""
    from PIL import Image, ImageDraw

    prob = None if prob_map is None else _fit(prob_map, pixels.shape) / 255.0
    image = Image.fromarray(blend(to_grey(pixels), prob))
    scale = min(1.0, size / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.LANCZOS)
    draw = ImageDraw.Draw(image)
    for x, y, w, h in np.asarray(boxes, dtype=float).reshape(-1, 4) * scale:
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BOX_RGB, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_case(case: Case, maps_dir: Path, out_dir: Path) -> None:
    """Read the radiograph and map of a case and write its overlay to out_dir/img (errors become a note)."""
    from pneumomap.stages.reader import UnreadableImageError, read_image

    if case.image_path is None:
        case.note = "no radiograph with this id in --images"
        return
    try:
        pixels = read_image(case.image_path).pixels
    except UnreadableImageError as error:
        case.note = str(error)
        return
    map_path = maps_dir / f"{case.image_id}.png"
    prob_map = score.read_map(map_path) if map_path.is_file() else None
    if prob_map is None:
        case.note = "no map"
    elif prob_map.shape != pixels.shape:
        case.note = f"map {prob_map.shape} resized to the image {pixels.shape}"
    case.image_file = f"img/{case.image_id}.png"
    atomic_write_bytes(out_dir / case.image_file, overlay_png(pixels, prob_map, case.boxes))


# ----------------------------------------------------------------------------- choosing the cases

def choose(ranked: Sequence[str], others: Sequence[str], n: int, seed: int) -> dict[str, list[str]]:
    """Worst n and best n of ``ranked`` (worst first) and a seeded sample of n of the ids left."""
    worst = list(ranked[:n])
    best = [pid for pid in reversed(ranked) if pid not in worst][:n]
    taken = set(worst) | set(best)
    rest = [pid for pid in list(ranked) + list(others) if pid not in taken]
    picks = np.random.default_rng(seed).permutation(len(rest))[:n]
    return {"worst": worst, "best": best, "random": [rest[i] for i in sorted(picks)]}


def scored_rows(pred_dir: Path, truth: Truth, ids: Sequence[str],
                metric: str | metrics.MapMetric = score.DEFAULT_METRIC, work: Path | None = None) -> tuple[dict, dict]:
    """(summary, per-image rows by id) from score_submission over ``ids``, plus the truth boxes."""
    known = set(truth.ids)
    ids = [pid for pid in ids if pid in known]
    if not ids:
        raise score.SubmissionError(f"{truth.root}: none of the predicted ids is in the truth set")
    result = score.score_submission(pred_dir, truth, ids=ids, metric=metric, work=work)
    rows = {row["image_id"]: row for row in result.pop("per_image")}
    for pid, row in rows.items():
        boxes = truth.boxes(pid)
        row["boxes"] = np.zeros((0, 4)) if boxes is None else boxes
        row["class"] = truth.image_class(pid)
    return result, rows


# ----------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
.cases { display: flex; flex-wrap: wrap; gap: 14px; }
.case { background: #fff; border: 1px solid #ccc; padding: 8px; width: 300px; }
.case img { width: 100%; height: auto; display: block; image-rendering: auto; }
.case .id { font-family: monospace; font-weight: bold; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.85em; margin-top: 4px; }
td, th { padding: 1px 6px 1px 0; text-align: left; vertical-align: top; }
.note { color: #a33; font-size: 0.85em; }
.legend span { display: inline-block; width: 1em; height: 1em; vertical-align: middle; margin: 0 4px; }
"""

SECTION_TITLES = {"worst": "Worst cases by map log loss", "best": "Best cases by map log loss",
                  "random": "Random sample"}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: Sequence[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def case_html(case: Case) -> str:
    """One case as an HTML block."""
    picture = (f'<img src="{html.escape(quote(case.image_file))}" alt="{html.escape(case.image_id)}">'
               if case.image_file else "")
    facts = [("probability", case.probability)]
    facts += [(k, case.metrics[k]) for k in ("class", "map_log_loss", "dice") if k in case.metrics]
    decisions = [(k, v) for k, v in case.decisions.items() if k not in ("image_id", "probability")]
    note = f'<div class="note">{html.escape(case.note)}</div>' if case.note else ""
    gate = f"<div>pipeline decisions</div>{_table(decisions)}" if decisions else ""
    return (f'<div class="case">{picture}<div class="id">{html.escape(case.image_id)}</div>'
            f"{_table(facts)}{gate}{note}</div>")


def page_html(sections: dict[str, list[Case]], summary: Sequence[tuple[str, object]], title: str) -> str:
    """The whole report page: inline style, relative image paths only."""
    body = [f"<h1>{html.escape(title)}</h1>", _table(summary),
            '<p class="legend">overlay: <span style="background:#ff2000"></span>predicted opacity '
            '(more opaque = higher probability)<span style="border:2px solid #00e600"></span>truth boxes</p>']
    for name, cases in sections.items():
        if cases:
            body.append(f"<h2>{html.escape(SECTION_TITLES[name])} ({len(cases)})</h2>")
            body.append('<div class="cases">' + "".join(case_html(c) for c in cases) + "</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


# ----------------------------------------------------------------------------- the report

def _truth_image(truth: Truth | None, image_id: str) -> Path | None:
    """The truth folder's own radiograph of an id missing from --images, when there is one."""
    path = truth.image_path(image_id) if truth is not None else None
    return path if path is not None and path.is_file() else None


def write_report(pred_dir: str | Path, images_dir: str | Path, out_dir: str | Path,
                 truth_dir: str | Path | None = None, n: int = 8, seed: int = 0,
                 truth_def: str = score.DEFAULT_TRUTH_DEF, *, metric: str | metrics.MapMetric = score.DEFAULT_METRIC,
                 box_level: float | str = DEFAULT_BOX_LEVEL, work: str | Path | None = None) -> Path:
    """Write out_dir/index.html and out_dir/img/*.png; return the page's path."""
    from tqdm import tqdm

    from pneumomap.stages.reader import list_images

    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    submission = read_submission(pred_dir, work)
    probabilities = submission.probabilities
    decisions = score.read_decisions(submission)
    images = {p.stem: p for p in list_images(images_dir)}
    ids = list(probabilities)
    summary: list[tuple[str, object]] = [("submission", str(pred_dir)), ("images", len(ids))]
    rows: dict[str, dict] = {}
    truth = None
    if truth_dir is not None:
        truth = load_truth(truth_dir, truth_def=truth_def, box_level=box_level)
        result, rows = scored_rows(pred_dir, truth, ids, metric, submission.layout.work)
        level = f", box level {result['box_level_name']}" if result.get("box_level_name") else ""
        summary += [("truth", f"{truth_dir} ({result['truth_def']}{level})"), ("metric", result["metric"])]
        summary += [(k, result[k]) for k in ("n_images", "auc", "map_log_loss", "dice", "rsna_map") if k in result]
    ranked = sorted((pid for pid in rows if "map_log_loss" in rows[pid]),
                    key=lambda pid: -rows[pid]["map_log_loss"])
    chosen = choose(ranked, [pid for pid in ids if pid not in set(ranked)], n, seed)

    sections: dict[str, list[Case]] = {}
    for name, section_ids in chosen.items():
        sections[name] = [Case(pid, probabilities[pid], images.get(pid) or _truth_image(truth, pid), rows.get(pid, {}),
                               decisions.get(pid, {}), rows.get(pid, {}).get("boxes", np.zeros((0, 4))))
                          for pid in section_ids]
    for case in tqdm([c for cases in sections.values() for c in cases], desc="report", unit="image", leave=False):
        render_case(case, score.maps_folder(submission), out_dir)
    page = out_dir / "index.html"
    atomic_write_text(page, page_html(sections, summary, f"pneumomap report: {pred_dir.name}"))
    return page


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, type=Path, help="submission folder (either layout, as score)")
    parser.add_argument("--work", type=Path, default=None,
                        help="the run's work folder of a MIDRC-layout submission (default <pred>-work)")
    parser.add_argument("--images", required=True, type=Path, help="the radiographs the submission was made from")
    parser.add_argument("--truth", type=Path,
                        help="truth folder (RSNA-format or reference maps): rank cases by the map metric, draw boxes")
    parser.add_argument("--out", required=True, type=Path, help="report folder (index.html + img/)")
    parser.add_argument("--n", type=int, default=8, help="cases per section (worst, best, random; default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    score.add_metric_arguments(parser)  # the map metric the cases are ranked by, as score's


def main(args: argparse.Namespace) -> int:
    from pneumomap.stages.reader import UnreadableImageError

    try:
        page = write_report(args.pred, args.images, args.out, args.truth, args.n, args.seed, args.truth_def,
                            metric=metrics.map_metric(args.metric, args.pos_weight, args.neg_weight),
                            box_level=args.box_level, work=args.work)
    except (ValueError, OSError, UnreadableImageError) as error:
        print(f"pneumomap report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0
