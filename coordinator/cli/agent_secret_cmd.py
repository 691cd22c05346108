"""`lab secret get|exec|cache|status`: this host's agent, over its local socket.

``get`` and ``exec`` normally never reach typer: :func:`lab.coordinator.cli.main` answers them on a
fast path (:mod:`lab.agent.localclient`). They are registered here too so that ``--help`` works
and ``lab secret --help`` lists them. ``cache`` and ``status`` show what the agent knows.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any, TextIO

import typer

from lab.agent import localclient
from lab.common.errors import AuthError, LabError
from lab.coordinator.cli import app as base
from lab.common.render import FAIL, OK, WARN, emit, table

app = base.app

secret_app = base.subcommand("secret", "Secrets: read them on this host, set and audit them in the store.")


def _call(message: dict[str, Any]) -> dict[str, Any]:
    try:
        return localclient.call(message)
    except localclient.AgentError as exc:
        err: LabError = AuthError(str(exc)) if exc.code == "not_entitled" else LabError(str(exc))
        err.exit_code = exc.exit_code
        raise err from None


@secret_app.command("get")
def secret_get(path: Annotated[str, typer.Argument(help="Secret path, e.g. db/main-password.")]) -> None:
    """Print a secret this host caches (as stored: no newline added). Root, or the declared owner/group."""
    code = localclient.fast_main(["get", path])
    raise typer.Exit(code or 0)


@secret_app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def secret_exec(ctx: typer.Context) -> None:
    """Run `-- CMD ARGS` with LAB_SECRET_<PATH> variables for every secret the caller may read."""
    code = localclient.fast_main(["exec", *ctx.args])
    raise typer.Exit(code or 0)


def _left(seconds: float) -> str:
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} left"
    return f"{int(seconds)}s left"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def cache_rows(entries: list[dict[str, Any]], now: float) -> list[list[str]]:
    rows = []
    for e in entries:
        exp = e.get("expires_at")
        ttl = "no expiry" if exp is None else _left(exp - now)
        cached = OK if e.get("status") != "corrupt" else FAIL
        rows.append([e["path"], cached, ttl, e.get("status", "?")])
    return rows


@secret_app.command("cache")
def secret_cache(output: base.Output = "table") -> None:
    """What this host's agent holds in its local cache (no values)."""
    fmt = base._format(output)
    entries = _call({"t": "agent.list"})["entries"]
    now = time.time()

    def human(es: list[dict[str, Any]], out: TextIO) -> None:
        out.write("LOCAL CACHE:\n")
        if not es:
            out.write("  (empty)\n")
            return
        table(["SECRET", "CACHED", "TTL", "STATUS"], cache_rows(es, now), out)

    emit(entries, fmt, human)


def status_lines(s: dict[str, Any], now: float) -> list[tuple[str, str]]:
    n = s.get("cached", 0)
    by = s.get("by_status", {})
    sync = s.get("sync") or {}
    entitled = s.get("entitled", sync.get("entitled"))
    of = f" (of {entitled} entitled)" if isinstance(entitled, int) else ""
    prot = s.get("key_protection", "?")
    stale_after = s.get("stale_after") or 300
    if n == 0:
        cache = f"{WARN} empty — nothing cached yet, waiting for a store (key: {prot})"
    elif by.get("stale") or by.get("expired"):
        oldest = s.get("oldest_confirmed") or 0
        cache = (
            f"{WARN} {n} secrets cached{of}, encrypted (key: {prot}), "
            f"{by.get('stale', 0) + by.get('expired', 0)} stale (oldest confirmed {_ago(now - oldest)} ago), still served"
        )
    else:
        cache = f"{OK} {n} secrets cached{of}, encrypted (key: {prot}), fresh (< {_ago(stale_after)} old)"
    running = sync.get("running", False)
    stores = sync.get("stores") or {}
    if not running:
        store = f"{FAIL} not connected (sync not running)"
    elif any(v == "connected" for v in stores.values()):
        up = sorted(k for k, v in stores.items() if v == "connected")
        store = f"{OK} connected ({len(stores)} replicas: {', '.join(sorted(stores))}; via {up[0]})"
    else:
        store = f"{FAIL} not connected ({len(stores)} known, none reachable)"
    coord = sync.get("coordinator")
    if not running:
        server = f"{FAIL} not connected (sync not running)"
    elif coord == "connected":
        server = f"{OK} connected"
    else:
        server = f"{FAIL} {coord or 'not connected'}"
    return [("Local cache:", cache), ("Secret store:", store), ("Lab-server:", server)]


@secret_app.command("status")
def secret_status(
    output: base.Output = "table",
    store: Annotated[bool, typer.Option("--store", help="The secret store instead: replicas, sync state, counts, consumers.")] = False,
    definitions: base.Definitions = None,
) -> None:
    """Secret distribution as this host's agent sees it: local cache, store and server connections."""
    fmt = base._format(output)
    if store:  # [secret-store] the stores' view: coordinator/cli/secret_cmd.py (every configured replica)
        from lab.coordinator.cli.secret_cmd import render_store_status, store_status

        emit(store_status(definitions), fmt, render_store_status)
        return
    st = _call({"t": "agent.status"})["status"]
    now = time.time()

    def human(s: dict[str, Any], out: TextIO) -> None:
        out.write("SECRET DISTRIBUTION STATUS:\n")
        for label, text in status_lines(s, now):
            out.write(f"  {label:<17}{text}\n")
        if s.get("secrets_fs") not in (None, "tmpfs", "ramfs"):
            out.write(f"  {'Files:':<17}{WARN} {s.get('secrets_dir')} is on {s.get('secrets_fs')}, not tmpfs\n")

    emit(st, fmt, human)
    sys.stdout.flush()
