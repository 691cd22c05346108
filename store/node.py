"""The store role as a trio service: the sans-IO cores of :mod:`lab.store` over :mod:`lab.common.rpc`.

:func:`run_store` opens the dataset, listens, and runs::

    rpc.serve ── handler ─┬─ store.gossip          peer stores (role "store"): one Gossip message in,
                          │                         its replies out (push and anti-entropy)
                          ├─ store.sync  (stream)   agents: SyncRequest → SyncUpdate, then pushes
                          ├─ store.fetch           agents: one entitled secret
                          ├─ store.set / .delete / .publish    admin or coordinator certificates
                          ├─ store.status          admin, coordinator or store certificates
                          ├─ store.meta            admin or coordinator: per-path metadata, no values
                          ├─ store.backup / .restore   admin only: age-encrypted backup pages; recovery writes
                          └─ store.key             a store of the current policy: the dataset key sealed to it
    one link per --peer endpoint, and per store of the signed directory (_lab/stores): connect,
    reconnect with backoff and jitter, carry eager pushes
    no replica and no sealed key file: ask the --peer stores for the key first (request_dataset_key)
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
from lab.store import announce
from lab.store import backup as backup_mod
from lab.store import keys
from lab.store.dataset import Dataset
from lab.store.gossip import Gossip
from lab.store.policy import STORES_PATH, Enforcer, PolicyDocument, StoreDirectory, publish
from lab.store.records import MAX_VALUE, SYSTEM_PREFIX, Meta, check_path, decode_message_untrusted
from lab.store.serve import WRITER_ROLES, AgentSecret, StoreService, SyncRequest, SyncUpdate

__all__ = [
    "DEFAULT_AE_INTERVAL", "DEFAULT_STORE_PORT", "Backoff", "NodeConfig", "StoreNode", "jittered",
    "load_home_identity", "needs_key", "request_dataset_key", "run_store",
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
ADMIN_ROLE: Final = "admin"
MAX_RECIPIENTS: Final = 64
MAX_BACKUP_HAVE: Final = 1 << 20
MAX_RESTORE_ITEMS: Final = 10000
KEY_WAIT_CAP: Final = 10.0  # longest wait between two rounds of asking the peers for the dataset key


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


def needs_key(home: Path, create: bool = False) -> bool:
    """No replica, no sealed key file and no ``--create``: the dataset key must come from a peer."""
    return not create and not (home / DATASET_DIR / "data.mdb").exists() and not (home / SEALED_KEY_FILE).exists()


def open_dataset(home: Path, node: str, node_key: NodeKey, *, create: bool = False, durable: bool = True,
                 sealed_key: bytes | None = None) -> Dataset:
    """The replica in ``<home>/store``: open it; else join with ``<home>/dataset.key.sealed`` (the
    dataset key sealed to this node by a running store, removed once used) or with ``sealed_key``
    (the same, handed over by a peer store: :func:`request_dataset_key`); else, with ``create``,
    a new cluster's first replica."""
    directory = home / DATASET_DIR
    sealed = home / SEALED_KEY_FILE
    if sealed_key is not None and not (directory / "data.mdb").exists():
        return Dataset.join(directory, node, sealed_key, node_key, durable=durable)
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
    raise ConfigError(f"no store dataset in {directory}: pass --create for a new cluster, --peer to ask a running store "
                      f"for the key, or put the key "
                      f"sealed to this node in {sealed}")


