"""`lab describe server NAME`: the four pillars of one server in detail (spec: "lab describe server").

Registered on ``app`` by one import line in app.py. The engine builds the data
(Engine.describe_server → coordinator/reports.py); :func:`describe_server_view` only prints it.
"""

from __future__ import annotations

from typing import Any, TextIO

import typer

from lab.coordinator.cli import views
from lab.coordinator.cli.app import Definitions, Output, _query, app
from lab.common.render import pillar, tree

describe_app = typer.Typer(rich_markup_mode=None, help="Describe one thing in detail: its status pillars.", no_args_is_help=True)
app.add_typer(describe_app, name="describe")

_RUN_WORD = {"ok": "success", "failed": "failed", "changed": "success, changes applied", "noop": "noop"}


def _when(iso: str | None) -> str:
    """'2026-03-15T14:22:03Z' → '2026-03-15 14:22:03 UTC'."""
    return iso.replace("T", " ").replace("Z", " UTC") if iso else "—"


def _ago(seconds: int | None) -> str:
    """' (38 seconds ago)', ' (5 minutes ago)', ' (3 hours ago)', ' (2 days ago)'."""
    if seconds is None:
        return ""
    if seconds < 120:
        return f" ({seconds} second{'s' if seconds != 1 else ''} ago)"
    n, unit = next((seconds // size, unit) for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)) if seconds >= 2 * size)
    return f" ({n} {unit}s ago)"


def describe_server_view(v: dict[str, Any], out: TextIO) -> None:
    out.write(f"{'Name:':<12}{v['name']}\n")
    out.write(f"{'Provider:':<12}{v['provider']}\n")
    out.write(f"{'Labels:':<12}[{', '.join(v['labels'])}]\n")
    size = v["size"]
    detail = f" ({size['detail']})" if size.get("detail") else ""
    out.write(f"{'Size:':<12}{size['name'] or '—'}{detail}\n")
    out.write(f"{'Status:':<12}{pillar(v['status']['sync'])}\n")

    p = v["puppet"]
    out.write("Puppet:\n")
    out.write(f"  {'Environment:':<14}{p['environment'] or '—'}\n")
    out.write(f"  {'Role:':<14}{', '.join(p['role']) or '—'}\n")
    out.write(f"  {'Classes:':<14}[{', '.join(p['classes'])}]\n")
    run = p["last_run"]
    if run is None:
        out.write(f"  {'Last run:':<14}— (no report from the agent yet)\n")
    else:
        word = _RUN_WORD.get(run["status"] or "", run["status"] or "?")
        stale = ", stale" if p["pillar"] == "stale" else ""
        out.write(f"  {'Last run:':<14}{_when(run['time'])} ({word}{stale})\n")
        if p["next_run"]:
            out.write(f"  {'Next run:':<14}{_when(p['next_run'])}\n")
    if p["failed_resources"]:
        out.write(f"  Failed resources ({len(p['failed_resources'])}):\n")
        lines = []
        for f in p["failed_resources"]:
            where = f" ({f['file']}:{f['line']})" if f.get("file") and f.get("line") is not None else ""
            lines.append(f"{f['resource']}{where}: {f['message']}")
        tree(lines, out, "    ")
    if p["errors"]:
        out.write("  Errors:\n")
        tree(p["errors"], out, "    ")

    views.health(v["health"], out)  # "\nHealth:\n  ..." — the same section as `lab show server`

    i = v["identity"]
    out.write("\nIdentity:\n")
    if i["dns"] is not None:
        addrs = ", ".join(i["dns"]["addresses"]) or "no address reported"
        out.write(f"  {'DNS:':<15}{i['dns']['name']} (A: {addrs})\n")
    elif i["addresses"]:
        out.write(f"  {'Addresses:':<15}{', '.join(i['addresses'])} (DNS not configured)\n")
    cert = i["certificate"]
    if cert is not None:
        expires = f", expires {cert['expires'][:10]}" if cert.get("expires") else ""
        out.write(f"  {'Certificate:':<15}✓ signed (serial {cert['serial']}{expires})\n")
    else:
        out.write(f"  {'Certificate:':<15}– none (not enrolled)\n")
    out.write(f"  {'Enrolled:':<15}{_when(i['enrolled_at']) if i['enrolled_at'] else '— (not enrolled)'}\n")
    checkin = _when(i["last_checkin"]) + _ago(i["last_checkin_seconds_ago"]) if i["last_checkin"] else "—"
    out.write(f"  {'Last Check-in:':<15}{checkin}\n")


@describe_app.command("server")
def describe_server(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """A server's sections: labels, size, sync status, Puppet, health, identity."""
    _query(definitions, output, lambda e: e.describe_server(name), describe_server_view)
