"""The second channel of a move: the CA-signed coordinator announcement the stores keep
(``_lab/coordinator``: store/policy.py, store/announce.py).

The check-in redirect of the old coordinator reaches only the agents that check in during the
grace period. The stores outlive any coordinator, so the coordinator also announces there where
it answers: when it starts serving, and the old one announces the new endpoint at the switch
(``migrate.finish``). An agent whose coordinator stayed unreachable for :data:`FOLLOW_AFTER`
check-ins in a row asks its stores; an announcement that verifies against its CA and is newer
than the one it last followed is followed like a redirect (a check-in there first, then
enrollment.yaml). Unsigned, forged or older announcements are ignored and logged.

A coordinator installed by a migration announces itself only once adopted (its node carries
``lab-server``): before the switch an abort may still drop it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from lab.common.errors import LabError
from lab.coordinator.migrate._base import SERVER_LABEL, event
from lab.coordinator.migrate.bundle import origin_node

FOLLOW_AFTER: Final = 3  # failed check-ins in a row before an agent asks its stores
STORE_TIMEOUT: Final = 5.0
RETRY_FIRST: Final = 5.0  # the coordinator's announcement at start, until a store holds it
RETRY_MAX: Final = 300.0
VERSION_KEY: Final = "coordinator_version"  # in enrollment.yaml: the announcement last followed


async def newest_announcement(stores: Sequence[str], identity: Any) -> Any:
    """The newest announcement any of ``stores`` holds that verifies against ``identity``'s CA
    (a CoordinatorAnnouncement, or None); a store that is down is skipped, a forged one logged."""
    import trio

    from lab.common import rpc

    found: list[Any] = []

    async def one(ep: str) -> None:
        try:
            host, port = rpc.parse_endpoint(ep, 7444)
            with trio.fail_after(STORE_TIMEOUT * 2):
                async with rpc.connect(host, port, identity=identity, timeout=STORE_TIMEOUT) as conn:
                    reply = await conn.call("store.coordinator", {}, timeout=STORE_TIMEOUT)
        except (LabError, OSError, trio.TooSlowError) as exc:
            event(logging.DEBUG, "announcement.store_unreachable", store=ep, reason=str(exc)[:200] or type(exc).__name__)
            return
        doc = verified(reply.get("announcement"), identity.ca_public_key, ep)
        if doc is not None:
            found.append(doc)

    async with trio.open_nursery() as nursery:
        for ep in dict.fromkeys(stores):
            nursery.start_soon(one, ep)
    return max(found, key=lambda d: d.version, default=None)


def verified(raw: object, ca_public_key: bytes, source: str) -> Any:
    """The announcement in ``raw`` if it is one, signed by this CA; None (logged) otherwise."""
    from lab.store.policy import CoordinatorAnnouncement

    if raw is None:
        return None
    try:
        doc = CoordinatorAnnouncement.decode_untrusted(raw if isinstance(raw, bytes) else b"")
        doc.verify(ca_public_key)
    except LabError as exc:
        event(logging.WARNING, "announcement.refused", store=source, reason=str(exc)[:200])
        return None
    return doc


class Announcer:
    """The coordinator daemon's side: publish where it answers to every store that answers."""

    def __init__(self, engine: Any, ca: Any, identity: Any, enrolled_stores: Callable[[], list[str]],
                 clock: Callable[[], float] = time.time) -> None:
        self.engine, self.ca, self.identity, self.clock = engine, ca, identity, clock
        self.enrolled_stores = enrolled_stores

    def stores(self) -> list[str]:
        from lab.common.errors import ConfigError
        from lab.coordinator.cluster import configured_stores

        try:
            configured = configured_stores(Path(self.engine.paths.home))
        except ConfigError:
            configured = []
        return list(dict.fromkeys([*configured, *self.enrolled_stores()]))

    async def publish(self, endpoint: str) -> bool:
        """Announce ``endpoint`` (version above any held one, whatever the clocks say). True when
        a store holds it now (published, or announced already); never raises."""
        from lab.coordinator.identity_ops import publish_everywhere
        from lab.store.policy import sign_announcement

        try:
            stores = self.stores()
            if not stores:
                return False  # no store known yet: nothing to warn about
            held = await newest_announcement(stores, self.identity)
            if held is not None and held.endpoint == endpoint:
                return True
            now = self.clock()
            version = max(int(now * 1000), held.version + 1 if held is not None else 0)
            doc = sign_announcement(self.ca, endpoint, version=version, now=now)
            results = await publish_everywhere(stores, self.identity, [{"coordinator": doc.encode()}])
        except (LabError, OSError) as exc:
            event(logging.WARNING, "announcement.not_published", endpoint=endpoint, reason=str(exc)[:200])
            return False
        ok = [ep for ep, why in results.items() if why == "ok"]
        if not ok:
            event(logging.WARNING, "announcement.not_published", endpoint=endpoint, version=version,
                  reason="; ".join(f"{ep}: {why}" for ep, why in results.items())[:300])
            return False
        event(logging.INFO, "announcement.published", endpoint=endpoint, version=version, stores=len(ok))
        return True

    async def at_start(self, endpoint: str) -> None:
        """When the daemon starts serving: announce it, unless a migration installed it and it was
        not adopted yet; retried (5 s doubling to 5 min) until a store holds it, since the stores
        may come up or enroll after the coordinator."""
        import trio

        try:
            node = origin_node(Path(self.engine.paths.home))
            if node is not None and SERVER_LABEL not in self.engine.state.get_server(node).labels:
                event(logging.INFO, "announcement.deferred", endpoint=endpoint, reason="not adopted yet")
                return
        except LabError as exc:
            event(logging.WARNING, "announcement.not_published", endpoint=endpoint, reason=str(exc)[:200])
            return
        delay = RETRY_FIRST
        while not await self.publish(endpoint):
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


async def follow_announcement(home: Path, coordinator: str) -> str | None:
    """The agent's side, when ``coordinator`` stayed unreachable: the endpoint it now checks in
    with (enrollment.yaml rewritten), or None. Never raises."""
    from lab.agent.sync import ENROLLMENT_FILE
    from lab.coordinator.migrate.role import switch_coordinator
    from lab.store.node import load_home_identity

    try:
        doc = yaml.safe_load((home / ENROLLMENT_FILE).read_text(encoding="utf-8")) or {}
        stores = [s for s in doc.get("stores") or [] if isinstance(s, str)]
        known = doc.get(VERSION_KEY) if isinstance(doc.get(VERSION_KEY), int) else 0
        held = await newest_announcement(stores, load_home_identity(home)) if stores else None
    except (LabError, OSError, yaml.YAMLError, AttributeError) as exc:
        event(logging.WARNING, "announcement.lookup_failed", reason=str(exc)[:200])
        return None
    if held is None or held.endpoint == coordinator:
        return None
    if held.version <= known:
        event(logging.INFO, "announcement.ignored", endpoint=held.endpoint, version=held.version, known=known, reason="older")
        return None
    if not await switch_coordinator(home, coordinator, held.endpoint, via="announcement", **{VERSION_KEY: held.version}):
        return None
    return str(held.endpoint)
