"""`pneumomap report`: an offline HTML page whose images all exist; checked in headless Chromium when present."""
from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from pneumomap import report
from pneumomap.cli import main as cli_main
from test_metrics import oracle_log_loss, organisers_wll
from test_score import BOXES, PNG_MAGIC, SHAPE, hand_truth, make_midrc_pred, make_pred, make_truth

CHROMIUM = Path("/usr/bin/chromium")


class PageParser(HTMLParser):
    """Collects every tag and its attributes."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def images(self) -> list[str]:
        return [attrs["src"] for tag, attrs in self.tags if tag == "img"]


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    return parser


def check_self_contained(page: Path) -> list[str]:
    """No external URL anywhere; every <img src> a PNG beside the page. Returns the srcs."""
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"(https?:)?//[a-z0-9]", text, re.IGNORECASE)
    srcs = parse(page).images()
    for src in srcs:
        assert not Path(src).is_absolute() and ".." not in src
        assert (page.parent / unquote(src)).read_bytes()[:8] == PNG_MAGIC
    return srcs


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(3)
    ids = list(BOXES)
    images = tmp_path / "images"
    images.mkdir()
    for pid in ids:
        Image.fromarray(rng.integers(0, 256, SHAPE, dtype=np.uint8)).save(images / f"{pid}.png")
    maps = {pid: rng.integers(0, 256, SHAPE, dtype=np.uint8) for pid in ids}
    maps["p6"] = np.where(hand_truth(BOXES["p6"], "boxes_in_lungs"), 250, 5).astype(np.uint8)  # a good one
    maps["p1"] = np.where(hand_truth(BOXES["p1"], "boxes_in_lungs"), 2, 250).astype(np.uint8)  # a bad one
    pred = make_pred(tmp_path / "pred", {pid: float(rng.random()) for pid in ids}, maps)
    decisions = ["image_id,probability,gate,right_extent,left_extent,right_choice,left_choice,level"]
    decisions += [f"{pid},0.5,{'positive' if i % 2 else 'negative'},0.1,0.2,regressor,floor,low"
                  for i, pid in enumerate(ids)]
    (pred / "decisions.csv").write_text("\n".join(decisions) + "\n")
    return {"ids": ids, "images": images, "pred": pred, "maps": maps,
            "truth": make_truth(tmp_path / "truth", BOXES), "out": tmp_path / "report"}


@pytest.mark.parametrize("metric", ["midrc", "balanced"])
def test_report_with_truth_ranks_by_map_log_loss(folders, metric):
    page = report.write_report(folders["pred"], folders["images"], folders["out"], folders["truth"], n=2,
                               **({} if metric == "midrc" else {"metric": metric}))  # midrc: the default
    srcs = check_self_contained(page)
    oracle = organisers_wll if metric == "midrc" else lambda truth, values: oracle_log_loss(values / 255.0, truth)
    losses = {pid: oracle(hand_truth(BOXES[pid], "boxes_in_lungs").astype(float), folders["maps"][pid])
              for pid in folders["ids"]}
    order = sorted(losses, key=losses.get, reverse=True)
    assert order[0] == "p1" and order[-1] == "p6"
    assert [unquote(s) for s in srcs] == [f"img/{pid}.png" for pid in order[:2] + order[::-1][:2]] + srcs[4:]
    assert len(srcs) == 6  # 2 worst, 2 best, 2 random from the other 4
    text = page.read_text()
    assert "Worst cases" in text and "Best cases" in text and "Random sample" in text
    assert "regressor" in text and "negative" in text  # decisions shown
    assert f"{losses['p1']:.4f}" in text


def test_truth_boxes_are_drawn_in_green(folders):
    report.write_report(folders["pred"], folders["images"], folders["out"], folders["truth"], n=1)
    rgb = np.asarray(Image.open(folders["out"] / "img" / "p1.png").convert("RGB")).astype(int)
    x, y, w, h = BOXES["p1"][0]
    assert tuple(rgb[y + h // 2, x]) == report.BOX_RGB
    assert rgb.shape[:2] == SHAPE


def test_report_without_truth_is_a_seeded_random_sample(folders, tmp_path):
    first = report.write_report(folders["pred"], folders["images"], tmp_path / "a", n=3, seed=5)
    again = report.write_report(folders["pred"], folders["images"], tmp_path / "b", n=3, seed=5)
    srcs = check_self_contained(first)
    assert len(srcs) == 3 and srcs == parse(again).images()
    assert "Worst cases" not in first.read_text()


def test_missing_image_and_map_become_notes(folders):
    (folders["images"] / "p3.png").unlink()
    (folders["pred"] / "maps" / "p5.png").unlink()
    (folders["pred"] / "maps" / "p1.png").unlink()
    page = report.write_report(folders["pred"], folders["images"], folders["out"], n=8)
    text = page.read_text()
    assert "no radiograph with this id" in text and "no map" in text
    assert len(check_self_contained(page)) == 7


def test_report_reads_a_midrc_layout_submission(folders, tmp_path):
    """OUT/<id>.png + image-level-classifications.csv, the decisions in the work folder: the same page."""
    probabilities = {pid: float(i) / 10 for i, pid in enumerate(folders["ids"])}
    work = tmp_path / "run-files"
    pred = make_midrc_pred(tmp_path / "midrc", probabilities, folders["maps"], work=work)
    (work / "decisions.csv").write_text((folders["pred"] / "decisions.csv").read_text())
    page = report.write_report(pred, folders["images"], tmp_path / "r", folders["truth"], n=2, work=work)
    assert len(check_self_contained(page)) == 6
    text = page.read_text()
    assert "regressor" in text and "Worst cases" in text and "midrc" in text
    rgb = np.asarray(Image.open(tmp_path / "r" / "img" / "p6.png").convert("RGB")).astype(int)
    assert rgb.shape[:2] == SHAPE and (rgb[..., 0] > rgb[..., 1] + 60).any()  # p6's map was drawn


def test_large_images_are_downscaled():
    pixels = np.random.default_rng(0).random((1024, 800)).astype(np.float32)
    data = report.overlay_png(pixels, np.full((1024, 800), 200, np.uint8), np.array([[100, 100, 200, 300]]))
    import io

    assert Image.open(io.BytesIO(data)).size == (400, 512)


def test_cli(folders, capsys):
    status = cli_main(["report", "--pred", str(folders["pred"]), "--images", str(folders["images"]),
                       "--truth", str(folders["truth"]), "--out", str(folders["out"]), "--n", "1"])
    assert status == 0 and "index.html" in capsys.readouterr().out
    check_self_contained(folders["out"] / "index.html")


def test_renders_in_headless_chromium(folders, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed: the report is validated by parsing only "
                    "(install Debian's chromium to check it in a real browser)")
    page = report.write_report(folders["pred"], folders["images"], folders["out"], folders["truth"], n=2)
    shot = tmp_path / "shot.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,900",
               f"--screenshot={shot}", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot (status {done.returncode}): {done.stderr[-2000:]}"
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 120) & (rgb[..., 2] < 100)  # the opacity overlays were loaded
    green = (rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)  # truth boxes
    assert red.sum() > 500 and green.sum() > 50
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
