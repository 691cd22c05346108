"""Moving the coordinator: `lab server migrate --to NODE` (docs/LIFECYCLE.md, "Moving the coordinator").

The move is *pulled* by the target's agent over its own authenticated Noise session (agents
never listen)::

    lab server migrate ── migrate.plan / migrate.start ──► old coordinator (daemon, or served
         │                                                  in-process in local mode)
         │                 NODE's check-in reply carries {"migrate": {id, listen, advertise}}
         │                 NODE ── migrate.fetch ──► bundle (state.db via the sqlite backup API,
         │                         CA key, CRL, issued certificates, config minus `server:`,
         │                         definitions) — only NODE's current, unrevoked certificate may
         │                 NODE writes AGENT_HOME/coordinator/ (0700, files 0600), supervises
         │                 `lab server run` there, ── migrate.ready {endpoint} ──► old
         ├── verify: the new endpoint answers as coordinator, same CA, same inventory count
         ├── migrate.adopt on the new one: NODE gets the `lab-server` label (the old node loses it)
         ├── switch config.yaml `server:` to the new endpoint
         └── migrate.finish on the old one: from then on every check-in reply carries
             {"coordinator": new, "moved_to": new}; it writes moved.json and stops once every
             enrolled node was redirected, or after the grace period.

From the moment NODE fetched the state the old coordinator is *frozen*: it refuses enrollment,
inventory writes and identity operations (they would be lost), and keeps answering check-ins.
A failure at any step before the config switch aborts the migration (``migrate.abort``): the old
coordinator is unfrozen and stays authoritative; NODE stops and removes what it installed.

The pure parts (plan, endpoint choice, bundle build/verify, who may fetch, config switch, the
check-in decisions) are unit-tested in tests/unit/test_migrate.py; the whole move by
tests/integration/test_migrate_cluster.py.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from lab.common.errors import ConfigError, LabError, NotEntitled, NotFound, RemoteProtocolError, StateError, UsageError

__all__ = [
    "BUNDLE_KIND", "MOVED_FILE", "ORIGIN_FILE", "ROLE_DIR", "ROLE_FILE", "SERVER_LABEL",
    "Bundle", "CoordinatorRole", "MigrationFailed", "MigrationService", "Pending",
    "build_bundle", "check_not_moved", "choose_endpoint", "config_for_bundle", "decode_bundle_untrusted",
    "encode_bundle", "install_bundle", "may_fetch", "on_checkin_reply", "render_plan", "switch_config",
]

log = logging.getLogger("lab.migrate")

BUNDLE_KIND: Final = "lab-coordinator-bundle-v1"
MOVED_FILE: Final = "moved.json"  # in a coordinator home: it moved away; `lab server run` refuses to start there
ORIGIN_FILE: Final = "migrated.json"  # in a coordinator home a migration installed: node, from, at
ROLE_DIR: Final = "coordinator"  # AGENT_HOME/coordinator: the coordinator home an agent hosts
ROLE_FILE: Final = "coordinator-role.yaml"  # AGENT_HOME/coordinator-role.yaml: the role marker (id, listen, advertise)
SERVER_LABEL: Final = "lab-server"
ENDPOINT_FILE: Final = "coordinator.endpoint"  # = identity_ops.ENDPOINT_FILE
DEFAULT_GRACE: Final = 120.0
MAX_BUNDLE: Final = 15 * 1024 * 1024  # under the RPC's 16 MiB message limit
MAX_DEFINITIONS: Final = 4 * 1024 * 1024
_ID_RE: Final = re.compile(r"^[a-z0-9]{8,32}$")
_PART_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")
_HOME_FILES: Final = ("ca.key", "ca.pub", "revocations.crl")
_REQUIRED: Final = ("state.db", "ca.key", "ca.pub")


class MigrationFailed(LabError):
    """One step of the migration failed; the old coordinator stays authoritative."""


def _event(level: int, event: str, **fields: object) -> None:
    if log.isEnabledFor(level):
        from lab.common import rpc

        log.log(level, "event=%s %s", event, " ".join(f"{k}={rpc._fmt(v)}" for k, v in fields.items() if v is not None))


# ---------------------------------------------------------------------------------------------
# Pure parts: endpoint, plan, config


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def choose_endpoint(listen: str, addresses: Iterable[str]) -> str:
    """Where agents and the CLI reach the new coordinator: the listen address, or for a wildcard
    listen (0.0.0.0 / ::) the node's first reported non-loopback address (else its first)."""
    from lab.common.rpc import parse_endpoint

    host, port = parse_endpoint(listen, 7443)
    if host not in ("0.0.0.0", "::", ""):
        return _host_port(host, port)
    addrs = [a.split("/")[0] for a in addresses if isinstance(a, str) and a]
    if not addrs:
        raise UsageError(f"cannot tell where {listen} will be reachable: the node reported no address; pass --listen HOST:PORT")
    public = [a for a in addrs if not a.startswith("127.") and a != "::1"]
    return _host_port((public or addrs)[0], port)


