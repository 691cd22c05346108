"""`lab secret ...`: set, remove, audit, back up and recover secrets (local mode: a store in-process).

In local mode the store lives in ``$LAB_HOME/store`` (dataset key wrapped by
``$LAB_HOME/store/machine.key``), node id ``local``. Values never come from the command line: a
hidden prompt on a terminal, standard input otherwise (taken byte for byte; use ``printf``, not
``echo``, to avoid a trailing newline).

Puppet modules for ``lab::secret`` scanning: ``--modules``, else ``$LAB_PUPPET_MODULES``, else
``<definitions>/modules`` when that directory exists.

In a connected home (`lab server connect`, or a laptop after `lab server migrate`) the engine is a
:class:`~lab.coordinator.client.RemoteEngine`: definitions, consumers, the audit and the store list
come from the daemon's admin-only ``secrets.*`` methods (coordinator/secrets_api.py), and values go
straight to a store over Noise with this home's admin identity, as with config.yaml ``stores:``.
"""

from __future__ import annotations

import getpass
import os
import pathlib
import sys
import time
from typing import Annotated, Any, Final, TextIO

import typer

from lab.common.config import parse_duration
from lab.common.errors import LabError, NotFound, StoreError, UsageError
from lab.coordinator.cli.app import Definitions, Output, _engine, _format, app, subcommand
from lab.common.render import emit
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


def _cluster_stores(home: pathlib.Path) -> list[str]:
    """config.yaml ``stores:`` (a cluster, docs/CLUSTER.md); empty: local mode."""
    from lab.coordinator.cluster import configured_stores

    return configured_stores(home)


# ---------------------------------------------------------------------------------------------
# A connected home: what the local engine would answer comes from the daemon (`secrets.*`)


def _remote(engine: Any) -> bool:
    """True for a RemoteEngine (config.yaml ``server:``)."""
    from lab.coordinator.engine import Engine

    if isinstance(engine, Engine):
        return False  # local mode need not import the RPC client
    from lab.coordinator.client import RemoteEngine

    return isinstance(engine, RemoteEngine)


def merge_stores(configured: list[str], daemon: Any) -> list[str]:
    """This home's ``stores:`` first, then those the daemon knows (its ``stores:`` and the
    enrolled secret-store nodes), each once."""
    if not isinstance(daemon, list) or not all(isinstance(s, str) for s in daemon):
        from lab.common.errors import RemoteProtocolError

        raise RemoteProtocolError("malformed store list from the coordinator")
    return list(dict.fromkeys([*configured, *daemon]))


