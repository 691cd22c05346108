"""`lab-agent` entry point. `lab-agent run` (what systemd starts, and what must answer from the
cache quickly after a restart) goes straight to the daemon without importing typer or the CLI's
output helpers; every other command goes through the typer app in agent/cli.py."""

from __future__ import annotations

import sys

_RUN_FLAGS = ("--home", "--runtime-dir", "--secrets-dir", "--key-protection")


def _fast_run(argv: list[str]) -> int | None:
    """Parse `run [--flag VALUE | --flag=VALUE]...`; None means "let the full CLI handle it"
    (help, unknown or malformed flags), so there is one source of usage messages."""
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag not in _RUN_FLAGS:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        values[flag] = value
        i += 1
    if values.get("--key-protection", "auto") not in ("auto", "tpm", "file"):
        return None
    from lab.agent.daemon import AgentConfig, main
    from lab.common.errors import LabError

    try:
        config = AgentConfig.resolve(
            values.get("--home"),
            values.get("--runtime-dir"),
            values.get("--secrets-dir"),
            key_protection=values.get("--key-protection", "auto"),
        )
        main(config)
    except LabError as exc:
        print(f"lab-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        code = _fast_run(argv[1:])
        if code is not None:
            sys.exit(code)
    from lab.agent.cli import run

    run()
