"""The store role as a trio service: the sans-IO cores of :mod:`lab.store` over :mod:`lab.common.rpc`.

:func:`run_store` opens the dataset, listens, and runs::

    rpc.serve ── handler ─┬─ store.gossip          peer stores (role "store"): one Gossip message in,
                          │                         its replies out (push and anti-entropy)
                          ├─ store.sync  (stream)   agents: SyncRequest → SyncUpdate, then pushes
                          ├─ store.fetch           agents: one entitled secret
                          ├─ store.set / .delete / .publish    admin or coordinator certificates
                          ├─ store.status          admin, coordinator or store certificates
                          └─ store.meta            admin or coordinator: per-path metadata, no values
    one link per --peer endpoint: connect, reconnect with backoff and jitter, carry eager pushes
    anti-entropy: every ``interval`` (± jitter) one exchange with a random connected member
    tombstone GC after each anti-entropy round

Store-protocol messages travel as their strict encoding (``{"msg": bytes}``), decoded with
:func:`lab.store.records.decode_message_untrusted` on arrival, so the wire sees exactly what the
in-memory simulator (:mod:`lab.store.simulate`) tests.

**Authorisation.** Every session is authenticated by the RPC layer (CA signature, validity,
the *current* revocation list, asked at each handshake and each request). On top: gossip needs
the ``store`` role and membership (the policy's ``stores``; before any policy, the stores this
node has met); writes need ``admin`` or ``coordinator``; agents get only what the signed policy
grants the name in their certificate (:class:`~lab.store.serve.StoreService`), and a refusal never
depends on whether the path exists.

The pure parts (:class:`Backoff`, :func:`jittered`) take their randomness explicitly and are
unit-tested without sockets (tests/unit/test_store_node.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from lab.common import rpc, wire
from lab.common.errors import AuthError, ConfigError, LabError, StateError, StoreError, TransportError, UsageError
from lab.common.identity import Certificate, NodeKey, RevocationList, verify_certificate
from lab.store.dataset import Dataset
from lab.store.gossip import Gossip
from lab.store.policy import Enforcer, PolicyDocument, publish
from lab.store.records import Meta, decode_message_untrusted
from lab.store.serve import WRITER_ROLES, AgentSecret, StoreService, SyncRequest, SyncUpdate

__all__ = [
    "DEFAULT_AE_INTERVAL", "DEFAULT_STORE_PORT", "Backoff", "NodeConfig", "StoreNode", "jittered",
    "load_home_identity", "run_store",
]

log = logging.getLogger("lab.store.node")

DEFAULT_STORE_PORT: Final = 7444
DEFAULT_AE_INTERVAL: Final = 5.0
DEFAULT_BACKOFF_BASE: Final = 0.2
DEFAULT_BACKOFF_CAP: Final = 10.0
DEFAULT_PUSH_QUEUE: Final = 1024
DEFAULT_HEARTBEAT: Final = 30.0  # an idle agent session gets an empty update this often
DATASET_DIR: Final = "store"
SEALED_KEY_FILE: Final = "dataset.key.sealed"
CA_PUB_KIND: Final = "lab-ca-pub-v1"
STORE_ROLE: Final = "store"
STATUS_ROLES: Final = frozenset({"admin", "coordinator", STORE_ROLE})


# ---------------------------------------------------------------------------------------------
# Pure helpers (no I/O, randomness and time passed in)


def jittered(interval: float, rng: random.Random, spread: float = 0.5) -> float:
    """``interval`` scaled by a uniform factor in ``[1 - spread, 1 + spread]``."""
    if interval < 0 or not 0 <= spread < 1:
        raise ValueError("interval must be >= 0 and spread in [0, 1)")
    return interval * (1 - spread + 2 * spread * rng.random())


@dataclasses.dataclass
class Backoff:
    """Exponential backoff with "full jitter": the n-th consecutive failure waits a uniform time in
    ``[0, min(cap, base * 2**n)]``, floored at ``base / 2`` (no hot loop); :meth:`reset` on success.

    ``rng`` is explicit so a test can pin the schedule."""

    base: float = DEFAULT_BACKOFF_BASE
    cap: float = DEFAULT_BACKOFF_CAP
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError("backoff needs 0 < base <= cap")

    def ceiling(self, failures: int | None = None) -> float:
        n = self.failures if failures is None else failures
        return min(self.cap, self.base * (2 ** min(n, 62)))

    def next_delay(self) -> float:
        """The wait before the next attempt, after one more failure."""
        ceiling = self.ceiling()
        self.failures += 1
        return max(self.base / 2, ceiling * self.rng.random())

    def reset(self) -> None:
        self.failures = 0


# ---------------------------------------------------------------------------------------------
# Files


def load_ca_public_key(path: Path) -> bytes:
    """A ``lab-ca-pub-v1 <base64>`` file (the agent home's ``ca.pub``)."""
    try:
        kind, _, body = path.read_text(encoding="ascii").strip().partition(" ")
        key = base64.b64decode(body, validate=True)
    except FileNotFoundError as exc:
        raise ConfigError("CA public key not found", file=str(path)) from exc
    except (OSError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"cannot read CA public key: {exc}", file=str(path)) from exc
    if kind != CA_PUB_KIND or len(key) != 32:
        raise ConfigError(f"not a {CA_PUB_KIND} file", file=str(path))
    return key


def load_home_identity(home: Path, revocations: Any = None, *, now: float | None = None) -> rpc.Identity:
    """``node.key`` + ``node.cert`` + ``ca.pub`` of an agent home as an :class:`rpc.Identity`."""
    ca_pub = load_ca_public_key(home / "ca.pub")
    key = NodeKey.load(home / "node.key")
    cert_path = home / "node.cert"
    try:
        raw = cert_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate: {exc.strerror or exc}", file=str(cert_path)) from exc
    try:
        cert = verify_certificate(raw, ca_pub, time.time() if now is None else now, None, key.public_key)
    except LabError as exc:
        raise ConfigError(f"certificate unusable: {exc}", file=str(cert_path)) from exc
    return rpc.Identity(key, cert, ca_pub, revocations)


def open_dataset(home: Path, node: str, node_key: NodeKey, *, create: bool = False, durable: bool = True) -> Dataset:
    """The replica in ``<home>/store``: open it; else join with ``<home>/dataset.key.sealed`` (the
    dataset key sealed to this node by a running store, removed once used); else, with ``create``,
    a new cluster's first replica."""
    directory = home / DATASET_DIR
    sealed = home / SEALED_KEY_FILE
    if (directory / "data.mdb").exists():
        try:
            return Dataset.open(directory, node, durable=durable)
        except StoreError:
            if not sealed.exists():
                raise
    if sealed.exists():
        ds = Dataset.join(directory, node, sealed.read_bytes(), node_key, durable=durable)
        sealed.unlink()
        return ds
    if create:
        return Dataset.create(directory, node, durable=durable)
    raise ConfigError(f"no store dataset in {directory}: pass --create for a new cluster, or put the key "
                      f"sealed to this node in {sealed}")


# ---------------------------------------------------------------------------------------------
# The node


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    ae_interval: float = DEFAULT_AE_INTERVAL
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    heartbeat: float = DEFAULT_HEARTBEAT
    limits: rpc.ServerLimits = rpc.ServerLimits()

    def __post_init__(self) -> None:
        if not self.ae_interval > 0 or not self.heartbeat > 0:
            raise ConfigError("anti-entropy interval and heartbeat must be positive")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _log(level: int, event: str, **fields: object) -> None:
    if log.isEnabledFor(level):
        log.log(level, "event=%s %s", event, " ".join(f"{k}={rpc._fmt(v)}" for k, v in fields.items() if v is not None))


class _Changes:
    """A broadcast "the dataset changed" for the agent streams (dataset listener → trio.Event)."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def fire(self, _records: object = None) -> None:
        self.event.set()
        self.event = trio.Event()


@dataclasses.dataclass
class PeerLink:
    """One configured peer endpoint: its connection (when up) and the pushes waiting for it."""

    endpoint: str
    name: str | None = None
    conn: rpc.Connection | None = None
    since: float | None = None
    last_error: str | None = None
    send: trio.MemorySendChannel[bytes] | None = None
    receive: trio.MemoryReceiveChannel[bytes] | None = None


class StoreNode:
    """One store process: dataset, enforcer, gossip, agent service, peer links."""

    def __init__(self, dataset: Dataset, identity_key: NodeKey, certificate: Certificate, ca_public_key: bytes,
                 peers: Sequence[str], config: NodeConfig = NodeConfig(), *, rng: random.Random | None = None) -> None:
        self.dataset = dataset
        self.name = certificate.name
        self.config = config
        self.rng = rng or random.Random()
        self.enforcer = Enforcer(ca_public_key)
        self.enforcer.load_from(dataset.reveal, dataset.records())
        dataset.system_checker = self.enforcer.system_checker
        self.identity = rpc.Identity(identity_key, certificate, ca_public_key, lambda: self.enforcer.revocations)
        self.gossip = Gossip(dataset, self.enforcer, seeds=())
        self.service = StoreService(dataset, self.enforcer)
        self.changes = _Changes()
        dataset.listeners.append(self.changes.fire)
        self.links = [PeerLink(p) for p in peers]
        self.met: set[str] = set()  # store names seen with a valid "store" certificate
        self.agents = 0
        self.last_anti_entropy: float | None = None  # when this node last completed an exchange it drove

    # -- membership -------------------------------------------------------------------------------

    def _meet(self, cert: Certificate) -> None:
        if cert.name != self.name and cert.name not in self.met:
            self.met.add(cert.name)
            self.gossip.seeds = tuple(sorted(self.met))

    def _link_for(self, name: str) -> PeerLink | None:
        for link in self.links:
            if link.name == name and link.conn is not None and not link.conn.closed:
                return link
        return None

    # -- local writes: eager push ----------------------------------------------------------------

    def _push(self, outgoing: list[tuple[str, wire.Message]]) -> None:
        for peer, msg in outgoing:
            link = self._link_for(peer)
            if link is None or link.send is None:
                continue  # unreachable now: anti-entropy repairs it later
            try:
                link.send.send_nowait(wire.encode(msg))
            except trio.WouldBlock:
                _log(logging.WARNING, "store.push_dropped", peer=peer, reason="queue full")

    # -- rpc handler -------------------------------------------------------------------------------

    def handle(self, peer: rpc.PeerInfo, req: wire.Request) -> Any:
        method, body = req.method, req.body
        if method == "store.gossip":
            return self._gossip(peer, body)
        if method == "store.sync":
            return self._sync(peer, body)
        if method == "store.fetch":
            return self._fetch(peer, body)
        if method in ("store.set", "store.delete", "store.publish"):
            if not WRITER_ROLES.intersection(peer.roles):
                raise AuthError(f"certificate {peer.name!r} may not write secrets (needs the admin or coordinator role)")
            return getattr(self, "_" + method.split(".")[1])(peer, body)
        if method == "store.status":
            if not STATUS_ROLES.intersection(peer.roles):
                raise AuthError(f"certificate {peer.name!r} may not read store status")
            return self.status()
        if method == "store.meta":  # read-only metadata for `lab get secrets` (never values)
            if not WRITER_ROLES.intersection(peer.roles):
                raise AuthError(f"certificate {peer.name!r} may not read secret metadata (needs the admin or coordinator role)")
            return self.meta()
        raise UsageError(f"unknown method {method[:64]!r}")

    @staticmethod
    def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        value = body.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UsageError(f"field {name!r} missing or of the wrong type")
        return value

    def _gossip(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        if STORE_ROLE not in peer.roles:
            raise AuthError(f"certificate {peer.name!r} is not a store")
        self._meet(peer.certificate)
        msg = decode_message_untrusted(self._field(body, "msg", bytes))
        replies = self.gossip.receive(peer.name, msg, _now_ms())
        return {"msgs": [wire.encode(m) for _, m in replies]}

    async def _sync(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        request = decode_message_untrusted(self._field(body, "msg", bytes))
        if not isinstance(request, SyncRequest):
            raise UsageError("store.sync takes a SyncRequest")
        sub, first = self.service.subscribe(peer.certificate, request, time.time())
        self.agents += 1
        _log(logging.INFO, "store.agent_subscribed", peer=peer.address, name=peer.name, sent=len(first.records),
             removed=len(first.removed))
        heartbeat = wire.encode(SyncUpdate((), (), False))
        try:
            yield {"msg": wire.encode(first)}
            last = trio.current_time()
            while not sub.closed:
                waiter = self.changes.event
                update = sub.poll()
                while update is not None:
                    yield {"msg": wire.encode(update)}
                    last = trio.current_time()
                    if update.final:
                        _log(logging.INFO, "store.agent_revoked", name=peer.name)
                        return
                    update = sub.poll()
                if trio.current_time() - last >= self.config.heartbeat:
                    yield {"msg": heartbeat}  # "all you hold is current": keeps the agent's cache fresh
                    last = trio.current_time()
                with trio.move_on_after(min(1.0, self.config.heartbeat)):  # re-poll: policy-only changes
                    await waiter.wait()
        finally:
            self.agents -= 1

    def _fetch(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        secret: AgentSecret = self.service.read(peer.certificate, self._field(body, "path", str))
        return {"path": secret.path, "version": [secret.version.wall_ms, secret.version.counter, secret.version.origin],
                "value": secret.value, "meta": secret.meta._to_wire()}

    def _set(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        meta = Meta.simple(
            peer.name, int(now * 1000), type=self._field(body, "type", str, optional=True) or "static",
            ttl=self._field(body, "ttl", int, optional=True), rotate_every=self._field(body, "rotate_every", int, optional=True),
            owner=self._field(body, "owner", str, optional=True) or "root",
            group=self._field(body, "group", str, optional=True) or "root",
            mode=self._field(body, "mode", int, optional=True) or 0o400,
        )
        rec = self.service.write(peer.certificate, self._field(body, "path", str), self._field(body, "value", bytes), meta, now,
                                 node=self._field(body, "node", str, optional=True))
        self._push(self.gossip.local_write([rec]))
        _log(logging.INFO, "store.set", path=rec.path, version=rec.version, by=peer.name)
        return {"path": rec.path, "version": str(rec.version)}

    def _delete(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        path = self._field(body, "path", str)
        if path.startswith("_lab/"):
            raise AuthError("system records are replaced, not deleted")
        rec = self.dataset.delete(path, _now_ms())
        if rec is not None:
            self._push(self.gossip.local_write([rec]))
        _log(logging.INFO, "store.delete", path=path, existed=rec is not None, by=peer.name)
        return {"path": path, "deleted": rec is not None}

    def _publish(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        """A CA-signed policy (``policy``) or revocation list (``revocations``), written as the
        record that replicates it. An older or equal version than the one held is refused."""
        signed: PolicyDocument | RevocationList
        if body.get("policy") is not None:
            signed = PolicyDocument.decode_untrusted(self._field(body, "policy", bytes))
            current = self.enforcer.policy
        else:
            signed = RevocationList.decode_untrusted(self._field(body, "revocations", bytes))
            current = self.enforcer.revocations  # type: ignore[assignment]
        signed.verify(self.enforcer.ca_public_key)
        if current is not None and signed.version <= current.version:
            raise StateError(f"version {signed.version} is not newer than the held {current.version}")
        rec = publish(self.dataset, signed, _now_ms(), by=peer.name)
        self._push(self.gossip.local_write([rec]))
        _log(logging.INFO, "store.published", path=rec.path, version=signed.version, by=peer.name)
        return {"path": rec.path, "version": signed.version}

    def status(self) -> dict[str, Any]:
        e = self.enforcer
        return {
            "node": self.name, "records": len(self.dataset), "root": self.dataset.root().hex(), "seq": self.dataset.seq,
            "policy": e.policy.version if e.policy else None, "revocations": e.revocations.version if e.revocations else None,
            "members": list(self.gossip.peers), "agents": self.agents, "stats": dict(self.gossip.stats),
            "secrets": sum(1 for r in self.dataset.records() if not r.is_system), "last_anti_entropy": self.last_anti_entropy,
            "peers": [
                {"endpoint": ln.endpoint, "name": ln.name, "connected": ln.conn is not None and not ln.conn.closed,
                 "since": ln.since, "last_error": ln.last_error}
                for ln in self.links
            ],
        }

    def meta(self) -> dict[str, Any]:
        """``{path: {version, set_by, set_at, type}}`` of every live non-system record (no values,
        no ciphertext): what `lab get secrets` shows as LAST ROTATED / SET BY."""
        return {"node": self.name, "records": {
            r.path: {"version": r.wall_ms, "set_by": r.meta.set_by, "set_at": r.meta.set_at, "type": r.meta.type}
            for r in self.dataset.records() if not r.is_system and r.meta is not None}}

    # -- peer links --------------------------------------------------------------------------------

    async def run_link(self, link: PeerLink) -> None:
        """Keep one connection to ``link.endpoint``: connect, carry pushes, reconnect with backoff."""
        host, port = rpc.parse_endpoint(link.endpoint, DEFAULT_STORE_PORT)
        backoff = Backoff(self.config.backoff_base, self.config.backoff_cap, random.Random(self.rng.random()))
        while True:
            try:
                async with rpc.connect(host, port, identity=self.identity, timeout=5.0) as conn:
                    if STORE_ROLE not in conn.peer.roles:
                        raise AuthError(f"{link.endpoint} answered as {conn.peer.name!r}, which is not a store")
                    link.name, link.since, link.last_error = conn.peer.name, time.time(), None
                    self._meet(conn.peer.certificate)
                    link.send, link.receive = trio.open_memory_channel[bytes](DEFAULT_PUSH_QUEUE)
                    link.conn = conn
                    backoff.reset()
                    _log(logging.INFO, "store.peer_up", endpoint=link.endpoint, name=link.name)
                    # A fresh link may have missed pushes: reconcile at once.
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._exchange_safely, link)
                        nursery.start_soon(self._pump, link, conn, nursery.cancel_scope)
                        while not conn.closed:
                            await trio.sleep(0.25)
                        nursery.cancel_scope.cancel()
                    raise TransportError(f"connection to {link.name} lost")
            except (LabError, OSError) as exc:
                link.last_error = str(exc)[:200]
                _log(logging.INFO, "store.peer_down", endpoint=link.endpoint, name=link.name, reason=link.last_error)
            finally:
                link.conn, link.since = None, None
                if link.send is not None:
                    link.send.close()
                link.send = link.receive = None
            await trio.sleep(backoff.next_delay())

    async def _pump(self, link: PeerLink, conn: rpc.Connection, scope: trio.CancelScope) -> None:
        """Carry queued eager pushes to the peer, in order."""
        assert link.receive is not None
        async for data in link.receive:
            try:
                await conn.call("store.gossip", {"msg": data}, timeout=30)
            except rpc.RemoteError as exc:  # refused (e.g. its policy does not list us yet): next one
                _log(logging.WARNING, "store.push_refused", peer=link.name, reason=str(exc)[:200])
            except TransportError:
                scope.cancel()
                return

    async def _exchange_safely(self, link: PeerLink) -> None:
        try:
            await self.exchange(link)
        except LabError as exc:
            _log(logging.INFO, "store.ae_failed", peer=link.name, reason=str(exc)[:200])

    async def exchange(self, link: PeerLink) -> None:
        """One anti-entropy exchange with a connected peer, driven from our side."""
        conn, name = link.conn, link.name
        if conn is None or name is None or name not in self.gossip.peers:
            return
        pending = [m for _, m in self.gossip.start_round(self.rng, name)]
        while pending:
            msg = pending.pop(0)
            reply = await conn.call("store.gossip", {"msg": wire.encode(msg)}, timeout=60)
            msgs = reply.get("msgs")
            if not isinstance(msgs, list) or not all(isinstance(m, bytes) for m in msgs):
                raise TransportError(f"{name}: malformed gossip reply")
            for raw in msgs:
                for _, out in self.gossip.receive(name, decode_message_untrusted(raw), _now_ms()):
                    pending.append(out)
        self.last_anti_entropy = time.time()

    async def anti_entropy(self) -> None:
        while True:
            await trio.sleep(jittered(self.config.ae_interval, self.rng))
            members = set(self.gossip.peers)
            up = [ln for ln in self.links if ln.conn is not None and not ln.conn.closed and ln.name in members]
            if up:
                await self._exchange_safely(self.rng.choice(up))
            try:
                self.gossip.collect_garbage(_now_ms())
            except StoreError as exc:
                _log(logging.WARNING, "store.gc_failed", reason=str(exc))


async def run_store(
    home: str | Path,
    listen: str,
    peers: Sequence[str] = (),
    identity: rpc.Identity | None = None,
    *,
    config: NodeConfig = NodeConfig(),
    create: bool = False,
    durable: bool = True,
    rng: random.Random | None = None,
    on_ready: Callable[[StoreNode], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one store until cancelled; ``started(port)`` once it listens.

    ``identity`` defaults to the home's ``node.key``/``node.cert``/``ca.pub``; its certificate
    must carry the ``store`` role. The revocation list the RPC layer checks is always the one the
    dataset holds (replicated by gossip)."""
    home = Path(home)
    if identity is None:
        identity = load_home_identity(home)
    if STORE_ROLE not in identity.certificate.roles:
        raise ConfigError(f"certificate {identity.certificate.name!r} lacks the {STORE_ROLE!r} role")
    host, port = rpc.parse_endpoint(listen, DEFAULT_STORE_PORT)
    dataset = open_dataset(home, identity.certificate.name, identity.key, create=create, durable=durable)
    try:
        node = StoreNode(dataset, identity.key, identity.certificate, identity.ca_public_key, peers, config, rng=rng)
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(functools.partial(
                rpc.serve, host, port, identity=node.identity, handler=node.handle, limits=config.limits))
            for link in node.links:
                nursery.start_soon(node.run_link, link)
            nursery.start_soon(node.anti_entropy)
            _log(logging.INFO, "store.ready", node=node.name, listen=f"{host}:{actual}", peers=len(node.links),
                 records=len(dataset), policy=node.enforcer.policy.version if node.enforcer.policy else None)
            if on_ready is not None:
                on_ready(node)
            task_status.started(actual)
    finally:
        dataset.close()
