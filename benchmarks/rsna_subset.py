"""A smaller RSNA-format folder made of links into a bigger one (for the tuning benchmarks)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

LABEL_FILES = ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv")
IMAGE_FOLDERS = ("stage_2_train_images", "lung_masks")


def read_splits(source: Path) -> dict[str, str]:
    """patientId -> split of ``source``'s split.csv."""
    with open(source / "split.csv", newline="") as handle:
        return {row["patientId"]: row["split"] for row in csv.DictReader(handle)}


def link_subset(source: Path, target: Path, splits: dict[str, str]) -> Path:
    """``target`` holding the ids of ``splits`` (id -> split): label rows filtered, a split.csv of
    ``splits``, images and lung masks as symbolic links into ``source``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in LABEL_FILES:
        with open(source / name, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [row for row in reader if row["patientId"] in splits]
            fields = reader.fieldnames
        with open(target / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    with open(target / "split.csv", "w", newline="") as handle:
        handle.write("patientId,split\n" + "".join(f"{pid},{split}\n" for pid, split in sorted(splits.items())))
    for folder in IMAGE_FOLDERS:
        (target / folder).mkdir(exist_ok=True)
        for path in (source / folder).iterdir():
            if path.stem in splits and not (target / folder / path.name).exists():
                os.symlink(path, target / folder / path.name)
    return target
