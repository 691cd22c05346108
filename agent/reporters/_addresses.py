"""The host's addresses: read them (psutil, impure), filter them (pure), debounce changes (pure).

::

    tracker = AddressTracker(stable_for=10.0)
    ...every poll_interval seconds:
    changed = tracker.observe(current_addresses(), now=time.monotonic())
    if changed is not None:   # a new set, unchanged for ``stable_for`` seconds
        send({"addresses": list(changed)})

DHCP renewals, interfaces flapping and a VPN coming up produce bursts of changes; only a set
that has held still for ``stable_for`` seconds is reported, so DNS sees one update, not five.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_STABLE_FOR_S = 10.0
DEFAULT_POLL_INTERVAL_S = 5.0
MAX_ADDRESSES = 64  # the coordinator refuses more (coordinator/enrollment.py, coordinator/reports.py)

# Interfaces whose addresses are never this host's identity on the network.
SKIP_INTERFACE_PREFIXES = ("lo", "docker", "veth", "br-", "virbr", "cni", "flannel", "cali", "kube-ipvs", "podman")


def parse_addresses(raw: Mapping[str, Sequence[tuple[str, str]]], skip_prefixes: Sequence[str] = SKIP_INTERFACE_PREFIXES) -> tuple[str, ...]:
    """``{interface: [(family, address), ...]}`` → sorted unique unicast addresses (pure).

    ``family`` is "inet" or "inet6" (anything else, e.g. link-layer, is ignored). Loopback,
    link-local, multicast and unspecified addresses, and interfaces named by ``skip_prefixes``
    (loopback, container bridges), are left out; IPv6 scope ids (``%eth0``) are dropped."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for iface, addrs in raw.items():
        if any(iface.startswith(p) for p in skip_prefixes):
            continue
        for family, address in addrs:
            if family not in ("inet", "inet6"):
                continue
            try:
                ip = ipaddress.ip_address(str(address).split("%", 1)[0].split("/", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
                continue
            found.add(ip)
    ordered = sorted(found, key=lambda a: (a.version, int(a)))
    return tuple(str(a) for a in ordered[:MAX_ADDRESSES])


def collect_raw_addresses() -> dict[str, list[tuple[str, str]]]:
    """psutil.net_if_addrs() as plain data (the input of :func:`parse_addresses`)."""
    import psutil

    families = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
    return {
        iface: [(families[a.family], a.address) for a in addrs if a.family in families]
        for iface, addrs in psutil.net_if_addrs().items()
    }


def current_addresses() -> tuple[str, ...]:
    return parse_addresses(collect_raw_addresses())


@dataclasses.dataclass
class AddressTracker:
    """Debounces address sets. Pure: the caller passes ``now`` (monotonic seconds).

    ``reported`` is the last set handed out (seed it with what the coordinator already has, e.g.
    the addresses sent at enrollment, to avoid a redundant first report)."""

    stable_for: float = DEFAULT_STABLE_FOR_S
    reported: tuple[str, ...] | None = None
    _candidate: tuple[str, ...] | None = dataclasses.field(default=None, init=False)
    _since: float = dataclasses.field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if self.stable_for < 0:
            raise ValueError(f"stable_for must not be negative, got {self.stable_for}")
        if self.reported is not None:
            self.reported = _norm(self.reported)

    def observe(self, addresses: Iterable[str], now: float) -> tuple[str, ...] | None:
        """Feed the current set; returns it once it differs from the last reported set and has
        been the same for ``stable_for`` seconds, else None."""
        current = _norm(addresses)
        if current != self._candidate:
            self._candidate, self._since = current, now
        if current == self.reported:
            return None
        if now - self._since >= self.stable_for:
            self.reported = current
            return current
        return None

    def pending(self, now: float) -> float | None:
        """Seconds until the waiting set becomes reportable (None if nothing waits)."""
        if self._candidate is None or self._candidate == self.reported:
            return None
        return max(0.0, self.stable_for - (now - self._since))

    def state(self) -> dict[str, Any]:
        return {"reported": list(self.reported or []), "candidate": list(self._candidate or []), "since": self._since}


def _norm(addresses: Iterable[str]) -> tuple[str, ...]:
    if isinstance(addresses, (str, bytes)):
        raise TypeError("addresses must be an iterable of address strings, not one string")
    return tuple(sorted(set(str(a) for a in addresses)))
