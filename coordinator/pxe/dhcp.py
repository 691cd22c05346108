"""DHCP for network boot: a sans-IO server (``DhcpServer``) and its trio UDP edge (``serve_dhcp``).

Safety first: the server answers **only** MACs on the onboarding ``Allowlist`` and is silent for
every other client, so it can share a segment with the network's real DHCP server.

Modes
  ``full``   hands out addresses from a configured pool (isolated segment), with the boot info.
  ``proxy``  proxyDHCP (PXE spec / RFC 4578): boot info only, ``yiaddr`` 0, option 60
             ``PXEClient``; answers PXE clients only, on port 67 and on 4011.

Boot file by client: option 77 "iPXE" / option 175 → HTTP URL of the per-MAC script; else by
option 93: 0 BIOS → ``undionly.kpxe``, 7/9 EFI x86-64 → ``ipxe.efi``, 11 ARM64 → ``ipxe-arm64.efi``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Literal

import trio

from lab.common.errors import ConfigError, RemoteProtocolError
from lab.coordinator.pxe._dhcp_wire import (
    BOOTREPLY, BOOTREQUEST, FLAG_BROADCAST, U32, ZERO, DhcpPacket, MessageType, Opt, parse_untrusted,
)
from lab.coordinator.pxe.registry import Allowlist, mac_for_url

__all__ = [
    "DhcpConfig", "DhcpServer", "DhcpPacket", "LeaseTable", "MessageType", "Opt", "Send", "Seen",
    "boot_file_for", "parse_untrusted", "serve_dhcp",
]

log = logging.getLogger("lab.pxe.dhcp")

DEFAULT_SERVER_PORT = 67
DEFAULT_CLIENT_PORT = 68
DEFAULT_PROXY_PORT = 4011
DEFAULT_LEASE_TIME = 3600
DEFAULT_OFFER_HOLD = 60.0  # seconds an offered address stays reserved for its client
DEFAULT_BIOS_FILE = "undionly.kpxe"
DEFAULT_EFI_X64_FILE = "ipxe.efi"
DEFAULT_ARM64_FILE = "ipxe-arm64.efi"
RECV_BUFFER = 1 << 20  # bytes of queued requests the kernel keeps for us during a storm
BURST = 64  # packets handled per wake-up before other tasks get a turn
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# PXE vendor option (43) 6, PXE_DISCOVERY_CONTROL = 8: skip boot server discovery, boot the file named
PXE_DISCOVERY_CONTROL = b"\x06\x01\x08\xff"

ARCH_BIOS = 0
ARCH_EFI_X64 = (7, 9)
ARCH_EFI_ARM64 = 11

IPv4 = ipaddress.IPv4Address


@dataclasses.dataclass(frozen=True)
class DhcpConfig:
    server_ip: IPv4
    http_base: str  # e.g. "http://10.9.0.1:8080": iPXE scripts live under /boot/
    mode: Literal["full", "proxy"] = "full"
    pool_first: IPv4 | None = None
    pool_last: IPv4 | None = None
    subnet_mask: IPv4 = IPv4("255.255.255.0")
    router: IPv4 | None = None
    dns: tuple[IPv4, ...] = ()
    domain: str | None = None
    lease_time: int = DEFAULT_LEASE_TIME
    bios_file: str = DEFAULT_BIOS_FILE
    efi_x64_file: str = DEFAULT_EFI_X64_FILE  # or "snponly.efi"
    arm64_file: str = DEFAULT_ARM64_FILE

    def __post_init__(self) -> None:
        if self.mode not in ("full", "proxy"):
            raise ConfigError(f"DHCP mode must be 'full' or 'proxy', not {self.mode!r}")
        if self.mode == "full":
            if self.pool_first is None or self.pool_last is None or int(self.pool_first) > int(self.pool_last):
                raise ConfigError("full DHCP mode needs a pool FIRST-LAST with FIRST <= LAST")
            net = ipaddress.IPv4Network(f"{self.server_ip}/{self.subnet_mask}", strict=False)
            if self.pool_first not in net or self.pool_last not in net:
                raise ConfigError(f"pool {self.pool_first}-{self.pool_last} is outside {net}")
            if int(self.pool_last) - int(self.pool_first) > 65535:
                raise ConfigError("DHCP pool larger than 65536 addresses")
        if not self.http_base.startswith(("http://", "https://")):
            raise ConfigError(f"http_base must be an http(s) URL, not {self.http_base!r}")


def boot_file_for(pkt: DhcpPacket, cfg: DhcpConfig) -> str | None:
    """What this client should load next, or None if it is not a network-boot client we serve."""
    if pkt.is_ipxe:
        return f"{cfg.http_base.rstrip('/')}/boot/{mac_for_url(pkt.mac)}.ipxe"
    arch = pkt.client_arch
    if arch is None:
        return cfg.bios_file if pkt.is_pxe_client else None
    if arch == ARCH_BIOS:
        return cfg.bios_file
    if arch in ARCH_EFI_X64:
        return cfg.efi_x64_file
    if arch == ARCH_EFI_ARM64:
        return cfg.arm64_file
    return None


@dataclasses.dataclass
class _Lease:
    ip: IPv4
    expires: float
    bound: bool  # False while only offered


class LeaseTable:
    """Addresses of the pool by MAC, with expiry; declined addresses are quarantined.

    ``by_mac`` is the record; ``_by_ip`` (address as int → MAC) indexes it so that ownership
    checks are O(1), and ``_low`` remembers where the search for a free address starts (every
    address below it is held by a lease or quarantined until at least ``_low_until``), so a
    boot storm of N clients costs O(N) rather than O(N²). The choice stays "lowest free
    address": once ``_low_until`` has passed, the search starts from the pool's first address.
    """

    def __init__(self, first: IPv4, last: IPv4, *, offer_hold: float = DEFAULT_OFFER_HOLD) -> None:
        self.first, self.last = int(first), int(last)
        self.offer_hold = offer_hold
        self.by_mac: dict[str, _Lease] = {}
        self.declined: dict[IPv4, float] = {}
        self._by_ip: dict[int, str] = {}
        self._low = self.first
        self._low_until = float("inf")

    def in_pool(self, ip: IPv4) -> bool:
        return self.first <= int(ip) <= self.last

    def _set(self, mac: str, lease: _Lease) -> None:
        old = self.by_mac.get(mac)
        if old is not None and old.ip != lease.ip:
            self._unindex(mac, old.ip)
        self.by_mac[mac] = lease
        n = int(lease.ip)
        self._by_ip[n] = mac
        if n < self._low:
            self._low_until = min(self._low_until, lease.expires)

    def _unindex(self, mac: str, ip: IPv4) -> None:
        n = int(ip)
        if self._by_ip.get(n) == mac:
            del self._by_ip[n]
            if self.first <= n < self._low:
                self._low = n

    def _owner_n(self, n: int, now: float) -> str | None:
        mac = self._by_ip.get(n)
        if mac is None:
            return None
        lease = self.by_mac.get(mac)
        return mac if lease is not None and int(lease.ip) == n and lease.expires > now else None

    def _owner(self, ip: IPv4, now: float) -> str | None:
        return self._owner_n(int(ip), now)

    def _usable(self, ip: IPv4, mac: str, now: float) -> bool:
        if not self.in_pool(ip) or (self.declined and self.declined.get(ip, 0.0) > now):
            return False
        owner = self._owner(ip, now)
        return owner is None or owner == mac

    def _free(self, mac: str, now: float) -> IPv4 | None:
        """The lowest address not held by another MAC's live lease and not quarantined."""
        if now >= self._low_until:
            self._low, self._low_until = self.first, float("inf")
        until = self._low_until
        for n in range(self._low, self.last + 1):
            owner = self._owner_n(n, now)
            if owner is not None and owner != mac:
                until = min(until, self.by_mac[owner].expires)
                continue
            ip = IPv4(n)
            if self.declined:
                q = self.declined.get(ip, 0.0)
                if q > now:
                    until = min(until, q)
                    continue
            self._low, self._low_until = n, until
            return ip
        self._low, self._low_until = self.last + 1, until
        return None

    def offer(self, mac: str, requested: IPv4 | None, now: float) -> IPv4 | None:
        current = self.by_mac.get(mac)
        candidates: list[IPv4] = []
        if current is not None:
            candidates.append(current.ip)
        if requested is not None:
            candidates.append(requested)
        for ip in candidates:
            if self._usable(ip, mac, now):
                break
        else:
            found = self._free(mac, now)
            if found is None:
                return None
            ip = found
        if current is not None and current.bound and current.ip == ip and current.expires > now:
            return ip  # keep the binding's expiry
        self._set(mac, _Lease(ip, now + self.offer_hold, bound=False))
        return ip

    def bind(self, mac: str, ip: IPv4, lease_time: int, now: float) -> bool:
        if not self._usable(ip, mac, now):
            return False
        self._set(mac, _Lease(ip, now + lease_time, bound=True))
        return True

    def current(self, mac: str, now: float) -> IPv4 | None:
        lease = self.by_mac.get(mac)
        return lease.ip if lease is not None and lease.bound and lease.expires > now else None

    def mac_for(self, ip: IPv4, now: float) -> str | None:
        return self._owner(ip, now)

    def release(self, mac: str, ip: IPv4 | None = None) -> None:
        lease = self.by_mac.get(mac)
        if lease is not None and (ip is None or lease.ip == ip):
            del self.by_mac[mac]
            self._unindex(mac, lease.ip)

    def decline(self, mac: str, ip: IPv4, now: float, quarantine: float) -> None:
        self.release(mac, ip)
        if self.in_pool(ip):
            self.declined[ip] = now + quarantine


