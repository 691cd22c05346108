"""The agent's side of store sync: one Noise session to any reachable store, kept subscribed.

::

    shuffle the store list ──► connect (rpc, certificate both ways; the store must carry "store")
         ▲                       │ store.sync  SyncRequest{have: {path: version} from the cache}
         │                       ▼
    backoff with jitter      SyncUpdate* ── records → cache.put + /run/secrets (atomic replace)
    after a full pass            │           removed → cache.remove + unlink, at once
    of failures; the lost        │           each update (heartbeats too) → cache.mark_synced()
    store goes last              ▼           final (we are revoked) → everything dropped, session ends
                             connection lost, or silent past silence_timeout → next store

Nothing here blocks serving: the daemon answers from the cache whatever this loop is doing.
:func:`sync_loop` reports in the ``status`` mapping it is given (what ``lab secret status``
shows): ``running``, ``state`` (connecting / connected / unreachable / revoked), ``store``
(endpoint), ``store_name``, ``since``, ``last_error``, ``last_update``, ``updates`` and
``stores`` ({endpoint: "connected" | "unreachable: why"}).

The pure parts — :class:`StoreRotation` (failover order) and :func:`to_cache_records` — take
their randomness and time explicitly (tests/unit/test_agent_sync.py). The backoff schedule is
:class:`lab.store.node.Backoff`, shared with the store's peer links.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from collections.abc import Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import trio
import yaml

from lab.agent.cache import CacheRecord, SecretCache
from lab.common import rpc, wire
from lab.common.errors import AuthError, ConfigError, LabError, RemoteProtocolError, TransportError
from lab.store.node import DEFAULT_STORE_PORT, STORE_ROLE, Backoff, load_home_identity
from lab.store.records import NODE_PATTERN, decode_message_untrusted
from lab.store.serve import SyncRequest, SyncUpdate, VersionRef

__all__ = ["SyncConfig", "StoreRotation", "have_from_cache", "run_for_agent", "sync_loop", "to_cache_records"]

log = logging.getLogger("lab.agent.sync")

DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_SILENCE_TIMEOUT: Final = 90.0  # three of the store's 30 s heartbeats
ENROLLMENT_FILE: Final = "enrollment.yaml"
_NODE_RE: Final = re.compile(NODE_PATTERN)


@dataclasses.dataclass(frozen=True)
class SyncConfig:
    backoff_base: float = 0.2
    backoff_cap: float = 30.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    silence_timeout: float = DEFAULT_SILENCE_TIMEOUT  # no update nor heartbeat for this long: session dead


class Sink(Protocol):
    def apply(self, record: CacheRecord) -> None: ...
    def drop(self, path: str) -> None: ...


# ---------------------------------------------------------------------------------------------
# Pure parts


class StoreRotation:
    """Which store to try next: every store once per pass, in a fresh random order each pass
    (agents spread over the stores), the store just lost or failed placed last."""

    def __init__(self, stores: Iterable[str], rng: random.Random) -> None:
        self.stores = list(dict.fromkeys(stores))
        if not self.stores:
            raise ConfigError("no store endpoints to sync with")
        self.rng = rng
        self._queue: list[str] = []
        self._avoid: str | None = None

    def next(self) -> tuple[str, bool]:
        """(endpoint, starts_pass): ``starts_pass`` is True when a new pass over the list begins."""
        new_pass = not self._queue
        if new_pass:
            order = list(self.stores)
            self.rng.shuffle(order)
            if self._avoid in order and len(order) > 1:
                order.remove(self._avoid)
                order.append(self._avoid)
            self._queue = order
        return self._queue.pop(0), new_pass

    def lost(self, endpoint: str) -> None:
        """A working session to ``endpoint`` ended: start a new pass, trying it last."""
        self._avoid = endpoint
        self._queue = []


def have_from_cache(records: Iterable[CacheRecord]) -> dict[str, VersionRef]:
    """``{path: version}`` of the cached records that carry a store version."""
    node = _NODE_RE
    out: dict[str, VersionRef] = {}
    for r in records:
        v = r.version
        if isinstance(v, tuple) and len(v) == 3 and node.fullmatch(v[2]) and len(v[2]) <= 64 and v[1] < 2**32:
            out[r.path] = VersionRef(v[0], v[1], v[2])
    return out


def to_cache_records(update: SyncUpdate, now: float) -> list[CacheRecord]:
    """The update's secrets as cache records (fetched at ``now``)."""
    return [
        CacheRecord(
            path=s.path, value=s.value, version=(s.version.wall_ms, s.version.counter, s.version.origin),
            type=s.meta.type, ttl=s.meta.ttl or None, owner=s.meta.owner, group=s.meta.group,
            mode=s.meta.mode & 0o777, fetched_at=now,
        )
        for s in update.records
    ]


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class _CacheSink:
    cache: SecretCache
    files: Any = None  # lab.agent.delivery.FileDelivery

    def apply(self, record: CacheRecord) -> None:
        self.cache.put(record)
        if self.files is not None:
            self.files.write(record)

    def drop(self, path: str) -> None:
        self.cache.remove(path)
        if self.files is not None:
            self.files.remove(path)


