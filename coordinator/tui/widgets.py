"""urwid widgets that draw the models of :mod:`lab.coordinator.tui.models`; no decisions here.

Lists are lazy: a :class:`LazyWalker` makes a widget only for the rows a ListBox actually shows,
so a 10,000-server list costs what its visible 50 rows cost, and a refresh only swaps a tuple.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import urwid

from lab.coordinator.tui import models

# (name, foreground, background, monochrome); NO_COLOR uses only the last column.
PALETTE: list[tuple[str, str, str, str]] = [
    ("header", "white,bold", "dark blue", "bold,standout"),
    ("crumb", "light cyan,bold", "dark blue", "bold,standout"),
    ("title", "light cyan,bold", "default", "bold"),
    ("colhead", "white,bold", "default", "bold,underline"),
    ("section", "light cyan,bold", "default", "bold"),
    ("fact", "dark cyan", "default", ""),
    ("focus", "black", "light cyan", "standout"),
    ("ok", "light green", "default", ""),
    ("warn", "yellow", "default", "bold"),
    ("fail", "light red,bold", "default", "bold"),
    ("unknown", "dark gray", "default", ""),
    ("off", "dark gray", "default", ""),
    ("info", "light blue", "default", ""),
    ("dim", "dark gray", "default", ""),
    ("link", "default", "default", ""),
    ("status", "default", "default", ""),
    ("error", "light red,bold", "default", "bold"),
    ("prompt", "yellow,bold", "default", "bold"),
    ("keys", "black", "light gray", "standout"),
    ("log", "light gray", "default", ""),
    ("dialog", "black", "light gray", "standout"),
]


@dataclasses.dataclass(frozen=True, slots=True)
class Glyphs:
    rule: str = "─"
    link: str = "► "
    item: str = "● "
    ascii: bool = False

    def __call__(self, text: str) -> str:
        """``text`` as this terminal can show it (same width: one cell for one cell)."""
        if not self.ascii or text.isascii():
            return text
        return "".join(ch if ch.isascii() else _ASCII.get(ch, "?") for ch in text)


_ASCII = {"…": "~", "—": "-", "–": "-", "─": "-", "│": "|", "►": ">", "●": "*", "✓": "+", "⚠": "!", "✗": "x", "⏎": "^"}
UNICODE = Glyphs()
ASCII = Glyphs("-", "> ", "* ", True)


class TableLayout:
    """Column widths of one table for any screen width (memoised per width)."""

    def __init__(self, table: models.Table, glyphs: Glyphs = UNICODE) -> None:
        self.columns = table.columns
        self.natural = table.natural
        self.glyphs = glyphs

    @functools.lru_cache(maxsize=8)  # noqa: B019 — one small layout per table, dropped with it
    def widths(self, width: int) -> tuple[int, ...]:
        return tuple(models.layout(self.columns, self.natural, width))


def _line_canvas(markup: list[tuple[str, str]], maxcol: int, glyphs: Glyphs = UNICODE) -> urwid.Canvas:
    if glyphs.ascii:
        markup = [(attr, glyphs(text)) for attr, text in markup]
    return urwid.Text(markup or "", wrap="clip").render((maxcol,))


class _OneLine(urwid.Widget):
    _sizing = frozenset([urwid.Sizing.FLOW])

    def rows(self, size: tuple[int], focus: bool = False) -> int:
        return 1


class TableRow(_OneLine):
    _selectable = True

    def __init__(self, row: models.Row, layout: TableLayout) -> None:
        super().__init__()
        self.row = row
        self.layout = layout

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        (maxcol,) = size
        widths = self.layout.widths(maxcol)
        markup: list[Any] = []
        used = 0
        for cell, w in zip(self.row.cells, widths):
            if not w:
                continue
            if markup:
                markup.append(("focus" if focus else "link", " "))
                used += 1
            text = models.cell_text(cell, w)
            markup.append(("focus" if focus else (cell.style or "link"), text))
            used += models.cells(text)
        if used < maxcol:
            markup.append(("focus" if focus else "link", " " * (maxcol - used)))
        return _line_canvas(markup, maxcol, self.layout.glyphs)

    def keypress(self, size: tuple[int], key: str) -> str:
        return key


class TableHeader(_OneLine):
    def __init__(self, layout: TableLayout) -> None:
        super().__init__()
        self.layout = layout

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        (maxcol,) = size
        parts = [models.title_text(c, w) for c, w in zip(self.layout.columns, self.layout.widths(maxcol)) if w]
        return _line_canvas([("colhead", " ".join(parts))], maxcol, self.layout.glyphs)


class TitleBar(_OneLine):
    """`─ Servers [12/50] /web ──────`"""

    def __init__(self, text: str = "", glyphs: Glyphs = UNICODE) -> None:
        super().__init__()
        self.text = text
        self.glyphs = glyphs

    def set(self, text: str) -> None:
        if text != self.text:
            self.text = text
            self._invalidate()

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        (maxcol,) = size
        g = self.glyphs.rule
        head = f"{g} {self.text} "
        return _line_canvas([("title", models.clip(head + g * max(0, maxcol - models.cells(head)), maxcol))], maxcol, self.glyphs)


class SectionHeader(TitleBar):
    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        (maxcol,) = size
        head = f"{self.text} "
        return _line_canvas([("section", models.clip(head + self.glyphs.rule * max(0, maxcol - models.cells(head)), maxcol))], maxcol, self.glyphs)


class LinkLine(_OneLine):
    _selectable = True

    def __init__(self, line: models.Line, glyphs: Glyphs = UNICODE) -> None:
        super().__init__()
        self.line = line
        self.glyphs = glyphs

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        (maxcol,) = size
        ln = self.line
        lead = "  " * ln.depth + (self.glyphs.link if ln.target else self.glyphs.item)
        main = lead + ln.text
        text = models.clip(main + (f"  {ln.note}" if ln.note else ""), maxcol)
        if focus:
            return _line_canvas([("focus", text)], maxcol, self.glyphs)
        cut = min(len(main), len(text))
        return _line_canvas([(ln.style or "link", text[:cut]), (ln.note_style, text[cut:])], maxcol, self.glyphs)

    def keypress(self, size: tuple[int], key: str) -> str:
        return key


class PlainLine(_OneLine):
    def __init__(self, text: str, style: str = "dim", glyphs: Glyphs = UNICODE) -> None:
        super().__init__()
        self.text = text
        self.style = style
        self.glyphs = glyphs

    def set(self, text: str, style: str) -> None:
        self.text, self.style = text, style
        self._invalidate()

    def render(self, size: tuple[int], focus: bool = False) -> urwid.Canvas:
        (maxcol,) = size
        return _line_canvas([(self.style, models.clip(self.text, maxcol))], maxcol, self.glyphs)


class LazyWalker(urwid.ListWalker):
    """A ListWalker over a tuple of items that builds widgets only when the ListBox asks."""

    CACHE_LIMIT = 2000

    def __init__(self, make: Callable[[Any], urwid.Widget]) -> None:
        self.items: Sequence[Any] = ()
        self.focus = 0
        self._make = make
        self._cache: dict[int, urwid.Widget] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_items(self, items: Sequence[Any], focus: int = 0, make: Callable[[Any], urwid.Widget] | None = None) -> None:
        if make is not None:
            self._make = make
        self.items = items
        self._cache.clear()
        self.focus = max(0, min(focus, len(items) - 1))
        self._modified()

    def widget(self, pos: int) -> urwid.Widget:
        w = self._cache.get(pos)
        if w is None:
            if len(self._cache) > self.CACHE_LIMIT:
                self._cache.clear()
            w = self._cache[pos] = self._make(self.items[pos])
        return w

    def get_focus(self) -> tuple[Any, Any]:
        if not self.items:
            return None, None
        return self.widget(self.focus), self.focus

    def set_focus(self, position: int) -> None:
        self.focus = position
        self._modified()

    def get_next(self, position: int) -> tuple[Any, Any]:
        if position + 1 < len(self.items):
            return self.widget(position + 1), position + 1
        return None, None

    def get_prev(self, position: int) -> tuple[Any, Any]:
        if 0 < position <= len(self.items):
            return self.widget(position - 1), position - 1
        return None, None

    def next_position(self, position: int) -> int:
        if position + 1 >= len(self.items):
            raise IndexError(position)
        return position + 1

    def prev_position(self, position: int) -> int:
        if position <= 0:
            raise IndexError(position)
        return position - 1

    def positions(self, reverse: bool = False) -> range:
        n = len(self.items)
        return range(n - 1, -1, -1) if reverse else range(n)


class TableView(urwid.WidgetWrap):
    """Title bar, column header and the lazily drawn rows of one :class:`models.Table`."""

    def __init__(self, glyphs: Glyphs = UNICODE) -> None:
        self.title = TitleBar(glyphs=glyphs)
        self.header = urwid.WidgetPlaceholder(PlainLine(""))
        self.walker = LazyWalker(lambda r: PlainLine(""))
        self.listbox = urwid.ListBox(self.walker)
        self.table: models.Table | None = None
        self.visible_rows: tuple[models.Row, ...] = ()
        self._layout: TableLayout | None = None
        super().__init__(urwid.Pile([("pack", self.title), ("pack", self.header), self.listbox], focus_item=2))

    def show(self, table: models.Table, query: str, focus_key: str | None, empty: str = "nothing here") -> None:
        if self.table is None or table.columns != self.table.columns or table.natural != self.table.natural:
            self._layout = TableLayout(table, self.title.glyphs)
            self.header.original_widget = TableHeader(self._layout)
        layout = self._layout
        self.table = table
        rows = table.filtered(query)
        self.visible_rows = rows
        focus = 0
        if focus_key is not None:
            focus = next((i for i, r in enumerate(rows) if r.key == focus_key), 0)
        if rows:
            self.walker.set_items(rows, focus, lambda r: TableRow(r, layout))
        else:
            self.walker.set_items((empty,), 0, lambda t: PlainLine(t, "dim", layout.glyphs))
        shown = f"{len(rows)}/{len(table.rows)}" if query else str(len(table.rows))
        self.title.set(f"{table.title} [{shown}]" + (f"  /{query}" if query else ""))

    def focused(self) -> models.Row | None:
        if not self.visible_rows:
            return None
        return self.visible_rows[min(self.walker.focus, len(self.visible_rows) - 1)]


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One line of a detail column: a section header, a link line, or an 'empty' note."""

    kind: str  # "section" | "line" | "empty"
    section: models.Section
    line: models.Line | None = None

    @property
    def key(self) -> str:
        return f"{self.section.key}:{self.line.text}" if self.line else f"{self.section.key}:"


