"""What both ends of an RPC connection share above the socket: the send path (:class:`_Sender`),
the receive size, and the ``event=... key=value`` log line (:func:`log_event`).
Part of :mod:`lab.common.rpc`, which re-exports what others use."""

from __future__ import annotations

import logging
from typing import Final

import trio

from lab.common import wire
from lab.common._rpc_session import SecureSession
from lab.common.errors import TransportError

log = logging.getLogger("lab.rpc")

DEFAULT_MAX_MESSAGE: Final = wire.DEFAULT_MAX_MESSAGE
DEFAULT_SEND_TIMEOUT: Final = 30.0
RECEIVE_SIZE: Final = 65536


_CONTROL: Final = {c: "?" for c in [*range(0x20), 0x7F]}


def _fmt(value: object) -> str:
    """A log field value: control characters replaced (no forged log lines), quoted if needed."""
    text = str(value).translate(_CONTROL)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def log_event(logger: logging.Logger, level: int, event: str, /, **fields: object) -> None:
    """One structured line on ``logger``: ``event=EVENT key=value ...``, None values left out,
    every value through :func:`_fmt` (no forged lines). Never pass secret values."""
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s %s", event, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None))


def _log(level: int, event: str, **fields: object) -> None:
    log_event(log, level, event, **fields)


def _address_label(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return "local" if address is None else str(address)


class _Sender:
    """Encrypts and writes one message at a time. A send that cannot finish within
    ``send_timeout`` (or is interrupted half-way) breaks the connection: a partial frame may be out."""

    def __init__(self, stream: trio.abc.Stream, session: SecureSession, send_timeout: float) -> None:
        self.stream = stream
        self.session = session
        self.send_timeout = send_timeout
        self.lock = trio.StrictFIFOLock()
        self.broken: str | None = None

    async def send_raw(self, data: bytes) -> None:
        async with self.lock:
            await self._write(data)

    async def send(self, message: wire.Message) -> None:
        async with self.lock:
            if self.broken is not None:
                raise TransportError(f"connection unusable: {self.broken}")
            data = self.session.send(message)  # LocalProtocolError (too large...) leaves the session intact
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        if self.broken is not None:
            raise TransportError(f"connection unusable: {self.broken}")
        if not data:
            return
        # Shielded: cancelling one request must not cut a frame in half for everyone else.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.broken = "connection lost"
                    raise TransportError("connection lost while sending") from exc
        if scope.cancelled_caught:
            self.broken = "send timed out"
            raise TransportError(f"peer did not read for {self.send_timeout:g} s")