def render_plan(plan: Mapping[str, Any], home: str) -> str:
    """The plan as the operator reads it before saying yes."""
    src = plan.get("from_node") or f"local ({home})"
    lines = [
        "Plan",
        f"  ~ migrate lab-server from {src} ({plan['from_endpoint']}) to {plan['to']}",
        f"  + {plan['to']} pulls the state over its Noise session: {plan['servers']} servers, {plan['tokens']} tokens, "
        f"{plan['audit']} audit entries, {plan['certificates']} certificates, CA {plan['ca'][:16]}…",
        f"  + start the coordinator role on {plan['to']}, listening on {plan['listen']}; it answers at {plan['endpoint']}",
        f"  + verify {plan['endpoint']} answers as coordinator with the same CA and inventory",
        f"  + label {plan['to']} {SERVER_LABEL}" + (f", unlabel {plan['from_node']}" if plan.get("from_node") else ""),
        f"  + CLI config ({home}/config.yaml): server: {plan['endpoint']}",
        f"  - stop the old coordinator once every agent learnt the new endpoint (at most {plan['grace']:g} s)",
    ]
    return "\n".join(lines)


def switch_config(home: Path, endpoint: str) -> None:
    """``server: ENDPOINT`` in ``home/config.yaml`` (atomic: temp, fsync, rename)."""
    from lab.common.identity import write_private_file
    from lab.coordinator.engine import _read_settings

    settings = _read_settings(Path(home))
    settings["server"] = endpoint
    write_private_file(Path(home) / "config.yaml", yaml.safe_dump(settings, sort_keys=True).encode(), overwrite=True)


def config_for_bundle(settings: Mapping[str, Any]) -> dict[str, Any]:
    """config.yaml for the new home: without ``server:`` (it *is* the server) and without
    ``definitions:`` (the definitions travel in the bundle and land in the default place)."""
    return {k: v for k, v in settings.items() if k not in ("server", "definitions")}


# ---------------------------------------------------------------------------------------------
# The bundle


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What a coordinator home needs elsewhere; ``files`` maps relative paths to contents."""

    id: str
    source: str  # the old coordinator's endpoint
    node: str  # the target
    ca_fingerprint: str
    created: float
    files: dict[str, bytes]

    def __repr__(self) -> str:  # never the CA key, not even in a traceback
        return f"Bundle(id={self.id!r}, node={self.node!r}, files={sorted(self.files)!r})"


def _safe_relpath(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 512:
        raise RemoteProtocolError("bundle: a file name must be text of 1..512 characters")
    parts = name.split("/")
    if not all(_PART_RE.match(p) and p not in (".", "..") for p in parts):
        raise RemoteProtocolError(f"bundle: unsafe file name {name!r}")
    return name


def _db_copy(db: Path) -> bytes:
    """A consistent single-file copy of a live WAL database (sqlite backup API)."""
    with tempfile.TemporaryDirectory(prefix="lab-migrate-") as tmp:
        out = Path(tmp) / "state.db"
        try:
            src = sqlite3.connect(str(db), isolation_level=None, timeout=10)
            try:
                dest = sqlite3.connect(str(out), isolation_level=None)
                try:
                    src.backup(dest)
                    dest.execute("PRAGMA journal_mode = DELETE")
                    if dest.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                        raise StateError(f"{db}: the copy failed quick_check; state.db may be damaged")
                finally:
                    dest.close()
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise StateError(f"{db}: cannot copy the state database: {exc}") from exc
        return out.read_bytes()


def count_rows(db: bytes | Path) -> dict[str, int]:
    """servers / tokens / audit rows of a state database (a file, or a bundle's bytes)."""
    with tempfile.TemporaryDirectory(prefix="lab-migrate-") as tmp:
        path = Path(db) if isinstance(db, Path) else Path(tmp) / "state.db"
        if not isinstance(db, Path):
            path.write_bytes(db)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                return {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in ("servers", "tokens", "audit")}
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state database: {exc}") from exc


def _definitions(defs: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not defs.is_dir():
        return out
    total = 0
    for p in sorted(defs.rglob("*")):
        rel = p.relative_to(defs)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.is_symlink():
            continue  # .git and editor files stay behind
        data = p.read_bytes()
        total += len(data)
        if total > MAX_DEFINITIONS:
            raise UsageError(f"the definitions in {defs} are over {MAX_DEFINITIONS >> 20} MiB: keep them in Git, "
                             "and set `definitions:` on the new coordinator")
        out["definitions/" + rel.as_posix()] = data
    return out


def build_bundle(home: Path, definitions: Path, *, id: str, source: str, node: str, ca_fingerprint: str,
                 now: float) -> Bundle:
    """Collect the coordinator home: state.db (backup API), CA, CRL, issued certificates,
    config (minus ``server:``), the definitions directory."""
    from lab.coordinator.engine import _read_settings

    home = Path(home)
    files: dict[str, bytes] = {"state.db": _db_copy(home / "state.db")}
    for name in _HOME_FILES:
        if (home / name).exists():
            files[name] = (home / name).read_bytes()
    certs = home / "certs"
    if certs.is_dir():
        for p in sorted(certs.glob("*.cert")):
            files[f"certs/{p.name}"] = p.read_bytes()
    cfg = config_for_bundle(_read_settings(home))
    if cfg:
        files["config.yaml"] = yaml.safe_dump(cfg, sort_keys=True).encode()
    files.update(_definitions(Path(definitions)))
    for name in files:
        _safe_relpath(name)
    return Bundle(id, source, node, ca_fingerprint, now, files)


def encode_bundle(bundle: Bundle) -> bytes:
    from lab.common import wire

    raw: bytes = wire.packb({"kind": BUNDLE_KIND, "id": bundle.id, "source": bundle.source, "node": bundle.node,
                             "ca": bundle.ca_fingerprint, "created": bundle.created, "files": bundle.files})
    if len(raw) > MAX_BUNDLE:
        raise StateError(f"the coordinator state is {len(raw) >> 20} MiB, over the {MAX_BUNDLE >> 20} MiB a migration carries")
    return raw


def decode_bundle_untrusted(raw: object, ca_public_key: bytes) -> Bundle:
    """A bundle from the wire, checked: its kind, safe relative names, the required files, and a
    CA whose public key is ``ca_public_key`` (the receiving node's own trust root)."""
    import msgpack

    from lab.coordinator.enrollment import CA_PUB_KIND

    if not isinstance(raw, bytes) or len(raw) > MAX_BUNDLE:
        raise RemoteProtocolError("bundle: must be bytes under the size limit")
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"bundle: not msgpack ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != BUNDLE_KIND:
        raise RemoteProtocolError(f"bundle: not a {BUNDLE_KIND}")
    for key in ("id", "source", "node", "ca"):
        if not isinstance(doc.get(key), str) or not doc[key] or len(doc[key]) > 262:
            raise RemoteProtocolError(f"bundle: {key} must be text")
    if not _ID_RE.match(doc["id"]) or not isinstance(doc.get("created"), (int, float)):
        raise RemoteProtocolError("bundle: bad id or creation time")
    files = doc.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, bytes) for v in files.values()):
        raise RemoteProtocolError("bundle: files must map names to bytes")
    files = {_safe_relpath(k): v for k, v in files.items()}
    missing = [f for f in _REQUIRED if f not in files]
    if missing:
        raise RemoteProtocolError(f"bundle: missing {', '.join(missing)}")
    import base64
    import binascii

    kind, _, body = files["ca.pub"].decode("ascii", "replace").strip().partition(" ")
    try:
        pub = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        pub = b""
    if kind != CA_PUB_KIND or not hmac.compare_digest(pub, bytes(ca_public_key)):
        raise NotEntitled("bundle: its CA is not this node's CA")
    from lab.common.identity import fingerprint

    if not hmac.compare_digest(doc["ca"], fingerprint(bytes(ca_public_key))):
        raise RemoteProtocolError("bundle: CA fingerprint does not match its ca.pub")
    return Bundle(doc["id"], doc["source"], doc["node"], doc["ca"], float(doc["created"]), files)


