"""`lab secret ...`: set, remove, audit, back up and recover secrets (local mode: a store in-process).

In local mode the store lives in ``$LAB_HOME/store`` (dataset key wrapped by
``$LAB_HOME/store/machine.key``), node id ``local``. Values never come from the command line: a
hidden prompt on a terminal, standard input otherwise (taken byte for byte; use ``printf``, not
``echo``, to avoid a trailing newline).

Puppet modules for ``lab::secret`` scanning: ``--modules``, else ``$LAB_PUPPET_MODULES``, else
``<definitions>/modules`` when that directory exists.
"""

from __future__ import annotations

import getpass
import os
import pathlib
import sys
import time
from typing import Annotated, Any, TextIO

import typer

from lab.common.config import parse_duration
from lab.common.errors import NotFound, StoreError, UsageError
from lab.coordinator.cli.app import Definitions, Output, _engine, _format, app, subcommand
from lab.coordinator.cli.render import emit
from lab.coordinator.policy import audit as audit_policy
from lab.coordinator.policy import compile_policy
from lab.store import backup as backup_mod
from lab.store.dataset import Dataset
from lab.store.generators import generate
from lab.store.records import Meta, check_path, machine_path



secret_app = subcommand("secret", "Secrets: read them on this host, set and audit them in the store.")

LOCAL_NODE = "local"
Modules = Annotated[str | None, typer.Option("--modules", help="Puppet modules directory to scan for lab::secret calls.", show_default=False)]


def _store_dir(home: pathlib.Path) -> pathlib.Path:
    return home / "store"


def _open_store(home: pathlib.Path, *, create: bool) -> Dataset:
    d = _store_dir(home)
    if (d / "data.mdb").exists():
        return Dataset.open(d, LOCAL_NODE)
    if not create:
        raise NotFound(f"no local secret store in {d} (run `lab secret set` first, or `lab secret recover`)")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Dataset.create(d, LOCAL_NODE)


def _modules(flag: str | None, definitions: pathlib.Path) -> pathlib.Path | None:
    if flag:
        return pathlib.Path(flag)
    if os.environ.get("LAB_PUPPET_MODULES"):
        return pathlib.Path(os.environ["LAB_PUPPET_MODULES"])
    default = definitions / "modules"
    return default if default.is_dir() else None


def _read_value() -> bytes:
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("  Enter value: ")
        if getpass.getpass("  Again: ") != first:
            raise UsageError("the two values differ; nothing was set")
        value = first.encode()
    else:
        value = sys.stdin.buffer.read() if sys.stdin is not None else b""
    if not value:
        raise UsageError("empty value; nothing was set")
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


