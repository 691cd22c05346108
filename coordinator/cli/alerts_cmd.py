"""`lab render alerts` and `lab diff alerts`. Registers on the ``app`` of
:mod:`lab.coordinator.cli.app` when imported there. (Health and current values appear in
`lab show server` / `lab show alert` through the engine's data and cli/views.py.)"""

from __future__ import annotations

from typing import Annotated, Any, TextIO

import typer

from lab.coordinator.cli import app as base
from lab.common.render import emit

app = base.app

render_app = base.subcommand("render", "Render definitions into other tools' formats.")
diff_app = base.subcommand("diff", "What would change, as +/- lines.")
OutDir = Annotated[str, typer.Option("--out", help="Output directory (rules/, targets/, naemon/).")]


@render_app.command("alerts")
def render_alerts(out: OutDir, definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """Prometheus rule files per environment, file_sd targets and Naemon objects."""
    fmt = base._format(output)
    with base._engine(definitions) as engine:
        result = engine.render_alerts(out)

    def human(r: dict[str, Any], o: TextIO) -> None:
        changed = [f for f in r["files"] if f["status"] != "unchanged"]
        o.write(f"✓ {r['rules']} rules rendered into {r['out']} ({len(changed)} of {len(r['files'])} files changed)\n")
        for f in changed:
            o.write(f"  {'-' if f['status'] == 'removed' else '+'} {f['path']} ({f['status']})\n")
        for s in r["skipped"]:
            o.write(f"⚠ {s['alert']} not rendered: {s['reason']}\n")

    emit(result, fmt, human)


@diff_app.command("alerts")
def diff_alerts(out: OutDir, definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """What `lab render alerts --out DIR` would change there."""
    fmt = base._format(output)
    with base._engine(definitions) as engine:
        result = engine.diff_alerts(out)

    def human(r: dict[str, Any], o: TextIO) -> None:
        if not r["changes"]:
            o.write(f"No changes in {r['out']}.\n")
            return
        for c in r["changes"]:
            o.write(f"{c['status']}: {c['path']}\n")
            for line in c["lines"]:
                o.write(f"  {line}\n")

    emit(result, fmt, human)
