"""DHCP/BOOTP packet layout (RFC 2131 §2, RFC 2132): one strict parser, one encoder.

``parse_untrusted`` is the only way bytes from the network become a ``DhcpPacket``; whatever
is wrong with them, it raises ``RemoteProtocolError`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import struct
from collections.abc import Mapping

from lab.common.errors import LocalProtocolError, RemoteProtocolError

# op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
COOKIE = struct.Struct("!I")
MAGIC_COOKIE = 0x63825363
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")

MIN_PACKET = HEADER.size + COOKIE.size  # 240
MAX_PACKET = 4096  # larger than any DHCP message a boot ROM sends; anything bigger is noise
BOOTP_MIN_REPLY = 300  # some ROMs drop replies shorter than a BOOTP packet
MAX_OPTIONS = 128  # distinct option codes we keep from one packet
MAX_OPTION_LEN = 1020  # one option after RFC 3396 concatenation

BOOTREQUEST = 1
BOOTREPLY = 2
FLAG_BROADCAST = 0x8000
ZERO = ipaddress.IPv4Address(0)
_ZERO4 = bytes(4)


_COOKIE_BYTES = COOKIE.pack(MAGIC_COOKIE)
_END = b"\xff"


class MessageType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(enum.IntEnum):
    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAM_REQUEST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_T1 = 58
    REBINDING_T2 = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER = 66
    BOOTFILE = 67
    USER_CLASS = 77
    CLIENT_ARCH = 93
    CLIENT_NDI = 94
    CLIENT_UUID = 97
    IPXE_ENCAP = 175
    END = 255


# options whose length the rest of the code relies on: code -> (min, max, multiple of)
_LENGTH_RULES: dict[int, tuple[int, int, int]] = {
    Opt.MESSAGE_TYPE: (1, 1, 1),
    Opt.REQUESTED_IP: (4, 4, 4),
    Opt.SERVER_ID: (4, 4, 4),
    Opt.LEASE_TIME: (4, 4, 4),
    Opt.MAX_MESSAGE_SIZE: (2, 2, 2),
    Opt.CLIENT_ARCH: (2, 254, 2),
    Opt.SUBNET_MASK: (4, 4, 4),
}


@dataclasses.dataclass(frozen=True)
class DhcpPacket:
    op: int
    xid: int
    chaddr: bytes  # hardware address, hlen bytes
    htype: int = 1
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: ipaddress.IPv4Address = ZERO
    yiaddr: ipaddress.IPv4Address = ZERO
    siaddr: ipaddress.IPv4Address = ZERO
    giaddr: ipaddress.IPv4Address = ZERO
    sname: bytes = b""
    file: bytes = b""
    options: Mapping[int, bytes] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.op not in (BOOTREQUEST, BOOTREPLY):
            raise LocalProtocolError(f"op must be 1 or 2, not {self.op}")
        if not 0 < len(self.chaddr) <= 16:
            raise LocalProtocolError("chaddr must be 1..16 bytes")
        if len(self.sname) > 63 or len(self.file) > 127:
            raise LocalProtocolError("sname/file too long (63/127 bytes, NUL-terminated)")
        for code, value in self.options.items():
            if not 0 < code < 255 or len(value) > MAX_OPTION_LEN:
                raise LocalProtocolError(f"option {code} not encodable")

    # -- views -------------------------------------------------------------------------
    @functools.cached_property
    def mac(self) -> str:  # cached in the instance __dict__ (fine on a frozen dataclass)
        return self.chaddr.hex(":")

    @functools.cached_property
    def message_type(self) -> MessageType | None:
        raw = self.options.get(Opt.MESSAGE_TYPE)
        if raw is None:
            return None
        try:
            return MessageType(raw[0])
        except ValueError:
            return None

    def _ip_option(self, code: int) -> ipaddress.IPv4Address | None:
        raw = self.options.get(code)
        return ipaddress.IPv4Address(raw) if raw is not None and len(raw) == 4 else None

    @property
    def requested_ip(self) -> ipaddress.IPv4Address | None:
        return self._ip_option(Opt.REQUESTED_IP)

    @property
    def server_id(self) -> ipaddress.IPv4Address | None:
        return self._ip_option(Opt.SERVER_ID)

    @property
    def vendor_class(self) -> bytes:
        return self.options.get(Opt.VENDOR_CLASS, b"")

    @property
    def is_pxe_client(self) -> bool:
        return self.vendor_class.startswith(b"PXEClient")

    @property
    def client_arch(self) -> int | None:
        """First architecture type of option 93 (RFC 4578 §2.1), or None."""
        raw = self.options.get(Opt.CLIENT_ARCH)
        return U16.unpack_from(raw)[0] if raw and len(raw) >= 2 else None

    @property
    def uuid(self) -> bytes | None:
        """Option 97 (type byte 0 + 16-byte GUID), raw."""
        return self.options.get(Opt.CLIENT_UUID)

    @property
    def user_class(self) -> bytes:
        return self.options.get(Opt.USER_CLASS, b"")

    @property
    def is_ipxe(self) -> bool:
        """iPXE sends user class "iPXE" (raw, or RFC 3004-framed) and its option 175 block."""
        uc = self.user_class
        return uc == b"iPXE" or uc[1:5] == b"iPXE" or Opt.IPXE_ENCAP in self.options

    # -- encoding ----------------------------------------------------------------------
    def encode(self, pad_to: int = BOOTP_MIN_REPLY) -> bytes:
        head = HEADER.pack(
            self.op, self.htype, len(self.chaddr), self.hops, self.xid, self.secs, self.flags,
            self.ciaddr.packed, self.yiaddr.packed, self.siaddr.packed, self.giaddr.packed,
            self.chaddr, self.sname, self.file,
        )
        parts = [head, _COOKIE_BYTES]
        # message type first (some ROMs insist), the rest in the order given; long values split (RFC 3396)
        opts = self.options
        mt = opts.get(Opt.MESSAGE_TYPE)
        if mt is not None:
            parts.append(bytes((Opt.MESSAGE_TYPE, len(mt))) + mt)
        for code, value in opts.items():
            if code == Opt.MESSAGE_TYPE:
                continue
            if len(value) <= 255:
                parts.append(bytes((code, len(value))) + value)
                continue
            for i in range(0, len(value), 255):
                chunk = value[i : i + 255]
                parts.append(bytes((code, len(chunk))) + chunk)
        parts.append(_END)
        out = b"".join(parts)
        return out + b"\0" * (pad_to - len(out)) if len(out) < pad_to else out


def _ip4(raw: bytes) -> ipaddress.IPv4Address:
    return ZERO if raw == _ZERO4 else ipaddress.IPv4Address(raw)  # requests are mostly zeros


def _cstring(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def parse_untrusted(data: bytes) -> DhcpPacket:
    """Bytes from the network → DhcpPacket, or RemoteProtocolError. Overloaded sname/file
    (option 52) are not parsed as options: boot ROMs never need them."""
    if not MIN_PACKET <= len(data) <= MAX_PACKET:
        raise RemoteProtocolError(f"DHCP packet of {len(data)} bytes (want {MIN_PACKET}..{MAX_PACKET})")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file) = HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise RemoteProtocolError(f"bad BOOTP op {op}")
    if not 0 < hlen <= 16:
        raise RemoteProtocolError(f"bad hardware address length {hlen}")
    if COOKIE.unpack_from(data, HEADER.size)[0] != MAGIC_COOKIE:
        raise RemoteProtocolError("no DHCP magic cookie (plain BOOTP is not served)")
    options: dict[int, bytes] = {}
    pos, end = MIN_PACKET, len(data)
    while pos < end:
        code = data[pos]
        pos += 1
        if code == Opt.PAD:
            continue
        if code == Opt.END:
            break
        if pos >= end:
            raise RemoteProtocolError(f"option {code} truncated before its length")
        length = data[pos]
        pos += 1
        if pos + length > end:
            raise RemoteProtocolError(f"option {code} runs past the packet end")
        value = data[pos : pos + length]
        pos += length
        if code in options:
            options[code] += value  # RFC 3396 concatenation
            if len(options[code]) > MAX_OPTION_LEN:
                raise RemoteProtocolError(f"option {code} longer than {MAX_OPTION_LEN} bytes")
        elif len(options) >= MAX_OPTIONS:
            raise RemoteProtocolError("too many DHCP options")
        else:
            options[code] = value
    for code, (lo, hi, mult) in _LENGTH_RULES.items():
        v = options.get(code)
        if v is not None and not (lo <= len(v) <= hi and len(v) % mult == 0):
            raise RemoteProtocolError(f"option {code} has bad length {len(v)}")
    mt = options.get(Opt.MESSAGE_TYPE)
    if mt is not None and mt[0] not in MessageType._value2member_map_:
        raise RemoteProtocolError(f"unknown DHCP message type {mt[0]}")
    return DhcpPacket(
        op=op, htype=htype, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=_ip4(ci), yiaddr=_ip4(yi), siaddr=_ip4(si), giaddr=_ip4(gi),
        chaddr=chaddr[:hlen], sname=_cstring(sname)[:63], file=_cstring(file)[:127], options=options,
    )
