"""Read-only TFTP (RFC 1350) with blksize, tsize, timeout (RFC 2347-2349) and windowsize (RFC 7440).

``TftpTransfer`` is the sans-IO state machine of one read transfer: it takes packets and the
time (``now``) and returns packets to send; ``serve_tftp`` is the trio edge, one ephemeral UDP
socket per transfer. Only regular files inside the boot directory are served; writes are refused.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import pathlib
import socket
import struct
from collections.abc import Callable

import trio

from lab.common.errors import ConfigError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "ErrorCode", "Opcode", "Request", "TftpConfig", "TftpError", "TftpTransfer", "parse_request_untrusted",
    "parse_untrusted", "resolve_untrusted", "serve_tftp",
]

log = logging.getLogger("lab.pxe.tftp")

OPCODE = struct.Struct("!H")
BLOCK = struct.Struct("!HH")  # opcode + block number (DATA/ACK), opcode + error code (ERROR)
MAX_PACKET = 65468  # 4-byte header + the largest blksize (RFC 2348)
MAX_REQUEST = 512  # RRQ/WRQ from a boot ROM are tiny; refuse anything larger
MAX_FILENAME = 255
DEFAULT_BLKSIZE = 512
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464
DEFAULT_TIMEOUT = 1.0
DEFAULT_RETRIES = 5
DEFAULT_MAX_WINDOW = 64
DEFAULT_MAX_TRANSFERS = 64
DEFAULT_PORT = 69


class Opcode(enum.IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(enum.IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


@dataclasses.dataclass(frozen=True)
class TftpConfig:
    root: pathlib.Path
    max_blksize: int = 1468  # fits a 1500-byte Ethernet MTU without fragments
    max_window: int = DEFAULT_MAX_WINDOW
    retries: int = DEFAULT_RETRIES
    default_timeout: float = DEFAULT_TIMEOUT
    max_transfers: int = DEFAULT_MAX_TRANSFERS

    def __post_init__(self) -> None:
        if not MIN_BLKSIZE <= self.max_blksize <= MAX_BLKSIZE:
            raise ConfigError(f"max_blksize must be {MIN_BLKSIZE}..{MAX_BLKSIZE}")
        if self.max_window < 1 or self.retries < 1 or self.max_transfers < 1:
            raise ConfigError("max_window, retries and max_transfers must be >= 1")


# -- packets -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    opcode: Opcode  # RRQ or WRQ
    filename: str
    mode: str
    options: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Ack:
    block: int


@dataclasses.dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclasses.dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclasses.dataclass(frozen=True)
class OAck:
    options: dict[str, str]


Packet = Request | Ack | Error | Data | OAck


def _strings_untrusted(body: bytes, limit: int) -> list[str]:
    if not body.endswith(b"\0"):
        raise RemoteProtocolError("TFTP strings must be NUL-terminated")
    parts = body[:-1].split(b"\0")
    if len(parts) > limit:
        raise RemoteProtocolError("too many TFTP option strings")
    try:
        return [p.decode("ascii") for p in parts]
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("TFTP strings must be ASCII") from exc


def parse_request_untrusted(data: bytes) -> Request:
    if len(data) > MAX_REQUEST:
        raise RemoteProtocolError(f"TFTP request of {len(data)} bytes (max {MAX_REQUEST})")
    pkt = parse_untrusted(data)
    if not isinstance(pkt, Request):
        raise RemoteProtocolError("expected a read or write request")
    return pkt


def parse_untrusted(data: bytes) -> Packet:
    """Bytes from the network → a TFTP packet, or RemoteProtocolError."""
    if not 4 <= len(data) <= MAX_PACKET:
        raise RemoteProtocolError(f"TFTP packet of {len(data)} bytes")
    (op,) = OPCODE.unpack_from(data)
    if op in (Opcode.RRQ, Opcode.WRQ):
        if len(data) > MAX_REQUEST:
            raise RemoteProtocolError("TFTP request too long")
        strings = _strings_untrusted(data[2:], 2 + 2 * 16)
        if len(strings) < 2 or len(strings) % 2:
            raise RemoteProtocolError("TFTP request needs filename, mode and option pairs")
        filename, mode = strings[0], strings[1].lower()
        if not filename or len(filename) > MAX_FILENAME:
            raise RemoteProtocolError("bad TFTP file name length")
        options: dict[str, str] = {}
        for i in range(2, len(strings), 2):
            options.setdefault(strings[i].lower(), strings[i + 1])
        return Request(Opcode(op), filename, mode, options)
    if op == Opcode.ACK:
        if len(data) != 4:
            raise RemoteProtocolError("TFTP ACK must be 4 bytes")
        return Ack(BLOCK.unpack_from(data)[1])
    if op == Opcode.DATA:
        return Data(BLOCK.unpack_from(data)[1], data[4:])
    if op == Opcode.ERROR:
        code = BLOCK.unpack_from(data)[1]
        msg = data[4:].split(b"\0", 1)[0][:255].decode("ascii", "replace")
        return Error(code, msg)
    if op == Opcode.OACK:
        strings = _strings_untrusted(data[2:], 32) if len(data) > 2 else []
        if len(strings) % 2:
            raise RemoteProtocolError("TFTP OACK needs option pairs")
        return OAck({strings[i].lower(): strings[i + 1] for i in range(0, len(strings), 2)})
    raise RemoteProtocolError(f"unknown TFTP opcode {op}")


def encode_data(block: int, payload: bytes) -> bytes:
    return BLOCK.pack(Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return BLOCK.pack(Opcode.ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    return BLOCK.pack(Opcode.ERROR, code) + message.encode("ascii", "replace") + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    return OPCODE.pack(Opcode.OACK) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())


def encode_request(op: Opcode, filename: str, mode: str = "octet", options: dict[str, str] | None = None) -> bytes:
    parts = [filename, mode]
    for k, v in (options or {}).items():
        parts += [k, v]
    return OPCODE.pack(op) + b"".join(p.encode() + b"\0" for p in parts)


# -- files -------------------------------------------------------------------------------------


class TftpError(Exception):
    """A request we refuse; carries the TFTP error code to send back. Not a LabError: it never
    leaves this module, it becomes an ERROR packet."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def packet(self) -> bytes:
        return encode_error(self.code, self.message)


