"""One section of the lab settings file, ``$LAB_HOME/config.yaml``, read with line numbers.

Components that keep their own section there (``dns:``, ``pxe:``) validate it with
``parse_*(value, file, line)`` so every error says ``file:line``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from lab.common.config._yaml import LMap, load_file
from lab.common.errors import ConfigError

SETTINGS_FILE = "config.yaml"  # the same file lab.coordinator.engine reads


def load_section(home: str | os.PathLike[str], key: str) -> tuple[Any, str, int] | None:
    """``key:`` of ``<home>/config.yaml`` as ``(value, file, line)``; None when the file is absent
    or empty, or has no ``key`` (an empty ``key:`` gives the value None)."""
    path = pathlib.Path(home).expanduser() / SETTINGS_FILE
    if not path.exists():
        return None
    data = load_file(path)
    if data is None:
        return None
    if not isinstance(data, LMap):
        raise ConfigError("lab settings must be a mapping", str(path), getattr(data, "line", None))
    if key not in data:
        return None
    return data[key], str(path), data.line_of(key)
