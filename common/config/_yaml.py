"""YAML to plain Python values that remember where they came from.

Mappings become :class:`LMap` and sequences :class:`LSeq`; both know their own line and the
line of each key/item, so validation errors can say ``file:line``. Duplicate keys, which YAML
would silently collapse, are an error here.
"""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from lab.common.errors import ConfigError

try:  # libyaml is ~10x faster; the pure loader gives identical nodes
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader

MAX_FILE_BYTES = 8 * 1024 * 1024


class LMap(dict):
    """A dict with ``line`` (of the mapping) and ``key_lines`` (line of each key)."""

    __slots__ = ("line", "key_lines")

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LSeq(list):
    """A list with ``line`` (of the sequence) and ``item_lines`` (line of each item)."""

    __slots__ = ("line", "item_lines")

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


def load_file(path: pathlib.Path) -> Any:
    """Parse one YAML file into LMap/LSeq/scalars; any problem is a ConfigError with file:line."""
    name = str(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"file is larger than {MAX_FILE_BYTES} bytes", name)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("file is not valid UTF-8", name) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", name) from exc
    return load_text(text, name)


def load_text(text: str, name: str = "<string>") -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        return _convert(loader, node, name)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {exc.problem or exc.context}", name, line) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", name) from exc
    finally:
        loader.dispose()


def _convert(loader: Any, node: yaml.Node, name: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = LMap()
        out.line = node.start_mark.line + 1
        out.key_lines = {}
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        for key_node, value_node in node.value:
            key = _convert(loader, key_node, name)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise ConfigError(f"mapping keys must be text, got {type(key).__name__}", name, line)
            key = str(key)
            if key in out:
                raise ConfigError(
                    f"duplicate key '{key}' (first at line {out.key_lines[key]})", name, line
                )
            out[key] = _convert(loader, value_node, name)
            out.key_lines[key] = line
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LSeq(_convert(loader, item, name) for item in node.value)
        seq.line = node.start_mark.line + 1
        seq.item_lines = [item.start_mark.line + 1 for item in node.value]
        return seq
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"invalid value: {exc.problem}", name, node.start_mark.line + 1) from exc
