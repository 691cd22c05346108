"""Output for people (tables, trees) and for scripts (JSON, YAML). Nothing here decides content."""

from __future__ import annotations

import functools
import json
import os
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import yaml

FORMATS = ("table", "json", "yaml")

OK, WARN, FAIL, UNKNOWN = "✓", "⚠", "✗", "?"


def emit(data: Any, fmt: str, human: Callable[[Any, TextIO], None], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        json.dump(data, out, indent=2, ensure_ascii=False)
        out.write("\n")
    elif fmt == "yaml":
        yaml.safe_dump(data, out, sort_keys=False, allow_unicode=True, default_flow_style=False)
    else:
        human(data, out)


def use_color(stream: TextIO) -> bool:
    return "NO_COLOR" not in os.environ and hasattr(stream, "isatty") and stream.isatty()


@functools.lru_cache(maxsize=4096)
def _wide_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def width(text: str) -> int:
    """Terminal cells a string takes (wide East Asian characters count twice). Tables repeat the
    same few non-ASCII cells (pillars) thousands of times, hence the cache."""
    return len(text) if text.isascii() else _wide_width(text)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    cells = [list(headers)] + [[("" if c is None else str(c)) for c in row] for row in rows]
    sizes = [[width(c) for c in row] for row in cells]
    widths = [max(col) for col in zip(*sizes)]
    last = len(widths) - 1
    lines = []
    for row, row_sizes in zip(cells, sizes):
        parts = [c if i == last else c + " " * (widths[i] - row_sizes[i]) for i, c in enumerate(row)]
        lines.append("   ".join(parts).rstrip())
    out.write("\n".join(lines) + "\n")


def tree(items: Sequence[str], out: TextIO, indent: str = "  ") -> None:
    for i, item in enumerate(items):
        branch = "└── " if i == len(items) - 1 else "├── "
        out.write(f"{indent}{branch}{item}\n")


def aligned(items: Sequence[tuple[str, str]], out: TextIO, indent: str = "  ") -> None:
    """A tree whose second column lines up: ``├── name    (note)``."""
    if not items:
        return
    w = max(width(a) for a, _ in items)
    tree([f"{a}{' ' * (w - width(a))}    {b}".rstrip() for a, b in items], out, indent)


def pillar(value: str) -> str:
    """One of the four pillars as a cell: a symbol and a word."""
    if value.startswith("unknown"):
        return f"{UNKNOWN} {value}"
    if value.startswith("pxe:") and "timed out" not in value:
        return f"⏳ {value}"
    symbol = {
        "sync": OK,
        "ok": OK,
        "enrolled": OK,
        "drift": WARN,
        "changed": WARN,
        "stale": WARN,
        "failed": FAIL,
        "not enrolled": "–",
        "unknown": UNKNOWN,
    }.get(value, WARN)
    return f"{symbol} {value}"