def _secrets_call(engine: Any, name: str, body: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``secrets.NAME`` on the daemon: (its result, the stores to use)."""
    result = engine.call_method(f"secrets.{name}", body or {})
    if not isinstance(result, dict):
        from lab.common.errors import RemoteProtocolError

        raise RemoteProtocolError(f"malformed secrets.{name} reply from the coordinator")
    return result, merge_stores(_cluster_stores(engine.paths.home), result.get("stores"))


def _need_stores(engine: Any, stores: list[str]) -> list[str]:
    """A connected home has no store of its own: no store known is an error, not local mode."""
    if not stores:
        raise StoreError(f"the coordinator at {engine.host}:{engine.port} knows no secret store (no enrolled "
                         "secret-store node, no config.yaml `stores:`); nothing was done")
    return stores


def _stores_for(engine: Any) -> list[str]:
    """Where `lab secret rm|backup|recover` go: config.yaml ``stores:`` (empty: the local store);
    in a connected home, those and the daemon's (never empty)."""
    if not _remote(engine):
        return _cluster_stores(engine.paths.home)
    return _need_stores(engine, _secrets_call(engine, "stores")[1])


def _definition(engine: Any, path: str) -> tuple[Any, list[tuple[str, list[str]]], list[str]]:
    """(the definition of ``path`` or None, [(label, its servers)] granting it, the stores)."""
    if _remote(engine):
        from lab.common.errors import RemoteProtocolError
        from lab.coordinator.secrets_api import secret_from_wire

        r, stores = _secrets_call(engine, "definition", {"path": path})
        raw = r.get("definition")
        defined = secret_from_wire(raw) if raw is not None else None
        consumers = r.get("consumers")
        if not isinstance(consumers, list) or not all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list) for c in consumers):
            raise RemoteProtocolError("malformed consumers from the coordinator")
        return defined, [(label, [str(n) for n in names]) for label, names in consumers], _need_stores(engine, stores)
    defined = engine.definitions.secrets.get(path)
    consumers = engine.fleet().secret_consumers(path) if defined is not None else []
    return defined, consumers, _cluster_stores(engine.paths.home)


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
        defined, consumers, stores = _definition(engine, path)  # a connected home: the daemon's
        if defined is not None and defined.per_machine and node is None:
            raise UsageError(f"{path} is per-machine: give --node NODE")
        value = _read_value()
        meta = _meta_for(defined, type_, parse_duration(ttl) if ttl else None)
        stored = machine_path(path, node) if node else path
        # [cluster] config.yaml `stores:` (a local cluster, docs/CLUSTER.md) or a connected home:
        # write over the store RPC (the value travels only inside the Noise session to the store)
        from lab.coordinator.cluster import remote_set

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
        defined, consumers, stores = _definition(engine, path)  # a connected home: the daemon's
        if defined is None:
            raise NotFound(f"no secret named '{path}'")
        gen = generator or defined.generator
        if gen is None:
            raise UsageError(f"{path} is static: set it with `lab secret set` (or give --generator)")
        if defined.per_machine:
            nodes = [node] if node else sorted({n for _, names in consumers for n in names})
            targets = [machine_path(path, n) for n in nodes]
        else:
            targets = [path]
        values = [generate(gen, length) for _ in targets]  # refuse unknown generators before writing
        if stores:  # [cluster] to the cluster's stores, as `secret set` does
            from lab.coordinator.cluster import remote_set

            for stored, value in zip(targets, values):
                logical, _, for_node = stored.partition("@")
                remote_set(engine.paths.home, stores, logical, value, _meta_for(defined, "dynamic", None), for_node or None)
        else:
            with _open_store(engine.paths.home, create=True) as ds:
                for stored, value in zip(targets, values):
                    ds.write(stored, value, _meta_for(defined, "dynamic", None), _now_ms())
    print(f"  ✓ Rotated {len(targets)} value{'s' if len(targets) != 1 else ''} of {path} ({gen})")


@secret_app.command("rm")
def secret_rm(path: str, node: Annotated[str | None, typer.Option("--node", help="The per-machine value of this node.")] = None,
              definitions: Definitions = None) -> None:
    """Delete a secret's value (a tombstone that replicates to every store)."""
    stored = machine_path(path, node) if node else check_path(path)
    with _engine(definitions) as engine:
        stores = _stores_for(engine)
        if stores:  # [cluster] a tombstone written at the first reachable store; gossip carries it
            from lab.coordinator.cluster import store_call

            _ep, reply = store_call(engine.paths.home, stores, "store.delete", {"path": stored})[0]
            if isinstance(reply, Exception):
                raise reply
            if not reply.get("deleted"):
                raise NotFound(f"secret {stored!r} has no value")
        else:
            with _open_store(engine.paths.home, create=False) as ds:
                if ds.delete(stored, _now_ms()) is None:
                    raise NotFound(f"secret {stored!r} has no value")
    print(f"  ✓ Removed {stored}")


