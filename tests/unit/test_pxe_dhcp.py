"""DHCP: wire round trips, captured real packets, allowlist silence, full and proxy modes."""

from __future__ import annotations

import ipaddress
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common.errors import ConfigError, RemoteProtocolError
from lab.coordinator.pxe.dhcp import (
    DhcpConfig, DhcpPacket, DhcpServer, MessageType, Opt, Seen, Send, boot_file_for, parse_untrusted,
)
from lab.coordinator.pxe.registry import Allowlist

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures" / "pxe"
IP = ipaddress.IPv4Address
NOW = 1_800_000_000.0
MAC = "02:00:00:00:00:42"
SERVER = IP("10.250.0.1")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def allow(*macs: str, until: float = NOW + 600) -> Allowlist:
    al = Allowlist()
    for i, m in enumerate(macs):
        al.allow(m, f"node-{i}", until)
    return al


def full_config(**kw) -> DhcpConfig:
    return DhcpConfig(server_ip=SERVER, http_base="http://10.250.0.1:8080", mode="full",
                      pool_first=IP("10.250.0.100"), pool_last=IP("10.250.0.102"), **kw)


def proxy_config(**kw) -> DhcpConfig:
    return DhcpConfig(server_ip=SERVER, http_base="http://10.250.0.1:8080", mode="proxy", **kw)


def request(mt: MessageType, mac: str = MAC, xid: int = 0x1234, **opts: bytes) -> DhcpPacket:
    options = {Opt.MESSAGE_TYPE: bytes((mt,))}
    for k, v in opts.items():
        options[Opt[k.upper()]] = v
    return DhcpPacket(op=1, xid=xid, chaddr=bytes.fromhex(mac.replace(":", "")), options=options)


def sends(events) -> list[Send]:
    return [e for e in events if isinstance(e, Send)]


def reply_of(events) -> DhcpPacket:
    (s,) = sends(events)
    return parse_untrusted(s.data)


# -- wire ----------------------------------------------------------------------------------


def test_captured_udhcpc_discover_parses() -> None:
    # captured from busybox udhcpc 1.35.0 in a network namespace (tests/fixtures/pxe/README)
    p = parse_untrusted(fixture("udhcpc-discover.bin"))
    assert p.mac == MAC
    assert p.message_type == MessageType.DISCOVER
    assert p.vendor_class == b"udhcp 1.35.0"
    assert p.client_arch is None and not p.is_pxe_client and not p.is_ipxe
    assert p.options[Opt.PARAM_REQUEST] == bytes([1, 3, 6, 12, 15, 28, 42])


def test_captured_pxe_style_discover_parses() -> None:
    p = parse_untrusted(fixture("udhcpc-discover-pxe-efi64.bin"))
    assert p.is_pxe_client and p.client_arch == 7
    assert p.uuid == bytes.fromhex("00112233445566778899aabbccddeeff00")


def test_captured_ipxe_rom_discover_is_recognised() -> None:
    # captured from QEMU's iPXE ROM (Debian ipxe-qemu 1.0.0+git-20190125, pxe-virtio.rom) in a namespace
    p = parse_untrusted(fixture("ipxe-rom-discover.bin"))
    assert p.mac == "52:54:00:12:34:56" and p.is_ipxe and p.is_pxe_client and p.client_arch == 0
    assert p.user_class == b"iPXE" and Opt.IPXE_ENCAP in p.options
    server = DhcpServer(full_config(), allow("52:54:00:12:34:56"))
    offer = reply_of(server.receive(fixture("ipxe-rom-discover.bin"), NOW))
    assert offer.options[Opt.BOOTFILE] == b"http://10.250.0.1:8080/boot/52-54-00-12-34-56.ipxe"
    assert Opt.VENDOR_CLASS not in offer.options  # else iPXE waits seconds for a proxyDHCP