def entries(sections: Sequence[models.Section]) -> list[Entry]:
    out: list[Entry] = []
    for s in sections:
        out.append(Entry("section", s))
        out.extend(Entry("line", s, ln) for ln in s.lines)
        if not s.lines:
            out.append(Entry("empty", s))
    return out


class DetailView(urwid.WidgetWrap):
    """Facts on top, then two columns of sections whose lines cross-link to other things."""

    def __init__(self, glyphs: Glyphs = UNICODE) -> None:
        self.glyphs = glyphs
        self.title = TitleBar(glyphs=glyphs)
        self.facts = urwid.Text("", wrap="space")
        self.walkers = [LazyWalker(self._make), LazyWalker(self._make)]
        self.entries: list[list[Entry]] = [[], []]
        self.lists = [urwid.ListBox(w) for w in self.walkers]
        self.columns = urwid.Columns([self.lists[0], self.lists[1]], dividechars=2)
        self.detail: models.Detail | None = None
        super().__init__(urwid.Pile([("pack", self.title), ("pack", urwid.Padding(self.facts, left=1, right=1)), ("pack", urwid.Divider()), self.columns], focus_item=3))

    def _make(self, e: Entry) -> urwid.Widget:
        if e.kind == "section":
            return SectionHeader(e.section.title, self.glyphs)
        if e.kind == "empty":
            return PlainLine("  " + e.section.empty, "dim", self.glyphs)
        assert e.line is not None
        return LinkLine(e.line, self.glyphs)

    def show(self, detail: models.Detail, query: str, focus_key: str | None, pane: int, fresh: bool = True) -> None:
        self.detail = detail
        shown = models.filter_detail(detail, query)
        self.title.set(detail.title + (f"  /{query}" if query else ""))
        markup: list[Any] = []
        for f in detail.facts:
            markup += [("fact", f"{f.name}: "), (f.style or "link", self.glyphs(f.value)), "   "]
        self.facts.set_text(markup or "")
        for i, sections in enumerate((shown.left, shown.right)):
            # a refresh keeps each column's focus; a new screen restores the remembered one
            key = self._entry_key(i) if not fresh else focus_key if i == pane else None
            es = entries(sections)
            self.entries[i] = es
            focus = next((j for j, e in enumerate(es) if e.key == key), None) if key else None
            if focus is not None:
                self.walkers[i].set_items(es, focus)
            else:  # first link focused, its section header in sight
                self.walkers[i].set_items(es, 0)
                self._focus(i, 0, next((j for j, e in enumerate(es) if e.kind == "line"), 0))
        self.set_pane(pane)

    def _entry_key(self, i: int) -> str | None:
        es = self.entries[i]
        return es[min(self.walkers[i].focus, len(es) - 1)].key if es else None

    def _focus(self, i: int, top: int, pos: int) -> None:
        """Focus ``pos`` in column ``i`` with line ``top`` at the top of the column."""
        self.walkers[i].set_focus(top)
        self.lists[i].offset_rows = 0  # the focus (``top``) on the first row…
        self.lists[i].inset_fraction = (0, 1)
        if pos != top:  # …then move on to ``pos``, keeping ``top`` in sight
            self.lists[i].set_focus(pos)

    @property
    def pane(self) -> int:
        return self.columns.focus_position

    def set_pane(self, pane: int) -> None:
        self.columns.focus_position = max(0, min(pane, 1))

    def focused(self) -> Entry | None:
        i = self.pane
        es = self.entries[i]
        if not es:
            return None
        return es[min(self.walkers[i].focus, len(es) - 1)]

    def jump_to_section(self, key: str) -> bool:
        for i, es in enumerate(self.entries):
            for j, e in enumerate(es):
                if e.kind == "section" and e.section.key == key:
                    first = next((k for k in range(j + 1, len(es)) if es[k].kind == "line" and es[k].section.key == key), j)
                    self.set_pane(i)
                    self._focus(i, j, first)
                    return True
        return False


