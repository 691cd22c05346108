"""The old coordinator's side of the move: ``migrate.*`` in its daemon, who may fetch the
bundle, the write freeze while the state is away, and the check-in redirect afterwards."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from lab.common.errors import LabError, NotEntitled, NotFound, StateError, UsageError
from lab.coordinator.migrate._base import DEFAULT_GRACE, MOVED_FILE, SERVER_LABEL, choose_endpoint, event
from lab.coordinator.migrate.bundle import build_bundle, encode_bundle, origin_node


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

    announce: Callable[[str], Awaitable[Any]] | None = None  # the stores' announcement (announce.Announcer.publish)
    # While frozen only these are served (default deny: a method added later is refused until listed)
    READS: Final = frozenset({"ping", "checkin", "identity.show", "lifecycle.diff", "onboard.status", "tokens.list",
                              "secrets.stores", "secrets.definition", "secrets.consumers", "secrets.audit"})

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
        if self.frozen and not self.is_read(method):
            where = self.moved_to or (self.pending.endpoint if self.pending else "?")
            raise StateError(f"the coordinator is moving to {where}; {method} is refused here until the move is done "
                             "or aborted (retry against the new coordinator)")

    def is_read(self, method: str) -> bool:
        from lab.coordinator.daemon import ENGINE_READ

        return method in self.READS or method.startswith("migrate.") or (
            method.startswith("engine.") and method[len("engine."):] in ENGINE_READ)

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
        from lab.coordinator.enrollment import require_admin

        if method in ("migrate.fetch", "migrate.ready", "migrate.failed"):
            return self._from_node(peer, method, body)
        require_admin(peer, method)
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
        event(logging.INFO, "migrate.start", id=self.pending.id, to=to, endpoint=plan["endpoint"])
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
        event(logging.WARNING, "migrate.aborted", id=p.id, to=p.target, reason=reason)
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
        event(logging.INFO, "migrate.finished", id=id, to=p.target, endpoint=endpoint, grace=grace)
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
        if self.announce is not None and self.moved_to is not None:  # for the agents the redirect will miss
            await self.announce(self.moved_to)
        deadline = trio.current_time() + grace
        while trio.current_time() < deadline and not self.drained(nodes):
            await trio.sleep(0.2)
        await trio.sleep(0.5)  # let the last redirected replies go out
        event(logging.INFO, "migrate.stopping", moved_to=self.moved_to, redirected=len(self.redirected),
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
            event(logging.WARNING, "migrate.refused", peer=peer.address, name=peer.name, method=method, reason=str(exc))
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
            event(logging.INFO, "migrate.fetched", id=p.id, to=p.target, bytes=len(raw), files=len(bundle.files))
            return {"bundle": raw}
        if method == "migrate.ready":
            endpoint = _text(body, "endpoint")
            if p.stage != "fetched":
                raise StateError(f"migration {p.id} is {p.stage}: fetch the state first")
            if endpoint != p.endpoint:
                raise UsageError(f"ready at {endpoint}, but the migration expects {p.endpoint}")
            p.stage = "ready"
            event(logging.INFO, "migrate.ready", id=p.id, to=p.target, endpoint=endpoint)
            return {"ok": True}
        reason = str(body.get("reason") or "failed on the node")[:300]
        p.stage, p.error = "failed", f"{p.target}: {reason}"
        event(logging.WARNING, "migrate.node_failed", id=p.id, to=p.target, reason=reason)
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

