"""PowerDNS Authoritative through its HTTP API — a skeleton behind the same interface.

``PATCH /api/v1/servers/{server_id}/zones/{zone}`` with ``{"rrsets": [...]}`` applies every
RRset change of one zone in one transaction, so replacing a node's A/AAAA sets is atomic
without RFC 2136 prerequisites. PTRs live in the reverse zones, one PATCH each. The API has no
"delete this record only if it still says X", so a stale PTR is read first and deleted only
when it points at the node (a small race, documented in docs/DNS.md).

Status: message construction is unit-tested; it has not yet run against a real pdns_server.
PowerDNS also accepts RFC 2136 updates (``dnsupdate=yes``, TSIG keys in its database), which
:class:`~lab.coordinator.dns.rfc2136.Rfc2136Backend` already speaks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import dns.name

from lab.coordinator.dns._names import IPAddress, node_fqdn, parse_addresses, ptr_name, reverse_zone_for
from lab.coordinator.dns.backend import DnsAuthError, DnsChange, DnsRecords, DnsUpdateError
from lab.coordinator.dns.config import DEFAULT_TIMEOUT, DEFAULT_TTL, DnsConfig, PowerDnsSettings

log = logging.getLogger(__name__)


def rrset(name: dns.name.Name, rtype: str, ttl: int, contents: Iterable[str]) -> dict[str, Any]:
    """One REPLACE (or DELETE, when ``contents`` is empty) entry of a PATCH body."""
    records = [{"content": c, "disabled": False} for c in contents]
    if not records:
        return {"name": name.to_text(), "type": rtype, "changetype": "DELETE"}
    return {"name": name.to_text(), "type": rtype, "ttl": ttl, "changetype": "REPLACE", "records": records}


class PowerDnsBackend:
    def __init__(
        self,
        zone: dns.name.Name | str,
        settings: PowerDnsSettings,
        *,
        reverse_zones: Iterable[dns.name.Name | str] = (),
        ttl: int = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        transport: Any = None,  # an httpx transport; tests pass httpx.MockTransport
    ) -> None:
        import httpx  # only this backend needs it

        self.zone = dns.name.from_text(zone) if isinstance(zone, str) else zone
        self.reverse_zones = tuple(dns.name.from_text(z) if isinstance(z, str) else z for z in reverse_zones)
        self.ttl = ttl
        self.where = settings.api_url
        self._base = f"/api/v1/servers/{settings.server_id}/zones/"
        self._client = httpx.Client(
            base_url=settings.api_url, headers={"X-API-Key": settings.api_key}, timeout=timeout, transport=transport
        )
        self._httpx = httpx

    @classmethod
    def from_config(cls, config: DnsConfig, transport: Any = None) -> PowerDnsBackend:
        assert config.powerdns is not None  # parse_dns_config guarantees it
        return cls(
            config.zone, config.powerdns, reverse_zones=config.reverse_zones, ttl=config.ttl,
            timeout=config.timeout, transport=transport,
        )

    def __repr__(self) -> str:
        return f"PowerDnsBackend(zone={self.zone}, api={self.where})"

    def close(self) -> None:
        self._client.close()

    # -- pure --------------------------------------------------------------------------------

    def plan_register(self, name: str, addresses: Iterable[str | IPAddress]) -> dict[dns.name.Name, list[dict]]:
        """zone → rrsets for a PATCH; stale PTRs are not in here (they need a read first)."""
        fqdn = node_fqdn(name, self.zone)
        want = parse_addresses(addresses)
        body = {
            self.zone: [
                rrset(fqdn, "A", self.ttl, [str(a) for a in want if a.version == 4]),
                rrset(fqdn, "AAAA", self.ttl, [str(a) for a in want if a.version == 6]),
            ]
        }
        for a in want:
            zone = reverse_zone_for(a, self.reverse_zones)
            if zone is not None:
                body.setdefault(zone, []).append(rrset(ptr_name(a), "PTR", self.ttl, [fqdn.to_text()]))
        return body

    # -- I/O -----------------------------------------------------------------------------------

    def register(self, name: str, addresses: Iterable[str | IPAddress]) -> DnsChange:
        fqdn = node_fqdn(name, self.zone)
        want = parse_addresses(addresses)
        have = self._addresses(fqdn)
        for zone, rrsets in self.plan_register(name, want).items():
            self._patch(zone, rrsets)
        stale = [a for a in have if a not in want]
        self._drop_ptrs(fqdn, stale)
        return DnsChange(
            fqdn.to_text(), tuple(map(str, want)),
            added=tuple(str(a) for a in want if a not in have), removed=tuple(map(str, stale)),
            ptr_skipped=tuple(str(a) for a in want if reverse_zone_for(a, self.reverse_zones) is None),
        )

    def remove(self, name: str, addresses: Iterable[str | IPAddress] | None = None) -> DnsChange:
        fqdn = node_fqdn(name, self.zone)
        have = self._addresses(fqdn)
        gone = have if addresses is None else parse_addresses(addresses)
        keep = [a for a in have if a not in gone]
        self._patch(self.zone, [
            rrset(fqdn, "A", self.ttl, [str(a) for a in keep if a.version == 4]),
            rrset(fqdn, "AAAA", self.ttl, [str(a) for a in keep if a.version == 6]),
        ])
        self._drop_ptrs(fqdn, gone)
        return DnsChange(fqdn.to_text(), tuple(map(str, keep)), removed=tuple(str(a) for a in gone if a in have))

    def lookup(self, name: str) -> DnsRecords:
        fqdn = node_fqdn(name, self.zone)
        addresses = self._addresses(fqdn)
        ptr = {}
        for a in addresses:
            zone = reverse_zone_for(a, self.reverse_zones)
            if zone is not None:
                ptr[str(a)] = tuple(sorted(self._contents(zone, ptr_name(a), "PTR")))
        return DnsRecords(fqdn.to_text(), tuple(map(str, addresses)), ptr)

    def _drop_ptrs(self, fqdn: dns.name.Name, addresses: Iterable[IPAddress]) -> None:
        for a in addresses:
            zone = reverse_zone_for(a, self.reverse_zones)
            if zone is None:
                continue
            owner = ptr_name(a)
            targets = self._contents(zone, owner, "PTR")
            if fqdn.to_text() in targets:
                rest = [t for t in targets if t != fqdn.to_text()]
                self._patch(zone, [rrset(owner, "PTR", self.ttl, rest)])

    def _addresses(self, fqdn: dns.name.Name) -> tuple[IPAddress, ...]:
        return parse_addresses(self._contents(self.zone, fqdn, "A") + self._contents(self.zone, fqdn, "AAAA"))

    def _contents(self, zone: dns.name.Name, owner: dns.name.Name, rtype: str) -> list[str]:
        data = self._request(
            "GET", zone, params={"rrsets": "true", "rrset_name": owner.to_text(), "rrset_type": rtype}
        ).json()
        return [
            r["content"] for s in data.get("rrsets", [])
            if s.get("name") == owner.to_text() and s.get("type") == rtype
            for r in s.get("records", []) if not r.get("disabled")
        ]

    def _patch(self, zone: dns.name.Name, rrsets: list[dict]) -> None:
        self._request("PATCH", zone, json={"rrsets": rrsets})

    def _request(self, method: str, zone: dns.name.Name, **kwargs: Any) -> Any:
        httpx = self._httpx
        try:
            response = self._client.request(method, self._base + zone.to_text(), **kwargs)
        except httpx.TimeoutException as exc:
            raise DnsUpdateError(f"PowerDNS API {self.where} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise DnsUpdateError(f"cannot reach the PowerDNS API {self.where}: {exc}") from exc
        if response.status_code < 300:
            return response
        try:
            reason = response.json().get("error", "")
        except ValueError:
            reason = response.text[:200]
        message = f"PowerDNS API {self.where} answered {method} zone {zone} with HTTP {response.status_code}: {reason}"
        if response.status_code in (401, 403):
            raise DnsAuthError(message + " (check the API key)", str(response.status_code))
        raise DnsUpdateError(message, str(response.status_code))
