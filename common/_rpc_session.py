"""The sans-IO core of :mod:`lab.common.rpc`: one Noise-secured session, bytes in, messages out.

Imports neither trio nor ``socket``. One :class:`SecureSession` per connection, used like h11::

    session = SecureSession(identity, initiator=True, now=time.time())
    session.initiate()                        # initiator only: queues handshake message 1
    send(session.data_to_send())
    session.receive_data(received)            # b"" means the peer closed its side
    while (event := session.next_event()) is not NEED_DATA:
        ...                                   # PeerAuthenticated, a wire.Message, or ConnectionClosed
        send(session.data_to_send())          # handshake replies queue up here
    send(session.send(wire.Request(...)))     # once OPEN

**Handshake** (``Noise_XX_25519_ChaChaPoly_BLAKE2b``, prologue :data:`PROLOGUE`)::

    -> e                          empty payload (message 1 must be exactly 32 bytes)
    <- e, ee, s, es               payload: responder's Certificate.encode()
    -> s, se                      payload: initiator's Certificate.encode()
    <- transport: rpc.ready       the responder accepted the initiator's certificate
       (or rpc.error code "auth-failed" and a close)

The initiator sends nothing after message 3 until it has read rpc.ready, so until a session is
OPEN no frame may be longer than the largest handshake message (about 4 KiB): a peer that has not
authenticated cannot make us buffer more than that.

Each side checks the other's certificate with :func:`~lab.common.identity.verify_certificate`:
the CA signature, the validity window at ``now``, the revocation list, and that the certificate's
``noise_pub`` is the handshake's remote static key. Replayed handshake messages cannot complete:
every session mixes fresh ephemeral keys on both sides.

**Transport**: frames of a 2-byte big-endian length + one Noise transport message; each carries
one chunk (:func:`~lab.common.wire.split_message`) of an msgpack application message.

Errors: whatever the peer did wrong raises :class:`RemoteProtocolError` (or :class:`AuthError`
for a refused certificate) and leaves the session FAILED; a call in the wrong state raises
:class:`LocalProtocolError` naming the call and the state.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections import deque
from collections.abc import Callable
from typing import Annotated, Final

from lab.common import noise, wire
from lab.common.errors import AuthError, LocalProtocolError, ProtocolError, RemoteProtocolError
from lab.common.identity import MAX_CERT_SIZE, Certificate, NodeKey, RevocationList, fingerprint, verify_certificate

__all__ = [
    "NEED_DATA", "PROLOGUE", "PROTOCOL_NAME",
    "ConnectionClosed", "Identity", "PeerAuthenticated", "PeerInfo", "Ready", "SecureSession", "SessionState",
]

PROTOCOL_NAME: Final = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
PROLOGUE: Final = b"lab-rpc/1"
AUTH_FAILED: Final = "auth-failed"

_LEN = struct.Struct(">H")
_MSG1_LEN: Final = noise.DHLEN  # e, empty plaintext payload
# Largest handshake message: e + encrypted s + encrypted certificate (message 2).
_MAX_HANDSHAKE_LEN: Final = noise.DHLEN + (noise.DHLEN + noise.TAGLEN) + (MAX_CERT_SIZE + noise.TAGLEN)


@wire.message("rpc.ready")
@dataclasses.dataclass(frozen=True)
class Ready(wire.Message):
    """First transport message of the responder: the initiator's certificate was accepted."""

    v: Annotated[int, wire.Int(1, 1)]


# ---------------------------------------------------------------------------------------------
# Identity and peers


