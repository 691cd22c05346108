"""The server side of :mod:`lab.common.rpc` (which re-exports it): :func:`serve` listens,
:class:`Server` admits connections within its :class:`ServerLimits`, and one
:class:`_ServerConnection` per peer runs the handshake, the requests and the handlers.

The defences (handshake deadline against slowloris, idle timeout, connection caps in all and per
address, backpressure past ``max_in_flight``, send deadline) are listed in :mod:`lab.common.rpc`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import trio

from lab.common import wire
from lab.common._rpc_errors import error_code
from lab.common._rpc_session import (
    AUTH_FAILED,
    ENROLL_METHOD,
    NEED_DATA,
    ConnectionClosed,
    EnrolleeConnected,
    EnrollingPeer,
    Identity,
    PeerAuthenticated,
    PeerInfo,
    SecureSession,
    describe,
)
from lab.common._rpc_transport import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_SEND_TIMEOUT,
    RECEIVE_SIZE,
    _address_label,
    _fmt,
    _log,
    _Sender,
    log,
)
from lab.common.errors import (
    AuthError,
    ConfigError,
    LabError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)
from lab.common.identity import CLOCK_SKEW, Certificate

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_IDLE_TIMEOUT: Final = 300.0
DEFAULT_MAX_CONNECTIONS: Final = 1024
DEFAULT_MAX_CONNECTIONS_PER_IP: Final = 64
DEFAULT_MAX_IN_FLIGHT: Final = 32

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