class _Revoked(AuthError):
    pass


def _event(level: int, event: str, **fields: object) -> None:
    rpc.log_event(log, level, event, **fields)


async def _session(endpoint: str, cache: SecretCache, sink: Sink, identity: rpc.Identity,
                   status: MutableMapping[str, Any], config: SyncConfig, on_connected: Any, superseded: Any = None) -> None:
    host, port = rpc.parse_endpoint(endpoint, DEFAULT_STORE_PORT)
    async with rpc.connect(host, port, identity=identity, timeout=config.connect_timeout) as conn:
        if STORE_ROLE not in conn.peer.roles:
            raise AuthError(f"{endpoint} answered as {conn.peer.name!r}, which is not a store")
        request = SyncRequest(have_from_cache(cache.records()))
        async with conn.stream("store.sync", {"msg": wire.encode(request)}) as items:
            while True:
                with trio.move_on_after(config.silence_timeout) as silent:
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        break
                if silent.cancelled_caught:
                    raise TransportError(f"{endpoint}: no update nor heartbeat for {config.silence_timeout:g} s")
                raw = item.get("msg")
                update = decode_message_untrusted(raw) if isinstance(raw, bytes) else None
                if not isinstance(update, SyncUpdate):
                    raise RemoteProtocolError(f"{endpoint}: store.sync sent something other than a SyncUpdate")
                if update.final and superseded is not None and superseded():  # [identity] renewed: not us any more
                    raise TransportError(f"{endpoint}: the session's certificate was renewed; reconnecting")
                now = time.time()
                for record in to_cache_records(update, now):
                    sink.apply(record)
                for path in update.removed:
                    sink.drop(path)
                cache.mark_synced(now)
                if status.get("state") != "connected":
                    status.update(state="connected", store=endpoint, store_name=conn.peer.name, since=now, last_error=None)
                    status.setdefault("stores", {})[endpoint] = "connected"
                    on_connected()
                status.update(last_update=now, updates=status.get("updates", 0) + 1, entitled=len(cache.paths()))
                if update.records or update.removed or update.final:  # not for heartbeats
                    _event(logging.INFO, "sync.update", store=conn.peer.name, records=len(update.records),
                           removed=len(update.removed), final=update.final or None)
                if update.final:
                    raise _Revoked(f"{conn.peer.name} reports this node's certificate revoked")
    raise TransportError(f"{endpoint} ended the sync session")