def _no_revocations() -> RevocationList | None:
    return None


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who this node is and whom it trusts: node key, own certificate, CA key, revocation list.

    ``revocations`` is either a fixed :class:`RevocationList` (or None) or a zero-argument callable
    returning the current one, asked at each handshake (so a refreshed list applies at once).
    """

    key: NodeKey
    certificate: Certificate
    ca_public_key: bytes
    revocations: RevocationList | Callable[[], RevocationList | None] | None = None
    certificate_bytes: bytes = dataclasses.field(init=False, repr=False, compare=False)
    _static: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ca_public_key) != 32:
            raise LocalProtocolError("Identity: CA public key must be 32 bytes")
        if self.certificate.noise_pub != self.key.public_key:
            raise LocalProtocolError("Identity: the certificate is for another node key")
        object.__setattr__(self, "ca_public_key", bytes(self.ca_public_key))
        object.__setattr__(self, "certificate_bytes", self.certificate.encode())
        # One bytes object for the whole life of the identity: noise caches its public half by it.
        object.__setattr__(self, "_static", self.key.private_bytes())

    def current_revocations(self) -> RevocationList | None:
        r = self.revocations
        if r is None or isinstance(r, RevocationList):
            return r
        return r()

    def __repr__(self) -> str:
        return f"<Identity {self.certificate.name} key={self.key.fingerprint}>"


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """The authenticated peer of a session."""

    certificate: Certificate
    handshake_hash: bytes = dataclasses.field(repr=False)
    address: str | None = None

    @property
    def name(self) -> str:
        return self.certificate.name

    @property
    def node_id(self) -> str:
        return self.certificate.node_id

    @property
    def roles(self) -> tuple[str, ...]:
        return self.certificate.roles

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate.noise_pub)


@dataclasses.dataclass(frozen=True)
class PeerAuthenticated:
    """Event: the handshake is complete and the peer's certificate was accepted on both ends."""

    peer: PeerInfo


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """Event: the peer closed its side cleanly, between messages."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Event = PeerAuthenticated | ConnectionClosed | wire.Message | _NeedData

# ---------------------------------------------------------------------------------------------
# State machine


class SessionState(enum.Enum):
    START = "start"  # nothing exchanged yet
    HANDSHAKE = "handshake"  # Noise messages in flight
    CONFIRM = "confirm"  # initiator: handshake done, waiting for rpc.ready
    OPEN = "open"  # application messages flow
    CLOSED = "closed"  # the peer closed cleanly
    FAILED = "failed"  # a protocol or authentication error; nothing more may happen


_S = SessionState
# (initiator?, state, event) -> next state. Anything not listed is refused.
_TRANSITIONS: Final[dict[tuple[bool, SessionState, str], SessionState]] = {
    (True, _S.START, "initiate"): _S.HANDSHAKE,
    (True, _S.HANDSHAKE, "handshake message"): _S.CONFIRM,
    (True, _S.CONFIRM, "ready"): _S.OPEN,
    (False, _S.START, "handshake message"): _S.HANDSHAKE,
    (False, _S.HANDSHAKE, "handshake message"): _S.OPEN,
    (True, _S.OPEN, "eof"): _S.CLOSED,
    (False, _S.OPEN, "eof"): _S.CLOSED,
}
_CAN_SEND: Final = frozenset({_S.OPEN})
_CAN_RECEIVE: Final = frozenset({_S.START, _S.HANDSHAKE, _S.CONFIRM, _S.OPEN})

_FROM_INITIATOR: Final = (wire.Request, wire.Cancel, wire.Error)
_FROM_RESPONDER: Final = (wire.Response, wire.StreamItem, wire.StreamEnd, wire.Error)


class SecureSession:
    """One side of an RPC connection. ``now`` (Unix seconds) is when the certificates are checked."""

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        now: float,
        expected_name: str | None = None,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.identity = identity
        self.initiator = bool(initiator)
        self.now = now
        self.expected_name = expected_name
        self.max_message = max_message
        self.peer: PeerInfo | None = None
        self._state = SessionState.START
        self._hs: noise.Handshake | None = noise.Handshake(
            PROTOCOL_NAME, self.initiator, prologue=PROLOGUE, static_key=identity._static
        )
        self._send_cipher: noise.CipherState | None = None
        self._recv_cipher: noise.CipherState | None = None
        # Until the session is OPEN no frame may exceed the largest handshake message, so an
        # unauthenticated peer can make us buffer only a few KiB.
        self._decoder = wire.FrameDecoder(_MAX_HANDSHAKE_LEN)
        self._reassembler = wire.Reassembler(max_message)
        self._frames: deque[bytes] = deque()
        self._eof = False
        self._out: list[bytes] = []
        self._allowed = _FROM_RESPONDER if self.initiator else _FROM_INITIATOR

    # -- public surface --

    @property
    def state(self) -> SessionState:
        return self._state

    def initiate(self) -> None:
        """Initiator: queue handshake message 1 (``-> e``)."""
        self._transition("initiate")
        assert self._hs is not None
        self._queue_frame(self._hs.write_message(b""))

    def data_to_send(self) -> bytes:
        """Bytes queued by :meth:`initiate` and :meth:`next_event`, to be written to the peer."""
        out, self._out = self._out, []
        return b"".join(out)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes from the peer; ``b""`` says the peer closed its side."""
        if self._state not in _CAN_RECEIVE or self._eof:
            raise LocalProtocolError(f"receive_data() not allowed in state {self._state.name}" + (" after EOF" if self._eof else ""))
        if not data:
            self._eof = True
            return
        try:
            self._frames.extend(self._decoder.feed(data))
        except ProtocolError:
            self._state = SessionState.FAILED
            raise

    @property
    def eof_received(self) -> bool:
        """The peer closed its side (it may still have left frames to process)."""
        return self._eof

    @property
    def pending_frames(self) -> int:
        """Complete frames received but not yet turned into events."""
        return len(self._frames)

    def next_event(self) -> Event:
        """The next event, or NEED_DATA. Raises RemoteProtocolError / AuthError on a bad peer."""
        if self._state not in _CAN_RECEIVE:
            raise LocalProtocolError(f"next_event() not allowed in state {self._state.name}")
        try:
            while True:
                if self._frames:
                    event = self._on_frame(self._frames.popleft())
                    if event is not None:
                        return event
                elif self._eof:
                    return self._on_eof()
                else:
                    return NEED_DATA
        except (ProtocolError, AuthError):
            self._state = SessionState.FAILED
            self._frames.clear()
            raise

    def send(self, message: wire.Message) -> bytes:
        """Encrypt one application message; returns the frames to write, joined."""
        if self._state not in _CAN_SEND:
            raise LocalProtocolError(f"send({type(message).__name__}) not allowed in state {self._state.name}")
        return self._encrypt_message(message)

    def close_with_error(self, code: str, message: str) -> bytes:
        """Best effort: an encrypted rpc.error for the peer before we close (b"" when impossible)."""
        if self._send_cipher is None or self._state is SessionState.CLOSED:
            return b""
        try:
            return self._encrypt_message(wire.Error(code=code, message=message[:4096]))
        except ProtocolError:
            return b""

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        return f"<SecureSession {role} {self._state.name} peer={self.peer.name if self.peer else None}>"

    # -- internals --

    def _transition(self, event: str) -> None:
        nxt = _TRANSITIONS.get((self.initiator, self._state, event))
        if nxt is None:
            role = "initiator" if self.initiator else "responder"
            raise LocalProtocolError(f"{role} cannot handle {event!r} in state {self._state.name}")
        self._state = nxt
        if nxt is SessionState.OPEN:
            self._decoder.max_frame_len = wire.MAX_FRAME_LEN

    def _queue_frame(self, payload: bytes) -> None:
        self._out.append(_LEN.pack(len(payload)) + payload)

    def _encrypt_message(self, message: wire.Message) -> bytes:
        cipher = self._send_cipher
        assert cipher is not None
        data = wire.encode(message)
        pack = _LEN.pack
        out = []
        for chunk in wire.split_message(data, max_message=self.max_message):
            ct = cipher.encrypt(chunk)
            out.append(pack(len(ct)))
            out.append(ct)
        return b"".join(out)

    def _verify_peer(self, payload: bytes) -> Certificate:
        hs = self._hs
        assert hs is not None and hs.remote_static is not None
        idt = self.identity
        try:
            cert = verify_certificate(payload, idt.ca_public_key, self.now, idt.current_revocations(), hs.remote_static)
        except RemoteProtocolError as exc:  # undecodable: refused like any other bad certificate
            raise AuthError(f"malformed certificate: {exc}") from exc
        if self.expected_name is not None and cert.name != self.expected_name:
            raise AuthError(f"peer certificate is for {cert.name!r}, expected {self.expected_name!r}")
        return cert

    def _split(self, cert: Certificate | None) -> None:
        assert self._hs is not None
        if cert is not None:
            self.peer = PeerInfo(certificate=cert, handshake_hash=self._hs.handshake_hash)
        self._send_cipher, self._recv_cipher = self._hs.split()
        self._hs = None

    def _on_frame(self, frame: bytes) -> Event | None:
        state = self._state
        if state is SessionState.OPEN or state is SessionState.CONFIRM:
            return self._on_transport(frame)
        hs = self._hs
        if hs is None or (self.initiator and state is SessionState.START):
            raise RemoteProtocolError("peer spoke before the handshake began")
        if len(frame) > _MAX_HANDSHAKE_LEN:
            raise RemoteProtocolError(f"handshake message of {len(frame)} bytes exceeds {_MAX_HANDSHAKE_LEN}")
        if self.initiator:  # <- e, ee, s, es + responder's certificate
            cert = self._verify_peer(hs.read_message(frame))
            self._queue_frame(hs.write_message(self.identity.certificate_bytes))
            self._split(cert)
            self._transition("handshake message")
            return None
        if state is SessionState.START:  # -> e
            if len(frame) != _MSG1_LEN:
                raise RemoteProtocolError(f"handshake message 1 must be {_MSG1_LEN} bytes, got {len(frame)}")
            hs.read_message(frame)
            self._queue_frame(hs.write_message(self.identity.certificate_bytes))
            self._transition("handshake message")
            return None
        # -> s, se + initiator's certificate
        payload = hs.read_message(frame)
        try:
            cert = self._verify_peer(payload)
        except AuthError as exc:
            self._split(None)
            # Short enough to fit the peer's pre-OPEN frame limit whatever the characters.
            self._out.append(self._encrypt_message(wire.Error(code=AUTH_FAILED, message=str(exc)[:512])))
            raise
        self._split(cert)
        self._transition("handshake message")
        self._out.append(self._encrypt_message(Ready(v=1)))
        return PeerAuthenticated(self.peer)

    def _on_transport(self, frame: bytes) -> Event | None:
        assert self._recv_cipher is not None
        data = self._reassembler.feed(self._recv_cipher.decrypt(frame))
        if data is None:
            return None
        msg = wire.decode_untrusted(data, max_size=self.max_message)
        if self._state is SessionState.CONFIRM:
            if isinstance(msg, Ready):
                self._transition("ready")
                assert self.peer is not None
                return PeerAuthenticated(self.peer)
            if isinstance(msg, wire.Error):
                if msg.code == AUTH_FAILED:
                    raise AuthError(f"peer refused our certificate: {msg.message}")
                raise RemoteProtocolError(f"peer closed the handshake: {msg.code}: {msg.message}")
            raise RemoteProtocolError(f"expected rpc.ready, got {msg.TAG}")
        if not isinstance(msg, self._allowed):
            raise RemoteProtocolError(f"unexpected message {msg.TAG} from the {'responder' if self.initiator else 'initiator'}")
        return msg

    def _on_eof(self) -> Event:
        if self._state is not SessionState.OPEN:
            raise RemoteProtocolError(f"peer closed the connection during the handshake ({self._state.name})")
        self._decoder.eof()
        self._reassembler.eof()
        self._transition("eof")
        return ConnectionClosed()


def describe(exc: BaseException) -> str:
    """One short line for logs; never contains key material (our errors carry none)."""
    text = str(exc) or type(exc).__name__
    return text.replace("\n", " ")[:300]