@dataclasses.dataclass(frozen=True)
class Send:
    """Send ``data`` to ``(host, port)``; ``broadcast`` when host is 255.255.255.255."""

    data: bytes
    host: str
    port: int
    packet: DhcpPacket

    @property
    def broadcast(self) -> bool:
        return self.host == "255.255.255.255"


@dataclasses.dataclass(frozen=True)
class Seen:
    """A progress event for an allowlisted machine: ``dhcp-discover``, ``dhcp-ack``, ..."""

    mac: str
    stage: str
    detail: str = ""


Event = Send | Seen


class DhcpServer:
    """Sans-IO DHCP server: ``receive(data, now, via_port)`` → list of ``Send``/``Seen`` events.

    ``now`` is wall-clock seconds (the allowlist's expiry clock); leases use the same clock.
    """

    def __init__(self, config: DhcpConfig, allowlist: Allowlist) -> None:
        self.config = config
        self.allowlist = allowlist
        self.leases = (
            LeaseTable(config.pool_first, config.pool_last)  # type: ignore[arg-type]
            if config.mode == "full" else None
        )
        self.client_port = DEFAULT_CLIENT_PORT
        self.relay_port = DEFAULT_SERVER_PORT
        # option values that are the same in every reply, encoded once
        c = config
        self._opt_sid = c.server_ip.packed
        self._opt_mask = c.subnet_mask.packed
        self._opt_lease = (U32.pack(c.lease_time), U32.pack(c.lease_time // 2), U32.pack(c.lease_time * 7 // 8))
        self._opt_extra: dict[int, bytes] = {}
        if c.router is not None:
            self._opt_extra[Opt.ROUTER] = c.router.packed
        if c.dns:
            self._opt_extra[Opt.DNS] = b"".join(d.packed for d in c.dns)
        if c.domain:
            self._opt_extra[Opt.DOMAIN_NAME] = c.domain.encode()

    def lease_for(self, mac: str, now: float) -> IPv4 | None:
        return self.leases.current(mac, now) if self.leases is not None else None

    def mac_for(self, ip: str, now: float) -> str | None:
        """Which MAC holds ``ip`` (full mode), for labelling TFTP/HTTP progress."""
        if self.leases is None:
            return None
        try:
            addr = IPv4(ip)
        except ValueError:
            return None
        return self.leases.mac_for(addr, now)

    # -- entry point -------------------------------------------------------------------
    def receive(self, data: bytes, now: float, *, via_port: int = DEFAULT_SERVER_PORT) -> list[Event]:
        """Raises RemoteProtocolError for malformed packets; the edge logs and drops those."""
        pkt = parse_untrusted(data)
        return self.handle(pkt, now, via_port=via_port)

    def handle(self, pkt: DhcpPacket, now: float, *, via_port: int = DEFAULT_SERVER_PORT) -> list[Event]:
        if pkt.op != BOOTREQUEST or pkt.htype != 1 or len(pkt.chaddr) != 6:
            return []
        mt = pkt.message_type
        if mt is None:
            return []
        node = self.allowlist.lookup(pkt.mac, now)
        if node is None:
            return []  # silence for everyone lab is not onboarding
        if self.config.mode == "proxy":
            return self._proxy(pkt, mt, via_port)
        return self._full(pkt, mt, now, node.hostname)

    # -- full mode ---------------------------------------------------------------------
    def _full(self, pkt: DhcpPacket, mt: MessageType, now: float, hostname: str) -> list[Event]:
        assert self.leases is not None
        cfg = self.config
        if mt == MessageType.DISCOVER:
            ip = self.leases.offer(pkt.mac, pkt.requested_ip, now)
            if ip is None:
                log.warning("event=pool-exhausted mac=%s", pkt.mac)
                return [Seen(pkt.mac, "dhcp-pool-exhausted")]
            return [Seen(pkt.mac, "dhcp-discover", self._client_kind(pkt)),
                    self._reply(pkt, MessageType.OFFER, ip, hostname)]
        if mt == MessageType.REQUEST:
            return self._request(pkt, now, hostname)
        if mt == MessageType.RELEASE:
            self.leases.release(pkt.mac, pkt.ciaddr)
            return [Seen(pkt.mac, "dhcp-release", str(pkt.ciaddr))]
        if mt == MessageType.DECLINE:
            if pkt.requested_ip is not None:
                self.leases.decline(pkt.mac, pkt.requested_ip, now, cfg.lease_time)
            return [Seen(pkt.mac, "dhcp-decline", str(pkt.requested_ip))]
        if mt == MessageType.INFORM:
            return [self._reply(pkt, MessageType.ACK, ZERO, hostname, inform=True)]
        return []

    def _request(self, pkt: DhcpPacket, now: float, hostname: str) -> list[Event]:
        """RFC 2131 §4.3.2: SELECTING (server id set), INIT-REBOOT (requested IP, no server id),
        RENEWING/REBINDING (ciaddr). ACK only the address this client was offered or holds."""
        assert self.leases is not None
        sid = pkt.server_id
        if sid is not None and sid != self.config.server_ip:
            self.leases.release(pkt.mac)  # it chose another server's offer
            return []
        wanted = pkt.requested_ip or (pkt.ciaddr if pkt.ciaddr != ZERO else None)
        if wanted is None:
            return []
        record = self.leases.by_mac.get(pkt.mac)
        if record is None:
            if sid is None and self.leases.in_pool(wanted):
                return []  # INIT-REBOOT/RENEWING of a client we have no record of: stay silent
            return [self._nak(pkt, "no offer for this client" if sid else "address not on this network")]
        if record.ip != wanted or not self.leases.bind(pkt.mac, wanted, self.config.lease_time, now):
            return [self._nak(pkt, "address not available")]
        return [Seen(pkt.mac, "dhcp-ack", str(wanted)), self._reply(pkt, MessageType.ACK, wanted, hostname)]

    def _client_kind(self, pkt: DhcpPacket) -> str:
        if pkt.is_ipxe:
            return "ipxe"
        return f"arch={pkt.client_arch}" if pkt.client_arch is not None else ("pxe" if pkt.is_pxe_client else "plain")

    def _boot_options(self, pkt: DhcpPacket, opts: dict[int, bytes]) -> tuple[bytes, bytes]:
        boot = boot_file_for(pkt, self.config)
        if boot is None:
            return b"", b""
        server = str(self.config.server_ip).encode()
        opts[Opt.TFTP_SERVER] = server
        opts[Opt.BOOTFILE] = boot.encode()
        file_field = boot.encode() if len(boot) <= 127 else b""
        return server, file_field

    def _reply(self, pkt: DhcpPacket, mt: MessageType, ip: IPv4, hostname: str, *, inform: bool = False) -> Send:
        cfg = self.config
        opts: dict[int, bytes] = {
            Opt.MESSAGE_TYPE: bytes((mt,)),
            Opt.SERVER_ID: self._opt_sid,
            Opt.SUBNET_MASK: self._opt_mask,
        }
        if not inform:
            opts[Opt.LEASE_TIME], opts[Opt.RENEWAL_T1], opts[Opt.REBINDING_T2] = self._opt_lease
            opts[Opt.HOSTNAME] = hostname.encode()
        opts.update(self._opt_extra)
        if pkt.is_pxe_client and not pkt.is_ipxe:
            # PXE ROMs want option 60 back, and discovery control 8: "boot the file named here".
            # iPXE is not told: an offer with PXEClient makes it wait seconds for a proxyDHCP.
            opts[Opt.VENDOR_CLASS] = b"PXEClient"
            opts[Opt.VENDOR_SPECIFIC] = PXE_DISCOVERY_CONTROL
        _, file_field = self._boot_options(pkt, opts)
        reply = DhcpPacket(
            op=BOOTREPLY, xid=pkt.xid, chaddr=pkt.chaddr, flags=pkt.flags, giaddr=pkt.giaddr,
            ciaddr=pkt.ciaddr if inform else ZERO, yiaddr=ip,
            siaddr=cfg.server_ip if Opt.BOOTFILE in opts else ZERO, file=file_field, options=opts,
        )
        return self._address(pkt, reply, mt)

    def _nak(self, pkt: DhcpPacket, why: str) -> Send:
        opts = {Opt.MESSAGE_TYPE: bytes((MessageType.NAK,)), Opt.SERVER_ID: self.config.server_ip.packed,
                Opt.MESSAGE: why.encode()}
        reply = DhcpPacket(op=BOOTREPLY, xid=pkt.xid, chaddr=pkt.chaddr, flags=pkt.flags | FLAG_BROADCAST,
                           giaddr=pkt.giaddr, options=opts)
        return self._address(pkt, reply, MessageType.NAK)

    def _address(self, pkt: DhcpPacket, reply: DhcpPacket, mt: MessageType) -> Send:
        """RFC 2131 §4.1: relay → giaddr:67; NAK → broadcast; ciaddr → unicast; else broadcast
        (unicast to a not-yet-configured yiaddr would need an ARP entry we cannot add from UDP)."""
        data = reply.encode()
        if pkt.giaddr != ZERO:
            return Send(data, str(pkt.giaddr), self.relay_port, reply)
        if mt != MessageType.NAK and pkt.ciaddr != ZERO:
            return Send(data, str(pkt.ciaddr), self.client_port, reply)
        return Send(data, "255.255.255.255", self.client_port, reply)

    # -- proxy mode --------------------------------------------------------------------
    def _proxy(self, pkt: DhcpPacket, mt: MessageType, via_port: int) -> list[Event]:
        if not pkt.is_pxe_client and not pkt.is_ipxe:
            return []  # the network's own DHCP server answers plain clients
        if mt not in (MessageType.DISCOVER, MessageType.REQUEST, MessageType.INFORM):
            return []
        if mt == MessageType.REQUEST and via_port != DEFAULT_PROXY_PORT:
            return []  # REQUESTs on 67 are for the real DHCP server
        cfg = self.config
        opts: dict[int, bytes] = {
            Opt.MESSAGE_TYPE: bytes((MessageType.OFFER if mt == MessageType.DISCOVER else MessageType.ACK,)),
            Opt.SERVER_ID: cfg.server_ip.packed,
            Opt.VENDOR_CLASS: b"PXEClient",
            Opt.VENDOR_SPECIFIC: PXE_DISCOVERY_CONTROL,
        }
        if pkt.uuid is not None:
            opts[Opt.CLIENT_UUID] = pkt.uuid
        _, file_field = self._boot_options(pkt, opts)
        if Opt.BOOTFILE not in opts:
            return []
        reply = DhcpPacket(op=BOOTREPLY, xid=pkt.xid, chaddr=pkt.chaddr, flags=pkt.flags, giaddr=pkt.giaddr,
                           ciaddr=pkt.ciaddr, yiaddr=ZERO, siaddr=cfg.server_ip, file=file_field, options=opts)
        data = reply.encode()
        events: list[Event] = [Seen(pkt.mac, f"proxydhcp-{mt.name.lower()}", self._client_kind(pkt))]
        if via_port == DEFAULT_PROXY_PORT and pkt.ciaddr != ZERO:
            events.append(Send(data, str(pkt.ciaddr), self.client_port, reply))
        else:
            events.append(Send(data, "255.255.255.255", self.client_port, reply))
        return events


# -- trio edge -------------------------------------------------------------------------------


def udp_socket(interface: str | None) -> socket.socket:
    """A non-blocking UDP socket with SO_REUSEADDR, SO_BROADCAST and (given ``interface``)
    SO_BINDTODEVICE; the receive buffer is raised (1 MiB, as root past rmem_max) so a boot
    storm's burst is queued rather than dropped."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    # Linux hands a copy of every broadcast we send back to this host's own stack (the same
    # switch as for multicast); nobody here listens for our replies, so skip that copy
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, RECV_BUFFER)
            break
        except OSError:
            continue
    if interface:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot bind to interface {interface}: {exc}") from exc
    return sock


async def _sendto(sock: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
    while True:
        try:
            sock.sendto(data, dest)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def serve_dhcp(
    server: DhcpServer,
    *,
    interface: str | None = None,
    address: str = "0.0.0.0",
    port: int = DEFAULT_SERVER_PORT,
    client_port: int = DEFAULT_CLIENT_PORT,
    proxy_port: int | None = None,
    on_event: Callable[[Seen], None] | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[tuple[int, int | None]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DHCP on UDP ``port`` (and, in proxy mode, ``proxy_port``) until cancelled.

    ``task_status.started((port, proxy_port))`` once listening. Bind to ``0.0.0.0`` with
    ``interface`` (SO_BINDTODEVICE) to receive broadcasts on one segment only.

    The edge waits for readability through trio, then drains whatever the kernel has queued
    with plain non-blocking calls (at most ``BURST`` packets before yielding to other tasks):
    one trio wake-up per burst instead of two awaits per packet. See docs/PXE.md (benchmarks).
    """
    server.client_port = client_port
    server.relay_port = port
    socks: list[socket.socket] = []
    try:
        main = udp_socket(interface)
        socks.append(main)
        main.bind((address, port))
        if proxy_port is not None:
            px = udp_socket(interface)
            socks.append(px)
            px.bind((address, proxy_port))
    except OSError as exc:
        for s in socks:
            s.close()
        raise ConfigError(f"cannot listen for DHCP on {address}:{port}: {exc}") from exc

    async def pump(sock: socket.socket, via: int) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(BURST):
                try:
                    data, peer = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # e.g. ICMP-induced errors on a UDP socket
                    log.debug("event=recv-failed error=%s", exc)
                    break
                try:
                    events = server.receive(data, clock(), via_port=via)
                except RemoteProtocolError as exc:
                    log.debug("event=bad-packet peer=%s:%s error=%s", peer[0], peer[1], exc)
                    continue
                for ev in events:
                    if isinstance(ev, Seen):
                        log.info("event=%s mac=%s detail=%s", ev.stage, ev.mac, ev.detail)
                        if on_event is not None:
                            on_event(ev)
                        continue
                    try:
                        await _sendto(sock, ev.data, (ev.host, ev.port))
                    except OSError as exc:
                        log.warning("event=send-failed to=%s:%s error=%s", ev.host, ev.port, exc)
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, socks[0], DEFAULT_SERVER_PORT)
            if proxy_port is not None:
                nursery.start_soon(pump, socks[1], DEFAULT_PROXY_PORT)
            task_status.started((socks[0].getsockname()[1], socks[1].getsockname()[1] if proxy_port is not None else None))
            await trio.sleep_forever()
    finally:
        for s in socks:
            s.close()
