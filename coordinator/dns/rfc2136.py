"""RFC 2136 dynamic updates signed with TSIG (RFC 8945), for BIND, Knot, PowerDNS's DNS UPDATE, ….

Building the messages is pure (:meth:`Rfc2136Backend.plan_register`, :meth:`plan_remove`: the
node's current addresses in, :class:`UpdatePlan` out) and is what the unit tests check; only
:class:`TcpTransport` touches the network.

How a register replaces stale addresses without a race: read the node's A/AAAA sets, then send
ONE update to the forward zone whose prerequisites say "the sets are still exactly what I read"
(value-dependent RRset-exists, or RRset-does-not-exist when empty), deleting both sets and adding
the wanted addresses. The server applies it all or nothing; when another writer got in between,
the prerequisite fails (YXRRSET/NXRRSET) and we read again and retry. PTRs live in other zones
and so in other messages: each wanted address's PTR is replaced (delete RRset + add), and each
stale address's PTR is deleted only if it still points at this node (a value-specific delete), so
an address that has moved on to another node keeps that node's PTR. All of it is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update

from lab.coordinator.dns._names import (
    IPAddress,
    node_fqdn,
    parse_addresses,
    ptr_name,
    reverse_zone_for,
    sort_addresses,
)
from lab.coordinator.dns.backend import DnsAuthError, DnsChange, DnsRecords, DnsUpdateError
from lab.coordinator.dns.config import DEFAULT_TIMEOUT, DEFAULT_TTL, DnsConfig, TsigKey

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # read-modify-write rounds before giving up on a name that keeps changing
_PREREQ_FAILED = frozenset({dns.rcode.YXDOMAIN, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.NXRRSET})
_FAMILIES = ((4, dns.rdatatype.A), (6, dns.rdatatype.AAAA))

Transport = Callable[[dns.message.Message, float], dns.message.Message]
"""Sends one message and returns the (TSIG-verified) response; raises dnspython/OS errors."""


class _Key(dns.tsig.Key):
    """dnspython's Key prints its secret in ``repr``; ours (held by every message) does not."""

    def __repr__(self) -> str:
        return f"<TSIG key {self.name} {self.algorithm} secret=<hidden>>"

    __str__ = __repr__


class TcpTransport:
    """DNS over TCP to one server (updates and the reads behind them; TCP avoids truncation)."""

    def __init__(self, server: str, port: int) -> None:
        self.server = server
        self.port = port

    def __call__(self, message: dns.message.Message, timeout: float) -> dns.message.Message:
        return dns.query.tcp(message, self.server, timeout=timeout, port=self.port)


@dataclasses.dataclass(frozen=True, slots=True)
class UpdatePlan:
    """The messages one operation sends, in order: ``forward`` first, then ``reverse``."""

    forward: dns.update.UpdateMessage
    reverse: tuple[dns.update.UpdateMessage, ...]
    change: DnsChange


class _PrerequisiteFailed(Exception):
    pass


