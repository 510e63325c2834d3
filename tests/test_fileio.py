"""Atomic writes: a failed write leaves nothing; a killed writer's temporary is removable."""
from __future__ import annotations

import pytest

from pneumomap.fileio import (TEMP_PREFIX, FolderLockedError, _HOST, atomic_open, atomic_write_text, exclusive_lock,
                              remove_temporaries)


def test_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "a" / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_remove_temporaries_deletes_only_a_dead_writers_own_temporaries(tmp_path):
    """Only pneumomap's temporaries, and only those of writers no longer alive: a user's '.x.tmp' files and a
    concurrent writer's half-written file stay (a second run into the same folder never breaks the first)."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    atomic_write_text(tmp_path / "keep.csv", "x\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / f"{TEMP_PREFIX}{_HOST}-{dead_pid}-abc123.tmp").write_text("half")  # SIGKILL mid-write
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f"{TEMP_PREFIX}{_HOST}-{alive.pid}-def456.tmp").write_text("being written")
        (tmp_path / f"{TEMP_PREFIX}otherhost-{dead_pid}-x.tmp").write_text("another machine's writer")
        (tmp_path / "user.tmp").write_text("not ours")
        (tmp_path / ".notes.md.abc.tmp").write_text("the user's own, of the old pattern")
        assert remove_temporaries(tmp_path) == 1
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([
            "keep.csv", "user.tmp", ".notes.md.abc.tmp", f"{TEMP_PREFIX}{_HOST}-{alive.pid}-def456.tmp",
            f"{TEMP_PREFIX}otherhost-{dead_pid}-x.tmp"])
    finally:
        alive.kill()


def test_any_file_name_can_be_written(tmp_path):
    """The temporary's name does not grow with the target's (a 250-character name still fits the file system)."""
    target = tmp_path / ("x" * 250 + ".png")
    atomic_write_text(target, "ok")
    assert target.read_text() == "ok"


def test_a_second_lock_holder_is_refused_with_the_holder_named(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / ".pneumomap-0-of-1.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pneumomap.fileio import exclusive_lock\n"
                               "with exclusive_lock(sys.argv[1], 'the folder'):\n print('held', flush=True); time.sleep(30)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=f'"pid": {holder.pid}'):
            with exclusive_lock(lock, "the folder"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "the folder"):  # released when its holder died
        pass
