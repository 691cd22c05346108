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

**Enrollment mode** (a node that has no certificate yet; see docs/ENROLLMENT.md). The initiator
is an :class:`Enrollee` (node key + the CA fingerprint from its join token) and the responder
was built with ``allow_enroll=True``::

    -> e
    <- e, ee, s, es               payload: responder's certificate (decoded, not yet verifiable)
    -> s, se                      payload: rpc.enroll_hello (no certificate)
    <- transport: rpc.enroll_ready {ca_public_key}

The initiator accepts rpc.enroll_ready only if ``fingerprint(ca_public_key)`` equals the pinned
fingerprint, the responder's certificate verifies against that key with the handshake's remote
static key, and it carries the ``coordinator`` role; otherwise :class:`FingerprintMismatch` /
:class:`AuthError`. Only then is anything secret (the token) sent, in an ``enroll`` request.
The responder sees :class:`EnrolleeConnected` with an :class:`EnrollingPeer` (its handshake
static key, no certificate); servers route such sessions to the ``enroll`` method only.

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
from lab.common.identity import (
    FINGERPRINT_LEN,
    KEY_LEN,
    MAX_CERT_SIZE,
    Certificate,
    NodeKey,
    RevocationList,
    fingerprint,
    matches_fingerprint,
    verify_certificate,
)

__all__ = [
    "ENROLL_METHOD", "NEED_DATA", "PROLOGUE", "PROTOCOL_NAME",
    "ConnectionClosed", "EnrollHello", "EnrollReady", "Enrollee", "EnrolleeConnected", "EnrollingPeer",
    "FingerprintMismatch", "Identity", "PeerAuthenticated", "PeerInfo", "Ready", "SecureSession", "SessionState",
]

PROTOCOL_NAME: Final = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
PROLOGUE: Final = b"lab-rpc/1"
AUTH_FAILED: Final = "auth-failed"
ENROLL_METHOD: Final = "enroll"  # the only method a session without a certificate may call
ENROLL_ROLE: Final = "coordinator"  # the role an enrollee demands of the responder

_LEN = struct.Struct(">H")
_MSG1_LEN: Final = noise.DHLEN  # e, empty plaintext payload
# Largest handshake message: e + encrypted s + encrypted certificate (message 2).
_MAX_HANDSHAKE_LEN: Final = noise.DHLEN + (noise.DHLEN + noise.TAGLEN) + (MAX_CERT_SIZE + noise.TAGLEN)


@wire.message("rpc.ready")
@dataclasses.dataclass(frozen=True)
class Ready(wire.Message):
    """First transport message of the responder: the initiator's certificate was accepted."""

    v: Annotated[int, wire.Int(1, 1)]


@wire.message("rpc.enroll_hello")
@dataclasses.dataclass(frozen=True)
class EnrollHello(wire.Message):
    """Handshake payload of an enrollee's message 3, in place of a certificate."""

    v: Annotated[int, wire.Int(1, 1)]


@wire.message("rpc.enroll_ready")
@dataclasses.dataclass(frozen=True)
class EnrollReady(wire.Message):
    """The responder's first transport message to an enrollee: the CA key to check the pin with."""

    v: Annotated[int, wire.Int(1, 1)]
    ca_public_key: Annotated[bytes, wire.Bytes(min_len=KEY_LEN, max_len=KEY_LEN)]


class FingerprintMismatch(AuthError):
    """The responder's CA is not the one the enrollee's join token pins."""


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
class Enrollee:
    """A node without a certificate, enrolling: its key and the CA fingerprint its token pins.

    Usable only by an initiator, and only against a responder that offers enrollment.
    """

    key: NodeKey
    ca_fingerprint: str
    _static: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.ca_fingerprint, str) or len(self.ca_fingerprint) != FINGERPRINT_LEN:
            raise LocalProtocolError(f"Enrollee: the CA fingerprint must be {FINGERPRINT_LEN} characters")
        object.__setattr__(self, "_static", self.key.private_bytes())

    def __repr__(self) -> str:
        return f"<Enrollee key={self.key.fingerprint} pin={self.ca_fingerprint}>"


