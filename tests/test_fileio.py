"""Atomic writes: a failed write leaves nothing; a killed writer's temporary is removable."""
from __future__ import annotations

import pytest

from pneumomap.fileio import atomic_open, atomic_write_text, remove_temporaries


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "a" / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_remove_temporaries_deletes_only_stale_temporaries(tmp_path):
    atomic_write_text(tmp_path / "keep.csv", "x\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / ".img.json.abc123.tmp").write_text("half")  # what SIGKILL mid-write leaves
    (tmp_path / "user.tmp").write_text("not ours")  # not the atomic_open pattern
    assert remove_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["keep.csv", "user.tmp"]
