"""`lab dash`: the k9s-style terminal dashboard (urwid).

``models`` computes what each screen shows from Engine data (pure), ``nav`` is the navigation
state machine, ``source`` fetches data on worker threads, ``widgets`` draws, ``app`` wires it up.
Only ``app`` and ``widgets`` import urwid.
"""

from __future__ import annotations

__all__ = ["run_dash"]


def run_dash(*args, **kwargs):  # noqa: ANN002, ANN003 — thin lazy re-export; see app.run_dash
    from lab.coordinator.tui.app import run_dash as _run

    return _run(*args, **kwargs)
