"""Atomic file writes: a reader sees the old file or the new one, never half of one.

:func:`atomic_write` writes to a temp file in the target's own directory (so the rename never
crosses a filesystem), sets its mode, fsyncs it, renames it over the target and fsyncs the
directory, so the new name survives a crash too. On any failure the temp file is removed and the
target is left as it was; ``OSError`` is raised as is (callers translate it where it enters their
code). Secret key files have their own writer, :func:`lab.common.identity.write_private_file`
(0600 from the first byte, optional create-only, ``ConfigError`` on failure).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or unlink in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``, atomically and durably; the file gets exactly ``mode``.

    The directory must exist. The temp file (``.NAME.*.tmp`` beside ``path``) is created 0600 and
    changed to ``mode`` before the rename, whatever the umask, so the file never appears with
    another mode.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