@secret_app.command("audit")
def secret_audit(definitions: Definitions = None, modules: Modules = None, output: Output = "table") -> None:
    """Secrets defined but referenced by nothing, referenced but never set, and the like."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        stored: dict[str, bool] = {}
        if _remote(engine):  # a connected home: store.meta read here, the definitions' side from the daemon
            if modules:
                raise UsageError("--modules names a directory here, but a connected home audits with the coordinator's "
                                 "Puppet modules ($LAB_PUPPET_MODULES or <definitions>/modules there)")
            stores = _stores_for(engine)
            stored = dict.fromkeys(_remote_meta(engine.paths.home, stores), True)
            r, _stores = _secrets_call(engine, "audit", {"stored": sorted(stored)})
            result = {"findings": r.get("findings") or [], "warnings": r.get("warnings") or []}
        else:
            stores = _cluster_stores(engine.paths.home)
            if stores:  # [cluster] which paths are set, from the first store that answers (store.meta: no values)
                stored = {p: True for p in _remote_meta(engine.paths.home, stores)}
            elif (_store_dir(engine.paths.home) / "data.mdb").exists():
                with _open_store(engine.paths.home, create=False) as ds:
                    stored = {r.path: True for r in ds.records()}
            result = audit_result(engine, stored, modules)

    def human(r: dict[str, Any], out: TextIO) -> None:
        for f in r["findings"]:
            out.write(f"  {'✓' if f['level'] == 'ok' else '⚠'} {f['message']}\n")
        for w in r["warnings"]:
            out.write(f"  ⚠ {w}\n")

    emit(result, fmt, human)


def audit_result(engine: Any, stored: dict[str, bool], modules: str | None = None) -> dict[str, Any]:
    """`lab secret audit` as data for ``stored`` (path → has a live value): the engine's
    definitions and inventory, Puppet modules as for :func:`_modules`. Also the daemon's
    ``secrets.audit``."""
    compiled = compile_policy(engine.definitions, engine.state.list_servers(), _modules(modules, engine.paths.definitions))
    findings = audit_policy(engine.definitions, compiled, stored)
    return {"findings": [{"level": f.level, "kind": f.kind, "path": f.path, "message": f.message} for f in findings],
            "warnings": list(compiled.warnings)}


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
    with _engine(definitions) as engine:
        stores = _stores_for(engine)
        if stores:  # [cluster] a store encrypts the values to the recipients; the files are written here
            from lab.coordinator.cluster import remote_backup

            r = remote_backup(engine.paths.home, stores, to, recipient, now=time.time(), remote=push)
        else:
            with _open_store(engine.paths.home, create=False) as ds:
                r = backup_mod.backup(ds, to, recipient, now=time.time(), remote=push)
    print(f"  ✓ {r.total} secrets in {r.directory} ({r.written} written, {r.removed} removed)"
          + (f", commit {r.commit[:12]}" if r.commit else ", nothing new to commit"))


@secret_app.command("recover")
def secret_recover(
    from_: Annotated[str, typer.Option("--from", help="The backup repository (a clone is fine).")],
    identity: Annotated[str, typer.Option("--identity", help="age identity file (0600).")],
    force: Annotated[bool, typer.Option("--force", help="Cluster: recover even though the stores hold secrets (the backup's values win).")] = False,
    definitions: Definitions = None,
) -> None:
    """Restore the store from a backup: the cluster's stores (config.yaml `stores:`), else the
    local store (refuses to overwrite an existing one)."""
    with _engine(definitions) as engine:
        stores = _stores_for(engine)
        if stores:  # [cluster] decrypted here, written back to the stores over the store RPC (admin)
            from lab.coordinator.cluster import remote_restore
            from lab.coordinator.lifecycle import republish

            r = remote_restore(engine.paths.home, stores, from_, identity, force=force)
            # the current inventory's policy, newer than the backup's (a connected home: the daemon publishes it)
            line = _remote_republish(engine) if _remote(engine) else republish(engine.paths.home)
            print(f"  ✓ Recovered {r['restored']} secrets into the cluster through {r['store']}"
                  + "".join(f"; {what} published to {len(eps)} store(s)" for what, eps in r["published"].items()))
            if line:
                print(f"  {line}")
            return
        d = _store_dir(engine.paths.home)
        if (d / "data.mdb").exists():
            raise StoreError(f"a store already exists in {d}; move it aside first")
        with backup_mod.recover(from_, identity, d, LOCAL_NODE) as ds:
            n = len(list(ds.records()))
    print(f"  ✓ Recovered {n} records into {d}")


def _remote_republish(engine: Any) -> str | None:
    """`lab secret recover` in a connected home: the daemon compiles, signs and publishes the
    policy (``secrets.publish``); the line :func:`lab.coordinator.lifecycle.republish` would print."""
    try:
        r, _stores = _secrets_call(engine, "publish")
    except LabError as exc:
        return f"! policy not republished: {exc} (run `lab cluster publish` once the stores answer)"
    if r.get("version") is None:
        return None
    missed = "".join(f"; ! {ep} unreachable (gossip catches it up)" for ep in r.get("unreachable") or ())
    return f"→ policy version {r['version']} published to {len(r.get('published') or ())} store(s){missed}"


# ---------------------------------------------------------------------------------------------
# Store metadata (LAST ROTATED, SET BY) and the "why" of `lab show secret` — read by Engine.get_secrets
# and Engine.show_secret (plain data; views.secrets_table / views.secret render it). Never values.


def _local_meta(home: pathlib.Path) -> dict[str, dict[str, Any]]:
    with _open_store(home, create=False) as ds:
        return {r.path: {"version": r.wall_ms, "set_by": r.meta.set_by, "set_at": r.meta.set_at, "type": r.meta.type}
                for r in ds.records() if not r.is_system and r.meta is not None}


def _remote_meta(home: pathlib.Path, stores: list[str]) -> dict[str, dict[str, Any]]:
    """``store.meta`` of the first store that answers (admin identity of ``home``)."""
    from lab.coordinator.cluster import store_call

    _ep, reply = store_call(home, stores, "store.meta", {})[0]
    if isinstance(reply, Exception):
        raise reply
    return dict(reply.get("records") or {})


def _inside_trio() -> bool:
    try:
        import trio

        trio.lowlevel.current_task()
    except (ImportError, RuntimeError):
        return False
    return True


DAEMON_META_WARNING: Final = "secret store metadata is not read inside the coordinator daemon; LAST ROTATED not shown"


def store_metadata(home: str | os.PathLike[str], stores: list[str] | None = None) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """``({stored path: {version, set_by, set_at, type}}, warning)``: from the local store in
    ``home/store`` when there is one, else from the configured stores (or ``stores``, given by a
    connected home: read from those, with ``home``'s admin identity). ``(None, None)``: no store at
    all (nothing set yet); ``(None, warning)``: stores configured but none answered."""
    home = pathlib.Path(home)
    try:
        if stores is None:
            if (_store_dir(home) / "data.mdb").exists():
                return _local_meta(home), None
            stores = _cluster_stores(home)
            if stores and _inside_trio():  # the coordinator daemon answering a remote `lab`: never block its event loop
                return None, DAEMON_META_WARNING  # (the connected CLI reads the stores itself: connected_secrets)
        if not stores:
            return None, None
        return _remote_meta(home, stores), None
    except (LabError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"secret store unreachable, LAST ROTATED not shown ({first[:160]})"


def rotation_of(records: dict[str, dict[str, Any]], path: str) -> dict[str, Any] | None:
    """The newest value of ``path`` (any node's, for a per-machine secret): set_at (ms), set_by,
    and how many are stored (``PATH@NODE`` counted)."""
    mine = [m for p, m in records.items() if p == path or p.partition("@")[0] == path]
    if not mine:
        return None
    last = max(mine, key=lambda m: (m.get("set_at") or 0, m.get("version") or 0))
    return {"set_at": last.get("set_at"), "set_by": last.get("set_by"), "stored": len(mine)}


def _date(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000)) if ms else None


def annotate_rotation(home: pathlib.Path, rows: list[dict[str, Any]], warnings: list[str], stores: list[str] | None = None) -> None:
    """``lab get secrets``: add ``last_rotated`` (UTC ``YYYY-MM-DD HH:MM``), ``last_rotated_ms``,
    ``set_by``, ``stored`` (how many stored copies: per-machine ones counted) to each row (None when unset or unknown).
    ``stores``: see :func:`store_metadata`."""
    records, warning = store_metadata(home, stores)
    if warning:
        warnings.append(warning)
    for row in rows:
        r = rotation_of(records or {}, row["path"]) if records is not None else None
        row["last_rotated_ms"] = r["set_at"] if r else None
        row["last_rotated"] = _date(r["set_at"]) if r else None
        row["set_by"] = r["set_by"] if r else None
        row["stored"] = r["stored"] if r else (0 if records is not None else None)


def parse_source(src: str) -> dict[str, Any]:
    """A policy source (coordinator/policy.py) as data:

    ``label:mailserver`` → ``{"label": "mailserver", "classes": [], "call": None}``;
    ``label:web → class:web → class:web::tls (modules/web/manifests/init.pp:4) → modules/web/manifests/tls.pp:2``
    → ``{"label": "web", "classes": [{"name": "web", "declared_at": None},
    {"name": "web::tls", "declared_at": "modules/web/manifests/init.pp:4"}], "call": "modules/web/manifests/tls.pp:2"}``."""
    parts = src.split(" → ")
    kind, _, name = parts[0].partition(":")
    out: dict[str, Any] = {"kind": kind, "label": name if kind == "label" else None, "origin": parts[0], "classes": [], "call": None}
    for step in parts[1:]:
        if step.startswith("class:"):
            cname, _, rest = step[len("class:"):].partition(" (")
            out["classes"].append({"name": cname, "declared_at": rest[:-1] if rest.endswith(")") else None})
        else:
            out["call"] = step
    return out


def secret_reasons(engine: Any, path: str) -> dict[str, Any]:
    """Who is entitled to ``path`` and why, from the compiled policy (labels' ``secrets:`` and the
    ``lab::secret`` calls of the Puppet classes they apply), plus what the store knows of it.

    Keys: ``grants`` (one per distinct reason: source, parsed steps, servers), ``unapplied`` (code
    references under labels no server carries), ``entitled`` (server → sources), ``per_machine_set``,
    ``last_set``/``last_set_by``, ``modules`` and ``policy_warnings`` (only those naming this path)."""
    d = engine.definitions
    modules = _modules(None, engine.paths.definitions)
    servers = engine.state.list_servers()
    compiled = compile_policy(d, servers, modules)
    consumers = compiled.consumers(path)
    fleet = engine.fleet()
    by_source: dict[str, list[str]] = {}
    for node, sources in consumers.items():
        for src in dict.fromkeys(sources):
            by_source.setdefault(src, []).append(node)

    from lab.coordinator.engine import _provider

    def provider(n: str) -> str:
        try:
            return str(_provider(fleet, n))
        except Exception:  # noqa: BLE001  (a server the fleet does not know: still listed)
            return "?"

    grants = [{"source": src, **parse_source(src), "servers": [{"name": n, "provider": provider(n)} for n in sorted(names)]}
              for src, names in sorted(by_source.items(), key=lambda kv: (" → " in kv[0], kv[0]))]
    # code references under labels that no server carries yet: not in the per-server grants
    applied = {g["label"] for g in grants}
    unapplied = []
    for label in d.labels.values():
        if label.name in applied:
            continue
        if path in label.secrets:
            unapplied.append({"label": label.name, "class": None, "call": None})
        for cls in label.puppet_classes:
            for ref in compiled.class_refs.get(cls.lstrip(":"), ()):
                if ref.path == path:
                    unapplied.append({"label": label.name, "class": cls, "call": ref.where})
    records, warning = store_metadata(engine.paths.home)
    if warning:
        engine.state.warnings.append(warning)
    known = store_fields(records, path, sorted(consumers) if path in compiled.per_machine else None)
    return {
        "grants": grants,
        "unapplied": unapplied,
        "entitled": {n: list(dict.fromkeys(s)) for n, s in consumers.items()},
        **known,
        "modules": str(modules) if modules else None,
        "policy_warnings": [w for w in compiled.warnings if path in w],
    }


def store_fields(records: dict[str, dict[str, Any]] | None, path: str, per_machine: list[str] | None) -> dict[str, Any]:
    """What `lab show secret` says from the store: ``per_machine_set`` (``per_machine``: the
    servers of a per-machine secret, else None), ``last_set``, ``last_set_by``, ``store_known``.
    ``records``: :func:`store_metadata`'s (None: the store was not read)."""
    rot = rotation_of(records or {}, path) if records is not None else None
    have = {p.partition("@")[2] for p in (records or {}) if p.partition("@")[0] == path and "@" in p}
    return {
        "per_machine_set": None if per_machine is None else
        [{"server": n, "set": (n in have) if records is not None else None} for n in per_machine],
        "last_set": _date(rot["set_at"]) if rot else None,
        "last_set_by": rot["set_by"] if rot else None,
        "store_known": records is not None,
    }


def connected_secrets(engine: Any, what: str, data: Any, warnings: list[str]) -> Any:
    """A connected home's `lab get secrets` (``what="rows"``) or `lab show secret` (``"view"``):
    the daemon answered without the stores (it never blocks on them); read ``store.meta`` here,
    from the stores it knows, with this home's admin identity, and fill in what the coordinator
    host prints. ``warnings``: the daemon's (its note about the metadata is replaced). None of the
    stores known, or a daemon without ``secrets.*`` (older): the daemon's answer as it is."""
    try:
        _r, stores = _secrets_call(engine, "stores")
    except NotFound:  # "no method 'secrets.stores'"
        return data
    if not stores:
        return data
    warnings[:] = [w for w in warnings if w != DAEMON_META_WARNING]
    if what == "rows":
        annotate_rotation(engine.paths.home, data, warnings, stores)
        return data
    records, warning = store_metadata(engine.paths.home, stores)
    if warning:
        warnings.append(warning)
    pm = data.get("per_machine_set")
    data.update(store_fields(records, data["path"], None if pm is None else [str(x.get("server")) for x in pm]))
    return data


# ---------------------------------------------------------------------------------------------
# `lab secret status --store`


def _status_of(home: pathlib.Path, endpoint: str) -> dict[str, Any]:
    """One configured store's ``store.status`` (raises when unreachable)."""
    from lab.coordinator.cluster import store_call

    _ep, reply = store_call(home, [endpoint], "store.status", {})[0]
    if isinstance(reply, Exception):
        raise reply
    return dict(reply)


def consumers_per_label(engine: Any) -> list[dict[str, Any]]:
    """Per label: its servers, and how many secrets each of them is entitled to through it."""
    compiled = compile_policy(engine.definitions, engine.state.list_servers(), _modules(None, engine.paths.definitions))
    per: dict[str, dict[str, set[str]]] = {}
    for node, grants in compiled.grants.items():
        for p, sources in grants.items():
            for src in sources:
                label = parse_source(src)["label"]
                if label:
                    per.setdefault(label, {}).setdefault(node, set()).add(p)
    out = []
    for label, nodes in sorted(per.items()):
        counts = sorted({len(ps) for ps in nodes.values()})
        out.append({"label": label, "machines": len(nodes), "secrets": counts[-1],
                    "secrets_min": counts[0], "paths": sorted(set().union(*nodes.values()))})
    return out


def store_status(definitions: str | None = None) -> dict[str, Any]:
    """``lab secret status --store``: every configured store's view (config.yaml ``stores:``), else
    the local store in ``$LAB_HOME/store``; a connected home: the stores the daemon knows. An
    unreachable store is a row, not an error."""
    with _engine(definitions) as engine:
        home = engine.paths.home
        if _remote(engine):  # a connected home: the consumers and the store list from the daemon
            r, stores = _secrets_call(engine, "consumers")
            stores, consumers = _need_stores(engine, stores), r.get("consumers") or []
        else:
            stores, consumers = _cluster_stores(home), consumers_per_label(engine)
        if stores:
            replicas = []
            for ep in stores:
                try:
                    st = _status_of(home, ep)
                except (LabError, OSError) as exc:
                    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    replicas.append({"name": None, "endpoint": ep, "state": "unreachable", "reachable": False, "error": msg[:200]})
                    continue
                peers = st.get("peers") or []
                replicas.append({
                    "name": st.get("node"), "endpoint": ep, "state": "reachable", "reachable": True,
                    "secrets": st.get("secrets"), "records": st.get("records"), "root": st.get("root"),
                    "policy": st.get("policy"), "agents": st.get("agents"),
                    "last_anti_entropy": st.get("last_anti_entropy"),
                    "peers_connected": sum(1 for p in peers if p.get("connected")), "peers": len(peers),
                })
            up = [r for r in replicas if r["reachable"]]
            roots = {r["root"] for r in up}
            for r in up:
                r["in_sync"] = len(roots) == 1
            return {"mode": "cluster", "replicas": replicas, "reachable": len(up), "total": len(replicas),
                    "secrets": max((r["secrets"] or 0 for r in up), default=None), "in_sync": len(roots) <= 1 and bool(up),
                    "consumers": consumers}
        d = _store_dir(home)
        if not (d / "data.mdb").exists():
            raise NotFound(f"no local secret store in {d} and no stores configured (config.yaml `stores:`)")
        with _open_store(home, create=False) as ds:
            live = sum(1 for r in ds.records() if not r.is_system)
            return {
                "mode": "local", "store": str(d), "node": ds.node, "secrets": live, "tombstones": len(ds.tombstones()),
                "sequence": ds.seq, "root": ds.root().hex(), "acks": ds.acks(),
                "replicas": [{"name": ds.node, "endpoint": str(d), "state": "local", "reachable": True, "secrets": live,
                              "records": live, "last_anti_entropy": None}],
                "reachable": 1, "total": 1, "in_sync": True, "consumers": consumers,
            }


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = max(0, int(now - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def render_store_status(r: dict[str, Any], out: TextIO, now: float | None = None) -> None:
    """The spec's ``SECRET STORE:`` block."""
    now = time.time() if now is None else now
    out.write("SECRET STORE:\n")
    healthy = "healthy" if r.get("mode") == "cluster" else "(local mode)"
    out.write(f"  Replicas:        {r['reachable']}/{r['total']} {healthy}\n")
    for rep in r["replicas"]:
        name = rep.get("name") or "—"
        if not rep["reachable"]:
            out.write(f"    {name:<14} {rep['endpoint']:<21} ✗ unreachable  {rep.get('error', '')}\n")
            continue
        sync = "✓ local" if rep["state"] == "local" else ("✓ synced" if rep.get("in_sync") else "⚠ converging")
        ae = "" if rep["state"] == "local" else f"  last anti-entropy {_ago(rep.get('last_anti_entropy'), now)}"
        out.write(f"    {name:<14} {rep['endpoint']:<21} {sync:<12} {rep.get('secrets') or 0} secrets{ae}\n")
    if r.get("tombstones") is not None:
        out.write(f"  Tombstones:      {r['tombstones']}\n")
    total = r.get("secrets")
    out.write(f"  Total secrets:   {total if total is not None else '—'}\n")
    if r.get("consumers"):
        out.write("  Entitled consumers:\n")
        for c in r["consumers"]:
            who = f"{c['label']} ({c['machines']} machine{'s' if c['machines'] != 1 else ''})"
            each = "" if c["machines"] == 1 else " each"
            n = c["secrets"] if c["secrets_min"] == c["secrets"] else f"{c['secrets_min']}–{c['secrets']}"
            out.write(f"    {who:<26}→ {n} secret{'s' if c['secrets'] != 1 else ''}{each}\n")
