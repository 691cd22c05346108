"""The `lab-agent` command line."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, TextIO

os.environ.setdefault("TYPER_USE_RICH", "0")  # plain usage errors; must precede `import typer`

import typer  # noqa: E402

from lab.common.errors import LabError  # noqa: E402

# Output helpers are shared with `lab` (they decide nothing about content).
from lab.coordinator.cli.render import FORMATS, emit  # noqa: E402

app = typer.Typer(
    name="lab-agent",
    rich_markup_mode=None,
    help="The agent every lab host runs: hardware facts, enrollment, secrets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Output = Annotated[str, typer.Option("--output", "-o", help="table, json or yaml.")]


@app.callback()
def _root() -> None:
    """The agent every lab host runs: hardware facts, enrollment, secrets."""


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"'{fmt}' is not one of: {', '.join(FORMATS)}", param_hint="--output")
    return fmt


@app.command()
def facts(
    output: Output = "table",
    raw: Annotated[bool, typer.Option("--raw", help="The unparsed data from every source (for test fixtures).")] = False,
) -> None:
    """Detect this host's hardware and suggest labels for it."""
    from lab.agent.facts import collect_raw, parse_facts, render_text, suggest_labels

    fmt = _format(output)
    data = collect_raw()
    if raw:
        emit(data, "yaml" if fmt == "yaml" else "json", lambda d, out: None)
        return
    parsed = parse_facts(data)
    suggestions = suggest_labels(parsed)
    result: dict[str, Any] = {"facts": parsed.to_dict(), "suggestions": [s.to_dict() for s in suggestions]}

    def human(_: Any, out: TextIO) -> None:
        render_text(parsed, suggestions, out)

    emit(result, fmt, human)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; a LabError becomes one line on stderr and a non-zero status.
    With ``argv`` given (tests), the status is returned instead of exiting."""
    try:
        app(args=argv, prog_name="lab-agent")
        code: int = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LabError as exc:
        print(f"lab-agent: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("lab-agent: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `lab-agent facts | head`
        code = 0
    if argv is None:
        sys.exit(code)
    return code


def main() -> None:
    run()
