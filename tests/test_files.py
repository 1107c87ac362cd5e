"""Directories written whole: readable by others, replaced only on success."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gqaru.files import atomic_directory


def test_a_written_directory_is_readable_by_others_and_replaces_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    umask = os.umask(0o022)
    try:
        with atomic_directory(out) as staging:
            (staging / "new.txt").write_text("new")
    finally:
        os.umask(umask)
    assert sorted(path.name for path in out.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # mkdtemp's 0700 would lock colleagues out
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_a_failed_write_leaves_the_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert sorted(path.name for path in out.iterdir()) == ["config.json"]
    assert [path.name for path in tmp_path.iterdir()] == ["merged"]
