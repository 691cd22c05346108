"""`lab dash` end to end: a real terminal (tmux), 50 servers, keys in, screen captured.

Skips only when tmux is missing *and* CI is unset; on CI a missing tmux is a failure.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from lab.coordinator.engine import Engine, Paths
from lab.coordinator.state import StateDB

TMUX = shutil.which("tmux")
if TMUX is None and not os.environ.get("CI"):
    pytest.skip("tmux is not installed (apt-get install tmux); required when CI is set", allow_module_level=True)

WAIT = 15.0  # seconds a screen may take to appear on a loaded machine


def lab_binary() -> str:
    here = pathlib.Path(sys.executable).with_name("lab")
    return str(here) if here.exists() else (shutil.which("lab") or "lab")


@pytest.fixture()
def home(tmp_path: pathlib.Path) -> pathlib.Path:
    home = tmp_path / "home"
    Engine.init_local(Paths(home, home / "definitions", "default"))
    rnd = random.Random(5)
    combos = [["k8s-worker", "production", "eu-west"], ["postgres", "production"], ["app", "eu-west"], ["k8s-worker"], ["app"]]
    servers = [
        {"name": f"srv-{i:02d}", "provider": rnd.choice(["aws", "xcpng", "baremetal", "ssh"]), "labels": combos[i % len(combos)],
         "environment": rnd.choice(["prod", "dev", "staging"]), "region": rnd.choice(["eu-west", "us-east"])}
        for i in range(48)
    ]
    servers += [
        {"name": "mail-1", "provider": "xcpng", "labels": ["mailserver"], "environment": "prod", "region": "eu-west"},
        {"name": "mail-2", "provider": "aws", "labels": ["mailserver"], "environment": "prod", "region": "us-east"},
    ]
    with StateDB.open(home) as state:
        assert state.add_servers_bulk(servers) == 50
    return home


class Tmux:
    """One private tmux server (its own socket, no user config) running one session."""

    def __init__(self, socket: pathlib.Path, session: str) -> None:
        self.socket = socket
        self.session = session

    def run(self, *args: str) -> str:
        assert TMUX is not None, "tmux is required when CI is set (apt-get install tmux)"
        out = subprocess.run([TMUX, "-S", str(self.socket), *args], check=True, capture_output=True, text=True, timeout=10)
        return out.stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", self.session, *(["-l"] if literal else []), *keys)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def screen(self, escapes: bool = False) -> list[str]:
        return self.run("capture-pane", "-p", *(["-e"] if escapes else []), "-t", self.session).split("\n")[:-1]

    def wait(self, what: str | Callable[[list[str]], bool], timeout: float = WAIT) -> list[str]:
        test = (lambda lines: what in "\n".join(lines)) if isinstance(what, str) else what
        deadline = time.monotonic() + timeout
        lines = self.screen()
        while not test(lines):
            if time.monotonic() > deadline:
                pytest.fail(f"waited {timeout}s for {what!r}; the screen shows:\n" + "\n".join(lines))
            time.sleep(0.05)
            lines = self.screen()
        return lines


@pytest.fixture()
def tmux(home: pathlib.Path) -> Iterator[Tmux]:
    sockets = pathlib.Path(tempfile.mkdtemp(prefix="labtmux-"))  # short: socket paths are limited to ~100 bytes
    t = Tmux(sockets / "s", "dash")
    env = f"env LAB_HOME={home} LANG=C.UTF-8 LC_ALL=C.UTF-8 NO_COLOR=1 TERM=screen-256color"
    command = f"{env} {lab_binary()} dash --refresh 0.5; echo LAB-EXIT=$?; sleep 60"
    t.run("-f", "/dev/null", "new-session", "-d", "-s", t.session, "-x", "80", "-y", "24", command)
    try:
        yield t
    finally:
        subprocess.run([TMUX or "tmux", "-S", str(t.socket), "kill-session", "-t", t.session], capture_output=True, timeout=10)
        subprocess.run([TMUX or "tmux", "-S", str(t.socket), "kill-server"], capture_output=True, timeout=10)
        shutil.rmtree(sockets, ignore_errors=True)


def framed(width: int, height: int, also: str = "") -> Callable[[list[str]], bool]:
    """The screen has been redrawn at this size: header on top, key hints at the bottom."""
    return lambda lines: len(lines) == height and lines[0].startswith(" lab dash") and "q quit" in lines[-1] and also in "\n".join(lines)


def assert_fits(lines: list[str], width: int, height: int) -> None:
    assert len(lines) == height, lines
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long
    assert lines[0].startswith(" lab dash │") and "[?]Help" in lines[0], lines[0]  # header
    assert "? help" in lines[-1] and "q quit" in lines[-1], lines[-1]  # footer


_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def colour_codes(lines: list[str]) -> set[int]:
    codes = set()
    for line in lines:
        for params in _SGR.findall(line):
            for p in params.split(";"):
                if p and (30 <= int(p) <= 48 or 90 <= int(p) <= 107) and int(p) != 39:  # 39/49: default colours
                    codes.add(int(p))
    return codes


@pytest.mark.slow
def test_dash_in_a_real_terminal(tmux: Tmux) -> None:
    screen = tmux.wait("Servers [50]")
    assert_fits(screen, 80, 24)
    assert screen[2].split()[:4] == ["NAME", "PROVIDER", "ENV", "LABELS"]
    assert "mail-1" in "\n".join(screen)

    # filter: `/` narrows the list as you type
    tmux.keys("/")
    tmux.type("mail")
    tmux.keys("Enter")
    screen = tmux.wait("Servers [2/50]")
    rows = [line for line in screen[3:] if line.startswith(("mail-", "srv-"))]
    assert [r.split()[0] for r in rows] == ["mail-1", "mail-2"]

    # drill-down: Enter opens the focused server
    tmux.keys("Enter")
    screen = tmux.wait("Server: mail-1")
    text = "\n".join(screen)
    assert "Servers > mail-1" in screen[0]
    assert "Labels (1)" in text and "► mailserver" in text and "Alerts (" in text and "Secrets (3)" in text

    # cross-link: server → label → another server carrying it
    tmux.keys("l", "Enter")
    screen = tmux.wait("Label: mailserver")
    assert "Applied to: 2 servers" in "\n".join(screen)
    tmux.keys("Down", "Enter")
    screen = tmux.wait("Server: mail-2")
    assert "mail-1 > mailserver > mail-2" in screen[0]

    # Esc walks back through the history, then clears the filter
    tmux.keys("Escape")
    tmux.wait("Label: mailserver")
    tmux.keys("Escape")
    tmux.wait("Server: mail-1")
    tmux.keys("Escape")
    tmux.wait("Servers [2/50]")
    tmux.keys("Escape")
    tmux.wait("Servers [50]")

    # `:labels` jumps like k9s
    tmux.keys(":")
    tmux.type("labels")
    tmux.keys("Enter")
    screen = tmux.wait("Labels [10]")
    assert screen[0].startswith(" lab dash │ Labels")
    assert any(line.startswith("mailserver") for line in screen)

    # wide and back: the layout follows the window
    tmux.run("resize-window", "-t", tmux.session, "-x", "160", "-y", "50")
    screen = tmux.wait(framed(160, 50, "PUPPET CLASSES"))
    assert_fits(screen, 160, 50)
    tmux.keys(":")
    tmux.type("servers")
    tmux.keys("Enter")
    screen = tmux.wait(framed(160, 50, "IDENTITY"))
    assert_fits(screen, 160, 50)
    assert "? unknown" in "\n".join(screen)  # pillars in words when there is room
    tmux.run("resize-window", "-t", tmux.session, "-x", "80", "-y", "24")
    screen = tmux.wait(framed(80, 24, "Servers [50]"))
    assert_fits(screen, 80, 24)

    # an action asks first, then streams what the lifecycle says into the log pane
    tmux.keys("S")
    tmux.wait("Run sync on")
    tmux.keys("y")
    screen = tmux.wait(": done")
    assert_fits(screen, 80, 24)
    # apply without a stored plan, and renew without a daemon: one line each, no traceback
    tmux.keys("A")
    tmux.wait("applies the plan stored by")
    tmux.keys("y")
    assert_fits(tmux.wait("apply failed: no plan for"), 80, 24)
    tmux.keys("R")
    tmux.wait("Run identity renew on")
    tmux.keys("y")
    screen = tmux.wait("identity renew failed: identity renew needs the coordinator daemon")
    assert_fits(screen, 80, 24)
    assert "Traceback" not in "\n".join(screen)

    # NO_COLOR: attributes only, no colours
    assert not colour_codes(tmux.screen(escapes=True))

    # q quits cleanly: no traceback, exit status 0
    tmux.keys("q")
    screen = tmux.wait("LAB-EXIT=")
    text = "\n".join(screen)
    assert "LAB-EXIT=0" in text and "Traceback" not in text
