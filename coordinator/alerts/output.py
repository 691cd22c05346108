"""Write a rendered tree into an output directory atomically, or say what writing it would change.

Each file is written to a temporary name in its own directory, fsynced and renamed, so a
monitoring system reloading at any moment sees the old file or the new one, never half of one.
``.lab-rendered`` lists the files lab wrote; a file lab wrote before and no longer renders is
removed — files lab did not write are never touched.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from lab.common.errors import UsageError
from lab.common.fsutil import atomic_write

MANIFEST = ".lab-rendered"


def _safe(root: pathlib.Path, rel: str) -> pathlib.Path:
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise UsageError(f"refusing to write outside {root}: {rel}")
    return path


def write_atomic(path: pathlib.Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=mode)


def _previous(root: pathlib.Path) -> list[str]:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return [p for p in data.get("files", []) if isinstance(p, str)] if isinstance(data, dict) else []


def _read(path: pathlib.Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc


def write_tree(root: str | os.PathLike[str], files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """Write ``files`` below ``root``; returns one ``{path, status}`` per file (written/unchanged/removed)."""
    root = pathlib.Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        out = []
        for rel, data in sorted(files.items()):
            path = _safe(root, rel)
            if _read(path) == data:
                out.append({"path": rel, "status": "unchanged", "bytes": len(data)})
                continue
            write_atomic(path, data)
            out.append({"path": rel, "status": "written", "bytes": len(data)})
        for rel in sorted(set(_previous(root)) - set(files)):
            path = _safe(root, rel)
            if path.exists():
                path.unlink()
                out.append({"path": rel, "status": "removed", "bytes": 0})
        write_atomic(root / MANIFEST, (json.dumps({"files": sorted(files)}, indent=1) + "\n").encode())
    except OSError as exc:
        raise UsageError(f"cannot write to {root}: {exc.strerror or exc}") from exc
    return out


def diff_tree(root: str | os.PathLike[str], files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """What :func:`write_tree` would change: ``{path, status: added/changed/removed, lines}``,
    ``lines`` being unified-diff ``+``/``-`` lines (without the ``---``/``+++`` headers)."""
    root = pathlib.Path(root)
    out = []
    for rel, data in sorted(files.items()):
        old = _read(_safe(root, rel)) if root.exists() else None
        if old == data:
            continue
        new_lines = data.decode().splitlines()
        if old is None:
            out.append({"path": rel, "status": "added", "lines": ["+" + x for x in new_lines]})
            continue
        old_lines = old.decode(errors="replace").splitlines()
        lines = [x for x in difflib.unified_diff(old_lines, new_lines, lineterm="", n=1)][2:]
        out.append({"path": rel, "status": "changed", "lines": lines})
    for rel in sorted(set(_previous(root)) - set(files)) if root.exists() else ():
        old = _read(_safe(root, rel))
        if old is not None:
            out.append({"path": rel, "status": "removed", "lines": ["-" + x for x in old.decode(errors="replace").splitlines()]})
    return out
