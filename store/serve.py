"""Serving agents, sans-IO: the sync exchange of DESIGN.md and single fetches and writes.

An agent keeps one session to a store. It opens with :class:`SyncRequest` ``{path: version}`` of
what it holds; the store answers one :class:`SyncUpdate` with every entitled record that is newer
than the agent's copy (or that it lacks) and every path the agent must drop (no longer entitled,
deleted, or the node revoked). The session then stays subscribed: :meth:`Subscription.poll`
returns the next :class:`SyncUpdate` after the dataset, the policy or the revocation list changed,
or None. A revoked node's last update removes everything it holds and has ``final`` set; the
session closes after it.

Values travel in plaintext *inside* the Noise session (the agent re-encrypts them under its cache
key); the ciphertext under the dataset key never leaves the stores.

The requester is identified by the certificate of its session, verified here against the CA,
the validity window and the current revocation list; a node id inside a message is never trusted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Final

from lab.common import wire
from lab.common.errors import AuthError, NotFound
from lab.common.identity import Certificate
from lab.store.dataset import Dataset
from lab.store.hlc import Version
from lab.store.policy import Enforcer
from lab.store.records import MESSAGES, MAX_VALUE, NODE_PATTERN, PATH_PATTERN, Meta, SecretRecord, check_path, machine_path

__all__ = ["AgentSecret", "Fetch", "StoreService", "Subscription", "SyncRequest", "SyncUpdate", "VersionRef", "WRITER_ROLES"]

WRITER_ROLES: Final = frozenset({"admin", "coordinator"})
MAX_HELD: Final = 65536
MAX_UPDATE_BYTES: Final = 8 * 1024 * 1024  # half the wire's 16 MiB message cap
_Path = Annotated[str, wire.Str(max_len=256, min_len=1, pattern=PATH_PATTERN)]


@wire.record
@dataclasses.dataclass(frozen=True)
class VersionRef(wire.Record):
    wall_ms: Annotated[int, wire.UInt()]
    counter: Annotated[int, wire.UInt(2**32 - 1)]
    origin: Annotated[str, wire.Str(max_len=64, min_len=1, pattern=NODE_PATTERN)]

    @property
    def version(self) -> Version:
        return Version(self.wall_ms, self.counter, self.origin)

    @classmethod
    def of(cls, v: Version) -> VersionRef:
        return cls(v.wall_ms, v.counter, v.origin)


@wire.record
@dataclasses.dataclass(frozen=True)
class AgentSecret(wire.Record):
    """One secret as an agent receives it: its logical path, version, value and delivery meta."""

    path: _Path
    version: Annotated[VersionRef, wire.Struct(VersionRef)]
    value: Annotated[bytes, wire.Bytes(max_len=MAX_VALUE)] = dataclasses.field(repr=False)
    meta: Annotated[Meta, wire.Struct(Meta)]


@wire.message("store.sync.request", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class SyncRequest(wire.Message):
    have: Annotated[dict[str, VersionRef], wire.Dict(wire.Str(max_len=256, min_len=1, pattern=PATH_PATTERN), wire.Struct(VersionRef), max_items=MAX_HELD)]


@wire.message("store.sync.update", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class SyncUpdate(wire.Message):
    records: Annotated[tuple[AgentSecret, ...], wire.List(wire.Struct(AgentSecret), max_items=MAX_HELD)]
    removed: Annotated[tuple[str, ...], wire.List(wire.Str(max_len=256, min_len=1, pattern=PATH_PATTERN), max_items=MAX_HELD)]
    final: Annotated[bool, wire.Bool()]

    def __hash__(self) -> int:
        return hash((self.records, self.removed, self.final))


@wire.message("store.fetch", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class Fetch(wire.Message):
    path: _Path


def _split(records: list[AgentSecret], removed: list[str], final: bool) -> list[SyncUpdate]:
    """One update, or several when the values would pass MAX_UPDATE_BYTES (removals and ``final``
    ride on the last one)."""
    out: list[SyncUpdate] = []
    batch: list[AgentSecret] = []
    size = 0
    for r in records:
        n = len(r.value) + len(r.path) + 256
        if batch and size + n > MAX_UPDATE_BYTES:
            out.append(SyncUpdate(tuple(batch), (), False))
            batch, size = [], 0
        batch.append(r)
        size += n
    out.append(SyncUpdate(tuple(batch), tuple(removed), final))
    return out


class Subscription:
    """One agent session's view: what it holds, and what it must be sent next.

    An update too large for one message is split; :meth:`poll` hands out the remaining parts first.
    """

    def __init__(self, service: StoreService, cert: Certificate, have: Mapping[str, Version]) -> None:
        self.service = service
        self.cert = cert
        self.held: dict[str, Version] = dict(have)
        self.closed = False
        self._pending: list[SyncUpdate] = []
        self._seq = service.dataset.seq
        self._policy = self._policy_marker()

    def _queue(self, records: list[AgentSecret], removed: list[str], final: bool) -> SyncUpdate:
        first, *rest = _split(records, removed, final)
        self._pending.extend(rest)
        return first

    def _policy_marker(self) -> tuple[int, int]:
        e = self.service.enforcer
        return (e.policy.version if e.policy else -1, e.revocations.version if e.revocations else -1)

    def _full(self) -> SyncUpdate:
        """Compare everything the node is entitled to with everything it holds."""
        ds, e = self.service.dataset, self.service.enforcer
        if e.is_revoked(self.cert):
            return self._revoked()
        if e.policy is None:
            # A store without a signed policy yet (new, wiped, recovering) knows no entitlement:
            # it must not tell agents to drop what they hold — stale beats absent.
            return self._queue([], [], False)
        ent = e.entitlement(self.cert)
        records, removed = [], []
        for logical in sorted(set(ent) | set(self.held)):
            stored = ent.get(logical)
            rec = ds.get(stored) if stored is not None else None
            if stored is not None and rec is None:
                continue  # entitled, but this replica has not received the value yet: keep the agent's copy
            if rec is None or rec.deleted:
                if logical in self.held:
                    removed.append(logical)
                    del self.held[logical]
            elif logical not in self.held or self.held[logical] < rec.version:
                records.append(self.service.agent_secret(logical, rec))
                self.held[logical] = rec.version
        return self._queue(records, removed, False)

    def _revoked(self) -> SyncUpdate:
        removed = tuple(sorted(self.held))
        self.held.clear()
        self.closed = True
        self._pending.clear()
        return SyncUpdate((), removed, True)

    def initial(self) -> SyncUpdate:
        self._seq = self.service.dataset.seq
        return self._full()

    def poll(self) -> SyncUpdate | None:
        """The next update for this agent, or None when nothing it holds or may hold changed."""
        if self.closed:
            return None
        ds, e = self.service.dataset, self.service.enforcer
        if e.is_revoked(self.cert):
            return self._revoked()
        if self._pending:
            return self._pending.pop(0)
        marker = self._policy_marker()
        if marker != self._policy:
            self._policy = marker
            self._seq = ds.seq
            update = self._full()
            return update if (update.records or update.removed or update.final) else None
        ent = e.entitlement(self.cert)
        by_stored = {stored: logical for logical, stored in ent.items()}
        records, removed = [], []
        while True:
            changes = ds.changes_since(self._seq)
            if not changes:
                break
            for seq, rec in changes:
                self._seq = seq
                logical = by_stored.get(rec.path)
                if logical is None:
                    continue
                if rec.deleted:
                    if logical in self.held:
                        removed.append(logical)
                        del self.held[logical]
                elif logical not in self.held or self.held[logical] < rec.version:
                    records.append(self.service.agent_secret(logical, rec))
                    self.held[logical] = rec.version
        if not records and not removed:
            return None
        return self._queue(records, removed, False)


class StoreService:
    """What a store answers agents and operators: sync, fetch, write. One per store."""

    def __init__(self, dataset: Dataset, enforcer: Enforcer) -> None:
        self.dataset = dataset
        self.enforcer = enforcer

    def agent_secret(self, logical: str, rec: SecretRecord) -> AgentSecret:
        assert rec.meta is not None
        return AgentSecret(logical, VersionRef.of(rec.version), self.dataset.reveal(rec), rec.meta)

    def subscribe(self, cert: Certificate | bytes, request: SyncRequest, now: float) -> tuple[Subscription, SyncUpdate]:
        """Open an agent session: verify its certificate, answer its first sync."""
        verified = self.enforcer.authenticate(cert, now)
        sub = Subscription(self, verified, {p: v.version for p, v in request.have.items()})
        return sub, sub.initial()

    def fetch(self, cert: Certificate | bytes, path: str, now: float) -> AgentSecret:
        """One entitled secret. Refusals never depend on whether ``path`` exists."""
        return self.read(self.enforcer.authenticate(cert, now), path)

    def read(self, session_cert: Certificate, path: str) -> AgentSecret:
        """A fetch inside a session whose certificate was verified at the handshake: revocation
        and entitlement are still checked on every call, the CA signature is not."""
        stored = self.enforcer.check(session_cert, path)
        rec = self.dataset.get(stored)
        if rec is None or rec.deleted:
            raise NotFound(f"secret {path!r} has no value yet")
        return self.agent_secret(path, rec)

    def write(self, cert: Certificate | bytes, path: str, value: bytes, meta: Meta, now: float, *, node: str | None = None) -> SecretRecord:
        """An operator's or the coordinator's write (``node``: the per-machine value for that node)."""
        verified = self.enforcer.authenticate(cert, now)
        if not WRITER_ROLES.intersection(verified.roles):
            raise AuthError(f"certificate {verified.name!r} may not write secrets (needs the admin or coordinator role)")
        check_path(path)
        if path.startswith("_lab/") or "@" in path:
            raise AuthError("system and per-machine paths are written through their own operations")
        if node is not None:
            path = machine_path(path, node)
        return self.dataset.write(path, value, meta, int(now * 1000))
