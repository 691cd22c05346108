"""DNS manager: A/AAAA + PTR records for enrolled nodes (RFC 2136 + TSIG; PowerDNS API skeleton).

The public surface, re-exported once::

    DnsManager            node_enrolled / address_changed / node_revoked / lookup (trio)
    DnsBackend            the small sync interface a backend implements (register/remove/lookup)
    Rfc2136Backend        dynamic updates signed with TSIG (BIND, Knot, PowerDNS dnsupdate)
    PowerDnsBackend       PowerDNS HTTP API (skeleton; needs httpx)
    DnsConfig, load_dns_config, parse_dns_config   the ``dns:`` section of config.yaml
    DnsChange, DnsRecords, DnsUpdateError (TransportError), DnsAuthError (AuthError)

See docs/DNS.md.
"""

from lab.coordinator.dns.backend import DnsAuthError, DnsBackend, DnsChange, DnsRecords, DnsUpdateError
from lab.coordinator.dns.config import DnsConfig, TsigKey, load_dns_config, parse_dns_config, read_tsig_key_file
from lab.coordinator.dns.manager import DnsManager, backend_from_config
from lab.coordinator.dns.rfc2136 import Rfc2136Backend, UpdatePlan

__all__ = [
    "DnsAuthError",
    "DnsBackend",
    "DnsChange",
    "DnsConfig",
    "DnsManager",
    "DnsRecords",
    "DnsUpdateError",
    "PowerDnsBackend",
    "Rfc2136Backend",
    "TsigKey",
    "UpdatePlan",
    "backend_from_config",
    "load_dns_config",
    "parse_dns_config",
    "read_tsig_key_file",
]


def __getattr__(name: str):  # PowerDnsBackend imports httpx only when asked for
    if name == "PowerDnsBackend":
        from lab.coordinator.dns.powerdns import PowerDnsBackend

        return PowerDnsBackend
    raise AttributeError(name)