@pytest.mark.parametrize("name", ["udhcpc-discover.bin", "udhcpc-discover-pxe-efi64.bin", "ipxe-rom-discover.bin"])
def test_captured_packets_round_trip(name: str) -> None:
    raw = fixture(name)
    p = parse_untrusted(raw)
    again = parse_untrusted(p.encode())
    assert again == p
    # same bytes up to the END option (udhcpc pads with zeros to 300 bytes too)
    assert p.encode(pad_to=len(raw)) == raw


def test_concatenated_long_option_round_trips() -> None:
    p = request(MessageType.DISCOVER, vendor_class=b"x" * 600)
    assert parse_untrusted(p.encode()).vendor_class == b"x" * 600


@pytest.mark.parametrize(
    "mutate, why",
    [
        (lambda b: b[:239], "bytes"),
        (lambda b: b + b"\0" * 5000, "bytes"),
        (lambda b: b"\x03" + b[1:], "op"),
        (lambda b: b[:2] + b"\x00" + b[3:], "hardware address"),
        (lambda b: b[:236] + b"\0\0\0\0" + b[240:], "cookie"),
        (lambda b: b[:240] + b"\x35\x05\x01", "past the packet end"),
        (lambda b: b[:240] + b"\x35", "truncated"),
        (lambda b: b[:240] + b"\x35\x01\x09\xff", "message type"),
        (lambda b: b[:240] + b"\x5d\x03\x00\x00\x07\xff", "bad length"),
    ],
)
def test_malformed_packets_raise_remote_protocol_error(mutate, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        parse_untrusted(mutate(fixture("udhcpc-discover.bin")))


@given(st.binary(max_size=1600))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        p = parse_untrusted(data)
    except RemoteProtocolError:
        return
    p.message_type, p.client_arch, p.is_ipxe, p.requested_ip, p.server_id  # views never raise


@given(st.binary(min_size=240, max_size=1600))
def test_random_bytes_behind_a_valid_header_only_raise_remote_protocol_error(tail: bytes) -> None:
    data = fixture("udhcpc-discover.bin")[:240] + tail
    try:
        parse_untrusted(data)
    except RemoteProtocolError:
        pass


@given(
    xid=st.integers(0, 2**32 - 1),
    mac=st.binary(min_size=6, max_size=6),
    options=st.dictionaries(st.integers(1, 254), st.binary(max_size=300), max_size=10),
)
def test_encode_parse_round_trip(xid: int, mac: bytes, options: dict[int, bytes]) -> None:
    options = {k: v for k, v in options.items() if k not in (53, 50, 54, 51, 57, 93, 1, 52)}
    p = DhcpPacket(op=1, xid=xid, chaddr=mac, options=options)
    q = parse_untrusted(p.encode())
    # empty options survive as empty; everything else byte for byte
    assert q.xid == xid and q.chaddr == mac and dict(q.options) == options


# -- boot file choice ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, expected",
    [(0, "undionly.kpxe"), (7, "ipxe.efi"), (9, "ipxe.efi"), (11, "ipxe-arm64.efi"), (6, None), (99, None)],
)
def test_arch_selects_boot_file(arch: int, expected: str | None) -> None:
    p = request(MessageType.DISCOVER, vendor_class=b"PXEClient", client_arch=arch.to_bytes(2, "big"))
    assert boot_file_for(p, full_config()) == expected


def test_snponly_is_configurable() -> None:
    p = request(MessageType.DISCOVER, vendor_class=b"PXEClient", client_arch=b"\x00\x07")
    assert boot_file_for(p, full_config(efi_x64_file="snponly.efi")) == "snponly.efi"


@pytest.mark.parametrize(
    "opts",
    [{"user_class": b"iPXE"}, {"user_class": b"\x04iPXE"}, {"ipxe_encap": b"\xb1\x05\x01\x80\x86\x10\x0e"}],
)
def test_ipxe_gets_its_script_url(opts) -> None:
    p = request(MessageType.DISCOVER, vendor_class=b"PXEClient:Arch:00000", client_arch=b"\x00\x00", **opts)
    assert p.is_ipxe
    assert boot_file_for(p, full_config()) == "http://10.250.0.1:8080/boot/02-00-00-00-00-42.ipxe"


