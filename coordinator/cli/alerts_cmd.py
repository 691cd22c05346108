"""`lab render alerts`, `lab diff alerts`, and health in `lab show server` / `lab show alert`.

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. ``show server``
and ``show alert`` are re-registered here with the same options and JSON, and a human view that
adds the health section and the current values.
"""

from __future__ import annotations

from typing import Annotated, Any, TextIO

import typer

from lab.coordinator.cli import app as base
from lab.coordinator.cli.render import aligned, emit, tree

app = base.app


def _sub(name: str, help_text: str) -> typer.Typer:
    """The sub-app ``lab NAME``, shared with any other module that registers under it."""
    for group in app.registered_groups:
        if group.name == name and group.typer_instance is not None:
            return group.typer_instance
    sub = typer.Typer(rich_markup_mode=None, help=help_text, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


def _replace(sub: typer.Typer, name: str) -> None:
    sub.registered_commands = [c for c in sub.registered_commands if c.name != name]


render_app = _sub("render", "Render definitions into other tools' formats.")
diff_app = _sub("diff", "What would change, as +/- lines.")
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


# -- health in show server / show alert ----------------------------------------------------------

_MARK = {"ok": "✓", "alerts": "⚠", "unknown": "?"}


def _human_health(h: dict[str, Any], o: TextIO) -> None:
    o.write("\nHealth:\n")
    if not h["sources"]:
        o.write(f"  {h.get('detail') or 'unknown'}\n")
        return
    for s in h["sources"]:
        o.write(f"  {s['source'].capitalize() + ':':<14}{_MARK.get(s['status'], '?')} {s['detail'] or s['status']}\n")
    o.write(f"  {'Alerts:':<14}{', '.join(h['alerts']) if h['alerts'] else 'none active'}\n")


_replace(base.show_app, "server")


@base.show_app.command("server")
def show_server(name: str, definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """What a server gets, and from where, and how it is doing."""
    fmt = base._format(output)
    with base._engine(definitions) as engine:
        view = engine.show_server(name)

    def human(v: dict[str, Any], o: TextIO) -> None:
        base._human_server(v, o)
        if "health" in v:
            _human_health(v["health"], o)

    emit(view, fmt, human)


def _value(v: float | None, condition: str) -> str:
    if v is None:
        return "no data"
    if "_percent" in condition.split(" ", 1)[0]:
        return f"{v:.0f}%"
    return f"{v:.4g}"


_STATUS = {"ok": "✓", "approaching": "⚠ approaching", "over": "✗ over", "no data": "? no data"}


def _current(s: dict[str, Any], conditions: list[str]) -> str:
    if "status" not in s or s["status"] in ("unknown", "not rendered"):
        return "" if s.get("status") != "not rendered" else "not rendered"
    if s["status"].startswith("unknown"):
        return f"? {s['status']}"
    cond = conditions[0] if conditions else ""
    return f"currently: {_value(s['current'], cond)}  {_STATUS.get(s['status'], s['status'])}"


_replace(base.show_app, "alert")


@base.show_app.command("alert")
def show_alert(name: str, definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """Where an alert applies, its current value on each server, and where it is rendered."""
    fmt = base._format(output)
    with base._engine(definitions) as engine:
        view = engine.show_alert(name)

    def human(v: dict[str, Any], o: TextIO) -> None:
        o.write(f"Alert: {v['name']}\n")
        if v["kind"] == "defined":
            o.write(f"Severity: {v['severity']}\nCondition: {v['condition']}\n")
            if v["for"]:
                o.write(f"For: {v['for']}\n")
            o.write(f"Target: {v['target']}\nExcludes: {', '.join(v['excludes']) or 'none'}\n")
        else:
            o.write(f"Kind: {v['kind']}\n")
        if v["labels"]:
            o.write(f"Named by labels: {', '.join(v['labels'])}\n")
        rendered = v.get("rendered_to", {})
        conditions = rendered.get("conditions", [])
        n = len(v["servers"])
        o.write(f"\nApplies to {n} server{'s' if n != 1 else ''}:\n")
        rows = []
        for s in v["servers"]:
            note = "" if s["source"] == "target" else f"via {s['source']}"
            rows.append((f"{s['name']} ({s['provider']})", "  ".join(x for x in (_current(s, conditions), note) if x)))
        aligned(rows, o)
        if v.get("health_source"):
            o.write(f"⚠ values unknown: {v['health_source']}\n")
        if v["excluded"]:
            o.write("\nExcluded:\n")
            tree([f"{e['server']} ({e['reason']})" for e in v["excluded"]], o)
        if rendered:
            lines = [f"Prometheus: rule \"{v['name']}\" in {', '.join(rendered['prometheus'])}"] if rendered["prometheus"] else []
            hosts = len(rendered["naemon_hosts"])
            if hosts:
                lines.append(f"Naemon: service check on {hosts} bare-metal host{'s' if hosts != 1 else ''}")
            if lines:
                o.write("\nRendered to:\n")
                tree(lines, o)

    emit(view, fmt, human)