class Rfc2136Backend:
    """A :class:`~lab.coordinator.dns.backend.DnsBackend` speaking RFC 2136 + TSIG to one primary."""

    def __init__(
        self,
        zone: dns.name.Name | str,
        key: TsigKey,
        *,
        server: str = "127.0.0.1",
        port: int = 53,
        reverse_zones: Iterable[dns.name.Name | str] = (),
        ttl: int = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
        transport: Transport | None = None,
    ) -> None:
        self.zone = dns.name.from_text(zone) if isinstance(zone, str) else zone
        self.reverse_zones = tuple(dns.name.from_text(z) if isinstance(z, str) else z for z in reverse_zones)
        self.ttl = ttl
        self.timeout = timeout
        self.where = f"{server}:{port}"
        self._key_name = key.name
        self._tsig = _Key(key.name, key.secret, key.algorithm)
        self._transport = transport or TcpTransport(server, port)

    @classmethod
    def from_config(cls, config: DnsConfig, transport: Transport | None = None) -> Rfc2136Backend:
        if config.tsig is None:
            raise ValueError("Rfc2136Backend needs a TSIG key")  # parse_dns_config guarantees one
        return cls(
            config.zone,
            config.tsig,
            server=config.server,
            port=config.port,
            reverse_zones=config.reverse_zones,
            ttl=config.ttl,
            timeout=config.timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"Rfc2136Backend(zone={self.zone}, server={self.where}, key={self._key_name!r})"

    def close(self) -> None:
        pass  # one TCP connection per message; nothing held open

    # -- pure: message construction --------------------------------------------------------

    def fqdn(self, name: str) -> dns.name.Name:
        return node_fqdn(name, self.zone)

    def _update(self, zone: dns.name.Name) -> dns.update.UpdateMessage:
        msg = dns.update.UpdateMessage(zone)
        msg.use_tsig(self._tsig)
        return msg

    def plan_register(
        self, name: str, addresses: Iterable[str | IPAddress], current: Iterable[IPAddress]
    ) -> UpdatePlan:
        """The updates that turn ``current`` (what the server holds now) into ``addresses``."""
        fqdn = self.fqdn(name)
        want = parse_addresses(addresses)
        have = sort_addresses(set(current))
        fwd = self._update(self.zone)
        for family, rdtype in _FAMILIES:
            had = [a for a in have if a.version == family]
            if had:  # prerequisite: the RRset is exactly what we read (value dependent)
                fwd.present(fqdn, *(_rdata(rdtype, a) for a in had))
            else:  # prerequisite: there is no such RRset
                fwd.absent(fqdn, rdtype)
            fwd.delete(fqdn, rdtype)
            for a in want:
                if a.version == family:
                    fwd.add(fqdn, self.ttl, _rdata(rdtype, a))
        stale = [a for a in have if a not in want]
        reverse, skipped = self._ptr_updates(fqdn, replace=want, drop=stale)
        change = DnsChange(
            fqdn=fqdn.to_text(),
            addresses=_texts(want),
            added=_texts(a for a in want if a not in have),
            removed=_texts(stale),
            ptr_skipped=_texts(skipped),
        )
        return UpdatePlan(fwd, reverse, change)

    def plan_remove(
        self, name: str, addresses: Iterable[str | IPAddress] | None, current: Iterable[IPAddress]
    ) -> UpdatePlan:
        """Delete ``addresses`` (None: every address in ``current``) and their PTRs."""
        fqdn = self.fqdn(name)
        have = sort_addresses(set(current))
        fwd = self._update(self.zone)
        if addresses is None:
            gone = have
            for _family, rdtype in _FAMILIES:
                fwd.delete(fqdn, rdtype)
        else:
            gone = parse_addresses(addresses)
            for a in gone:  # value-specific deletes: other addresses of the node stay
                fwd.delete(fqdn, _rdata(dns.rdatatype.A if a.version == 4 else dns.rdatatype.AAAA, a))
        reverse, skipped = self._ptr_updates(fqdn, replace=(), drop=gone)
        change = DnsChange(
            fqdn=fqdn.to_text(),
            addresses=_texts(a for a in have if a not in gone),
            removed=_texts(a for a in gone if a in have) if addresses is not None else _texts(gone),
            ptr_skipped=_texts(skipped),
        )
        return UpdatePlan(fwd, reverse, change)

    def _ptr_updates(
        self, fqdn: dns.name.Name, replace: Iterable[IPAddress], drop: Iterable[IPAddress]
    ) -> tuple[tuple[dns.update.UpdateMessage, ...], list[IPAddress]]:
        by_zone: dict[dns.name.Name, dns.update.UpdateMessage] = {}
        skipped: list[IPAddress] = []
        target = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, fqdn.to_text())

        def message_for(address: IPAddress) -> dns.update.UpdateMessage | None:
            zone = reverse_zone_for(address, self.reverse_zones)
            if zone is None:
                skipped.append(address)
                return None
            if zone not in by_zone:
                by_zone[zone] = self._update(zone)
            return by_zone[zone]

        for a in drop:
            msg = message_for(a)
            if msg is not None:  # only if it still points at us
                msg.delete(ptr_name(a), target)
        for a in replace:
            msg = message_for(a)
            if msg is not None:
                msg.replace(ptr_name(a), self.ttl, target)
        return tuple(by_zone[z] for z in sorted(by_zone)), skipped

    # -- I/O -----------------------------------------------------------------------------------

    def register(self, name: str, addresses: Iterable[str | IPAddress]) -> DnsChange:
        want = parse_addresses(addresses)
        fqdn = self.fqdn(name)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            current = self._addresses(fqdn)
            plan = self.plan_register(name, want, current)
            try:
                self._send(plan.forward, "update")
            except _PrerequisiteFailed:
                log.info("event=dns_update_raced fqdn=%s attempt=%d", fqdn, attempt)
                continue
            for msg in plan.reverse:
                self._send(msg, "update")
            log.info(
                "event=dns_registered fqdn=%s added=%s removed=%s",
                fqdn, ",".join(plan.change.added), ",".join(plan.change.removed),
            )
            return plan.change
        raise DnsUpdateError(
            f"DNS: {fqdn} kept changing on {self.where} while lab updated it "
            f"({MAX_ATTEMPTS} attempts); another writer is updating the same name",
            "YXRRSET",
        )

    def remove(self, name: str, addresses: Iterable[str | IPAddress] | None = None) -> DnsChange:
        fqdn = self.fqdn(name)
        current = self._addresses(fqdn)
        plan = self.plan_remove(name, addresses, current)
        self._send(plan.forward, "update")  # no prerequisites: deleting is idempotent
        for msg in plan.reverse:
            self._send(msg, "update")
        log.info("event=dns_removed fqdn=%s removed=%s", fqdn, ",".join(plan.change.removed))
        return plan.change

    def lookup(self, name: str) -> DnsRecords:
        fqdn = self.fqdn(name)
        addresses = self._addresses(fqdn)
        ptr: dict[str, tuple[str, ...]] = {}
        for a in addresses:
            if reverse_zone_for(a, self.reverse_zones) is None:
                continue
            ptr[str(a)] = tuple(sorted(r.target.to_text() for r in self._query(ptr_name(a), dns.rdatatype.PTR)))
        return DnsRecords(fqdn.to_text(), _texts(addresses), ptr)

    def _addresses(self, fqdn: dns.name.Name) -> tuple[IPAddress, ...]:
        found: list[str] = []
        for _family, rdtype in _FAMILIES:
            found.extend(r.address for r in self._query(fqdn, rdtype))
        return parse_addresses(found)

    def _query(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> list[Any]:
        q = dns.message.make_query(qname, rdtype)
        q.use_tsig(self._tsig)
        response = self._exchange(q, "query")
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return []
        if rcode != dns.rcode.NOERROR:
            raise self._rcode_error(rcode, "query", qname)
        return [
            rd for rrset in response.answer
            if rrset.name == qname and rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN
            for rd in rrset
        ]

    def _send(self, msg: dns.update.UpdateMessage, what: str) -> None:
        response = self._exchange(msg, what)
        rcode = response.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        if rcode in _PREREQ_FAILED and msg.prerequisite:
            raise _PrerequisiteFailed(dns.rcode.to_text(rcode))
        raise self._rcode_error(rcode, what, msg.zone[0].name if msg.zone else None)

    def _exchange(self, msg: dns.message.Message, what: str) -> dns.message.Message:
        """One round trip; every foreign error becomes a DnsUpdateError/DnsAuthError."""
        try:
            return self._transport(msg, self.timeout)
        except dns.tsig.PeerBadKey as exc:
            raise DnsAuthError(
                f"DNS server {self.where} does not know TSIG key {self._key_name!r} (BADKEY); "
                "check the key name in named.conf", "BADKEY",
            ) from exc
        except dns.tsig.PeerBadSignature as exc:
            raise DnsAuthError(
                f"DNS server {self.where} rejected the signature of TSIG key {self._key_name!r} (BADSIG); "
                "the secret or algorithm differs from the server's", "BADSIG",
            ) from exc
        except dns.tsig.PeerBadTime as exc:
            raise DnsAuthError(
                f"DNS server {self.where} rejected the TSIG time (BADTIME); the clocks differ by more than the fudge",
                "BADTIME",
            ) from exc
        except dns.tsig.PeerError as exc:
            raise DnsAuthError(f"DNS server {self.where} rejected our TSIG signature ({exc})", "BADSIG") from exc
        except (dns.tsig.BadSignature, dns.message.UnknownTSIGKey, dns.message.BadTSIG) as exc:
            raise DnsAuthError(
                f"DNS server {self.where} sent a {what} response whose TSIG does not verify with key "
                f"{self._key_name!r}: {exc.__class__.__name__}", "BADSIG",
            ) from exc
        except dns.exception.Timeout as exc:
            raise DnsUpdateError(f"DNS server {self.where} did not answer the {what} within {self.timeout:g}s") from exc
        except (dns.exception.DNSException, EOFError) as exc:
            raise DnsUpdateError(f"DNS {what} to {self.where} failed: {exc.__class__.__name__}: {exc}") from exc
        except OSError as exc:
            raise DnsUpdateError(f"cannot reach DNS server {self.where}: {exc.strerror or exc}") from exc

    def _rcode_error(self, rcode: dns.rcode.Rcode, what: str, subject: dns.name.Name | None) -> Exception:
        text = dns.rcode.to_text(rcode)
        about = f" for {subject}" if subject is not None else ""
        if rcode == dns.rcode.REFUSED:
            return DnsAuthError(
                f"DNS server {self.where} refused the {what}{about} (REFUSED): key {self._key_name!r} is not "
                "allowed to change it; check allow-update/update-policy of the zone", text,
            )
        if rcode == dns.rcode.NOTAUTH:
            return DnsAuthError(
                f"DNS server {self.where} answered NOTAUTH to the {what}{about}: it is not authoritative for "
                f"that zone or did not accept key {self._key_name!r}", text,
            )
        if rcode == dns.rcode.NOTZONE:
            return DnsUpdateError(
                f"DNS server {self.where}: a name in the {what}{about} is outside the zone (NOTZONE)", text
            )
        return DnsUpdateError(f"DNS server {self.where} answered the {what}{about} with {text}", text)


def _rdata(rdtype: dns.rdatatype.RdataType, address: IPAddress) -> Any:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(address))


def _texts(addresses: Iterable[IPAddress]) -> tuple[str, ...]:
    return tuple(str(a) for a in addresses)