def test_plain_client_gets_no_boot_file_but_pxeclient_without_arch_is_bios() -> None:
    assert boot_file_for(request(MessageType.DISCOVER), full_config()) is None
    assert boot_file_for(request(MessageType.DISCOVER, vendor_class=b"PXEClient"), full_config()) == "undionly.kpxe"


# -- allowlist --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "proxy"])
def test_silent_for_macs_not_being_onboarded(mode: str) -> None:
    cfg = full_config() if mode == "full" else proxy_config()
    server = DhcpServer(cfg, allow("02:00:00:00:00:99"))
    for raw in (fixture("udhcpc-discover.bin"), fixture("udhcpc-discover-pxe-efi64.bin")):
        assert server.receive(raw, NOW) == []
    for mt in MessageType:
        assert server.handle(request(mt, vendor_class=b"PXEClient"), NOW) == []


def test_silent_after_the_allowlist_entry_expires() -> None:
    server = DhcpServer(full_config(), allow(MAC, until=NOW + 10))
    assert sends(server.receive(fixture("udhcpc-discover.bin"), NOW))
    assert server.receive(fixture("udhcpc-discover.bin"), NOW + 10) == []


def test_silent_for_replies_and_non_ethernet() -> None:
    server = DhcpServer(full_config(), allow(MAC))
    p = request(MessageType.DISCOVER)
    assert server.handle(DhcpPacket(op=2, xid=1, chaddr=p.chaddr, options=p.options), NOW) == []
    assert server.handle(DhcpPacket(op=1, xid=1, htype=6, chaddr=p.chaddr, options=p.options), NOW) == []


# -- full mode ----------------------------------------------------------------------------------


def test_full_mode_discover_offer_request_ack() -> None:
    server = DhcpServer(full_config(router=IP("10.250.0.1"), dns=(IP("10.250.0.53"),)), allow(MAC))
    events = server.receive(fixture("udhcpc-discover.bin"), NOW)
    assert Seen(MAC, "dhcp-discover", "plain") in events
    (send,) = sends(events)
    assert send.broadcast and send.port == 68
    offer = parse_untrusted(send.data)
    assert offer.op == 2 and offer.message_type == MessageType.OFFER
    assert offer.yiaddr == IP("10.250.0.100") and offer.server_id == SERVER
    assert offer.options[Opt.ROUTER] == IP("10.250.0.1").packed
    assert offer.options[Opt.HOSTNAME] == b"node-0"
    assert Opt.BOOTFILE not in offer.options  # udhcpc is not a PXE client
    assert len(send.data) >= 300

    req = request(MessageType.REQUEST, xid=offer.xid, requested_ip=offer.yiaddr.packed, server_id=SERVER.packed)
    ack = reply_of(server.handle(req, NOW + 1))
    assert ack.message_type == MessageType.ACK and ack.yiaddr == offer.yiaddr
    assert int.from_bytes(ack.options[Opt.LEASE_TIME], "big") == 3600
    assert server.lease_for(MAC, NOW + 2) == offer.yiaddr


def test_full_mode_pxe_offer_carries_boot_file_and_next_server() -> None:
    server = DhcpServer(full_config(), allow(MAC))
    offer = reply_of(server.receive(fixture("udhcpc-discover-pxe-efi64.bin"), NOW))
    assert offer.options[Opt.BOOTFILE] == b"ipxe.efi" and offer.file == b"ipxe.efi"
    assert offer.options[Opt.TFTP_SERVER] == b"10.250.0.1" and offer.siaddr == SERVER
    assert offer.options[Opt.VENDOR_CLASS] == b"PXEClient"


def test_request_for_another_server_is_silent_and_frees_the_offer() -> None:
    server = DhcpServer(full_config(), allow(MAC))
    server.handle(request(MessageType.DISCOVER), NOW)
    assert server.handle(request(MessageType.REQUEST, requested_ip=IP("10.250.0.100").packed,
                                 server_id=IP("10.250.0.2").packed), NOW) == []
    assert MAC not in server.leases.by_mac


