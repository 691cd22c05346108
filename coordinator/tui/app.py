"""`lab dash`: the controller that ties the navigator, the data worker and the widgets together.

Everything the operator sees is computed by :mod:`models`; where they are is :mod:`nav`; data
arrives from :mod:`source` workers through the urwid loop's watch pipe, so a slow Engine call
never freezes the keyboard. Exceptions never reach the terminal as tracebacks: they become the
status line.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import urwid

from lab.coordinator.tui import models, nav, widgets
from lab.coordinator.tui.source import ACTION_METHODS, Result, Worker, action_job, describe_error, fetch_job

log = logging.getLogger(__name__)

DEFAULT_REFRESH = 2.0  # seconds between live refreshes
CACHE_SIZE = 64  # screens kept for an instant Esc
ACTION_KEYS = {"S": "sync", "P": "plan", "A": "apply", "R": "renew"}
MOVE_ALIASES = {"j": "down", "k": "up", "ctrl f": "page down", "ctrl b": "page up"}


def _utf8() -> bool:
    return urwid.util.get_encoding() in ("utf-8", "utf8")


def _one_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()] or [""]
    return lines[0] + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")


class Root(urwid.WidgetWrap):
    """The top widget: every key goes through :meth:`Dash.handle_key` first."""

    def __init__(self, dash: Dash, frame: urwid.Widget) -> None:
        self.dash = dash
        self.holder = urwid.WidgetPlaceholder(frame)
        super().__init__(self.holder)

    def selectable(self) -> bool:
        return True  # even under a dialog that holds nothing selectable: keys come here first

    def render(self, size: tuple[int, int], focus: bool = False) -> urwid.Canvas:
        self.dash.resize(size)
        return super().render(size, focus)

    def keypress(self, size: tuple[int, int], key: str) -> str | None:
        try:
            return self.dash.handle_key(size, key)
        except urwid.ExitMainLoop:
            raise
        except Exception as exc:  # noqa: BLE001 — never a traceback on the operator's screen
            log.debug("key %r failed", key, exc_info=True)
            self.dash.error(describe_error(exc))
            return None


class Dash:
    """One dashboard session. Usable without a terminal: feed it results, render ``root``."""

    def __init__(self, refresh: float = DEFAULT_REFRESH, start: str = models.SERVERS, unicode: bool | None = None) -> None:
        self.refresh = refresh
        utf8 = _utf8() if unicode is None else unicode
        self.glyphs = widgets.UNICODE if utf8 else widgets.ASCII
        self.symbols = models.SYMBOLS if utf8 else models.ASCII_SYMBOLS
        self.nav = nav.Navigator(nav.Screen(start))
        self.cache: collections.OrderedDict[tuple[str, ...], Any] = collections.OrderedDict()
        self.errors: dict[tuple[str, ...], str] = {}
        self.shown: tuple[tuple[str, ...], Any, str] | None = None  # key, model, filter on screen
        self.mode = "normal"  # normal | prompt | help | confirm
        self.prompt_kind = ""
        self.pending_action: tuple[str, models.Target] | None = None
        self.last_update: float | None = None
        self.fetch_seconds = 0.0  # how long the current screen's last fetch took
        self.size: tuple[int, int] | None = None
        self.loop: urwid.MainLoop | None = None
        self.worker: Worker | None = None
        self.actions: Worker | None = None
        self._wake_fd: int | None = None

        self.crumbs = urwid.Text("", wrap="clip")
        self.clock = urwid.Text("", align="right", wrap="clip")
        header = urwid.AttrMap(urwid.Columns([self.crumbs, (22, self.clock)]), "header")
        self.table = widgets.TableView(self.glyphs)
        self.detail = widgets.DetailView(self.glyphs)
        self.message = widgets.PlainLine("", "dim", self.glyphs)
        self.main = urwid.WidgetPlaceholder(urwid.Filler(self.message, valign="top"))
        self.log = widgets.LogPane(self.glyphs)
        self.body = urwid.Pile([self.main, (4, self.log)], focus_item=0)
        self.status = urwid.Text("", wrap="clip")
        self.status_holder = urwid.WidgetPlaceholder(urwid.AttrMap(self.status, "status"))
        self.prompt = urwid.Edit("", wrap="clip")
        self.keys = urwid.AttrMap(urwid.Text("", wrap="clip"), "keys")
        self.footer = urwid.Pile([self.status_holder, self.keys])
        self.frame = urwid.Frame(self.body, header=header, footer=self.footer)
        self.root = Root(self, self.frame)
        self.show()

    # -- wiring ------------------------------------------------------------------------------

    def start(self, loop: urwid.MainLoop, open_engine: Callable[[], Any]) -> None:
        self.loop = loop
        self._wake_fd = loop.watch_pipe(self._on_wake)
        fd = self._wake_fd

        def wake() -> None:
            os.write(fd, b"!")

        self.worker = Worker(open_engine, wake, "lab-dash-data")
        self.actions = Worker(open_engine, wake, "lab-dash-actions")
        self.request(reload=False)
        loop.set_alarm_in(self.refresh, self._tick)

    def stop(self) -> None:
        for w in (self.worker, self.actions):
            if w is not None:
                w.close(timeout=1.0)
        if self._wake_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._wake_fd)
            self._wake_fd = None

    def _on_wake(self, data: bytes) -> bool:
        try:
            for w in (self.worker, self.actions):
                if w is not None:
                    for r in w.results():
                        self.apply(r)
        except Exception as exc:  # noqa: BLE001
            log.debug("applying results failed", exc_info=True)
            self.error(describe_error(exc))
        return True

    def _tick(self, loop: urwid.MainLoop, _data: Any = None) -> None:
        try:
            self.request(reload=True)
            self._update_header()
        except Exception as exc:  # noqa: BLE001
            self.error(describe_error(exc))
        loop.set_alarm_in(self.next_refresh(), self._tick)

    def next_refresh(self) -> float:
        """Seconds to the next refresh: the configured interval, stretched so that a slow source
        keeps its worker busy at most a third of the time."""
        return max(self.refresh, 3 * self.fetch_seconds)

    def request(self, reload: bool = False) -> None:
        """Ask the worker for the current screen's data (coalesced if already asked)."""
        if self.worker is not None:
            key = self.nav.current.key
            self.worker.submit(key, fetch_job(key, self.symbols, reload=reload))

    def apply(self, r: Result) -> None:
        """Take one result from a worker (UI thread)."""
        if r.log is not None:
            self.log.add(r.log, "warn" if r.log.startswith("warning") else "log")
            return
        if r.key[0] == "action":
            if r.error:
                self.log.add(f"{r.key[1]} failed: {r.error}", "error")
                self.error(f"{r.key[1]} failed: {r.error}")
            return
        if r.error:
            self.errors[r.key] = r.error
            if r.key == self.nav.current.key:
                self.error(r.error)
                if r.key not in self.cache:
                    self.show()
            return
        self.errors.pop(r.key, None)
        if r.key == self.nav.current.key:
            self.fetch_seconds = r.elapsed
        self.cache[r.key] = r.value
        self.cache.move_to_end(r.key)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        self.last_update = time.time()
        if r.key == self.nav.current.key:
            self.show()
            self._update_header()

    # -- drawing -----------------------------------------------------------------------------

    def resize(self, size: tuple[int, int]) -> None:
        if size == self.size:
            return
        self.size = size
        cols, rows = size
        log_rows = 3 if rows < 30 else 6 if rows < 60 else 10
        if rows < 14:
            log_rows = 1
        self.body.contents[1] = (self.log, self.body.options("given", log_rows + 1))
        self._update_header()

    def _focus_key(self) -> str | None:
        """The focused row/line on screen, if the screen shows the current key."""
        if self.shown is None or self.shown[0] != self.nav.current.key:
            return self.nav.current.focus
        if self.nav.current.is_list:
            row = self.table.focused()
            return row.key if row else None
        entry = self.detail.focused()
        return entry.key if entry else None

    def show(self) -> None:
        """Draw the current screen from the cache (or a loading/error note)."""
        screen = self.nav.current
        model = self.cache.get(screen.key)
        if model is None:
            err = self.errors.get(screen.key)
            what = screen.view if screen.is_list else str(screen.target)
            self.message.set(f"  cannot show {what}: {err}" if err else f"  loading {what}…", "error" if err else "dim")
            self.main.original_widget = urwid.Filler(self.message, valign="top")
            self.shown = None
        elif self.shown is not None and self.shown[0] == screen.key and self.shown[1] is model and self.shown[2] == screen.filter:
            pass  # unchanged (the worker hands back the very same object): leave the screen alone
        else:
            focus = self._focus_key()
            if isinstance(model, models.Table):
                self.table.show(model, screen.filter, focus, "no match for the filter" if screen.filter else f"no {model.view}")
                self.main.original_widget = self.table
            else:
                same = self.shown is not None and self.shown[0] == screen.key
                self.detail.show(model, screen.filter, focus, self.detail.pane if same else screen.pane, fresh=not same)
                self.main.original_widget = self.detail
            self.shown = (screen.key, model, screen.filter)
        self._update_header()
        self._update_keys()

    def _update_header(self) -> None:
        crumbs = self.nav.breadcrumbs()
        room = (self.size[0] if self.size else 80) - 22 - 13
        if models.cells(crumbs) > room > 3:  # the newest steps matter most: cut on the left
            while models.cells(crumbs) > room - 1:
                crumbs = crumbs[1:]
            crumbs = "…" + crumbs
        self.crumbs.set_text([("header", " lab dash "), ("crumb", self.glyphs("│ " + crumbs + " "))])
        stamp = time.strftime("%H:%M:%S", time.localtime(self.last_update)) if self.last_update else "--:--:--"
        busy = self.worker is not None and self.worker.busy(self.nav.current.key)
        self.clock.set_text(f"{'*' if busy else ' '}{stamp}  [?]Help ")

    def _update_keys(self) -> None:
        if self.mode == "prompt":
            text = " Enter apply  Esc cancel"
        elif self.nav.current.is_list:
            text = " ⏎ open  Esc back  / filter  : view  Tab pane  S/P/A/R act  ? help  q quit"
        else:
            keys = "".join(s.key for s in self.detail.detail.sections) if self.detail.detail else ""
            text = f" ⏎ follow  Esc back  / filter  Tab pane  {'/'.join(keys)} section  ? help  q quit"
        if self.glyphs.ascii:
            text = text.replace("⏎", "Enter")
        self.keys.original_widget.set_text(text)

    def info(self, text: str) -> None:
        self.status.set_text(("status", _one_line(text)))

    def error(self, text: str) -> None:
        self.status.set_text(("error", _one_line(text)))

    # -- navigation --------------------------------------------------------------------------

    def _remember(self) -> None:
        if self.shown is not None and self.shown[0] == self.nav.current.key:
            self.nav.remember(self._focus_key(), self.detail.pane if not self.nav.current.is_list else 0)

    def go(self, move: Callable[[], Any]) -> None:
        self._remember()
        move()
        self.shown = None
        self.show()
        self.request()

    def drill(self, target: models.Target) -> None:
        self.go(lambda: self.nav.drill(target))
        self.info(f"{target}")

    def back(self) -> None:
        if self.nav.current.filter:
            self.nav.back()
            self.show()
            return
        if not self.nav.history:
            self.info("at the first screen (q quits)")
            return
        self.go(self.nav.back)

    def jump(self, view: str) -> None:
        self.go(lambda: self.nav.jump(view))

    def focused_target(self) -> models.Target | None:
        if self.body.focus_position != 0:
            return None
        if self.nav.current.is_list:
            row = self.table.focused()
            return row.target if row else None
        entry = self.detail.focused()
        return entry.line.target if entry and entry.line else None

    def next_pane(self, step: int = 1) -> None:
        stops = [("main", 0), ("log", 0)] if self.nav.current.is_list or self.shown is None else [("main", 0), ("main", 1), ("log", 0)]
        here = ("log", 0) if self.body.focus_position == 1 else ("main", self.detail.pane if not self.nav.current.is_list else 0)
        i = stops.index(here) if here in stops else 0
        part, pane = stops[(i + step) % len(stops)]
        self.body.focus_position = 1 if part == "log" else 0
        if part == "main" and not self.nav.current.is_list:
            self.detail.set_pane(pane)
        self.info("log pane (Tab to leave)" if part == "log" else "")

    # -- keys --------------------------------------------------------------------------------

    def handle_key(self, size: tuple[int, int], key: str) -> str | None:
        if self.mode == "help":
            self.close_overlay()
            return None
        if self.mode == "confirm":
            return self._confirm_key(key)
        if self.mode == "prompt":
            return self._prompt_key(size, key)
        if key == "q":
            raise urwid.ExitMainLoop()
        if key == "?":
            self.open_overlay(widgets.HELP, size)
            self.mode = "help"
            return None
        if key in ("/", ":"):
            self.open_prompt(key)
            return None
        if key in ("tab", "shift tab"):
            self.next_pane(1 if key == "tab" else -1)
            return None
        if key == "esc":
            self.back()
            return None
        if key == "enter":
            target = self.focused_target()
            if target is None:
                self.info("nothing to open here")
            else:
                self.drill(target)
            return None
        if key in ACTION_KEYS:
            self.ask_action(ACTION_KEYS[key], size)
            return None
        if key in ("ctrl r", "r"):
            self.request(reload=True)
            self.info("refreshing…")
            return None
        if not self.nav.current.is_list and len(key) == 1 and self.detail.detail is not None:
            if self.detail.jump_to_section(key):
                self.body.focus_position = 0
                return None
        return self.frame.keypress(size, MOVE_ALIASES.get(key, key))

    def open_prompt(self, kind: str) -> None:
        self.mode = "prompt"
        self.prompt_kind = kind
        self.prompt.set_caption(("prompt", kind))
        self.prompt.set_edit_text(self.nav.current.filter if kind == "/" else "")
        self.prompt.set_edit_pos(len(self.prompt.edit_text))
        self.status_holder.original_widget = self.prompt
        self.footer.focus_position = 0
        self.frame.focus_position = "footer"
        self._update_keys()

    def close_prompt(self) -> None:
        self.mode = "normal"
        self.status_holder.original_widget = urwid.AttrMap(self.status, "status")
        self.frame.focus_position = "body"
        self._update_keys()

    def _prompt_key(self, size: tuple[int, int], key: str) -> str | None:
        kind = self.prompt_kind
        if key == "esc":
            if kind == "/":
                self.nav.set_filter("")
                self.show()
            self.close_prompt()
            return None
        if key == "enter":
            text = self.prompt.edit_text
            self.close_prompt()
            if kind == "/":
                self.nav.set_filter(text)
                self.show()
                self.info(f"filter: {text}" if text.strip() else "filter cleared")
            else:
                self.command(text)
            return None
        self.frame.keypress(size, key)
        if kind == "/":  # filter as you type
            self.nav.set_filter(self.prompt.edit_text)
            self.show()
        return None

    def command(self, text: str) -> None:
        cmd = nav.parse_command(text)
        if cmd.kind == "quit":
            raise urwid.ExitMainLoop()
        if cmd.kind == "help":
            self.open_overlay(widgets.HELP, self.size or (80, 24))
            self.mode = "help"
        elif cmd.kind == "view":
            self.jump(cmd.view)
        elif cmd.kind == "target" and cmd.target is not None:
            self.drill(cmd.target)
        elif cmd.kind == "action":
            self.ask_action(cmd.view, self.size or (80, 24))
        else:
            self.error(cmd.message)

    # -- overlays and actions ------------------------------------------------------------------

    def open_overlay(self, text: str, size: tuple[int, int]) -> None:
        cols, rows = size
        lines = text.count("\n") + 3
        box = widgets.dialog(text, self.glyphs)
        width = min(max(len(x) for x in text.splitlines()) + 4, max(10, cols - 2))
        self.root.holder.original_widget = urwid.Overlay(box, self.frame, "center", width, "middle", min(lines, max(3, rows - 2)))

    def close_overlay(self) -> None:
        self.mode = "normal"
        self.root.holder.original_widget = self.frame

    def action_target(self) -> models.Target | None:
        """The server an action applies to: the focused row/line, else the server shown."""
        target = self.focused_target()
        if target is not None and target.kind == "server":
            return target
        if self.nav.current.target is not None and self.nav.current.target.kind == "server":
            return self.nav.current.target
        return None

    def ask_action(self, action: str, size: tuple[int, int]) -> None:
        target = self.action_target()
        words = ACTION_METHODS[action][0]
        if target is None:
            self.error(f"{words}: focus a server first")
            return
        self.pending_action = (action, target)
        self.open_overlay(nav.confirm_question(action, words, target.name), size)
        self.mode = "confirm"

    def _confirm_key(self, key: str) -> None:
        action, target = self.pending_action or ("", None)
        self.close_overlay()
        self.pending_action = None
        if key in ("y", "Y") and target is not None:
            self.run_action(action, target)
        else:
            self.info("cancelled")
        return None

    def run_action(self, action: str, target: models.Target) -> None:
        words = ACTION_METHODS[action][0]
        self.log.add(f"$ {words} {target.name}", "prompt")
        if self.actions is None:
            self.log.add(f"{words}: no engine connected", "error")
            return
        if not self.actions.submit(("action", words, target.name), action_job(action, target)):
            self.info(f"{words} {target.name} is already queued")
        else:
            self.info(f"{words} {target.name}: running (see log)")


def palette(no_color: bool) -> list[tuple[str, str, str, str]]:
    """The palette; with NO_COLOR only bold/underline/standout remain."""
    if no_color:
        return [(name, "default", "default", mono) for name, _, _, mono in widgets.PALETTE]
    return list(widgets.PALETTE)


def run_dash(open_engine: Callable[[], Any], refresh: float = DEFAULT_REFRESH, no_color: bool | None = None) -> None:
    """Run the dashboard in this terminal until the operator quits."""
    if no_color is None:
        no_color = bool(os.environ.get("NO_COLOR"))
    dash = Dash(refresh=refresh)
    screen = urwid.display.raw.Screen()
    if no_color:
        screen.set_terminal_properties(colors=1)
    loop = urwid.MainLoop(dash.root, palette(no_color), screen=screen, handle_mouse=False)
    try:
        dash.start(loop, open_engine)
        loop.run()
    finally:
        dash.stop()


__all__ = ["DEFAULT_REFRESH", "Dash", "palette", "run_dash"]
