"""common.fsutil: atomic_write gives exactly the mode, replaces atomically, leaves nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from lab.common import fsutil
from lab.common.fsutil import atomic_write, fsync_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_data_with_default_mode_0600(tmp_path):
    target = tmp_path / "state.json"
    atomic_write(target, b"hello\n")
    assert target.read_bytes() == b"hello\n"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o444])
def test_mode_is_exact_whatever_the_umask(tmp_path, mode):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "f", b"x", mode=mode)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f") == mode


def test_replaces_an_existing_file_and_its_mode(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old contents, longer than the new ones")
    os.chmod(target, 0o600)
    atomic_write(target, b"new", mode=0o644)
    assert target.read_bytes() == b"new"
    assert _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_failure_before_rename_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsutil.os, "fsync", boom)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(target, b"new data")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_failure_leaves_no_partial_file_when_target_was_absent(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "f", b"data")
    assert list(tmp_path.iterdir()) == []


def test_bad_data_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "f", "not bytes")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")
    assert list(tmp_path.iterdir()) == []


def test_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    seen = []
    real = fsutil.fsync_dir

    def spy(path):
        seen.append(((tmp_path / "f").exists(), os.fspath(path)))
        real(path)

    monkeypatch.setattr(fsutil, "fsync_dir", spy)
    atomic_write(tmp_path / "f", b"x")
    assert seen == [(True, os.fspath(tmp_path))]


def test_fsync_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