def install_bundle(bundle: Bundle, target: Path) -> None:
    """Write the bundle as a coordinator home ``target`` (0700; files 0600, CA key checked
    against ca.pub, state.db checked), replacing what a previous attempt left there."""
    from lab.common.identity import CertificateAuthority, write_private_file
    from lab.coordinator.enrollment import load_ca_public_key

    target = Path(target)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    staging.mkdir(mode=0o700, parents=True)
    try:
        for name, data in bundle.files.items():
            path = staging / name
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private_file(path, data, overwrite=True)
        ca = CertificateAuthority.load(staging / "ca.key")
        try:
            if not hmac.compare_digest(ca.public_key, load_ca_public_key(staging / "ca.pub")):
                raise NotEntitled("bundle: ca.key does not belong to ca.pub")
        finally:
            ca.close()
        try:
            conn = sqlite3.connect(str(staging / "state.db"), isolation_level=None)
            try:
                ok = conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            finally:
                conn.close()
        except sqlite3.Error:
            ok = False
        if not ok:
            raise RemoteProtocolError("bundle: state.db is damaged")
        origin = {"id": bundle.id, "node": bundle.node, "from": bundle.source, "at": bundle.created}
        write_private_file(staging / ORIGIN_FILE, json.dumps(origin).encode(), overwrite=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        os.chmod(target, 0o700)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_not_moved(home: Path) -> None:
    """`lab server run` refuses to start in a home whose coordinator moved away (two
    coordinators with one CA would split the fleet)."""
    path = Path(home) / MOVED_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        doc = {}
    to = doc.get("to") if isinstance(doc, dict) else None
    raise ConfigError(f"this coordinator moved to {to or 'another node'} (`lab server migrate`); it must not run here "
                      f"too. Remove {path} only if that one is gone for good", str(path))


def origin_node(home: Path) -> str | None:
    """The node a migration installed this coordinator home on (None: not installed by one)."""
    try:
        doc = json.loads((Path(home) / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None
    node = doc.get("node") if isinstance(doc, dict) else None
    return node if isinstance(node, str) else None


# ---------------------------------------------------------------------------------------------
# Daemon side


@dataclasses.dataclass
class Pending:
    id: str
    target: str
    listen: str
    endpoint: str  # where the new coordinator will answer
    started: float
    stage: str = "waiting"  # waiting → fetched → ready | failed
    error: str | None = None

    def view(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def may_fetch(pending: Pending | None, id: object, peer_name: str, peer_serial: int, server: Any) -> None:
    """Only the target, with its current unrevoked certificate, for the pending migration."""
    if pending is None or pending.stage == "failed":
        raise NotEntitled("no migration is pending")
    if not isinstance(id, str) or not hmac.compare_digest(id.encode(), pending.id.encode()):
        raise NotEntitled("not the pending migration")
    if peer_name != pending.target:
        raise NotEntitled(f"the coordinator moves to {pending.target}, not to {peer_name}")
    current = getattr(server, "cert_serial", None)
    if not getattr(server, "enrolled_at", None) or not isinstance(current, str) or not current.isdigit() \
            or int(current) != peer_serial:
        raise NotEntitled(f"certificate {peer_serial} is not {peer_name}'s current one")


class MigrationService:
    """``migrate.*`` in the coordinator daemon, the check-in hook and the write freeze."""

    WRITES: Final = ("engine.add_server", "engine.set_labels", "engine.remove_server", "identity.revoke", "identity.renew",
                     "lifecycle.apply", "lifecycle.sync")

    def __init__(self, engine: Any, ca: Any, endpoint: str, *, stop: Callable[[], None] | None = None,
                 spawn: Callable[..., Any] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.home = Path(engine.paths.home)
        self.ca = ca
        self.endpoint = endpoint
        self.stop = stop
        self.spawn = spawn
        self.clock = clock
        self.pending: Pending | None = None
        self.aborted: dict[str, str] = {}  # node → id of an aborted migration it may have installed
        self.moved_to: str | None = None
        self.redirected: set[str] = set()

    @property
    def state(self) -> Any:
        return self.engine.state

    @property
    def frozen(self) -> bool:
        return self.moved_to is not None or (self.pending is not None and self.pending.stage in ("fetched", "ready"))

    def check_writable(self, method: str) -> None:
        """StateError for writes while the state is on its way to another node."""
        if (method == "enroll" or method in self.WRITES) and self.frozen:
            where = self.moved_to or (self.pending.endpoint if self.pending else "?")
            raise StateError(f"the coordinator is moving to {where}; {method} is refused here until the move is done "
                             "or aborted (retry against the new coordinator)")

    # -- check-in -------------------------------------------------------------------------------

    def on_checkin(self, name: str) -> dict[str, Any]:
        """Extra check-in reply fields: a redirect after the move, the migrate instruction for the
        target, or an abort for a target that may hold an aborted attempt."""
        if self.moved_to is not None:
            self.redirected.add(name)
            return {"coordinator": self.moved_to, "moved_to": self.moved_to}
        p = self.pending
        if p is not None and p.target == name and p.stage in ("waiting", "fetched"):
            return {"migrate": {"id": p.id, "listen": p.listen, "advertise": p.endpoint}}
        if name in self.aborted:
            return {"migrate_abort": self.aborted[name]}
        return {}

    # -- requests -------------------------------------------------------------------------------

    async def handle(self, peer: Any, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        from lab.coordinator.enrollment import ADMIN_ROLE

        if method in ("migrate.fetch", "migrate.ready", "migrate.failed"):
            return self._from_node(peer, method, body)
        if ADMIN_ROLE not in peer.roles:
            raise NotEntitled(f"{method} needs the {ADMIN_ROLE!r} role")
        if method == "migrate.plan":
            return self.plan(_text(body, "to"), _text(body, "listen"), _grace(body))
        if method == "migrate.start":
            return self.start(_text(body, "to"), _text(body, "listen"), actor=f"cert:{peer.name}")
        if method == "migrate.status":
            return self.status()
        if method == "migrate.abort":
            return self.abort(_text(body, "id"), str(body.get("reason") or "aborted")[:300])
        if method == "migrate.adopt":
            return self.adopt(_text(body, "node"), body.get("previous"), actor=f"cert:{peer.name}")
        if method == "migrate.finish":
            return self.finish(_text(body, "id"), _text(body, "endpoint"), _grace(body))
        raise NotFound(f"no method {method!r}")

    def _target(self, name: str) -> Any:
        from lab.coordinator.identity_ops import is_revoked_marker

        self.engine.reload()
        server = self.state.get_server(name)
        if is_revoked_marker(server.cert_serial) or not server.enrolled_at:
            raise StateError(f"{name} is not an enrolled agent (enroll it first: the move is pulled by its agent)")
        return server

    def plan(self, to: str, listen: str, grace: float) -> dict[str, Any]:
        if self.moved_to is not None:
            raise StateError(f"this coordinator already moved to {self.moved_to}")
        server = self._target(to)
        here = origin_node(self.home)
        if here == to:
            raise UsageError(f"the coordinator already runs on {to}")
        with self.state._sql("counting the state") as conn:  # the daemon's own connection (WAL-consistent)
            counts = {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in ("tokens", "audit")}
        counts["servers"] = len(self.state.list_servers())
        certs = len(list((self.home / "certs").glob("*.cert"))) if (self.home / "certs").is_dir() else 0
        return {"to": to, "listen": listen, "endpoint": choose_endpoint(listen, server.addresses or []),
                "from_node": here, "from_endpoint": self.endpoint, "ca": self.ca.fingerprint, "certificates": certs,
                "grace": grace, **counts}

    def start(self, to: str, listen: str, *, actor: str) -> dict[str, Any]:
        plan = self.plan(to, listen, DEFAULT_GRACE)
        old = self.pending
        if old is not None and old.stage != "failed":
            self.aborted[old.target] = old.id  # a rerun replaces an unfinished attempt
        self.pending = Pending(secrets.token_hex(8), to, listen, plan["endpoint"], self.clock())
        self.aborted.pop(to, None)
        self.state.audit("coordinator.migrate", to, {"stage": "start", "id": self.pending.id, "listen": listen,
                                                     "endpoint": plan["endpoint"]}, actor=actor)
        _event(logging.INFO, "migrate.start", id=self.pending.id, to=to, endpoint=plan["endpoint"])
        return {**plan, "id": self.pending.id}

    def status(self) -> dict[str, Any]:
        self.engine.reload()
        return {"ca": self.ca.fingerprint, "servers": len(self.state.list_servers()), "endpoint": self.endpoint,
                "moved_to": self.moved_to,
                "pending": self.pending.view() if self.pending else None, "node": origin_node(self.home)}

    def abort(self, id: str, reason: str) -> dict[str, Any]:
        p = self.pending
        if p is None or p.id != id:
            return {"aborted": False}
        if self.moved_to is not None:
            raise StateError("the move is already finished; it cannot be aborted")
        self.aborted[p.target] = p.id
        p.stage, p.error = "failed", reason
        self.state.audit("coordinator.migrate", p.target, {"stage": "abort", "id": p.id, "reason": reason})
        _event(logging.WARNING, "migrate.aborted", id=p.id, to=p.target, reason=reason)
        return {"aborted": True}

    def adopt(self, node: str, previous: object, *, actor: str) -> dict[str, Any]:
        """On the *new* coordinator: NODE carries ``lab-server``; the previous host does not."""
        with self.state.transaction():
            server = self.state.get_server(node)
            if SERVER_LABEL not in server.labels:
                self.state.set_labels(node, [*server.labels, SERVER_LABEL])
            if isinstance(previous, str) and previous and previous != node:
                try:
                    prev = self.state.get_server(previous)
                except LabError:
                    prev = None
                if prev is not None and SERVER_LABEL in prev.labels:
                    self.state.set_labels(previous, [x for x in prev.labels if x != SERVER_LABEL])
            self.state.audit("coordinator.migrate", node, {"stage": "adopted", "previous": previous or "local"}, actor=actor)
        return {"labels": list(self.state.get_server(node).labels)}

    def finish(self, id: str, endpoint: str, grace: float) -> dict[str, Any]:
        p = self.pending
        if p is None or p.id != id or p.stage != "ready":
            raise StateError("no migration ready to finish")
        if endpoint != p.endpoint:
            raise UsageError(f"the migration is ready at {p.endpoint}, not at {endpoint}")
        self.moved_to = endpoint
        from lab.common.identity import write_private_file

        write_private_file(self.home / MOVED_FILE, json.dumps({"to": endpoint, "node": p.target, "id": id,
                                                               "at": self.clock()}).encode(), overwrite=True)
        self.state.audit("coordinator.migrate", p.target, {"stage": "finish", "id": id, "endpoint": endpoint})
        _event(logging.INFO, "migrate.finished", id=id, to=p.target, endpoint=endpoint, grace=grace)
        if self.spawn is not None:
            self.spawn(self._drain, grace)
        return {"moved_to": endpoint, "grace": grace}

    def drained(self, nodes: set[str] | None = None) -> bool:
        """Every enrolled node (or every one of ``nodes``) got the redirect."""
        return (nodes if nodes is not None else self._enrolled()) <= self.redirected

    def _enrolled(self) -> set[str]:
        from lab.coordinator.identity_ops import is_revoked_marker

        return {s.name for s in self.state.list_servers() if s.enrolled_at and not is_revoked_marker(s.cert_serial)}

    async def _drain(self, grace: float) -> None:
        import trio

        nodes = self._enrolled()  # frozen: nobody enrolls meanwhile
        deadline = trio.current_time() + grace
        while trio.current_time() < deadline and not self.drained(nodes):
            await trio.sleep(0.2)
        await trio.sleep(0.5)  # let the last redirected replies go out
        _event(logging.INFO, "migrate.stopping", moved_to=self.moved_to, redirected=len(self.redirected),
               all_redirected=self.drained())
        if self.stop is not None:
            self.stop()

    def _from_node(self, peer: Any, method: str, body: Mapping[str, Any]) -> dict[str, Any]:
        p = self.pending
        try:
            server = self.state.get_server(peer.name)
        except LabError:
            server = None
        try:
            may_fetch(p, body.get("id"), peer.name, peer.certificate.serial, server)
        except NotEntitled as exc:
            _event(logging.WARNING, "migrate.refused", peer=peer.address, name=peer.name, method=method, reason=str(exc))
            self.state.audit("coordinator.migrate_refused", peer.name, {"method": method, "reason": str(exc)},
                             actor=f"node:{peer.name}")
            raise
        assert p is not None
        if method == "migrate.fetch":
            if p.stage == "ready":
                raise StateError("the new coordinator already reported ready")
            bundle = build_bundle(self.home, self.engine.paths.definitions, id=p.id, source=self.endpoint, node=p.target,
                                  ca_fingerprint=self.ca.fingerprint, now=self.clock())
            raw = encode_bundle(bundle)
            p.stage = "fetched"  # frozen from here: writes would not reach the new coordinator
            self.state.audit("coordinator.migrate", p.target, {"stage": "fetched", "id": p.id, "bytes": len(raw),
                                                               "files": len(bundle.files)}, actor=f"node:{peer.name}")
            _event(logging.INFO, "migrate.fetched", id=p.id, to=p.target, bytes=len(raw), files=len(bundle.files))
            return {"bundle": raw}
        if method == "migrate.ready":
            endpoint = _text(body, "endpoint")
            if p.stage != "fetched":
                raise StateError(f"migration {p.id} is {p.stage}: fetch the state first")
            if endpoint != p.endpoint:
                raise UsageError(f"ready at {endpoint}, but the migration expects {p.endpoint}")
            p.stage = "ready"
            _event(logging.INFO, "migrate.ready", id=p.id, to=p.target, endpoint=endpoint)
            return {"ok": True}
        reason = str(body.get("reason") or "failed on the node")[:300]
        p.stage, p.error = "failed", f"{p.target}: {reason}"
        _event(logging.WARNING, "migrate.node_failed", id=p.id, to=p.target, reason=reason)
        return {"ok": True}


def _grace(body: Mapping[str, Any]) -> float:
    v = body.get("grace", DEFAULT_GRACE)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 86400:
        raise UsageError("grace must be 0..86400 seconds")
    return float(v)


def _text(body: Mapping[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str) or not v or len(v) > 262 or not v.isprintable():
        raise UsageError(f"{key} must be printable text")
    return v


# ---------------------------------------------------------------------------------------------
# Agent side: the coordinator role inside an agent


def _lab_argv() -> list[str]:
    exe = Path(sys.executable).parent / "lab"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from lab.coordinator.cli import main; main()"]


class CoordinatorRole:
    """``AGENT_HOME/coordinator`` served by a supervised ``lab server run`` child while the role
    marker ``AGENT_HOME/coordinator-role.yaml`` exists: restarted when it dies (backoff), started
    again when the agent starts; stopped for good when it moved away (``moved.json``)."""

    def __init__(self, home: Path) -> None:
        import trio

        self.home = Path(home)
        self.dir = self.home / ROLE_DIR
        self.marker = self.home / ROLE_FILE
        self._wake = trio.Event()
        self._scope: Any = None
        self.state = "off"
        self.pid: int | None = None

    def role(self) -> dict[str, Any] | None:
        try:
            doc = yaml.safe_load(self.marker.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("listen"), str) else None

    async def install(self, bundle: Bundle, listen: str, advertise: str) -> None:
        """Replace the served home with ``bundle`` (a running child is stopped first) and start it."""
        import trio

        self.marker.unlink(missing_ok=True)  # the supervisor must not restart the child meanwhile
        self.stop_child()
        while self.state in ("starting", "running"):
            await trio.sleep(0.05)
        await trio.to_thread.run_sync(self._install_files, bundle, listen, advertise)
        self.state = "installed"
        self._wake.set()

    def _install_files(self, bundle: Bundle, listen: str, advertise: str) -> None:
        from lab.common.identity import write_private_file

        install_bundle(bundle, self.dir)
        (self.dir / ENDPOINT_FILE).unlink(missing_ok=True)
        doc = {"id": bundle.id, "listen": listen, "advertise": advertise, "from": bundle.source}
        write_private_file(self.marker, yaml.safe_dump(doc, sort_keys=True).encode(), overwrite=True)

    def remove(self, id: str | None = None) -> bool:
        """Drop an (aborted) role: stop the child, remove the marker and the home it served."""
        role = self.role()
        if role is None or (id is not None and role.get("id") != id):
            return False
        self.marker.unlink(missing_ok=True)
        self.stop_child()
        if not (self.dir / MOVED_FILE).exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        _event(logging.WARNING, "coordinator_role.removed", id=id)
        return True

    def stop_child(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def wait_ready(self, timeout: float) -> None:
        import trio

        with trio.move_on_after(timeout):
            while not (self.dir / ENDPOINT_FILE).exists():
                if self.state.startswith("exited"):
                    raise StateError(f"the coordinator child {self.state}; see {self.dir / 'coordinator.log'}")
                await trio.sleep(0.1)
            return
        raise StateError(f"the coordinator child was not ready after {timeout:g} s; see {self.dir / 'coordinator.log'}")

    async def run(self, task_status: Any = None) -> None:
        import trio

        if task_status is not None:
            task_status.started()
        delay = 0.5  # the first restart after 1 s, then doubling up to 30 s (reset after a minute up)
        while True:
            role = self.role()
            if role is None or (self.dir / MOVED_FILE).exists():
                if role is not None:  # moved away: the role ends here
                    self.marker.unlink(missing_ok=True)
                    _event(logging.INFO, "coordinator_role.moved_away", home=self.dir)
                self.state = "off"
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            started = trio.current_time()
            try:
                code = await self._run_child(role)
            except (LabError, OSError) as exc:  # never take the agent down with its role
                self.state = f"exited: cannot start ({str(exc)[:200]})"
                _event(logging.ERROR, "coordinator_role.start_failed", reason=str(exc)[:200])
                code = -1
            if self.role() is None or (self.dir / MOVED_FILE).exists():
                continue
            if code is None:  # stopped by us to (re)install
                continue
            delay = 1.0 if trio.current_time() - started > 60 else min(delay * 2, 30.0)
            _event(logging.WARNING, "coordinator_role.exited", code=code, restart_in=delay)
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _run_child(self, role: Mapping[str, Any]) -> int | None:
        import trio

        argv = [*_lab_argv(), "server", "run", "--listen", str(role["listen"])]
        if isinstance(role.get("advertise"), str):
            argv += ["--advertise", role["advertise"]]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(LAB_HOME=str(self.dir), PYTHONUNBUFFERED="1")
        (self.dir / ENDPOINT_FILE).unlink(missing_ok=True)
        logf = os.open(self.dir / "coordinator.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

        async def terminate(proc: Any) -> None:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
                return
            proc.kill()

        self._scope = trio.CancelScope()
        self.state = "starting"
        try:
            with self._scope:
                proc = await trio.lowlevel.open_process(argv, env=env, stdin=subprocess_devnull(), stdout=logf, stderr=logf)
                self.pid, self.state = proc.pid, "running"
                _event(logging.INFO, "coordinator_role.started", pid=proc.pid, listen=role["listen"], home=self.dir)
                try:
                    code = await proc.wait()
                except trio.Cancelled:
                    with trio.CancelScope(shield=True):
                        await terminate(proc)
                    raise
                self.state = f"exited with status {code}"
                return int(code)
            return None
        finally:
            os.close(logf)
            self._scope, self.pid = None, None
            if self.state in ("starting", "running"):
                self.state = "stopped"


def subprocess_devnull() -> int:
    import subprocess

    return subprocess.DEVNULL


async def on_checkin_reply(agent: Any, home: Path, coordinator: str, reply: Mapping[str, Any]) -> str | None:
    """The agent's side of a check-in reply: keep ``stores`` current in enrollment.yaml, follow a
    ``moved_to`` redirect (after a successful check-in there), carry out a ``migrate`` instruction,
    drop an aborted role. Returns the coordinator endpoint to use from now on when it changed."""
    from lab.agent.sync import ENROLLMENT_FILE

    stores = reply.get("stores")
    if isinstance(stores, list) and stores and all(isinstance(s, str) for s in stores):
        try:
            _update_enrollment(home / ENROLLMENT_FILE, stores=list(stores))
        except OSError as exc:
            _event(logging.WARNING, "checkin.enrollment_not_updated", reason=exc.strerror or str(exc))
    role: CoordinatorRole | None = getattr(agent, "coordinator_role", None)
    abort = reply.get("migrate_abort")
    if isinstance(abort, str) and role is not None:
        role.remove(abort)
    instr = reply.get("migrate")
    if isinstance(instr, dict) and role is not None:
        await _carry_out(agent, role, home, coordinator, instr)
    moved = reply.get("moved_to")
    if isinstance(moved, str) and moved and moved != coordinator:
        from lab.agent.sync import checkin_once

        from lab.common.rpc import parse_endpoint

        parse_endpoint(moved, 7443)
        try:
            await checkin_once(home, moved)  # the new one must answer as coordinator of our CA first
        except (LabError, OSError) as exc:
            _event(logging.WARNING, "checkin.redirect_unreachable", coordinator=moved, reason=str(exc)[:200])
            return None
        _update_enrollment(home / ENROLLMENT_FILE, coordinator=moved)
        _event(logging.INFO, "checkin.coordinator_moved", old=coordinator, new=moved)
        return moved
    return None


def _update_enrollment(path: Path, **changes: Any) -> None:
    from lab.common.identity import write_private_file

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(doc, dict) or all(doc.get(k) == v for k, v in changes.items()):
        return
    doc.update(changes)
    mode = path.stat().st_mode & 0o777
    write_private_file(path, yaml.safe_dump(doc, sort_keys=False).encode(), overwrite=True)
    os.chmod(path, mode)


async def _carry_out(agent: Any, role: CoordinatorRole, home: Path, coordinator: str, instr: Mapping[str, Any]) -> None:
    """Fetch the bundle, install it, start the role, report ready (or why not)."""
    from lab.common import rpc
    from lab.store.node import load_home_identity

    id, listen, advertise = instr.get("id"), instr.get("listen"), instr.get("advertise")
    if not all(isinstance(x, str) and x for x in (id, listen, advertise)):
        _event(logging.WARNING, "migrate.bad_instruction")
        return
    identity = load_home_identity(home)
    host, port = rpc.parse_endpoint(coordinator, 7443)

    async def call(method: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        async with rpc.connect(host, port, identity=identity, timeout=10) as conn:
            if "coordinator" not in conn.peer.roles:
                raise NotEntitled(f"{coordinator} is not the coordinator")
            out: dict[str, Any] = await conn.call(method, body, timeout=timeout)
            return out

    current = role.role()
    try:
        if current is None or current.get("id") != id or role.state.startswith("exited"):
            reply = await call("migrate.fetch", {"id": id})
            bundle = decode_bundle_untrusted(reply.get("bundle"), identity.ca_public_key)
            if bundle.id != id or bundle.node != identity.certificate.name:
                raise RemoteProtocolError("bundle: for another migration or node")
            await role.install(bundle, listen, advertise)
            _event(logging.INFO, "migrate.installed", id=id, home=role.dir, files=len(bundle.files))
        await role.wait_ready(60)
        await call("migrate.ready", {"id": id, "endpoint": advertise})
        _event(logging.INFO, "migrate.reported_ready", id=id, endpoint=advertise)
    except (LabError, OSError) as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:250]}"
        _event(logging.WARNING, "migrate.node_failed", id=id, reason=reason)
        role.remove(id)
        try:
            await call("migrate.failed", {"id": id, "reason": reason}, timeout=10)
        except (LabError, OSError):
            pass


# ---------------------------------------------------------------------------------------------
# CLI side: `lab server migrate`


async def _call(endpoint: str, identity: Any, method: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    from lab.common import rpc
    from lab.common.errors import AuthError

    host, port = rpc.parse_endpoint(endpoint, 7443)
    async with rpc.connect(host, port, identity=identity, timeout=5) as conn:
        if "coordinator" not in conn.peer.roles:
            raise AuthError(f"{endpoint} is {conn.peer.name!r}, not a coordinator")
        out: dict[str, Any] = await conn.call(method, body, timeout=timeout)
        return out


async def _answers(endpoint: str, identity: Any) -> bool:
    try:
        await _call(endpoint, identity, "ping", {}, timeout=5)
    except (LabError, OSError):
        return False
    return True


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


async def run_migration(
    paths: Any, to: str, listen: str, *, serve_at: str, grace: float, timeout: float,
    confirm: Callable[[], bool], say: Callable[[str], None],
) -> dict[str, Any]:
    """`lab server migrate --to NODE`: against the daemon this home talks to (config.yaml
    ``server:``, or a running local `lab server run`), else a daemon served in-process at
    ``serve_at`` for the duration (local mode). MigrationFailed names the step that failed."""
    import trio

    from lab.coordinator.engine import _read_settings
    from lab.coordinator.enrollment import load_identity

    home = Path(paths.home)
    identity = load_identity(home, "admin")
    server = _read_settings(home).get("server")
    old: str | None = server if isinstance(server, str) and server else None
    if old is None:
        try:
            local = (home / ENDPOINT_FILE).read_text().strip()
        except OSError:
            local = ""
        if local and await _answers(local, identity):
            old = local
    async with trio.open_nursery() as nursery:
        served = trio.Event()
        if old is None:  # local mode, no daemon: serve one in-process while the move runs
            from lab.coordinator import daemon

            async def serve_task(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await daemon.serve(paths, serve_at, task_status=task_status)
                finally:
                    served.set()

            try:
                port = await nursery.start(serve_task)
            except (LabError, OSError) as exc:
                raise MigrationFailed(f"serving the local coordinator at {serve_at} failed: {_why(exc)}; nothing changed") from None
            host = serve_at.rsplit(":", 1)[0].strip("[]")
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            old = _host_port(host, port)
            say(f"→ local mode: serving this home's coordinator at {serve_at} until the move is done")
        else:
            served.set()
        try:
            result = await _drive(home, old, identity, to, listen, grace, timeout, confirm, say)
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        if not served.is_set():
            say(f"→ waiting for the agents to learn the new endpoint (at most {grace:g} s)")
            await served.wait()
            result["old_stopped"] = True
        else:
            deadline = trio.current_time() + grace + 15
            while trio.current_time() < deadline and await _answers(old, identity):
                await trio.sleep(0.5)
            result["old_stopped"] = not await _answers(old, identity)
        say("✓ the old coordinator stopped" if result["old_stopped"]
            else f"⚠ the old coordinator at {old} still answers; it stops by itself once its agents moved")
    return result


async def _drive(home: Path, old: str, identity: Any, to: str, listen: str, grace: float, timeout: float,
                 confirm: Callable[[], bool], say: Callable[[str], None]) -> dict[str, Any]:
    import trio

    try:
        plan = await _call(old, identity, "migrate.plan", {"to": to, "listen": listen, "grace": grace})
    except (LabError, OSError) as exc:
        raise MigrationFailed(f"plan failed: {_why(exc)} (coordinator {old}); nothing changed") from None
    say(render_plan(plan, str(home)))
    if not await trio.to_thread.run_sync(confirm):
        raise UsageError("not migrated")
    try:
        started = await _call(old, identity, "migrate.start", {"to": to, "listen": listen})
    except (LabError, OSError) as exc:
        raise MigrationFailed(f"start failed: {_why(exc)}; nothing changed") from None
    id, endpoint = started["id"], started["endpoint"]
    step = f"waiting for {to}"
    try:
        say(f"→ waiting for {to} to check in and take the state (at most {timeout:g} s)")
        deadline = trio.current_time() + timeout
        while True:
            p = (await _call(old, identity, "migrate.status", {})).get("pending") or {}
            if p.get("id") != id:
                raise StateError("another migration replaced this one")
            if p.get("stage") == "ready":
                break
            if p.get("stage") == "failed":
                raise StateError(str(p.get("error")))
            if trio.current_time() > deadline:
                raise StateError(f"{to} did not take the state within {timeout:g} s (is its agent running and "
                                 f"checking in? stage: {p.get('stage')})")
            await trio.sleep(0.3)
        say(f"→ {to} took the state and serves the coordinator at {endpoint}")
        step = f"verifying {endpoint}"
        deadline = trio.current_time() + 30
        while True:
            try:
                new = await _call(endpoint, identity, "migrate.status", {})
                break
            except (LabError, OSError):
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.3)
        if not hmac.compare_digest(str(new.get("ca")), str(plan["ca"])):
            raise StateError(f"it holds CA {str(new.get('ca'))[:16]}…, not {plan['ca'][:16]}…")
        if new.get("servers") != plan["servers"] or new.get("node") != to:
            raise StateError(f"it has {new.get('servers')} servers on {new.get('node')}, expected {plan['servers']} on {to}")
        say(f"→ verified: {endpoint} answers as coordinator, CA {plan['ca'][:16]}…, {plan['servers']} servers")
        step = f"labelling {to} {SERVER_LABEL}"
        await _call(endpoint, identity, "migrate.adopt", {"node": to, "previous": plan.get("from_node")})
        step = "switching the CLI config"
        switch_config(home, endpoint)
    except (LabError, OSError) as exc:
        try:
            await _call(old, identity, "migrate.abort", {"id": id, "reason": f"{step}: {_why(exc)}"[:300]}, timeout=10)
        except (LabError, OSError):
            pass
        raise MigrationFailed(f"{step} failed: {_why(exc)}; the old coordinator at {old} stays authoritative "
                              "(migration aborted; rerun it when fixed)") from None
    except BaseException:  # interrupted (Ctrl-C): do not leave the old coordinator frozen
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await _call(old, identity, "migrate.abort", {"id": id, "reason": f"{step}: interrupted"}, timeout=5)
            except (LabError, OSError):
                pass
        raise
    say(f"→ CLI config: server: {endpoint}")
    try:
        await _call(old, identity, "migrate.finish", {"id": id, "endpoint": endpoint, "grace": grace}, timeout=10)
    except (LabError, OSError) as exc:
        say(f"⚠ the old coordinator did not take the stop ({_why(exc)}): stop it yourself; {endpoint} is authoritative")
    return {"from": old, "from_node": plan.get("from_node"), "to": to, "endpoint": endpoint, "id": id,
            "servers": plan["servers"], "ca": plan["ca"]}