def resolve_untrusted(root: pathlib.Path, filename: str) -> pathlib.Path:
    """The regular file ``filename`` names inside ``root``, or TftpError. Refuses absolute paths,
    ``..``, backslashes, control characters and symlinks that lead outside ``root``."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in filename) or "\\" in filename:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "access violation")
    if filename.startswith("/") or any(part == ".." for part in filename.split("/")):
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "access violation")
    base = root.resolve()
    try:
        target = (base / filename).resolve(strict=True)
    except (OSError, RuntimeError):
        raise TftpError(ErrorCode.FILE_NOT_FOUND, "file not found") from None
    if not target.is_relative_to(base):
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "access violation")
    if not target.is_file():
        raise TftpError(ErrorCode.FILE_NOT_FOUND, "file not found")
    return target


# -- transfer state machine ----------------------------------------------------------------------


class State(enum.Enum):
    NEW = "new"
    OACK_SENT = "oack-sent"  # waiting for ACK 0
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


# which events each state accepts: written as data, checked in one place
_ACCEPTS: dict[State, frozenset[str]] = {
    State.NEW: frozenset({"start"}),
    State.OACK_SENT: frozenset({"receive", "timeout"}),
    State.SENDING: frozenset({"receive", "timeout"}),
    State.DONE: frozenset({"receive", "timeout"}),  # late duplicates are ignored
    State.FAILED: frozenset({"receive", "timeout"}),
}


def negotiate(request: Request, size: int, config: TftpConfig) -> dict[str, str]:
    """The options we accept (RFC 2347): only known ones, values clamped to our limits."""
    out: dict[str, str] = {}
    opts = request.options
    try:
        if "blksize" in opts:
            b = int(opts["blksize"])
            if b < MIN_BLKSIZE:
                raise TftpError(ErrorCode.OPTION_REFUSED, "blksize too small")
            out["blksize"] = str(min(b, config.max_blksize))
        if "tsize" in opts:
            out["tsize"] = str(size)
        if "timeout" in opts:
            t = int(opts["timeout"])
            if 1 <= t <= 255:
                out["timeout"] = str(t)
        if "windowsize" in opts:
            w = int(opts["windowsize"])
            if w < 1:
                raise TftpError(ErrorCode.OPTION_REFUSED, "windowsize must be >= 1")
            out["windowsize"] = str(min(w, config.max_window, 65535))
    except ValueError:
        raise TftpError(ErrorCode.OPTION_REFUSED, "option value is not a number") from None
    return out


class TftpTransfer:
    """One read transfer. ``read_at(offset, length) -> bytes`` supplies the file's bytes.

    Block numbers are tracked as absolute integers; on the wire they roll over at 65536 (to 0,
    as tftp-hpa and iPXE expect). ``now`` is any monotonic clock in seconds.
    """

    def __init__(self, request: Request, size: int, read_at: Callable[[int, int], bytes], config: TftpConfig) -> None:
        if request.opcode != Opcode.RRQ:
            raise LocalProtocolError("TftpTransfer serves read requests only")
        self.request = request
        self.size = size
        self.read_at = read_at
        self.config = config
        self.state = State.NEW
        self.accepted = negotiate(request, size, config)
        self.blksize = int(self.accepted.get("blksize", DEFAULT_BLKSIZE))
        self.window = int(self.accepted.get("windowsize", 1))
        self.timeout_s = float(self.accepted.get("timeout", config.default_timeout))
        self.last_block = size // self.blksize + 1  # the short (maybe empty) block ends the file
        self.base = 1  # first block not yet acknowledged
        self.deadline: float | None = None
        self.tries = 0
        self.error: str | None = None
        self._last_sent: list[bytes] = []

    def _check(self, event: str) -> None:
        if event not in _ACCEPTS[self.state]:
            raise LocalProtocolError(f"TFTP transfer cannot handle {event!r} in state {self.state.value!r}")

    @property
    def done(self) -> bool:
        return self.state in (State.DONE, State.FAILED)

    def _block(self, n: int) -> bytes:
        offset = (n - 1) * self.blksize
        return encode_data(n, self.read_at(offset, max(0, min(self.blksize, self.size - offset))))

    def _window(self, now: float) -> list[bytes]:
        last = min(self.base + self.window - 1, self.last_block)
        self._last_sent = [self._block(n) for n in range(self.base, last + 1)]
        self.deadline = now + self.timeout_s
        return list(self._last_sent)

    def start(self, now: float) -> list[bytes]:
        self._check("start")
        self.tries = 0
        if self.accepted:
            self.state = State.OACK_SENT
            self._last_sent = [encode_oack(self.accepted)]
            self.deadline = now + self.timeout_s
            return list(self._last_sent)
        self.state = State.SENDING
        return self._window(now)

    def _absolute(self, ack: int) -> int | None:
        """Map a 16-bit ACK to the absolute block in [base-1, base+window-1], or None (stale)."""
        for n in range(self.base - 1, min(self.base + self.window, self.last_block + 1)):
            if n & 0xFFFF == ack:
                return n
        return None

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Feed one packet from the client's TID. Malformed → RemoteProtocolError."""
        self._check("receive")
        if self.done:
            return []
        pkt = parse_untrusted(data)
        if isinstance(pkt, Error):
            self.state, self.error = State.FAILED, f"client error {pkt.code}: {pkt.message}"
            return []
        if not isinstance(pkt, Ack):
            self.state, self.error = State.FAILED, "unexpected packet"
            return [encode_error(ErrorCode.ILLEGAL_OPERATION, "illegal operation")]
        if self.state == State.OACK_SENT:
            if pkt.block != 0:
                return []
            self.state, self.tries = State.SENDING, 0
            return self._window(now)
        n = self._absolute(pkt.block)
        if n is None or n < self.base - 1:
            return []  # stale duplicate
        if n == self.base - 1:
            # duplicate ACK of the block before the window: ignore (Sorcerer's Apprentice,
            # RFC 1123 §4.2.3.1); the timer resends if it really was lost
            return []
        self.base, self.tries = n + 1, 0
        if n == self.last_block:
            self.state, self.deadline = State.DONE, None
            return []
        return self._window(now)

    def timeout(self, now: float) -> list[bytes]:
        """Call when ``now >= deadline``: resend the window, or give up after ``retries``."""
        self._check("timeout")
        if self.done or self.deadline is None or now < self.deadline:
            return []
        self.tries += 1
        if self.tries > self.config.retries:
            self.state, self.error, self.deadline = State.FAILED, "timed out", None
            return [encode_error(ErrorCode.NOT_DEFINED, "timed out")]
        self.deadline = now + self.timeout_s
        return list(self._last_sent)