@dataclasses.dataclass(frozen=True)
class EnrollingPeer:
    """The unauthenticated peer of an enrollment session: only its handshake static key is known
    (the handshake proved it holds the private half). It may call :data:`ENROLL_METHOD` only."""

    noise_pub: bytes = dataclasses.field(repr=False)
    handshake_hash: bytes = dataclasses.field(repr=False)
    address: str | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.noise_pub)

    @property
    def name(self) -> str:
        return f"enrolling:{self.fingerprint[:16]}"


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
class EnrolleeConnected:
    """Event (responder): a node without a certificate completed an enrollment handshake."""

    peer: EnrollingPeer


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """Event: the peer closed its side cleanly, between messages."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Event = PeerAuthenticated | EnrolleeConnected | ConnectionClosed | wire.Message | _NeedData

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
        identity: Identity | Enrollee,
        *,
        initiator: bool,
        now: float,
        expected_name: str | None = None,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
        allow_enroll: bool = False,
    ) -> None:
        if isinstance(identity, Enrollee) and not initiator:
            raise LocalProtocolError("an Enrollee (no certificate) can only initiate a session")
        self.identity = identity
        self.allow_enroll = bool(allow_enroll) and not initiator
        # Enrollment: the responder's certificate, held until rpc.enroll_ready brings the CA key.
        self._pending_cert: Certificate | None = None
        self.ca_public_key: bytes | None = None if isinstance(identity, Enrollee) else identity.ca_public_key
        self.remote_static: bytes | None = None
        self._handshake_hash = b""
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
        assert isinstance(idt, Identity)
        try:
            cert = verify_certificate(payload, idt.ca_public_key, self.now, idt.current_revocations(), hs.remote_static)
        except RemoteProtocolError as exc:  # undecodable: refused like any other bad certificate
            raise AuthError(f"malformed certificate: {exc}") from exc
        if self.expected_name is not None and cert.name != self.expected_name:
            raise AuthError(f"peer certificate is for {cert.name!r}, expected {self.expected_name!r}")
        return cert

    def _split(self, cert: Certificate | None) -> None:
        assert self._hs is not None
        self.remote_static = self._hs.remote_static
        self._handshake_hash = self._hs.handshake_hash
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
        if self.initiator and isinstance(self.identity, Enrollee):  # no CA key yet: check on enroll_ready
            payload = hs.read_message(frame)
            try:
                self._pending_cert = Certificate.decode_untrusted(payload)
            except RemoteProtocolError as exc:
                raise AuthError(f"malformed certificate: {exc}") from exc
            self._queue_frame(hs.write_message(wire.encode(EnrollHello(v=1))))
            self._split(None)
            self._transition("handshake message")
            return None
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
        # -> s, se + initiator's certificate (or rpc.enroll_hello)
        payload = hs.read_message(frame)
        if _is_enroll_hello(payload):
            return self._accept_enrollee()
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

    def _accept_enrollee(self) -> Event:
        if not self.allow_enroll:
            self._split(None)
            exc = AuthError("this endpoint does not accept enrollment; present a certificate")
            self._out.append(self._encrypt_message(wire.Error(code=AUTH_FAILED, message=str(exc))))
            raise exc
        self._split(None)
        self._transition("handshake message")
        assert self.remote_static is not None and isinstance(self.identity, Identity)
        self._out.append(self._encrypt_message(EnrollReady(v=1, ca_public_key=self.identity.ca_public_key)))
        return EnrolleeConnected(EnrollingPeer(noise_pub=self.remote_static, handshake_hash=self._handshake_hash))

    def _confirm_enrollment(self, msg: EnrollReady) -> Event:
        """Enrollee: pin the CA by the token's fingerprint, then verify the responder with it."""
        idt = self.identity
        assert isinstance(idt, Enrollee) and self._pending_cert is not None and self.remote_static is not None
        if not matches_fingerprint(msg.ca_public_key, idt.ca_fingerprint):
            raise FingerprintMismatch(
                f"the peer's CA has fingerprint {fingerprint(msg.ca_public_key)}, the token pins {idt.ca_fingerprint}"
            )
        cert = verify_certificate(self._pending_cert, msg.ca_public_key, self.now, None, self.remote_static)
        if ENROLL_ROLE not in cert.roles:
            raise AuthError(f"peer {cert.name!r} is not a {ENROLL_ROLE} (roles: {', '.join(cert.roles) or 'none'})")
        if self.expected_name is not None and cert.name != self.expected_name:
            raise AuthError(f"peer certificate is for {cert.name!r}, expected {self.expected_name!r}")
        self.ca_public_key = bytes(msg.ca_public_key)
        self.peer = PeerInfo(certificate=cert, handshake_hash=self._handshake_hash)
        self._transition("ready")
        return PeerAuthenticated(self.peer)

    def _on_transport(self, frame: bytes) -> Event | None:
        assert self._recv_cipher is not None
        data = self._reassembler.feed(self._recv_cipher.decrypt(frame))
        if data is None:
            return None
        msg = wire.decode_untrusted(data, max_size=self.max_message)
        if self._state is SessionState.CONFIRM:
            enrolling = isinstance(self.identity, Enrollee)
            if isinstance(msg, EnrollReady) and enrolling:
                return self._confirm_enrollment(msg)
            if isinstance(msg, Ready) and not enrolling:
                self._transition("ready")
                assert self.peer is not None
                return PeerAuthenticated(self.peer)
            if isinstance(msg, wire.Error):
                if msg.code == AUTH_FAILED:
                    raise AuthError(f"peer refused our certificate: {msg.message}")
                raise RemoteProtocolError(f"peer closed the handshake: {msg.code}: {msg.message}")
            raise RemoteProtocolError(f"expected {'rpc.enroll_ready' if enrolling else 'rpc.ready'}, got {msg.TAG}")
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


def _is_enroll_hello(payload: bytes) -> bool:
    """A certificate is an msgpack array; an rpc.enroll_hello is a map (fixmap, 0x80-0x8f)."""
    if not payload or not 0x80 <= payload[0] <= 0x8F:
        return False
    try:
        return isinstance(wire.decode_untrusted(payload, max_size=MAX_CERT_SIZE), EnrollHello)
    except ProtocolError:
        return False


def describe(exc: BaseException) -> str:
    """One short line for logs; never contains key material (our errors carry none)."""
    text = str(exc) or type(exc).__name__
    return text.replace("\n", " ")[:300]
