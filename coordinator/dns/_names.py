"""Pure name arithmetic: node names, addresses, reverse (PTR) names and reverse zones."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import dns.exception
import dns.name
import dns.reversename

from lab.common.errors import ConfigError, UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_V4_ROOT = dns.name.from_text("in-addr.arpa.")
_V6_ROOT = dns.name.from_text("ip6.arpa.")


def zone_name(text: str, what: str = "zone") -> dns.name.Name:
    """``lab.internal`` → the absolute name ``lab.internal.``; ConfigError when not a DNS name."""
    if not isinstance(text, str) or not text.strip(".") or " " in text:
        raise ConfigError(f"{what} must be a DNS name like 'lab.internal', not {text!r}")
    labels = text.lower().rstrip(".").split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise ConfigError(f"{what} {text!r}: label {label!r} is not a valid DNS label")
    try:
        return dns.name.from_text(".".join(labels) + ".")
    except dns.exception.DNSException as exc:  # too long, empty label, ...
        raise ConfigError(f"{what} {text!r}: {exc}") from exc


def node_fqdn(name: str, zone: dns.name.Name) -> dns.name.Name:
    """A node's name in ``zone``: ``web-1`` (or ``web-1.lab.internal``) → ``web-1.lab.internal.``.

    Node names are LDH labels (RFC 1123), lower-cased; anything else is a UsageError so that an
    odd inventory name never reaches the DNS server as a wildcard or an out-of-zone owner.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"DNS: node name must be a non-empty string, not {name!r}")
    text = name.lower().rstrip(".")
    suffix = "." + zone.to_text(omit_final_dot=True)
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    labels = text.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise UsageError(
                f"DNS: node name {name!r} is not a valid host name (letters, digits and '-', "
                "at most 63 per label, no leading or trailing '-')"
            )
    try:
        return dns.name.Name(labels).concatenate(zone)
    except dns.name.NameTooLong as exc:
        raise UsageError(f"DNS: {name!r} in zone {zone} is longer than 255 octets") from exc


def parse_addresses(addresses: Iterable[str | IPAddress]) -> tuple[IPAddress, ...]:
    """Addresses as text or ipaddress objects → sorted, de-duplicated ipaddress objects."""
    if isinstance(addresses, (str, bytes)):
        raise UsageError("DNS: addresses must be a list of IP addresses, not one string")
    out: set[IPAddress] = set()
    for a in addresses:
        try:
            out.add(ipaddress.ip_address(a.strip() if isinstance(a, str) else a))
        except ValueError as exc:
            raise UsageError(f"DNS: {a!r} is not an IP address") from exc
    return sort_addresses(out)


def sort_addresses(addresses: Iterable[IPAddress]) -> tuple[IPAddress, ...]:
    return tuple(sorted(addresses, key=lambda a: (a.version, int(a))))


def publishable(address: IPAddress) -> bool:
    """Loopback, link-local, multicast and unspecified addresses never go into DNS."""
    return not (address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified)


def ptr_name(address: IPAddress) -> dns.name.Name:
    """``10.0.1.45`` → ``45.1.0.10.in-addr.arpa.``; IPv6 → the 32-nibble ``ip6.arpa.`` name."""
    return dns.reversename.from_address(str(address))


def reverse_zone(text: str) -> dns.name.Name:
    """A configured reverse zone → its name.

    Accepts a network on an octet (IPv4) or nibble (IPv6) boundary — ``10.0.1.0/24``,
    ``2001:db8:1::/48`` — or the zone name itself (``1.0.10.in-addr.arpa``). Classless
    delegations (RFC 2317, e.g. /26) are not supported: name the parent zone instead.
    """
    if not isinstance(text, str) or not text:
        raise ConfigError(f"reverse zone must be a network like '10.0.1.0/24' or a zone name, not {text!r}")
    if "/" in text:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ConfigError(f"reverse zone {text!r}: {exc}") from exc
        step = 8 if net.version == 4 else 4
        if net.prefixlen % step or net.prefixlen == 0:
            unit = "a multiple of 8 (IPv4)" if net.version == 4 else "a multiple of 4 (IPv6)"
            raise ConfigError(
                f"reverse zone {text!r}: the prefix length must be {unit} and not 0; "
                "classless (RFC 2317) delegations are not supported"
            )
        full = ptr_name(net.network_address)
        keep = net.prefixlen // step
        root = _V4_ROOT if net.version == 4 else _V6_ROOT
        return dns.name.Name(full.labels[len(full.labels) - len(root.labels) - keep :])
    name = zone_name(text, "reverse zone")
    if not (name.is_subdomain(_V4_ROOT) or name.is_subdomain(_V6_ROOT)) or name in (_V4_ROOT, _V6_ROOT):
        raise ConfigError(f"reverse zone {text!r} is not under in-addr.arpa or ip6.arpa")
    return name


def reverse_zone_for(address: IPAddress, zones: Iterable[dns.name.Name]) -> dns.name.Name | None:
    """The most specific configured reverse zone holding ``address``'s PTR name, or None."""
    owner = ptr_name(address)
    best: dns.name.Name | None = None
    for zone in zones:
        if owner.is_subdomain(zone) and (best is None or len(zone.labels) > len(best.labels)):
            best = zone
    return best