def test_request_for_a_taken_address_is_nakked() -> None:
    other = "02:00:00:00:00:43"
    server = DhcpServer(full_config(), allow(MAC, other))
    server.handle(request(MessageType.DISCOVER), NOW)
    server.handle(request(MessageType.REQUEST, requested_ip=IP("10.250.0.100").packed, server_id=SERVER.packed), NOW)
    server.handle(request(MessageType.DISCOVER, mac=other), NOW)
    nak = reply_of(server.handle(request(MessageType.REQUEST, mac=other, requested_ip=IP("10.250.0.100").packed,
                                         server_id=SERVER.packed), NOW))
    assert nak.message_type == MessageType.NAK and nak.yiaddr == IP(0)


def test_init_reboot_off_network_is_nakked_unknown_in_pool_is_silent() -> None:
    server = DhcpServer(full_config(), allow(MAC))
    nak = reply_of(server.handle(request(MessageType.REQUEST, requested_ip=IP("192.168.7.7").packed), NOW))
    assert nak.message_type == MessageType.NAK
    assert server.handle(request(MessageType.REQUEST, requested_ip=IP("10.250.0.101").packed), NOW) == []


def test_pool_exhaustion_expiry_release_and_decline() -> None:
    macs = [f"02:00:00:00:01:0{i}" for i in range(4)]
    server = DhcpServer(full_config(), allow(*macs, until=NOW + 10**6))
    got = [reply_of(server.handle(request(MessageType.DISCOVER, mac=m), NOW)).yiaddr for m in macs[:3]]
    assert got == [IP("10.250.0.100"), IP("10.250.0.101"), IP("10.250.0.102")]
    assert sends(server.handle(request(MessageType.DISCOVER, mac=macs[3]), NOW)) == []  # pool exhausted
    # offers are held 60 s, then the address is free again
    assert reply_of(server.handle(request(MessageType.DISCOVER, mac=macs[3]), NOW + 61)).yiaddr == IP("10.250.0.100")
    # a decline quarantines the address
    server.handle(request(MessageType.DECLINE, mac=macs[3], requested_ip=IP("10.250.0.100").packed), NOW + 62)
    assert sends(server.handle(request(MessageType.DISCOVER, mac=macs[0]), NOW + 62))[0].packet.yiaddr != IP("10.250.0.100")
    # release frees the binding
    server.handle(request(MessageType.REQUEST, mac=macs[2], requested_ip=IP("10.250.0.102").packed,
                          server_id=SERVER.packed), NOW + 63)
    assert server.lease_for(macs[2], NOW + 64) == IP("10.250.0.102")
    rel = DhcpPacket(op=1, xid=9, chaddr=bytes.fromhex(macs[2].replace(":", "")), ciaddr=IP("10.250.0.102"),
                     options={Opt.MESSAGE_TYPE: bytes((MessageType.RELEASE,))})
    server.handle(rel, NOW + 65)
    assert server.lease_for(macs[2], NOW + 66) is None


def test_renewing_client_is_answered_unicast_and_relay_via_giaddr() -> None:
    server = DhcpServer(full_config(), allow(MAC))
    server.handle(request(MessageType.DISCOVER), NOW)
    server.handle(request(MessageType.REQUEST, requested_ip=IP("10.250.0.100").packed, server_id=SERVER.packed), NOW)
    renew = DhcpPacket(op=1, xid=5, chaddr=bytes.fromhex("020000000042"), ciaddr=IP("10.250.0.100"),
                       options={Opt.MESSAGE_TYPE: bytes((MessageType.REQUEST,))})
    (s,) = sends(server.handle(renew, NOW + 100))
    assert (s.host, s.port) == ("10.250.0.100", 68) and parse_untrusted(s.data).message_type == MessageType.ACK
    relayed = DhcpPacket(op=1, xid=6, chaddr=bytes.fromhex("020000000042"), giaddr=IP("10.250.0.254"),
                         options={Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,))})
    (s,) = sends(server.handle(relayed, NOW + 100))
    assert (s.host, s.port) == ("10.250.0.254", 67)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="pool"):
        DhcpConfig(server_ip=SERVER, http_base="http://x", mode="full")
    with pytest.raises(ConfigError, match="outside"):
        DhcpConfig(server_ip=SERVER, http_base="http://x", pool_first=IP("10.0.0.1"), pool_last=IP("10.0.0.2"))
    with pytest.raises(ConfigError, match="mode"):
        DhcpConfig(server_ip=SERVER, http_base="http://x", mode="both")  # type: ignore[arg-type]