async def sync_loop(
    cache: SecretCache,
    identity: rpc.Identity,
    stores: Sequence[str],
    status: MutableMapping[str, Any],
    *,
    files: Any = None,
    sink: Sink | None = None,
    config: SyncConfig = SyncConfig(),
    rng: random.Random | None = None,
    reload_identity: Any = None,
    on_revoked: Any = None,
    control: MutableMapping[str, Any] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the cache in step with the stores until cancelled. ``started()`` at once: nothing
    waits for the network. ``sink`` (default: the cache, plus ``files`` if given) receives each
    record and removal.

    [identity] ``reload_identity()`` (if given) gives the identity for each new session (a renewed
    ``node.cert`` is used at once); ``on_revoked(reason)`` is called when a store refuses this
    node as revoked (final update, or a handshake refused with "revoked") — unless the refused
    certificate is no longer the one on disk (renewed meanwhile); ``control["session"]`` is the
    cancel scope of the running session (cancel it to reconnect now)."""
    rng = rng or random.Random()
    rotation = StoreRotation(stores, rng)
    backoff = Backoff(config.backoff_base, config.backoff_cap, rng)
    sink = sink or _CacheSink(cache, files)
    status.update(running=True, state="connecting", store=None, store_name=None, since=None, last_error=None,
                  stores={s: "not tried" for s in rotation.stores})
    task_status.started()
    first, pass_connected = True, False
    while True:
        endpoint, new_pass = rotation.next()
        if new_pass:
            if not first and not pass_connected:  # a whole pass connected nowhere
                await trio.sleep(backoff.next_delay())
            first, pass_connected = False, False
        connected = False

        def on_connected() -> None:
            nonlocal connected
            connected = True
            backoff.reset()

        ident = identity
        if reload_identity is not None:
            try:
                ident = reload_identity()
            except LabError as exc:
                ident = identity
                _event(logging.WARNING, "sync.identity_unreadable", reason=str(exc))

        def superseded(used: rpc.Identity = ident) -> bool:
            if reload_identity is None:
                return False
            try:
                return bool(reload_identity().certificate.serial != used.certificate.serial)
            except LabError:
                return False

        scope = trio.CancelScope()
        if control is not None:
            control["session"] = scope
        try:
            with scope:
                extra = (superseded,) if reload_identity is not None else ()
                await _session(endpoint, cache, sink, ident, status, config, on_connected, *extra)
        except _Revoked as exc:
            status.update(state="revoked", last_error=str(exc))
            _event(logging.WARNING, "sync.revoked", store=endpoint, reason=str(exc))
            if on_revoked is not None and not superseded():
                on_revoked(str(exc))
                status["running"] = False
                return  # wiped: nothing left to sync, and this key is refused everywhere
        except AuthError as exc:
            if "revoked" in str(exc) and not superseded():  # [identity] refused at the handshake as revoked
                status.update(state="revoked", last_error=str(exc)[:200])
                status["stores"][endpoint] = "refused: revoked"
                _event(logging.WARNING, "sync.revoked", store=endpoint, reason=str(exc)[:200])
                if on_revoked is not None:
                    on_revoked(str(exc))
                    status["running"] = False
                    return
            else:
                status["stores"][endpoint] = f"unreachable: {str(exc)[:200]}"
                status["last_error"] = str(exc)[:200]
                _event(logging.INFO, "sync.lost" if connected else "sync.unreachable", store=endpoint, reason=str(exc)[:200])
        except (LabError, OSError) as exc:
            reason = str(exc)[:200]
            status["stores"][endpoint] = f"unreachable: {reason}"
            status["last_error"] = reason
            _event(logging.INFO, "sync.lost" if connected else "sync.unreachable", store=endpoint, reason=reason)
        if scope.cancelled_caught:  # [identity] asked to reconnect (renewed certificate): at once
            _event(logging.INFO, "sync.reconnect", store=endpoint, reason="identity changed")
            status.update(state="connecting", store=None, store_name=None, since=None)
            continue
        if connected:
            if status.get("state") != "revoked":
                status["state"] = "connecting"
                status["stores"][endpoint] = "disconnected"
            status.update(store=None, store_name=None, since=None)
            rotation.lost(endpoint)
            pass_connected = True
            await trio.sleep(backoff.next_delay())  # lost just now: a short, jittered pause


def enrolled_stores(home: Path) -> list[str]:
    try:
        doc = yaml.safe_load((home / ENROLLMENT_FILE).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError("not enrolled: run `lab-agent enroll` first", file=str(home / ENROLLMENT_FILE)) from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(home / ENROLLMENT_FILE)) from exc
    stores = doc.get("stores") if isinstance(doc, dict) else None
    return [s for s in stores or [] if isinstance(s, str)]


async def run_for_agent(agent: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The daemon's hook (``lab.agent.daemon.sync_loop``): identity from the agent home, stores
    from ``enrollment.yaml``; records and removals through ``agent.apply`` / ``agent.drop``.
    Not enrolled, or no stores: says so in the status and serves the cache alone."""
    try:
        home = getattr(getattr(agent, "config", None), "home", None)
        if home is None:
            raise ConfigError("the agent has no home directory configured")
        home = Path(home)
        identity = load_home_identity(home)
        stores = enrolled_stores(home)
        if not stores:
            raise ConfigError("enrollment lists no stores", file=str(home / ENROLLMENT_FILE))
    except LabError as exc:
        agent.sync_status.update(running=False, state="not configured", last_error=str(exc), stores={})
        _event(logging.WARNING, "sync.not_configured", reason=str(exc))
        task_status.started()
        return
    # [identity] a renewed node.cert is picked up per session; a revocation wipes the agent
    await sync_loop(agent.cache, identity, stores, agent.sync_status, sink=agent, task_status=task_status,
                    reload_identity=lambda: load_home_identity(home), on_revoked=getattr(agent, "revoked", None),
                    control=getattr(agent, "sync_control", None))


# ---------------------------------------------------------------------------------------------
# [identity] Check-in with the coordinator: liveness, renewed certificates, revocation (issue 6)

DEFAULT_CHECKIN_INTERVAL: Final = 60.0


def checkin_interval(environ: Any = None) -> float:
    """``$LAB_CHECKIN_INTERVAL`` seconds (tests, `lab cluster`), else 60."""
    import os

    env = os.environ if environ is None else environ
    try:
        value = float(env.get("LAB_CHECKIN_INTERVAL") or DEFAULT_CHECKIN_INTERVAL)
    except ValueError:
        return DEFAULT_CHECKIN_INTERVAL
    return min(max(value, 0.2), 3600.0)


def accept_renewed(raw: Any, identity: rpc.Identity, now: float) -> Any:
    """The renewed certificate from a ``checkin`` reply, verified: signed by our CA, valid now,
    for our key and name, and not the one we hold. AuthError otherwise."""
    from lab.common.identity import verify_certificate

    if not isinstance(raw, bytes):
        raise AuthError("checkin reply: certificate must be bytes")
    cert = verify_certificate(raw, identity.ca_public_key, now, None, identity.key.public_key)
    if cert.name != identity.certificate.name:
        raise AuthError(f"renewed certificate is for {cert.name!r}, not {identity.certificate.name!r}")
    if cert.serial == identity.certificate.serial:
        raise AuthError("renewed certificate is the one already held")
    return cert


async def checkin_once(home: Path, coordinator: str, reply_out: dict[str, Any] | None = None) -> Any:
    """One ``checkin``; returns a renewed certificate (already written to ``node.cert``) or None.
    [migrate] ``reply_out`` (if given) receives the whole reply."""
    import os

    from lab.common.identity import write_private_file

    identity = load_home_identity(home)
    host, port = rpc.parse_endpoint(coordinator, 7443)
    async with rpc.connect(host, port, identity=identity, timeout=DEFAULT_CONNECT_TIMEOUT) as conn:
        if "coordinator" not in conn.peer.roles:
            raise AuthError(f"{coordinator} answered as {conn.peer.name!r}, which is not the coordinator")
        reply = await conn.call("checkin", {}, timeout=30)
    if reply_out is not None:
        reply_out.update(reply)
    if reply.get("certificate") is None:
        return None
    cert = accept_renewed(reply["certificate"], identity, time.time())
    write_private_file(home / "node.cert", cert.encode(), overwrite=True)  # atomic: temp, fsync, rename
    os.chmod(home / "node.cert", 0o644)
    _event(logging.INFO, "identity.renewed", serial=cert.serial, old=identity.certificate.serial, not_after=cert.not_after)
    return cert


async def checkin_loop(agent: Any, *, interval: float | None = None, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Check in every ``interval`` s. A renewed certificate: written, the store session restarted
    with it, and an immediate check-in with it (which confirms it to the coordinator). Refused as
    revoked: ``agent.revoked(reason)``, and the loop ends. Not enrolled: nothing to do."""
    home = getattr(getattr(agent, "config", None), "home", None)
    try:
        doc = yaml.safe_load((Path(home) / ENROLLMENT_FILE).read_text(encoding="utf-8")) if home else None
    except (OSError, yaml.YAMLError):
        doc = None
    coordinator = doc.get("coordinator") if isinstance(doc, dict) else None
    from lab.coordinator.migrate import on_checkin_reply  # [migrate]
    from lab.coordinator.migrate.announce import FOLLOW_AFTER, follow_announcement

    task_status.started()
    if not isinstance(coordinator, str) or not coordinator:
        return
    every = interval if interval is not None else checkin_interval()
    failures = 0  # [migrate] check-ins in a row that did not reach the coordinator
    while True:
        renewed = None
        reply: dict[str, Any] = {}
        try:
            renewed = await checkin_once(Path(home), coordinator, reply)
            agent.sync_status["coordinator"] = "ok"
            failures = 0
            # [migrate] stores, the coordinator's move (redirect), the migrate instruction for this node
            moved = await on_checkin_reply(agent, Path(home), coordinator, reply)
            if moved is not None:
                coordinator = moved
                agent.sync_status["coordinator_endpoint"] = moved
        except AuthError as exc:
            if "revoked" in str(exc):
                _event(logging.WARNING, "checkin.revoked", coordinator=coordinator, reason=str(exc)[:200])
                agent.sync_status["coordinator"] = "revoked"
                revoked = getattr(agent, "revoked", None)
                if revoked is not None:
                    revoked(str(exc))
                return
            agent.sync_status["coordinator"] = f"refused: {str(exc)[:200]}"
            _event(logging.WARNING, "checkin.refused", coordinator=coordinator, reason=str(exc)[:200])
            failures += 1
        except (LabError, OSError) as exc:
            agent.sync_status["coordinator"] = f"unreachable: {str(exc)[:200]}"
            _event(logging.DEBUG, "checkin.failed", coordinator=coordinator, reason=str(exc)[:200])
            failures += 1
        if failures and failures % FOLLOW_AFTER == 0:  # [migrate] it may have moved while we were away: ask the stores
            found = await follow_announcement(Path(home), coordinator)
            if found is not None:
                coordinator, failures = found, 0
                agent.sync_status["coordinator"], agent.sync_status["coordinator_endpoint"] = "ok", found
                continue
        if renewed is not None:
            restart = getattr(agent, "restart_sync", None)
            if restart is not None:
                restart()
            await trio.sleep(0.2)  # let the store session come back with the new certificate first
            continue  # check in with it now: that confirms the renewal
        await trio.sleep(every)
