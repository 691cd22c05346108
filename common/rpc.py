"""Noise-secured request/stream RPC over trio streams: the only place sockets meet Noise.

The protocol itself (handshake, certificate checks, framing, chunking) is the sans-IO
:class:`~lab.common._rpc_session.SecureSession`; this module moves its bytes and runs handlers.

Server::

    async def handler(peer: PeerInfo, request: wire.Request) -> dict | AsyncIterator[dict]:
        ...   # return a body, or be an async generator yielding stream items

    port = await nursery.start(partial(rpc.serve, "0.0.0.0", 7443, identity=ident, handler=handler))

A handler raising a :class:`LabError` answers with an error ``{code, message}`` (codes:
:func:`error_code`) and the connection stays open; any other exception answers ``internal``
and is logged with its traceback. Client::

    async with rpc.connect(host, 7443, identity=ident, expected_name="coord-1") as conn:
        body = await conn.call("server.get", {"name": "web-1"}, timeout=10)
        async for item in conn.stream("store.subscribe", {}):
            ...

**Enrollment**: a server given ``enroll_handler`` also accepts sessions from a node that has no
certificate yet (the client passes an :class:`Enrollee` instead of an :class:`Identity`; see
:mod:`lab.common._rpc_session`). Such a session may call :data:`ENROLL_METHOD` only, which goes
to ``enroll_handler(peer: EnrollingPeer, request)``; anything else is refused with ``auth``.
The enrollee has pinned the server's CA by fingerprint before it sends a request; afterwards
``conn.session.ca_public_key`` holds the pinned CA key.

Calls and streams are multiplexed on one connection by request id. A failed call raises
:class:`RemoteError` (also an instance of NotFound / NotEntitled / AuthError / UsageError when
the code says so); a lost connection raises :class:`TransportError`.

**Defences** (:class:`ServerLimits`): a handshake deadline (slowloris), an idle timeout, caps on
connections in all and per source address (refused connections are closed at once), on requests
in flight per connection (over it, the server stops reading from that peer until responses drain,
so TCP pushes back), on message size, and a send deadline (a peer that stops reading is dropped,
so at most one message per request waits in memory). A misbehaving peer costs only its own
connection; each disconnect is logged once as ``event=... peer=... reason=...``.

Layout: the server side (listener, limits, per-connection task) is :mod:`lab.common._rpc_server`;
the send path and log line both sides use, :mod:`lab.common._rpc_transport`; error codes across
the wire, :mod:`lab.common._rpc_errors`. This module holds the client and re-exports the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from lab.common import wire
from lab.common._rpc_errors import (  # re-exported: the names callers know as rpc.*
    RemoteAuthError,
    RemoteError,
    RemoteNotEntitled,
    RemoteNotFound,
    RemoteUsageError,
    _remote_error,
    error_code,
)
from lab.common._rpc_server import (  # re-exported, with _ServerConnection for tests that patch it
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_IN_FLIGHT,
    Handler,
    Server,
    ServerLimits,
    _ServerConnection,
    serve,
)
from lab.common._rpc_session import (
    ENROLL_METHOD,
    NEED_DATA,
    PROLOGUE,
    PROTOCOL_NAME,
    ConnectionClosed,
    Enrollee,
    EnrollingPeer,
    FingerprintMismatch,
    Identity,
    PeerAuthenticated,
    PeerInfo,
    SecureSession,
    SessionState,
    describe,
)
from lab.common._rpc_transport import DEFAULT_MAX_MESSAGE, DEFAULT_SEND_TIMEOUT, RECEIVE_SIZE, _address_label, _log, _Sender
from lab.common._rpc_transport import _fmt, log, log_event  # re-exported: other modules log through them
from lab.common.errors import (
    AuthError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
    UsageError,
)

__all__ = [
    "DEFAULT_CALL_TIMEOUT", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_CONNECTIONS_PER_IP", "DEFAULT_MAX_IN_FLIGHT", "DEFAULT_MAX_MESSAGE",
    "DEFAULT_SEND_TIMEOUT", "DEFAULT_STREAM_BUFFER", "ENROLL_METHOD", "PROLOGUE", "PROTOCOL_NAME",
    "Connection", "Enrollee", "EnrollingPeer", "FingerprintMismatch", "Handler", "Identity", "PeerInfo", "RemoteError", "RemoteStream", "SecureSession", "Server",
    "ServerLimits", "SessionState", "connect", "error_code", "log_event", "parse_endpoint", "open_connection", "serve",
]

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_CALL_TIMEOUT: Final = 30.0
DEFAULT_STREAM_BUFFER: Final = 64


def parse_endpoint(text: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` → (host, port); UsageError otherwise."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"invalid endpoint {text!r}: use HOST:PORT or [IPv6]:PORT")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise UsageError(f"invalid port in {text!r}") from None
    if not host or not 0 < port < 65536:
        raise UsageError(f"invalid endpoint {text!r}: use HOST:PORT")
    return host, port


# ---------------------------------------------------------------------------------------------
# Client


class _Call:
    __slots__ = ("done", "response", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.response: wire.Response | None = None
        self.error: BaseException | None = None


class Connection:
    """A client connection. Make one with :func:`connect` or :func:`open_connection`."""

    def __init__(self, stream: trio.abc.Stream, session: SecureSession, peer: PeerInfo, sender: _Sender) -> None:
        self._transport = stream
        self.session = session
        self.peer = peer
        self._sender = sender
        self._calls: dict[int, _Call] = {}
        self._streams: dict[int, trio.MemorySendChannel[wire.StreamItem | wire.StreamEnd]] = {}
        self._next_id = 0
        self._error: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._reader_scope = trio.CancelScope()
        self._read_error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._error is not None

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _lost(self, error: BaseException) -> TransportError:
        """A fresh exception for each waiter (one shared object would pile up their tracebacks)."""
        lost = TransportError(f"connection to {self.peer.name} failed: {describe(error)}")
        lost.__cause__ = error
        return lost

    def _check_open(self) -> None:
        if self._error is not None:
            raise TransportError(f"connection to {self.peer.name} is closed: {describe(self._error)}")

    async def call(self, method: str, body: dict[str, Any] | None = None, *, timeout: float | None = DEFAULT_CALL_TIMEOUT) -> dict[str, Any]:
        """Send a request and wait for its response body; RemoteError if the peer refused it."""
        self._check_open()
        rid = self._new_id()
        request = wire.Request(id=rid, method=method, body={} if body is None else body)
        pending = _Call()
        self._calls[rid] = pending
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                await self._sender.send(request)
                await pending.done.wait()
        finally:
            if self._calls.pop(rid, None) is not None:  # unanswered: cancelled or timed out
                self._cancel_soon(rid)
        if scope.cancelled_caught:
            raise TransportError(f"{method} to {self.peer.name}: no answer within {timeout:g} s")
        if pending.error is not None:
            raise self._lost(pending.error)
        response = pending.response
        assert response is not None
        if response.ok:
            assert response.body is not None
            return response.body
        assert response.error is not None
        raise _remote_error(response.error)

    def stream(self, method: str, body: dict[str, Any] | None = None, *, buffer: int = DEFAULT_STREAM_BUFFER) -> RemoteStream:
        """Open a server-push stream: ``async for item in conn.stream(...)``.

        Leaving the loop early cancels the stream on the server (at once with ``aclose()`` or
        ``async with``; otherwise when the iterator is garbage-collected).
        """
        self._check_open()
        return RemoteStream(self, method, {} if body is None else body, buffer)

    async def aclose(self) -> None:
        """Close the connection; pending calls and streams fail with TransportError."""
        self._shutdown(TransportError("connection closed by us"))
        self._reader_scope.cancel()
        await trio.aclose_forcefully(self._transport)

    def _cancel_soon(self, rid: int) -> None:
        if self._error is None and self._nursery is not None:
            try:
                self._nursery.start_soon(self._send_cancel, rid)
            except RuntimeError:  # nursery closed: the connection is going away anyway
                pass

    async def _send_cancel(self, rid: int) -> None:
        try:
            await self._sender.send(wire.Cancel(id=rid))
        except TransportError:
            pass

    def _abandon_stream(self, rid: int) -> None:
        chan = self._streams.pop(rid, None)
        if chan is not None:
            chan.close()
            self._cancel_soon(rid)

    async def _read_loop(self) -> None:
        error: BaseException = TransportError(f"connection to {self.peer.name} closed")
        try:
            with self._reader_scope:
                await self._read_messages()
            error = self._read_error or error
        except ProtocolError as exc:
            _log(logging.WARNING, "rpc.disconnected", peer=self.peer.address, name=self.peer.name, reason=describe(exc))
            error = exc
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            error = TransportError(f"connection to {self.peer.name} lost")
        finally:
            self._shutdown(error)

    async def _read_messages(self) -> None:
        session = self.session
        while True:
            ev = session.next_event()
            if ev is NEED_DATA:
                session.receive_data(await self._transport.receive_some(RECEIVE_SIZE))
            elif isinstance(ev, wire.Response):
                pending = self._calls.pop(ev.id, None)
                if pending is not None:
                    pending.response = ev
                    pending.done.set()
            elif isinstance(ev, (wire.StreamItem, wire.StreamEnd)):
                chan = self._streams.get(ev.id)
                if chan is None:
                    continue
                try:
                    await chan.send(ev)  # a full buffer pushes back on the whole connection
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._abandon_stream(ev.id)
                    continue
                if isinstance(ev, wire.StreamEnd):
                    self._streams.pop(ev.id, None)
                    chan.close()
            elif isinstance(ev, ConnectionClosed):
                self._read_error = TransportError(f"{self.peer.name} closed the connection")
                return
            elif isinstance(ev, wire.Error):
                self._read_error = TransportError(f"{self.peer.name} closed the connection: {ev.code}: {ev.message[:200]}")
                return

    def _shutdown(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        calls, streams = list(self._calls.values()), list(self._streams.values())
        self._calls.clear()
        self._streams.clear()
        for pending in calls:
            pending.error = self._error
            pending.done.set()
        for chan in streams:
            chan.close()


class RemoteStream:
    """Items of one server-push stream; an async iterator (and async context manager)."""

    def __init__(self, conn: Connection, method: str, body: dict[str, Any], buffer: int) -> None:
        self._conn = conn
        self._request_args = (method, body)
        self._buffer = buffer
        self._rid: int | None = None
        self._recv: trio.MemoryReceiveChannel[wire.StreamItem | wire.StreamEnd] | None = None
        self._done = False

    def __aiter__(self) -> RemoteStream:
        return self

    async def _open(self) -> trio.MemoryReceiveChannel[wire.StreamItem | wire.StreamEnd]:
        conn = self._conn
        conn._check_open()
        method, body = self._request_args
        rid = conn._new_id()
        request = wire.Request(id=rid, method=method, body=body)
        send, recv = trio.open_memory_channel[wire.StreamItem | wire.StreamEnd](self._buffer)
        conn._streams[rid] = send
        self._rid, self._recv = rid, recv
        weakref.finalize(self, conn._abandon_stream, rid)
        await conn._sender.send(request)
        return recv

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        recv = self._recv if self._recv is not None else await self._open()
        try:
            ev = await recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._done = True
            raise self._conn._lost(self._conn._error or TransportError("stream ended without its end marker"))
        if isinstance(ev, wire.StreamItem):
            return ev.body
        self._done = True
        if ev.error is None:
            raise StopAsyncIteration
        raise _remote_error(ev.error)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            if self._rid is not None:
                self._conn._abandon_stream(self._rid)
        if self._recv is not None:
            self._recv.close()

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _client_handshake(stream: trio.abc.Stream, session: SecureSession, sender: _Sender) -> PeerInfo:
    session.initiate()
    while True:
        out = session.data_to_send()
        if out:
            await sender.send_raw(out)
        ev = session.next_event()
        if ev is NEED_DATA:
            # Flush what reading the last message produced (our message 3) before waiting.
            out = session.data_to_send()
            if out:
                await sender.send_raw(out)
            session.receive_data(await stream.receive_some(RECEIVE_SIZE))
        elif isinstance(ev, PeerAuthenticated):
            return ev.peer
        else:  # pragma: no cover
            raise LocalProtocolError(f"unexpected event {ev!r} during the handshake")


def _unwrap(group: BaseExceptionGroup) -> BaseException:  # type: ignore[type-arg]
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]  # type: ignore[assignment]
    return group


@asynccontextmanager
async def open_connection(
    stream: trio.abc.Stream,
    *,
    identity: Identity | Enrollee,
    expected_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_message: int = DEFAULT_MAX_MESSAGE,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    address: object = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Connection]:
    """Run the client side over an open stream; the stream is closed on exit."""
    try:
        session = SecureSession(identity, initiator=True, now=clock(), expected_name=expected_name, max_message=max_message)
        sender = _Sender(stream, session, send_timeout)
        peer: PeerInfo | None = None
        try:
            with trio.move_on_after(timeout):
                peer = await _client_handshake(stream, session, sender)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TransportError(f"connection to {_address_label(address)} lost during the handshake") from exc
        except RemoteProtocolError as exc:
            if session.eof_received and session.state is SessionState.FAILED and not isinstance(exc, AuthError):
                # The server hung up without a word (refused: too many connections, or a crash).
                raise TransportError(f"{_address_label(address)} closed the connection during the handshake") from exc
            raise
        if peer is None:
            raise TransportError(f"handshake with {_address_label(address)} timed out after {timeout:g} s")
        peer = dataclasses.replace(peer, address=_address_label(address))
        conn = Connection(stream, session, peer, sender)
        try:
            async with trio.open_nursery() as nursery:
                conn._nursery = nursery
                nursery.start_soon(conn._read_loop)
                try:
                    yield conn
                finally:
                    conn._shutdown(TransportError("connection closed by us"))
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    identity: Identity | Enrollee,
    expected_name: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_message: int = DEFAULT_MAX_MESSAGE,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> AsyncIterator[Connection]:
    """Connect over TCP, run the handshake (bounded by ``timeout``) and yield a Connection.

    ``expected_name`` pins the peer's certificate name; the CA is pinned by ``identity``.
    """
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError as exc:
        raise TransportError(f"connecting to {host}:{port} timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    async with open_connection(
        stream, identity=identity, expected_name=expected_name, timeout=timeout, max_message=max_message,
        send_timeout=send_timeout, address=(host, port),
    ) as conn:
        yield conn