@secret_app.command("set")
def secret_set(
    path: str,
    type_: Annotated[str | None, typer.Option("--type", help="static or dynamic (default: the definition's, else static).")] = None,
    ttl: Annotated[str | None, typer.Option("--ttl", help="Cache TTL for agents, e.g. 1h.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="The per-machine value of this node.")] = None,
    definitions: Definitions = None,
    output: Output = "table",
) -> None:
    """Set a secret's value from a hidden prompt or standard input (never from the command line)."""
    fmt = _format(output)
    check_path(path)
    if path.startswith("_lab/") or "@" in path:
        raise UsageError("system and per-machine paths cannot be set directly (use --node NODE for per-machine values)")
    with _engine(definitions) as engine:
        d = engine.definitions
        defined = d.secrets.get(path)
        if defined is not None and defined.per_machine and node is None:
            raise UsageError(f"{path} is per-machine: give --node NODE")
        consumers = engine.fleet().secret_consumers(path) if defined is not None else []
        value = _read_value()
        meta = _meta_for(defined, type_, parse_duration(ttl) if ttl else None)
        stored = machine_path(path, node) if node else path
        # [cluster] config.yaml `stores:` (a local cluster, docs/CLUSTER.md): write over the store RPC
        from lab.coordinator.cluster import configured_stores, remote_set

        stores = configured_stores(engine.paths.home)
        if stores:
            version = remote_set(engine.paths.home, stores, path, value, meta, node)
        else:
            with _open_store(engine.paths.home, create=True) as ds:
                version = str(ds.write(stored, value, meta, _now_ms()).version)
    result = {"path": path, "stored_as": stored, "version": version, "defined": defined is not None,
              "accessible_by": [{"label": label, "servers": len(names)} for label, names in consumers]}

    def human(r: dict[str, Any], out: TextIO) -> None:
        who = ", ".join(f"{a['label']} ({a['servers']} server{'s' if a['servers'] != 1 else ''})" for a in r["accessible_by"])
        out.write(f"  ✓ Updated. Accessible by: {who or 'nobody yet (no label or class references it)'}\n")
        if not r["defined"]:
            out.write(f"  ⚠ {r['path']} is not defined in the secrets definitions\n")

    emit(result, fmt, human)


def _meta_for(defined: Any, type_: str | None, ttl: int | None) -> Meta:
    return Meta(
        type=type_ or (defined.type if defined else "static"),
        set_by=getpass.getuser() or "admin",
        set_at=_now_ms(),
        rotate_every=defined.rotate_every if defined else None,
        ttl=ttl if ttl is not None else (defined.ttl if defined else None),
        owner=defined.owner if defined else "root",
        group=defined.group if defined else "root",
        mode=defined.mode if defined else 0o400,
    )


@secret_app.command("rotate")
def secret_rotate(
    path: str,
    generator: Annotated[str | None, typer.Option("--generator", help="random or password (default: the definition's).")] = None,
    length: Annotated[int | None, typer.Option("--length", help="Bytes (random) or characters (password).")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node's per-machine value.")] = None,
    definitions: Definitions = None,
) -> None:
    """Replace a generated secret with a fresh value (every node's, for a per-machine secret)."""
    with _engine(definitions) as engine:
        defined = engine.definitions.secrets.get(path)
        if defined is None:
            raise NotFound(f"no secret named '{path}'")
        gen = generator or defined.generator
        if gen is None:
            raise UsageError(f"{path} is static: set it with `lab secret set` (or give --generator)")
        if defined.per_machine:
            nodes = [node] if node else sorted({n for _, names in engine.fleet().secret_consumers(path) for n in names})
            targets = [machine_path(path, n) for n in nodes]
        else:
            targets = [path]
        values = [generate(gen, length) for _ in targets]  # refuse unknown generators before writing
        with _open_store(engine.paths.home, create=True) as ds:
            for stored, value in zip(targets, values):
                ds.write(stored, value, _meta_for(defined, "dynamic", None), _now_ms())
    print(f"  ✓ Rotated {len(targets)} value{'s' if len(targets) != 1 else ''} of {path} ({gen})")


@secret_app.command("rm")
def secret_rm(path: str, node: Annotated[str | None, typer.Option("--node", help="The per-machine value of this node.")] = None,
              definitions: Definitions = None) -> None:
    """Delete a secret's value (a tombstone that replicates to every store)."""
    stored = machine_path(path, node) if node else check_path(path)
    with _engine(definitions) as engine, _open_store(engine.paths.home, create=False) as ds:
        if ds.delete(stored, _now_ms()) is None:
            raise NotFound(f"secret {stored!r} has no value")
    print(f"  ✓ Removed {stored}")


@secret_app.command("audit")
def secret_audit(definitions: Definitions = None, modules: Modules = None, output: Output = "table") -> None:
    """Secrets defined but referenced by nothing, referenced but never set, and the like."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        compiled = compile_policy(engine.definitions, engine.state.list_servers(), _modules(modules, engine.paths.definitions))
        stored: dict[str, bool] = {}
        if (_store_dir(engine.paths.home) / "data.mdb").exists():
            with _open_store(engine.paths.home, create=False) as ds:
                stored = {r.path: True for r in ds.records()}
        findings = audit_policy(engine.definitions, compiled, stored)
    result = {"findings": [{"level": f.level, "kind": f.kind, "path": f.path, "message": f.message} for f in findings],
              "warnings": compiled.warnings}

    def human(r: dict[str, Any], out: TextIO) -> None:
        for f in r["findings"]:
            out.write(f"  {'✓' if f['level'] == 'ok' else '⚠'} {f['message']}\n")
        for w in r["warnings"]:
            out.write(f"  ⚠ {w}\n")

    emit(result, fmt, human)


@secret_app.command("backup")
def secret_backup(
    to: Annotated[str, typer.Option("--to", help="Git repository directory (created when missing).")],
    recipient: Annotated[list[str] | None, typer.Option("--recipient", help="age recipient (age1...); repeat for several.")] = None,
    push: Annotated[str | None, typer.Option("--push", help="Git remote (name, path or URL) to push to.")] = None,
    definitions: Definitions = None,
) -> None:
    """Write every secret, age-encrypted, into a Git repository, and commit."""
    if not recipient:
        raise UsageError("give at least one --recipient age1...")
    with _engine(definitions) as engine, _open_store(engine.paths.home, create=False) as ds:
        r = backup_mod.backup(ds, to, recipient, now=time.time(), remote=push)
    print(f"  ✓ {r.total} secrets in {r.directory} ({r.written} written, {r.removed} removed)"
          + (f", commit {r.commit[:12]}" if r.commit else ", nothing new to commit"))


@secret_app.command("recover")
def secret_recover(
    from_: Annotated[str, typer.Option("--from", help="The backup repository (a clone is fine).")],
    identity: Annotated[str, typer.Option("--identity", help="age identity file (0600).")],
    definitions: Definitions = None,
) -> None:
    """Restore the local store from a backup (refuses to overwrite an existing store)."""
    with _engine(definitions) as engine:
        d = _store_dir(engine.paths.home)
        if (d / "data.mdb").exists():
            raise StoreError(f"a store already exists in {d}; move it aside first")
        with backup_mod.recover(from_, identity, d, LOCAL_NODE) as ds:
            n = len(list(ds.records()))
    print(f"  ✓ Recovered {n} records into {d}")


def store_status(definitions: str | None = None) -> dict[str, Any]:
    """The local store's view for ``lab secret status --store`` (local mode: one replica).

    Not registered as a command here: ``lab secret status`` belongs to the agent commands
    (:mod:`lab.coordinator.cli.agent_secret_cmd`), whose ``--store`` should print this."""
    with _engine(definitions) as engine:
        d = _store_dir(engine.paths.home)
        if not (d / "data.mdb").exists():
            raise NotFound(f"no local secret store in {d}")
        with _open_store(engine.paths.home, create=False) as ds:
            live = sum(1 for r in ds.records() if not r.is_system)
            return {
                "store": str(d), "node": ds.node, "secrets": live, "tombstones": len(ds.tombstones()),
                "sequence": ds.seq, "root": ds.root().hex(), "acks": ds.acks(),
                "replicas": [{"name": ds.node, "state": "local", "secrets": live}],
            }


def render_store_status(r: dict[str, Any], out: TextIO) -> None:
    out.write("SECRET STORE:\n")
    out.write(f"  Replicas:        {len(r['replicas'])} (local mode)\n")
    for rep in r["replicas"]:
        out.write(f"    {rep['name']:<14} {rep['state']:<8} {rep['secrets']} secrets\n")
    out.write(f"  Tombstones:      {r['tombstones']}\n  Digest root:     {r['root'][:16]}…\n")
