"""Framing and chunking, the byte layers under :mod:`lab.common.wire` (which re-exports them).

A frame is a 2-byte big-endian length and that many bytes; a chunk is one flags byte (bit 0 =
MORE) and a payload; the formats and limits are drawn in :mod:`lab.common.wire`. Sans-IO:
bytes in, frames, chunks or messages out.
"""

from __future__ import annotations

import struct
from typing import Final

from lab.common.errors import LocalProtocolError, RemoteProtocolError

MAX_FRAME_LEN: Final = 65535
NOISE_TAG_LEN: Final = 16
MAX_CHUNK_LEN: Final = MAX_FRAME_LEN - NOISE_TAG_LEN  # plaintext of one Noise transport message
CHUNK_HEADER_LEN: Final = 1
MAX_CHUNK_PAYLOAD: Final = MAX_CHUNK_LEN - CHUNK_HEADER_LEN
CHUNK_MORE: Final = 0x01
DEFAULT_MAX_MESSAGE: Final = 16 * 1024 * 1024

_LEN = struct.Struct(">H")


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """Length-prefix one frame."""
    n = len(payload)
    if not 0 < n <= MAX_FRAME_LEN:
        raise LocalProtocolError(f"frame payload must be 1..{MAX_FRAME_LEN} bytes, got {n}")
    return _LEN.pack(n) + bytes(payload)


class FrameDecoder:
    """Turns a byte stream into frames.

    Complete frames are handed out by each :meth:`feed`, so what stays buffered is at most one
    partial frame: ``2 + max_frame_len`` bytes. A header announcing a longer frame is refused as
    soon as its two bytes arrive, before any body is buffered.
    """

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        if not 0 < max_frame_len <= MAX_FRAME_LEN:
            raise LocalProtocolError(f"max_frame_len must be 1..{MAX_FRAME_LEN}")
        self.max_frame_len = max_frame_len
        self._buf = bytearray()
        self._failed = False

    @property
    def max_buffered(self) -> int:
        return _LEN.size + self.max_frame_len

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held now."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take stream bytes, return the frames they complete (possibly none)."""
        if self._failed:
            raise LocalProtocolError("FrameDecoder.feed after a protocol error")
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        while len(buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(buf)
            if n == 0 or n > self.max_frame_len:
                self._failed = True
                buf.clear()
                raise RemoteProtocolError(f"frame length {n} outside 1..{self.max_frame_len}")
            end = _LEN.size + n
            if len(buf) < end:
                break
            frames.append(bytes(buf[_LEN.size : end]))
            del buf[:end]  # bytearray drops a prefix in O(1)
        return frames

    def eof(self) -> None:
        """The stream ended: fine on a frame boundary, a truncation otherwise."""
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            raise RemoteProtocolError(f"stream ended inside a frame ({n} bytes pending)")


def split_message(
    message: bytes | bytearray | memoryview,
    *,
    max_chunk_len: int = MAX_CHUNK_LEN,
    max_message: int = DEFAULT_MAX_MESSAGE,
) -> list[bytes]:
    """Cut an application message into chunks of at most ``max_chunk_len`` bytes (header included)."""
    if not CHUNK_HEADER_LEN < max_chunk_len <= MAX_CHUNK_LEN:
        raise LocalProtocolError(f"max_chunk_len must be 2..{MAX_CHUNK_LEN}")
    mv = memoryview(message).cast("B")
    if len(mv) > max_message:
        raise LocalProtocolError(f"message of {len(mv)} bytes exceeds max_message {max_message}")
    n = len(mv)
    if n == 0:
        return [b"\x00"]
    step = max_chunk_len - CHUNK_HEADER_LEN
    return [(b"\x01" if i + step < n else b"\x00") + mv[i : i + step].tobytes() for i in range(0, n, step)]


class Reassembler:
    """Joins chunks into messages; refuses a message that grows past ``max_message``."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._parts: list[bytes] = []
        self._size = 0
        self._failed = False

    @property
    def in_progress(self) -> bool:
        return bool(self._parts)

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes | None:
        """Take one decrypted chunk; return the completed message, or None if more must follow."""
        if self._failed:
            raise LocalProtocolError("Reassembler.feed after a protocol error")
        if len(chunk) < CHUNK_HEADER_LEN or len(chunk) > MAX_CHUNK_LEN:
            self._fail()
            raise RemoteProtocolError(f"chunk of {len(chunk)} bytes outside 1..{MAX_CHUNK_LEN}")
        flags = chunk[0]
        if flags & ~CHUNK_MORE:
            self._fail()
            raise RemoteProtocolError(f"chunk flags {flags:#04x} set reserved bits")
        payload = bytes(chunk[CHUNK_HEADER_LEN:])
        more = bool(flags & CHUNK_MORE)
        if more and not payload:
            self._fail()
            raise RemoteProtocolError("empty non-final chunk")
        self._size += len(payload)
        if self._size > self.max_message:
            size = self._size
            self._fail()
            raise RemoteProtocolError(f"message exceeds {self.max_message} bytes (reached {size})")
        self._parts.append(payload)
        if more:
            return None
        message = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        self._size = 0
        return message

    def _fail(self) -> None:
        self._failed = True
        self._parts = []
        self._size = 0

    def eof(self) -> None:
        """The stream ended: fine between messages, a truncation inside one."""
        if self._parts:
            self._fail()
            raise RemoteProtocolError("stream ended inside a chunked message")
