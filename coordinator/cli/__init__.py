"""The `lab` command line."""

from __future__ import annotations


def main() -> None:
    import sys

    # Hot path: `lab secret get PATH` / `lab secret exec -- CMD` talk to the local agent socket
    # without importing typer or the engine (scripts and cron jobs call them a lot).
    argv = sys.argv[1:]
    if len(argv) >= 2 and argv[0] == "secret" and argv[1] in ("get", "exec"):
        from lab.agent.localclient import fast_main

        code = fast_main(argv[1:])
        if code is not None:
            sys.exit(code)

    import os

    # Plain click-style usage errors (one block, no boxes) and no `rich` import on every call.
    os.environ.setdefault("TYPER_USE_RICH", "0")
    from lab.coordinator.cli.app import run

    run()