# -- proxy mode ---------------------------------------------------------------------------------


def test_proxy_mode_offers_boot_info_without_an_address() -> None:
    server = DhcpServer(proxy_config(), allow(MAC))
    events = server.receive(fixture("udhcpc-discover-pxe-efi64.bin"), NOW)
    offer = reply_of(events)
    assert offer.message_type == MessageType.OFFER
    assert offer.yiaddr == IP(0)
    assert offer.options[Opt.VENDOR_CLASS] == b"PXEClient"
    assert offer.options[Opt.BOOTFILE] == b"ipxe.efi"
    assert offer.options[Opt.CLIENT_UUID] == bytes.fromhex("00112233445566778899aabbccddeeff00")
    assert Opt.LEASE_TIME not in offer.options and Opt.SUBNET_MASK not in offer.options
    assert server.leases is None


def test_proxy_mode_ignores_plain_clients_and_requests_on_port_67() -> None:
    server = DhcpServer(proxy_config(), allow(MAC))
    assert server.receive(fixture("udhcpc-discover.bin"), NOW) == []
    req = request(MessageType.REQUEST, vendor_class=b"PXEClient", client_arch=b"\x00\x00")
    assert server.handle(req, NOW, via_port=67) == []
    ack = reply_of(server.handle(req, NOW, via_port=4011))
    assert ack.message_type == MessageType.ACK and ack.options[Opt.BOOTFILE] == b"undionly.kpxe"


def test_proxy_mode_ipxe_gets_script_url() -> None:
    server = DhcpServer(proxy_config(), allow(MAC))
    p = request(MessageType.DISCOVER, vendor_class=b"PXEClient:Arch:00000:UNDI:002001", user_class=b"iPXE")
    offer = reply_of(server.handle(p, NOW))
    assert offer.options[Opt.BOOTFILE] == b"http://10.250.0.1:8080/boot/02-00-00-00-00-42.ipxe"


@given(st.lists(st.tuples(st.sampled_from(list(MessageType)), st.integers(0, 5), st.floats(0, 100)), max_size=40))
def test_any_message_sequence_keeps_leases_in_the_pool(steps) -> None:
    server = DhcpServer(full_config(), allow(MAC, until=NOW + 10**6))
    now = NOW
    for mt, ip_index, dt in steps:
        now += dt
        ip = IP(int(IP("10.250.0.99")) + ip_index)
        events = server.handle(request(mt, requested_ip=ip.packed, server_id=SERVER.packed), now)
        for s in sends(events):
            r = parse_untrusted(s.data)
            assert r.message_type in (MessageType.OFFER, MessageType.ACK, MessageType.NAK)
            assert r.yiaddr == IP(0) or server.leases.in_pool(r.yiaddr)


def test_selecting_a_different_address_than_offered_is_nakked() -> None:
    server = DhcpServer(full_config(), allow(MAC))
    server.handle(request(MessageType.DISCOVER), NOW)
    nak = reply_of(server.handle(request(MessageType.REQUEST, requested_ip=IP("10.250.0.102").packed,
                                         server_id=SERVER.packed), NOW))
    assert nak.message_type == MessageType.NAK
    assert server.lease_for(MAC, NOW) is None


# -- the indexed lease table behaves like the plain linear one ---------------------------------


