"""The urwid dashboard driven by keys and rendered to canvases off-screen (no terminal, no I/O)."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import pytest
import urwid

from lab.coordinator.engine import Engine, Paths
from lab.coordinator.tui import app, models, source
from lab.coordinator.tui.source import Result

SERVERS = [
    ("worker-5", "aws", ["k8s-worker", "production", "eu-west"], "prod"),
    ("batch-worker-1", "aws", ["k8s-worker"], "prod"),
    ("db-1", "baremetal", ["postgres", "production", "eu-west"], "prod"),
    ("mail-1", "xcpng", ["mailserver"], "prod"),
    ("web-1", "ssh", ["app"], "staging"),
]


@pytest.fixture()
def engine(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    paths = Paths.resolve()
    Engine.init_local(paths)
    with Engine.open(paths) as e:
        for name, provider, labels, env in SERVERS:
            e.add_server(name, provider, labels, env, "eu-west")
        yield e


NAMED = {"enter", "esc", "tab", "shift tab", "down", "up", "page down", "page up"}


class Driver:
    """Presses keys on a Dash and answers its data requests synchronously from the engine."""

    def __init__(self, engine: Engine, size: tuple[int, int] = (80, 24)) -> None:
        self.engine = engine
        self.size = size
        self.dash = app.Dash(refresh=60, unicode=True)
        self.feed()

    def feed(self) -> None:
        key = self.dash.nav.current.key
        try:
            value = source.load(self.engine, key)
        except Exception as exc:  # noqa: BLE001
            self.dash.apply(Result(key, error=source.describe_error(exc)))
        else:
            self.dash.apply(Result(key, value=value))

    def keys(self, *keys: str) -> Driver:
        for k in keys:
            for part in [k] if k in NAMED or len(k) == 1 else list(k):
                self.dash.root.keypress(self.size, part)
                self.feed()
        return self

    def screen(self) -> list[str]:
        canvas = self.dash.root.render(self.size, focus=True)
        return [line.decode("utf-8").rstrip() for line in canvas.text]

    def text(self) -> str:
        return "\n".join(self.screen())


def fits(lines: list[str], size: tuple[int, int]) -> None:
    assert len(lines) == size[1]
    assert all(models.cells(line) <= size[0] for line in lines), [line for line in lines if models.cells(line) > size[0]]


def test_first_screen_at_80x24(engine: Engine) -> None:
    d = Driver(engine)
    lines = d.screen()
    fits(lines, (80, 24))
    assert lines[0].startswith(" lab dash │ Servers") and "[?]Help" in lines[0]
    assert "Servers [5]" in lines[1]
    assert lines[2].split()[:4] == ["NAME", "PROVIDER", "ENV", "LABELS"]
    assert lines[3].startswith("batch-worker-1")
    assert "Log" in d.text() and "q quit" in lines[-1]


def test_drill_back_and_focus_is_restored(engine: Engine) -> None:
    d = Driver(engine).keys("down", "down", "enter")  # batch-worker-1, db-1, mail-1
    text = d.text()
    assert "Servers > mail-1" in d.screen()[0] and "Server: mail-1" in text
    assert "Labels (1)" in text and "mailserver" in text and "Puppet Classes" not in text.split("Alerts")[0]
    d.keys("esc")
    assert d.dash.nav.current.is_list and d.dash.table.focused().key == "mail-1"


def test_cross_links_server_label_server(engine: Engine) -> None:
    d = Driver(engine).keys("enter")  # batch-worker-1
    d.keys("l", "enter")  # its first label: k8s-worker
    assert d.dash.nav.current.target == models.Target("label", "k8s-worker")
    assert "Label: k8s-worker" in d.text() and "worker-5 (aws, prod)" in d.text()
    d.keys("down", "enter")  # the second server carrying it
    assert d.dash.nav.current.target == models.Target("server", "worker-5")
    crumbs = d.screen()[0].split("│ ")[1]
    assert crumbs.startswith("…") and "> k8s-worker > worker-5 " in crumbs  # cut on the left at 80
    d.size = (160, 50)
    assert d.screen()[0].split("│ ")[1].startswith("Servers > batch-worker-1 > k8s-worker > worker-5 ")
    d.keys("esc", "esc")
    assert d.dash.nav.current.target == models.Target("server", "batch-worker-1")


def test_tab_switches_panes_and_section_keys(engine: Engine) -> None:
    d = Driver(engine).keys("down", "enter")  # db-1
    assert d.dash.detail.pane == 0
    d.keys("tab")
    assert d.dash.detail.pane == 1 and d.dash.focused_target().kind == "alert"
    d.keys("tab")
    assert d.dash.body.focus_position == 1  # the log
    d.keys("tab")
    assert d.dash.body.focus_position == 0 and d.dash.detail.pane == 0
    d.keys("p")
    assert d.dash.detail.pane == 1 and d.dash.focused_target() == models.Target("label", "postgres")
    d.keys("enter")
    assert d.dash.nav.current.target == models.Target("label", "postgres")


def test_filter_live_and_clear(engine: Engine) -> None:
    d = Driver(engine).keys("/", "w", "o", "r")
    assert "Servers [2/5]  /wor" in d.text()
    d.keys("enter")
    assert d.dash.nav.current.filter == "wor" and "filter: wor" in d.text()
    d.keys("esc")
    assert d.dash.nav.current.filter == "" and "Servers [5]" in d.text()
    d.keys("/", "zzz", "enter")
    assert "no match for the filter" in d.text()


def test_colon_jumps_and_bad_commands(engine: Engine) -> None:
    d = Driver(engine).keys(":", "labels", "enter")
    assert d.dash.nav.current.view == "labels" and "Labels [10]" in d.text()
    d.keys(":", "pods", "enter")
    assert "unknown view 'pods'" in d.screen()[-2]
    d.keys(":", "server db-1", "enter")
    assert "Server: db-1" in d.text()
    d.keys(":", "server nope", "enter")
    assert "cannot show server nope: no server named 'nope'" in d.text()
    with pytest.raises(urwid.ExitMainLoop):
        d.keys(":", "q", "enter")


def test_help_and_quit(engine: Engine) -> None:
    d = Driver(engine).keys("?")
    assert "lab dash — keys" in d.text() and d.dash.mode == "help"
    d.keys("x")
    assert d.dash.mode == "normal" and "lab dash — keys" not in d.text()
    with pytest.raises(urwid.ExitMainLoop):
        d.keys("q")


def test_actions_confirm_then_log(engine: Engine) -> None:
    d = Driver(engine)
    d.dash.actions = source.Worker(lambda: object())
    try:
        d.keys("S")
        assert "Run sync on batch-worker-1?" in d.text()
        d.keys("n")
        assert "cancelled" in d.screen()[-2] and d.dash.mode == "normal"
        d.keys("R", "y")
        deadline = time.monotonic() + 5
        while "needs the lifecycle issue" not in d.text() and time.monotonic() < deadline:
            time.sleep(0.01)
            d.dash._on_wake(b"!")
        assert "$ identity renew batch-worker-1" in d.text()
        assert "not available from the dashboard: identity renew (use the lab command line)" in d.text()
    finally:
        d.dash.actions.close()
    d.keys(":", "labels", "enter", "A")
    assert "apply: focus a server first" in d.text()


def test_errors_go_to_the_status_line(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Driver(engine)
    d.dash.apply(Result(("list", "servers"), error="state.db: database is locked"))
    assert d.screen()[-2] == "state.db: database is locked"
    assert "batch-worker-1" in d.text()  # stale beats absent

    def boom() -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(d.dash, "back", boom)
    d.keys("esc")
    assert d.screen()[-2] == "internal error (RuntimeError): kaboom"


def test_resize_keeps_everything_in_frame(engine: Engine) -> None:
    d = Driver(engine, (160, 50))
    wide = d.screen()
    fits(wide, (160, 50))
    assert "SYNC" in wide[2] and "IDENTITY" in wide[2] and "? unknown" in wide[3]
    d.keys("down", "enter")
    fits(d.screen(), (160, 50))
    d.size = (80, 24)
    narrow = d.screen()
    fits(narrow, (80, 24))
    assert narrow[0].startswith(" lab dash") and "q quit" in narrow[-1]
    d.size = (40, 12)
    fits(d.screen(), (40, 12))


def test_refresh_keeps_focus_and_skips_identical_data(engine: Engine) -> None:
    d = Driver(engine).keys("down", "down")
    shown = d.dash.shown
    d.dash.apply(Result(("list", "servers"), value=shown[1]))  # the worker's "unchanged"
    assert d.dash.shown is shown
    d.feed()  # equal data, new object: redrawn in place
    assert d.dash.shown[1] == shown[1] and d.dash.table.focused().key == "mail-1"
    engine.add_server("aaa-new", "aws", ["app"], "prod", "eu-west")
    d.feed()
    assert d.dash.table.focused().key == "mail-1" and "Servers [6]" in d.text()


def test_detail_refresh_keeps_both_columns_where_they_were(engine: Engine) -> None:
    d = Driver(engine).keys("down", "enter", "down", "down", "tab", "down", "down", "down")  # db-1
    left, right = (d.dash.detail._entry_key(i) for i in (0, 1))
    assert left == "l:eu-west" and right.startswith("a:") and right != d.dash.detail.entries[1][1].key
    engine.add_server("zzz-new", "aws", ["app"], "prod", "eu-west")
    d.feed()
    assert (d.dash.detail._entry_key(0), d.dash.detail._entry_key(1)) == (left, right) and d.dash.detail.pane == 1


def test_no_color_palette_has_no_colours() -> None:
    mono = app.palette(no_color=True)
    assert {(fg, bg) for _, fg, bg, _ in mono} == {("default", "default")}
    assert any("standout" in m for *_, m in mono)  # the focused row still shows
    assert len(app.palette(no_color=False)) == len(mono)


def test_ascii_terminals_get_ascii_symbols(engine: Engine) -> None:
    dash = app.Dash(refresh=60, unicode=False)
    dash.apply(Result(("list", "servers"), value=source.load(engine, ("list", "servers"), dash.symbols)))
    lines = [line.decode() for line in dash.root.render((80, 24), focus=True).text]
    assert all(line.isascii() for line in lines)
