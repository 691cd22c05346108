"""`lab dash`: the k9s-style dashboard, registered on the `lab` app when imported."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from lab.common.errors import LabError, UsageError
from lab.coordinator.cli.app import Definitions, app
from lab.coordinator.engine import Paths

DEFAULT_REFRESH = 2.0


@app.command("dash")
def dash(
    definitions: Definitions = None,
    refresh: Annotated[float, typer.Option("--refresh", help="Seconds between live refreshes.", min=0.2, max=3600)] = DEFAULT_REFRESH,
) -> None:
    """Live dashboard: servers with their four pillars, drill-down and cross-links (k9s-style)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("lab dash needs a terminal (for scripts use `lab get …` and `lab show …`)")
    try:
        from lab.coordinator.tui.app import run_dash
        from lab.coordinator.tui.source import engine_opener
    except ImportError as exc:
        raise LabError(f"lab dash needs the urwid package: {exc}") from exc
    paths = Paths.resolve(definitions)
    opener = engine_opener(paths)  # the daemon's engine in a connected home, else this home's
    opener().close()  # fail here, in one line, when the engine cannot be opened at all
    try:
        run_dash(opener, refresh=refresh)
    except LabError:
        raise
    except Exception as exc:  # noqa: BLE001 — a traceback means a bug, but never on the screen
        raise LabError(f"dash stopped: {type(exc).__name__}: {exc}") from exc
