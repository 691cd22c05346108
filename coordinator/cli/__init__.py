"""The `lab` command line."""

from __future__ import annotations


def main() -> None:
    import os

    # Plain click-style usage errors (one block, no boxes) and no `rich` import on every call.
    os.environ.setdefault("TYPER_USE_RICH", "0")
    from lab.coordinator.cli.app import run

    run()
