"""What every DNS backend offers the coordinator, and what it answers with.

A backend is synchronous and blocking (dnspython's and httpx's sync APIs); the
:class:`~lab.coordinator.dns.manager.DnsManager` runs it in a worker thread under trio. Every
method is idempotent: calling it twice leaves the same records as calling it once, so the
lifecycle may simply retry after a failure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from lab.common.errors import AuthError, TransportError
from lab.coordinator.dns._names import IPAddress


class DnsUpdateError(TransportError):
    """The DNS server answered an update or query with an error rcode, or did not answer."""

    def __init__(self, message: str, rcode: str | None = None) -> None:
        super().__init__(message)
        self.rcode = rcode

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "DNS update failed"


class DnsAuthError(AuthError):
    """The DNS server refused us: TSIG key unknown or wrong (BADKEY/BADSIG/BADTIME), or the
    update policy does not allow this key to change these names (REFUSED/NOTAUTH)."""

    def __init__(self, message: str, rcode: str | None = None) -> None:
        super().__init__(message)
        self.rcode = rcode


@dataclasses.dataclass(frozen=True, slots=True)
class DnsChange:
    """What one register/remove did. Addresses are text, ready for the audit log and ``-o json``."""

    fqdn: str
    addresses: tuple[str, ...]  # the node's published addresses after the change
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    ptr_skipped: tuple[str, ...] = ()  # addresses outside every configured reverse zone

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqdn": self.fqdn,
            "addresses": list(self.addresses),
            "added": list(self.added),
            "removed": list(self.removed),
            "ptr_skipped": list(self.ptr_skipped),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class DnsRecords:
    """What the server holds for one node: its A/AAAA addresses and, per address, the PTR targets."""

    fqdn: str
    addresses: tuple[str, ...]
    ptr: Mapping[str, tuple[str, ...]]

    def ptr_ok(self) -> bool:
        """Every published address has exactly one PTR and it points back at the node."""
        return bool(self.addresses) and all(self.ptr.get(a) == (self.fqdn,) for a in self.addresses)

    def to_dict(self) -> dict[str, Any]:
        return {"fqdn": self.fqdn, "addresses": list(self.addresses), "ptr": {k: list(v) for k, v in self.ptr.items()}}


@runtime_checkable
class DnsBackend(Protocol):
    """The small interface every backend implements (RFC 2136 today, PowerDNS's HTTP API next).

    ``name`` is the node's name relative to the zone (``web-1``). ``addresses`` is the node's
    complete address set for :meth:`register` (anything else under the name is stale and goes).
    """

    def register(self, name: str, addresses: Iterable[str | IPAddress]) -> DnsChange:
        """Make ``name``'s A/AAAA set exactly ``addresses`` and point their PTRs at it, atomically
        per zone; drop the PTRs of addresses it no longer has."""
        ...

    def remove(self, name: str, addresses: Iterable[str | IPAddress] | None = None) -> DnsChange:
        """Delete the A/AAAA records of ``addresses`` (None: all of them) and their PTRs, where the
        PTR still points at ``name``."""
        ...

    def lookup(self, name: str) -> DnsRecords:
        """Ask the server what it holds for ``name`` now."""
        ...

    def close(self) -> None:
        ...
