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
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from lab.common import wire
from lab.common._rpc_session import (
    AUTH_FAILED,
    ENROLL_METHOD,
    NEED_DATA,
    PROLOGUE,
    PROTOCOL_NAME,
    ConnectionClosed,
    EnrolleeConnected,
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
from lab.common.errors import (
    AuthError,
    ConfigError,
    LabError,
    LocalProtocolError,
    NotEntitled,
    NotFound,
    ProtocolError,
    RemoteProtocolError,
    StateError,
    StoreError,
    TransportError,
    UsageError,
)
from lab.common.identity import CLOCK_SKEW, Certificate

__all__ = [
    "DEFAULT_CALL_TIMEOUT", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_CONNECTIONS_PER_IP", "DEFAULT_MAX_IN_FLIGHT", "DEFAULT_MAX_MESSAGE",
    "DEFAULT_SEND_TIMEOUT", "DEFAULT_STREAM_BUFFER", "ENROLL_METHOD", "PROLOGUE", "PROTOCOL_NAME",
    "Connection", "Enrollee", "EnrollingPeer", "FingerprintMismatch", "Handler", "Identity", "PeerInfo", "RemoteError", "RemoteStream", "SecureSession", "Server",
    "ServerLimits", "SessionState", "connect", "error_code", "parse_endpoint", "open_connection", "serve",
]

log = logging.getLogger("lab.rpc")

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_IDLE_TIMEOUT: Final = 300.0
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_CONNECTIONS_PER_IP: Final = 64
DEFAULT_MAX_IN_FLIGHT: Final = 32
DEFAULT_MAX_MESSAGE: Final = wire.DEFAULT_MAX_MESSAGE
DEFAULT_SEND_TIMEOUT: Final = 30.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_CALL_TIMEOUT: Final = 30.0
DEFAULT_STREAM_BUFFER: Final = 64
RECEIVE_SIZE: Final = 65536

Handler = Callable[[PeerInfo, wire.Request], Awaitable[Any] | AsyncIterator[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one server allows its peers. Times in seconds, sizes in bytes."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_message: int = DEFAULT_MAX_MESSAGE
    send_timeout: float = DEFAULT_SEND_TIMEOUT

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"rpc limit {f.name} must be a positive number, got {value!r}")
        if self.max_message < 1 or self.max_message > 1 << 30:
            raise ConfigError(f"rpc limit max_message must be 1..{1 << 30}")


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
# Errors across the wire


class RemoteError(LabError):
    """The peer answered a request with an error ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class RemoteNotFound(RemoteError, NotFound):
    pass


class RemoteNotEntitled(RemoteError, NotEntitled):
    pass


class RemoteAuthError(RemoteError, AuthError):
    pass


class RemoteUsageError(RemoteError, UsageError):
    pass


_CODE_RE: Final = re.compile(wire.ERROR_CODE_PATTERN)
_CODES: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (NotEntitled, "not-entitled"),
    (AuthError, "auth"),
    (NotFound, "not-found"),
    (ConfigError, "invalid"),
    (UsageError, "invalid"),
    (StateError, "state"),
    (StoreError, "store"),
    (ProtocolError, "protocol"),
    (TransportError, "transport"),
)
_REMOTE_CLASSES: Final[dict[str, type[RemoteError]]] = {
    "not-found": RemoteNotFound,
    "not-entitled": RemoteNotEntitled,
    "auth": RemoteAuthError,
    "invalid": RemoteUsageError,
}


def error_code(exc: LabError) -> str:
    """The wire code for an error: its ``code`` attribute when valid, else one by class."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and len(code) <= 64 and _CODE_RE.fullmatch(code):
        return code
    for cls, c in _CODES:
        if isinstance(exc, cls):
            return c
    return "error"


def _remote_error(info: wire.ErrorInfo) -> RemoteError:
    return _REMOTE_CLASSES.get(info.code, RemoteError)(info.code, info.message)


# ---------------------------------------------------------------------------------------------
# Logging


_CONTROL: Final = {c: "?" for c in [*range(0x20), 0x7F]}


def _fmt(value: object) -> str:
    """A log field value: control characters replaced (no forged log lines), quoted if needed."""
    text = str(value).translate(_CONTROL)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _log(level: int, event: str, **fields: object) -> None:
    if log.isEnabledFor(level):
        log.log(level, "event=%s %s", event, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None))


def _address_label(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return "local" if address is None else str(address)


# ---------------------------------------------------------------------------------------------
# Shared send path


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


# ---------------------------------------------------------------------------------------------
# Server


class Server:
    """Serves RPC connections; one object per listening service.

    :meth:`handle_connection` takes any :class:`trio.abc.Stream` (tests use memory streams).
    """

    def __init__(
        self,
        identity: Identity,
        handler: Handler,
        limits: ServerLimits = ServerLimits(),
        *,
        clock: Callable[[], float] = time.time,
        enroll_handler: Handler | None = None,
    ) -> None:
        self.identity = identity
        self.handler = handler
        self.enroll_handler = enroll_handler
        self.limits = limits
        self.clock = clock
        self.connections = 0
        self.authenticated = 0
        self._per_ip: Counter[str] = Counter()

    async def handle_connection(self, stream: trio.abc.Stream, address: object = None) -> None:
        """Serve one connection until it ends; never raises for what the peer does."""
        label = _address_label(address)
        ip = str(address[0]) if isinstance(address, tuple) and address else None
        reason = None
        if self.connections >= self.limits.max_connections:
            reason = "max-connections"
        elif ip is not None and self._per_ip[ip] >= self.limits.max_connections_per_ip:
            reason = "max-connections-per-ip"
        if reason is not None:
            _log(logging.WARNING, "rpc.refused", peer=label, reason=reason)
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        if ip is not None:
            self._per_ip[ip] += 1
        try:
            await _ServerConnection(self, stream, label).run()
        except Exception as exc:  # our bug: that one connection ends, the server goes on
            log.error(
                "event=rpc.internal_error peer=%s reason=%s", label, _fmt(f"{type(exc).__name__}: {describe(exc)}"),
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            await trio.aclose_forcefully(stream)
        finally:
            self.connections -= 1
            if ip is not None:
                self._per_ip[ip] -= 1
                if not self._per_ip[ip]:
                    del self._per_ip[ip]

    def check_peer(self, cert: Certificate) -> None:
        """AuthError if an authenticated peer's certificate has since expired or been revoked.

        Asked before each request, so a new revocation list cuts existing connections too."""
        if self.clock() - CLOCK_SKEW > cert.not_after:
            raise AuthError(f"certificate {cert.serial} for {cert.name!r} expired at {cert.not_after}")
        revocations = self.identity.current_revocations()
        if revocations is not None:
            revocations.verify(self.identity.ca_public_key)  # remembered: free after the first time
            reason = revocations.revoked_reason(cert)
            if reason is not None:
                raise AuthError(f"certificate {cert.serial} for {cert.name!r} refused: {reason}")

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        try:
            address = stream.socket.getpeername()
        except OSError:
            address = None
        await self.handle_connection(stream, address)


async def serve(
    listen_host: str | None,
    port: int,
    *,
    identity: Identity,
    handler: Handler,
    limits: ServerLimits = ServerLimits(),
    enroll_handler: Handler | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``listen_host:port`` (port 0: any) and serve forever; ``started(actual_port)``.

    With ``enroll_handler``, nodes without a certificate may connect to call ``enroll`` only."""
    server = Server(identity, handler, limits, enroll_handler=enroll_handler)
    try:
        listeners = await trio.open_tcp_listeners(port, host=listen_host)
    except OSError as exc:
        raise TransportError(f"cannot listen on {listen_host or '*'}:{port}: {exc.strerror or exc}") from exc
    actual_port = listeners[0].socket.getsockname()[1]
    _log(logging.INFO, "rpc.listening", host=listen_host or "*", port=actual_port, name=identity.certificate.name)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server._handle_socket, listeners)
        task_status.started(actual_port)


class _ServerConnection:
    def __init__(self, server: Server, stream: trio.abc.Stream, label: str) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.label = label
        self.session = SecureSession(
            server.identity, initiator=False, now=server.clock(), max_message=self.limits.max_message,
            allow_enroll=server.enroll_handler is not None,
        )
        self.sender = _Sender(stream, self.session, self.limits.send_timeout)
        self.peer: PeerInfo | EnrollingPeer | None = None
        self.active: dict[int, trio.CancelScope] = {}
        self.slot_free = trio.Event()
        self.read_scope: trio.CancelScope | None = None
        self.fatal: BaseException | None = None
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        event: str | None = None  # stays None for an unexpected error: handle_connection logs it
        level, reason = logging.INFO, ""
        try:
            with trio.move_on_after(self.limits.handshake_timeout):
                self.peer = await self._handshake()
            if self.peer is None:
                event, level, reason = "rpc.rejected", logging.WARNING, "handshake timeout"
                return
            self.server.authenticated += 1
            _log(logging.INFO, "rpc.connected", peer=self.label, name=self.peer.name, key=self.peer.fingerprint)
            reason = await self._serve_requests()
            event = "rpc.closed"
        except AuthError as exc:
            event, level, reason = "rpc.rejected", logging.WARNING, describe(exc)
            if self.peer is None:
                goodbye = self.session.data_to_send()  # the session queued an rpc.error
            else:
                goodbye = self.session.close_with_error(AUTH_FAILED, str(exc))
            with trio.move_on_after(1):  # tell the peer why, if it listens
                try:
                    await self.sender.send_raw(goodbye)
                except TransportError:
                    pass
        except ProtocolError as exc:
            event, level = ("rpc.rejected" if self.peer is None else "rpc.disconnected"), logging.WARNING
            reason = describe(exc)
        except TransportError as exc:
            event, level, reason = "rpc.disconnected", logging.INFO, describe(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            event, level, reason = "rpc.disconnected", logging.INFO, "connection lost"
        finally:
            if event is not None:
                _log(level, event, peer=self.label, name=self.peer.name if self.peer else None, reason=reason)
            await trio.aclose_forcefully(self.stream)

    async def _receive(self) -> None:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        self.session.receive_data(data)

    async def _handshake(self) -> PeerInfo | EnrollingPeer:
        session = self.session
        while True:
            ev = session.next_event()
            out = session.data_to_send()
            if out:
                await self.sender.send_raw(out)
            if ev is NEED_DATA:
                await self._receive()
            elif isinstance(ev, (PeerAuthenticated, EnrolleeConnected)):
                return dataclasses.replace(ev.peer, address=self.label)
            else:  # pragma: no cover - the session yields nothing else before PeerAuthenticated
                raise LocalProtocolError(f"unexpected event {ev!r} during the handshake")

    async def _serve_requests(self) -> str:
        reason = "peer closed"
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                reason = await self._read_loop(nursery)
            except (ProtocolError, AuthError, TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.fatal = exc
            nursery.cancel_scope.cancel()
        if self.fatal is not None:
            raise self.fatal
        return reason

    async def _read_loop(self, nursery: trio.Nursery) -> str:
        session, limits = self.session, self.limits
        while True:
            while len(self.active) >= limits.max_in_flight:  # backpressure: stop reading
                self.slot_free = trio.Event()
                await self.slot_free.wait()
            ev = session.next_event()
            if ev is NEED_DATA:
                deadline = math.inf if self.active else trio.current_time() + limits.idle_timeout
                with trio.CancelScope(deadline=deadline) as scope:
                    self.read_scope = scope
                    await self._receive()
                self.read_scope = None
                if scope.cancelled_caught:
                    return "idle timeout"
            elif isinstance(ev, wire.Request):
                assert self.peer is not None
                if isinstance(self.peer, PeerInfo):
                    self.server.check_peer(self.peer.certificate)
                if ev.id in self.active:
                    raise RemoteProtocolError(f"request id {ev.id} is already in flight")
                req_scope = trio.CancelScope()
                self.active[ev.id] = req_scope
                nursery.start_soon(self._run_request, ev, req_scope)
            elif isinstance(ev, wire.Cancel):
                scope_ = self.active.get(ev.id)
                if scope_ is not None:
                    scope_.cancel()
            elif isinstance(ev, ConnectionClosed):
                return "peer closed"
            elif isinstance(ev, wire.Error):
                return f"peer sent error {ev.code}: {ev.message[:200]}"

    def _done(self, rid: int) -> None:
        self.active.pop(rid, None)
        self.slot_free.set()
        if not self.active and self.read_scope is not None:
            self.read_scope.deadline = trio.current_time() + self.limits.idle_timeout

    async def _run_request(self, req: wire.Request, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._dispatch(req)
        except TransportError as exc:
            self._fail(exc)
        finally:
            self._done(req.id)

    def _fail(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _send_error(self, req: wire.Request, exc: Exception) -> None:
        if isinstance(exc, LabError):
            code, text = error_code(exc), str(exc)[:4096]
        else:
            _log_internal(self.label, req, exc)
            code, text = "internal", "internal error"
        await self.sender.send(wire.Response.failure(req.id, code, text))

    async def _dispatch(self, req: wire.Request) -> None:
        assert self.peer is not None
        handler = self.server.handler
        if isinstance(self.peer, EnrollingPeer):  # no certificate: the enroll method and nothing else
            if req.method != ENROLL_METHOD or self.server.enroll_handler is None:
                await self._send_error(req, AuthError(f"not enrolled: this session may only call {ENROLL_METHOD!r}"))
                return
            handler = self.server.enroll_handler
        try:
            result = handler(self.peer, req)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            await self._send_error(req, exc)
            return
        if isinstance(result, dict):
            try:
                response = wire.Response.success(req.id, result)
                await self.sender.send(response)
            except LocalProtocolError as exc:  # bad body or too large: the handler's bug
                _log_internal(self.label, req, exc)
                await self.sender.send(wire.Response.failure(req.id, "internal", "internal error"))
            return
        if hasattr(result, "__anext__"):
            await self._stream(req, result)
            return
        _log_internal(self.label, req, TypeError(f"handler returned {type(result).__name__}, not a dict or async iterator"))
        await self.sender.send(wire.Response.failure(req.id, "internal", "internal error"))

    async def _stream(self, req: wire.Request, items: Any) -> None:
        seq = 0
        error: wire.ErrorInfo | None = None
        try:
            while True:
                try:
                    body = await items.__anext__()
                    item = wire.StreamItem(id=req.id, seq=seq, body=body)
                except StopAsyncIteration:
                    break
                except LabError as exc:
                    if isinstance(exc, LocalProtocolError):
                        _log_internal(self.label, req, exc)
                        error = wire.ErrorInfo(code="internal", message="internal error")
                    else:
                        error = wire.ErrorInfo(code=error_code(exc), message=str(exc)[:4096])
                    break
                except Exception as exc:
                    _log_internal(self.label, req, exc)
                    error = wire.ErrorInfo(code="internal", message="internal error")
                    break
                await self.sender.send(item)
                seq += 1
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
        await self.sender.send(wire.StreamEnd(id=req.id, error=error))


def _log_internal(label: str, req: wire.Request, exc: BaseException) -> None:
    log.error(
        "event=rpc.handler_error peer=%s method=%s id=%d reason=%s",
        label, req.method, req.id, _fmt(f"{type(exc).__name__}: {describe(exc)}"),
        exc_info=(type(exc), exc, exc.__traceback__),
    )


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

