"""The coordinator's DNS manager: what the lifecycle calls when a node joins, moves or leaves.

Backends block (dnspython/httpx sync APIs), so every call runs in a trio worker thread; a
backend call is bounded by its configured timeout, so cancelling waits at most that long and
never leaves a half-sent message behind. Each call records one audit entry (success or failure)
through the optional ``audit(action, subject, detail)`` hook — ``StateDB.audit`` fits as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from lab.common.errors import LabError
from lab.coordinator.dns._names import IPAddress, parse_addresses, publishable
from lab.coordinator.dns.backend import DnsBackend, DnsChange, DnsRecords
from lab.coordinator.dns.config import DnsConfig, load_dns_config

log = logging.getLogger(__name__)

AuditHook = Callable[[str, str, Mapping[str, Any]], Any]


def backend_from_config(config: DnsConfig, **kwargs: Any) -> DnsBackend:
    """The backend ``config.backend`` names. ``kwargs`` go to its constructor (tests: transport)."""
    if config.backend == "rfc2136":
        from lab.coordinator.dns.rfc2136 import Rfc2136Backend

        return Rfc2136Backend.from_config(config, **kwargs)
    if config.backend == "powerdns":
        from lab.coordinator.dns.powerdns import PowerDnsBackend

        return PowerDnsBackend.from_config(config, **kwargs)
    raise ValueError(f"unknown DNS backend {config.backend!r}")  # parse_dns_config prevents this


class DnsManager:
    """Keeps ``<node>.<zone>`` A/AAAA and PTR records in step with the inventory.

    With no ``dns:`` section configured the manager is disabled: every method returns None and
    does nothing, so the lifecycle can call it unconditionally.
    """

    def __init__(self, backend: DnsBackend | None, *, audit: AuditHook | None = None) -> None:
        self.backend = backend
        self._audit = audit

    @classmethod
    def from_config(
        cls, config: DnsConfig | None, *, audit: AuditHook | None = None, **backend_kwargs: Any
    ) -> DnsManager:
        return cls(None if config is None else backend_from_config(config, **backend_kwargs), audit=audit)

    @classmethod
    def from_home(cls, home: str | os.PathLike[str], *, audit: AuditHook | None = None) -> DnsManager:
        """Read ``dns:`` from ``<home>/config.yaml`` (ConfigError with file:line when wrong)."""
        return cls.from_config(load_dns_config(home), audit=audit)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    # -- what the lifecycle calls ------------------------------------------------------------

    async def node_enrolled(self, name: str, addresses: Iterable[str | IPAddress]) -> DnsChange | None:
        """A node joined: publish its addresses (replacing anything stale under its name)."""
        want = _published(addresses)
        if not want:
            return self._skip("dns.register", name, {"addresses": [str(a) for a in parse_addresses(addresses)]})
        return await self._do("dns.register", name, {"addresses": _texts(want)}, self._register, name, want)

    async def address_changed(
        self, name: str, old: Iterable[str | IPAddress], new: Iterable[str | IPAddress]
    ) -> DnsChange | None:
        """The agent reported a new address set: make DNS follow it.

        A set with no publishable address (only loopback/link-local: the network is down) changes
        nothing and is audited as ``dns.update.skipped`` — revoke is what removes a node."""
        before, want = _published(old), _published(new)
        detail = {"old": _texts(before), "new": _texts(want)}
        if not want:  # stale beats absent: a node that lost its addresses keeps its records
            return self._skip("dns.update", name, {**detail, "new": [str(a) for a in parse_addresses(new)]})
        return await self._do("dns.update", name, detail, self._register, name, want, before)

    async def node_revoked(self, name: str, addresses: Iterable[str | IPAddress] = ()) -> DnsChange | None:
        """A node left: remove every A/AAAA under its name and the PTRs pointing at it."""
        known = _published(addresses)
        return await self._do("dns.remove", name, {"addresses": _texts(known)}, self._remove, name, known)

    async def lookup(self, name: str) -> DnsRecords | None:
        """What the server holds for ``name`` now (for ``lab describe``); no audit entry."""
        if self.backend is None:
            return None
        return await trio.to_thread.run_sync(self.backend.lookup, name)

    # -- internals ---------------------------------------------------------------------------

    def _register(self, name: str, want: tuple[IPAddress, ...], before: tuple[IPAddress, ...] = ()) -> DnsChange:
        assert self.backend is not None
        change = self.backend.register(name, want)
        # PTRs of old addresses whose A record was already gone (register only sees what is there)
        leftovers = [a for a in before if a not in want and str(a) not in change.removed]
        if leftovers:
            self.backend.remove(name, leftovers)
        return change

    def _remove(self, name: str, known: tuple[IPAddress, ...]) -> DnsChange:
        assert self.backend is not None
        change = self.backend.remove(name, None)
        leftovers = [a for a in known if str(a) not in change.removed]
        if leftovers:  # PTRs of addresses lab knew but DNS no longer had A records for
            self.backend.remove(name, leftovers)
        return change

    async def _do(self, action: str, name: str, detail: dict[str, Any], func: Callable[..., DnsChange], *args: Any):
        if self.backend is None:
            return None
        try:
            change = await trio.to_thread.run_sync(func, *args)
        except LabError as exc:
            self._record(f"{action}.failed", name, {**detail, "error": str(exc), "rcode": getattr(exc, "rcode", None)})
            raise
        self._record(action, name, change.to_dict())
        return change

    def _skip(self, action: str, name: str, detail: dict[str, Any]) -> None:
        if self.backend is None:
            return None
        log.info("event=dns_skipped action=%s subject=%s reason=no_publishable_address", action, name)
        self._record(f"{action}.skipped", name, {**detail, "reason": "no publishable address"})
        return None

    def _record(self, action: str, name: str, detail: Mapping[str, Any]) -> None:
        if self._audit is None:
            return
        try:
            self._audit(action, name, detail)
        except Exception:  # the DNS change happened; a failing audit hook must not hide that
            log.warning("event=dns_audit_failed action=%s subject=%s", action, name, exc_info=True)


def _published(addresses: Iterable[str | IPAddress]) -> tuple[IPAddress, ...]:
    return tuple(a for a in parse_addresses(addresses) if publishable(a))


def _texts(addresses: Iterable[IPAddress]) -> list[str]:
    return [str(a) for a in addresses]