class LogPane(urwid.WidgetWrap):
    """The last lines of action output and warnings; newest at the bottom."""

    LIMIT = 500

    def __init__(self, glyphs: Glyphs = UNICODE) -> None:
        self.glyphs = glyphs
        self.title = TitleBar("Log", glyphs)
        self.walker = urwid.SimpleFocusListWalker([])
        self.listbox = urwid.ListBox(self.walker)
        super().__init__(urwid.Pile([("pack", self.title), self.listbox], focus_item=1))

    def add(self, line: str, style: str = "log") -> None:
        self.walker.append(PlainLine(line, style, self.glyphs))
        if len(self.walker) > self.LIMIT:
            del self.walker[: len(self.walker) - self.LIMIT]
        self.walker.set_focus(len(self.walker) - 1)

    def lines(self) -> list[str]:
        return [w.text for w in self.walker]


HELP = """\
 lab dash — keys

 Enter      drill into the focused thing (cross-links)
 Esc        clear the filter, else go back
 /          filter this screen (terms; !term excludes)
 :          jump: :servers :labels :groups :alerts
            :secrets  :server NAME  :label NAME …  :q
 Tab        next pane (columns, log)
 l a p s g  detail: jump to Labels/Alerts/Puppet/…
 ↑ ↓ PgUp PgDn Home End   move
 S P A R    sync / plan / apply / identity renew
            the focused server (asks y/N first)
 ?          this help        q  quit

 press any key to close"""


def dialog(text: str, glyphs: Glyphs = UNICODE) -> urwid.Widget:
    body = urwid.Text(glyphs(text))
    return urwid.AttrMap(urwid.LineBox(urwid.Filler(body, valign="top")) if glyphs is UNICODE else urwid.LineBox(urwid.Filler(body, valign="top"), tlcorner="+", tline="-", lline="|", trcorner="+", blcorner="+", rline="|", bline="-", brcorner="+"), "dialog")