class _LinearLeases:
    """The straightforward O(N) lease table the indexed one replaced: the reference."""

    def __init__(self, first: IP, last: IP, hold: float) -> None:
        self.first, self.last, self.hold = int(first), int(last), hold
        self.by_mac: dict[str, tuple[IP, float, bool]] = {}
        self.declined: dict[IP, float] = {}

    def _owner(self, ip: IP, now: float) -> str | None:
        return next((m for m, (i, exp, _) in self.by_mac.items() if i == ip and exp > now), None)

    def _usable(self, ip: IP, mac: str, now: float) -> bool:
        if not self.first <= int(ip) <= self.last or self.declined.get(ip, 0.0) > now:
            return False
        return self._owner(ip, now) in (None, mac)

    def offer(self, mac: str, requested: IP | None, now: float) -> IP | None:
        cur = self.by_mac.get(mac)
        for ip in [c for c in (cur[0] if cur else None, requested) if c is not None]:
            if self._usable(ip, mac, now):
                break
        else:
            taken = {i for m, (i, exp, _) in self.by_mac.items() if exp > now and m != mac}
            free = [IP(n) for n in range(self.first, self.last + 1)
                    if IP(n) not in taken and self.declined.get(IP(n), 0.0) <= now]
            if not free:
                return None
            ip = free[0]
        if cur is not None and cur[2] and cur[0] == ip and cur[1] > now:
            return ip
        self.by_mac[mac] = (ip, now + self.hold, False)
        return ip

    def bind(self, mac: str, ip: IP, lease_time: int, now: float) -> bool:
        if not self._usable(ip, mac, now):
            return False
        self.by_mac[mac] = (ip, now + lease_time, True)
        return True

    def release(self, mac: str, ip: IP | None = None) -> None:
        cur = self.by_mac.get(mac)
        if cur is not None and (ip is None or cur[0] == ip):
            del self.by_mac[mac]

    def decline(self, mac: str, ip: IP, now: float, quarantine: float) -> None:
        self.release(mac, ip)
        if self.first <= int(ip) <= self.last:
            self.declined[ip] = now + quarantine


_OPS = st.lists(
    st.tuples(st.sampled_from(["offer", "bind", "release", "decline"]), st.integers(0, 5),
              st.one_of(st.none(), st.integers(0, 9)), st.integers(0, 40)),
    max_size=60,
)


@given(_OPS)
def test_indexed_lease_table_matches_the_linear_one(ops) -> None:
    from lab.coordinator.pxe.dhcp import LeaseTable

    first, last = IP("10.0.0.1"), IP("10.0.0.6")  # fewer addresses than MACs: exhaustion happens
    fast, ref = LeaseTable(first, last, offer_hold=10), _LinearLeases(first, last, 10)
    now = NOW
    for op, m, ipn, dt in ops:
        now += dt
        mac = f"02:00:00:00:00:{m:02x}"
        ip = IP(int(first) + ipn - 1) if ipn is not None else None  # 10.0.0.0 .. 10.0.0.9: some outside
        if op == "offer":
            assert fast.offer(mac, ip, now) == ref.offer(mac, ip, now)
        elif op == "bind" and ip is not None:
            assert fast.bind(mac, ip, 15, now) == ref.bind(mac, ip, 15, now)
        elif op == "release":
            fast.release(mac, ip)
            ref.release(mac, ip)
        elif op == "decline" and ip is not None:
            fast.decline(mac, ip, now, 20)
            ref.decline(mac, ip, now, 20)
        assert {k: (v.ip, v.expires, v.bound) for k, v in fast.by_mac.items()} == ref.by_mac
        for n in range(int(first) - 1, int(last) + 2):
            assert fast.mac_for(IP(n), now) == ref._owner(IP(n), now)


def test_a_storm_of_a_thousand_clients_gets_distinct_addresses_lowest_first() -> None:
    from lab.coordinator.pxe.dhcp import LeaseTable

    t = LeaseTable(IP("10.1.0.0"), IP("10.1.15.255"))
    got = [t.offer(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", None, NOW) for i in range(1000)]
    assert got == [IP(int(IP("10.1.0.0")) + i) for i in range(1000)]