def open_transfer(request: Request, config: TftpConfig) -> tuple[TftpTransfer, int]:
    """Check a request and open its file: (transfer, fd) or TftpError."""
    if request.opcode == Opcode.WRQ:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "access violation")
    if request.mode != "octet":
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "only octet mode is served")
    path = resolve_untrusted(config.root, request.filename)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise TftpError(ErrorCode.FILE_NOT_FOUND, "file not found") from None
    size = os.fstat(fd).st_size
    try:
        return TftpTransfer(request, size, lambda offset, length: os.pread(fd, length, offset), config), fd
    except TftpError:
        os.close(fd)
        raise


# -- trio edge ---------------------------------------------------------------------------------


def _socket(interface: str | None) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if interface:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
    return sock


def _transfer_socket(interface: str | None) -> socket.socket:
    """A plain non-blocking socket: the transfer loop calls it directly and goes through trio only
    to wait (readable, writable, or the retransmission deadline)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
    except OSError:
        sock.close()
        raise
    return sock


async def _send(sock: socket.socket, data: bytes, peer: tuple[str, int]) -> None:
    while True:
        try:
            sock.sendto(data, peer)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


YIELD_EVERY = 32  # packets handled back to back before other transfers get a turn


async def _run_transfer(request: Request, peer: tuple[str, int], config: TftpConfig, address: str,
                        interface: str | None, on_event: Callable[[str, str, str], None] | None) -> None:
    sock = _transfer_socket(interface)
    fd = None
    try:
        sock.bind((address, 0))
        try:
            transfer, fd = open_transfer(request, config)
        except TftpError as exc:
            log.info("event=tftp-refused peer=%s file=%r reason=%s", peer[0], request.filename, exc.message)
            await _send(sock, exc.packet(), peer)
            return
        log.info("event=tftp-start peer=%s file=%r size=%d options=%s", peer[0], request.filename, transfer.size, transfer.accepted)
        for out in transfer.start(trio.current_time()):
            await _send(sock, out, peer)
        handled = 0
        while not transfer.done:
            try:
                data, src = sock.recvfrom(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                deadline = transfer.deadline if transfer.deadline is not None else trio.current_time() + 1
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(sock)
                    continue
                for out in transfer.timeout(trio.current_time()):
                    await _send(sock, out, peer)
                continue
            handled += 1
            if handled % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            now = trio.current_time()
            if src != peer:
                await _send(sock, encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"), src)
            else:
                try:
                    outs = transfer.receive(data, now)
                except RemoteProtocolError:
                    outs = []
                for out in outs:
                    await _send(sock, out, peer)
            if transfer.deadline is not None and now >= transfer.deadline:  # a stream of junk must not stop the timer
                for out in transfer.timeout(now):
                    await _send(sock, out, peer)
        outcome = "tftp-done" if transfer.state == State.DONE else "tftp-failed"
        log.info("event=%s peer=%s file=%r error=%s", outcome, peer[0], request.filename, transfer.error)
        if on_event is not None:
            on_event(outcome, peer[0], request.filename)
    except OSError as exc:
        log.warning("event=tftp-io-error peer=%s error=%s", peer[0], exc)
    finally:
        if fd is not None:
            os.close(fd)
        sock.close()


async def serve_tftp(
    config: TftpConfig,
    *,
    address: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    interface: str | None = None,
    on_event: Callable[[str, str, str], None] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config.root`` read-only over TFTP; ``task_status.started(port)`` once bound."""
    sock = _socket(interface)
    try:
        await sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen for TFTP on {address}:{port}: {exc}") from exc
    reply_addr = address
    limiter = trio.CapacityLimiter(config.max_transfers)
    with sock:
        async with trio.open_nursery() as nursery:
            task_status.started(sock.getsockname()[1])
            while True:
                data, peer = await sock.recvfrom(MAX_PACKET)
                try:
                    request = parse_request_untrusted(data)
                except RemoteProtocolError as exc:
                    log.debug("event=tftp-bad-request peer=%s error=%s", peer[0], exc)
                    continue
                token = object()
                try:
                    limiter.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    log.warning("event=tftp-busy peer=%s", peer[0])
                    await sock.sendto(encode_error(ErrorCode.NOT_DEFINED, "server busy"), peer)
                    continue
                nursery.start_soon(_limited, limiter, token, request, peer, config, reply_addr, interface, on_event)


async def _limited(limiter: trio.CapacityLimiter, token: object, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        await _run_transfer(*args)
    finally:
        limiter.release_on_behalf_of(token)