async def request_dataset_key(identity: rpc.Identity, peers: Sequence[str], config: NodeConfig | None = None, *,
                              rng: random.Random | None = None) -> bytes:
    """Ask the peer stores, in random order and again with backoff until one answers, for the
    dataset key sealed to this node (``store.key``). A peer answers only a store of its current
    signed policy; the answer opens only with this node's private key (checked here, then dropped:
    :meth:`Dataset.join` opens it again). Never logged."""
    config = config or NodeConfig()
    rng = rng or random.Random()
    cap = max(config.backoff_base, min(config.backoff_cap, KEY_WAIT_CAP))
    backoff = Backoff(config.backoff_base, cap, random.Random(rng.random()))
    _log(logging.INFO, "store.waiting_for_key", node=identity.certificate.name, peers=len(peers))
    while True:
        order = list(peers)
        rng.shuffle(order)
        for ep in order:
            host, port = rpc.parse_endpoint(ep, DEFAULT_STORE_PORT)
            try:
                async with rpc.connect(host, port, identity=identity, timeout=5.0) as conn:
                    if STORE_ROLE not in conn.peer.roles:
                        raise AuthError(f"{ep} answered as {conn.peer.name!r}, which is not a store")
                    reply = await conn.call("store.key", {}, timeout=15)
                    name = conn.peer.name
                sealed = reply.get("sealed") if isinstance(reply, dict) else None
                if not isinstance(sealed, bytes) or len(sealed) > 256:
                    raise StoreError(f"{ep}: malformed store.key reply")
                keys.open_sealed(sealed, identity.key).close()  # sealed to us? (StoreError if not)
            except (LabError, OSError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                _log(logging.INFO, "store.key_wait", endpoint=ep, reason=reason)
                continue
            _log(logging.INFO, "store.key_received", peer=name)
            return sealed
        await trio.sleep(backoff.next_delay())


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
    rpc.log_event(log, level, event, **fields)


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
        self.nursery: trio.Nursery | None = None  # where learnt peer links run (set by run_store)
        self._directory_seen: tuple[int, int] | None = None
        dataset.listeners.append(lambda _records: self.adopt_peers())
        self.met: set[str] = set()  # store names seen with a valid "store" certificate
        self.agents = 0
        self.last_anti_entropy: float | None = None  # when this node last completed an exchange it drove

    # -- membership -------------------------------------------------------------------------------

    def _meet(self, cert: Certificate) -> None:
        if cert.name != self.name and cert.name not in self.met:
            self.met.add(cert.name)
            self.gossip.seeds = tuple(sorted(self.met))

    def adopt_peers(self) -> list[PeerLink]:
        """Links to the stores of the signed directory (``_lab/stores``, members of the current
        policy only) that no link reaches yet — a store added later is gossiped with without
        restarting this one. Returns the new links (started in :attr:`nursery` when running)."""
        e = self.enforcer
        marker = (e.directory.version if e.directory else -1, e.policy.version if e.policy else -1)
        if marker == self._directory_seen:
            return []
        self._directory_seen = marker
        endpoints = {ln.endpoint for ln in self.links}
        names = {ln.name for ln in self.links if ln.name}
        new = []
        for name, ep in sorted(e.endpoints.items()):
            if name == self.name or name in names or ep in endpoints:
                continue
            link = PeerLink(ep)
            self.links.append(link)
            new.append(link)
            _log(logging.INFO, "store.peer_learnt", name=name, endpoint=ep)
            if self.nursery is not None:
                self.nursery.start_soon(self.run_link, link)
        return new

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
        if method in ("store.backup", "store.restore"):  # `lab secret backup|recover` against the cluster: admins only
            if ADMIN_ROLE not in peer.roles:
                raise AuthError(f"certificate {peer.name!r} may not {method.split('.')[1]} the store (needs the admin role)")
            return self._backup(peer, body) if method == "store.backup" else self._restore(peer, body)
        if method == "store.key":  # a new store of the current policy asks for the dataset key
            return self._hand_key(peer)
        if method == "store.coordinator":  # any enrolled node: where the coordinator answers now (store/announce.py)
            return announce.read(self, peer)
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
        record that replicates it. An older or equal version than the one held is refused.
        ``stores`` (the CA-signed store directory) may come along, or alone; an older or equal one
        is skipped silently. ``coordinator`` (the signed announcement) comes alone: store/announce.py."""
        if body.get("coordinator") is not None:
            return announce.accept(self, peer, body["coordinator"])
        if body.get("stores") is not None:
            directory = StoreDirectory.decode_untrusted(self._field(body, "stores", bytes))
            directory.verify(self.enforcer.ca_public_key)
            held = self.enforcer.directory
            if held is None or directory.version > held.version:
                rec = publish(self.dataset, directory, _now_ms(), by=peer.name)
                self._push(self.gossip.local_write([rec]))
                _log(logging.INFO, "store.published", path=rec.path, version=directory.version, by=peer.name)
            if body.get("policy") is None and body.get("revocations") is None:
                return {"path": STORES_PATH, "version": directory.version}
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

    def _backup(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        """One page of a backup: the live records' index entries, each value age-encrypted *here*
        to the given recipients (plaintext never leaves the store), the values the caller already
        holds at the same version skipped; ``key``: dataset-key.age when asked for (first page)."""
        recipients = self._field(body, "recipients", list)
        if not 0 < len(recipients) <= MAX_RECIPIENTS or not all(isinstance(r, str) and len(r) <= 4096 for r in recipients):
            raise UsageError(f"recipients: 1 to {MAX_RECIPIENTS} age recipients")
        have = self._field(body, "have", dict, optional=True) or {}
        if len(have) > MAX_BACKUP_HAVE or not all(isinstance(k, str) and isinstance(v, str) for k, v in have.items()):
            raise UsageError("have: a map of path to version strings")
        after = self._field(body, "after", str, optional=True)
        parsed = backup_mod.parse_recipients(recipients)
        page = backup_mod.export_page(self.dataset, parsed, have, after=after)
        if after is None and self._field(body, "key", bool, optional=True):
            page["key"] = backup_mod.export_key(self.dataset, parsed)
        _log(logging.INFO, "store.backup_page", by=peer.name, entries=len(page["secrets"]), recipients=len(recipients),
             key="key" in page, more=page["next"] is not None)
        return page

    def _restore(self, peer: rpc.PeerInfo, body: dict[str, Any]) -> dict[str, Any]:
        """Recovery from a backup: write each record with its metadata (set_by, set_at, type, ...)
        at a fresh version, which beats whatever this store holds; gossip carries it everywhere."""
        items = self._field(body, "records", list)
        if len(items) > MAX_RESTORE_ITEMS:
            raise UsageError(f"records: at most {MAX_RESTORE_ITEMS} per call")
        checked = []
        for item in items:
            if not isinstance(item, dict):
                raise UsageError("records: a list of maps")
            path, value = self._field(item, "path", str), self._field(item, "value", bytes)
            check_path(path)
            if path.startswith(SYSTEM_PREFIX):
                raise AuthError("system records are restored through store.publish (they are CA-signed)")
            if len(value) > MAX_VALUE:
                raise UsageError(f"{path}: value over {MAX_VALUE} bytes")
            try:
                meta = Meta._from_wire(self._field(item, "meta", dict), "meta")
            except wire.Invalid as exc:
                raise UsageError(f"{path}: {exc}") from exc
            checked.append((path, value, meta))
        written = [self.dataset.write(path, value, meta, _now_ms()) for path, value, meta in checked]
        self._push(self.gossip.local_write(written))
        _log(logging.INFO, "store.restored", records=len(written), by=peer.name)
        return {"versions": {r.path: str(r.version) for r in written}}

    def _hand_key(self, peer: rpc.PeerInfo) -> dict[str, Any]:
        """The dataset key sealed to the asking store's Noise key (``crypto_box_seal``: only the
        holder of that certificate's private key opens it). Only for a certificate that is valid
        now, not revoked, carries the ``store`` role and names a store of the current signed
        policy. The key itself is never logged."""
        cert = self.enforcer.authenticate(peer.certificate, time.time())  # CA, validity window, revocations
        if STORE_ROLE not in cert.roles:
            _log(logging.WARNING, "store.key_refused", name=cert.name, reason="not a store")
            raise AuthError(f"certificate {cert.name!r} is not a store")
        policy = self.enforcer.policy
        if policy is None or cert.name not in policy.stores:
            _log(logging.WARNING, "store.key_refused", name=cert.name, reason="not in the policy's stores")
            raise AuthError(f"{cert.name!r} is not a store of the current signed policy")
        sealed = self.dataset.seal_key_for(cert.noise_pub)
        _log(logging.INFO, "store.key_handed", name=cert.name, serial=cert.serial, policy=policy.version)
        return {"sealed": sealed}

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
                    if conn.peer.name == self.name:  # our own endpoint, e.g. in the enrollment's store list
                        self.links.remove(link)
                        _log(logging.INFO, "store.peer_is_self", endpoint=link.endpoint)
                        return
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
    sealed = None
    if needs_key(home, create) and peers:  # a new store: the dataset key from a running peer, over the RPC
        sealed = await request_dataset_key(identity, peers, config, rng=rng)
    dataset = open_dataset(home, identity.certificate.name, identity.key, create=create, durable=durable, sealed_key=sealed)
    try:
        node = StoreNode(dataset, identity.key, identity.certificate, identity.ca_public_key, peers, config, rng=rng)
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(functools.partial(
                rpc.serve, host, port, identity=node.identity, handler=node.handle, limits=config.limits))
            for link in node.links:
                nursery.start_soon(node.run_link, link)
            node.nursery = nursery
            node._directory_seen = None
            node.adopt_peers()  # the directory already held: links to stores added since the flags were written
            nursery.start_soon(node.anti_entropy)
            _log(logging.INFO, "store.ready", node=node.name, listen=f"{host}:{actual}", peers=len(node.links),
                 records=len(dataset), policy=node.enforcer.policy.version if node.enforcer.policy else None)
            if on_ready is not None:
                on_ready(node)
            task_status.started(actual)
    finally:
        dataset.close()
