"""`lab-agent` entry point. `lab-agent run` (what systemd starts, and what must answer from the
cache quickly after a restart) and `lab-agent facts [-o json|table] [--raw]` (benchmarked against
`facter -j`) go straight to their code without importing typer (which pulls in pydantic) or the
CLI's output helpers; every other command, and any argument these fast paths do not recognise,
goes through the typer app in agent/cli.py, so there is one source of usage messages."""

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


def _fast_facts(argv: list[str]) -> int | None:
    """`facts` with only `-o/--output json|table` and `--raw`: the same output as the typer
    command in agent/cli.py (json.dump indent=2 + newline, or the text summary). Anything else
    (yaml, help, a bad format) returns None for the full CLI."""
    fmt, raw = "table", False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--raw":
            raw = True
        elif arg in ("-o", "--output"):
            if i + 1 >= len(argv):
                return None
            fmt = argv[i + 1]
            i += 1
        elif arg.startswith("--output="):
            fmt = arg.partition("=")[2]
        else:
            return None
        i += 1
    if fmt not in ("table", "json"):
        return None
    import json

    from lab.agent.facts import collect_raw, parse_facts, render_text, suggest_labels

    data = collect_raw()
    if raw:
        json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    parsed = parse_facts(data)
    suggestions = suggest_labels(parsed)
    if fmt == "json":
        result = {"facts": parsed.to_dict(), "suggestions": [s.to_dict() for s in suggestions]}
        json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        render_text(parsed, suggestions, sys.stdout)
    return 0


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["run"]:
        code = _fast_run(argv[1:])
        if code is not None:
            sys.exit(code)
    if argv[:1] == ["facts"]:
        code = _fast_facts(argv[1:])
        if code is not None:
            sys.exit(code)
    from lab.agent.cli import run

    run()
