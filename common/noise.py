"""Noise Protocol Framework, revision 34, for the suite ``25519_ChaChaPoly_BLAKE2b``; sans-IO.

https://noiseprotocol.org/noise.html. This module takes bytes and returns bytes; it imports
neither trio nor ``socket``. Primitives come from libsodium through PyNaCl (X25519,
ChaCha20-Poly1305 IETF) and from :mod:`hashlib` (BLAKE2b, HASHLEN 64, BLOCKLEN 128).

Supported: every handshake pattern of spec sections 7.4 (one-way N, K, X), 7.5 (NN ... IX)
and 7.6 (deferred NK1 ... I1X1), the ``pskN`` modifiers and their ``+`` combinations, and
prologues. Not supported: the ``fallback`` modifier and other DH/cipher/hash functions. The patterns
themselves, as token lists, are in :mod:`lab.common._noise_patterns`.

Typical use::

    hs = Handshake("Noise_XX_25519_ChaChaPoly_BLAKE2b", initiator=True, static_key=priv)
    wire = hs.write_message(b"")          # ... alternate with read_message() until hs.complete
    send, receive = hs.split()
    ciphertext = send.encrypt(b"hello")

Errors: using an object the wrong way (out of turn, bad keys, too large a payload) raises
:class:`LocalProtocolError`; anything the peer sent that fails to parse or authenticate, and
all-zero (low-order) DH results, raise :class:`RemoteProtocolError`. After a remote error a
``Handshake`` or ``CipherState`` is dead: every later call raises ``LocalProtocolError``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import nacl.exceptions
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_box_keypair,
    crypto_scalarmult,
    crypto_scalarmult_base,
)

from lab.common._noise_patterns import PATTERNS, HandshakePattern, needs_static, pattern_with_modifiers
from lab.common.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DHLEN",
    "HASHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_TRANSPORT_PAYLOAD",
    "PATTERNS",
    "CipherState",
    "Handshake",
    "HandshakePattern",
    "HandshakeState",
    "generate_keypair",
    "public_key",
]

DHLEN: Final = 32
HASHLEN: Final = 64
BLOCKLEN: Final = 128
KEYLEN: Final = 32
TAGLEN: Final = 16
PSKLEN: Final = 32
MAX_MESSAGE_LEN: Final = 65535  # spec §3: every Noise message, handshake or transport
MAX_TRANSPORT_PAYLOAD: Final = MAX_MESSAGE_LEN - TAGLEN
MAX_NONCE: Final = 2**64 - 1  # reserved for rekey(); never used for a message

_SUITE: Final = ("25519", "ChaChaPoly", "BLAKE2b")
_NONCE = struct.Struct("<4xQ")  # ChaChaPoly: 32 zero bits, then the 64-bit counter, little-endian
_ZERO_DH: Final = bytes(DHLEN)
_REKEY_ZEROS: Final = bytes(KEYLEN)
_IPAD: Final = bytes(b ^ 0x36 for b in range(256))
_OPAD: Final = bytes(b ^ 0x5C for b in range(256))
_blake2b = hashlib.blake2b  # module global so the benchmark can count calls


# --- primitives -----------------------------------------------------------------------------


def _as_bytes(what: str, value: bytes | bytearray | memoryview) -> bytes:
    """`value` as exact bytes, the only type PyNaCl takes; refuses non-buffers (`bytes(5)` would
    quietly make five zero bytes)."""
    if type(value) is bytes:
        return value
    try:
        return memoryview(value).tobytes()
    except TypeError:
        raise LocalProtocolError(f"{what} must be bytes-like, not {type(value).__name__}") from None


def _key32(what: str, value: object) -> bytes:
    """Validate a 32-byte key given by our own caller (libsodium reads 32 bytes blindly)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"{what} must be bytes, not {type(value).__name__}")
    key = bytes(value)
    if len(key) != 32:
        raise LocalProtocolError(f"{what} must be 32 bytes, got {len(key)}")
    return key


def _hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2b (RFC 2104), as the spec's HMAC-HASH; hashlib's keyed mode is a different MAC."""
    if len(key) > BLOCKLEN:
        key = _blake2b(key).digest()
    key = key.ljust(BLOCKLEN, b"\0")
    inner = _blake2b(key.translate(_IPAD))
    inner.update(data)
    return _blake2b(key.translate(_OPAD) + inner.digest()).digest()


def _hkdf(chaining_key: bytes, ikm: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF as spec §4.3 defines it (2 or 3 outputs of HASHLEN bytes)."""
    padded = _hmac(chaining_key, ikm).ljust(BLOCKLEN, b"\0")  # temp_key, HASHLEN < BLOCKLEN
    ipad, opad = padded.translate(_IPAD), padded.translate(_OPAD)
    out1 = _blake2b(opad + _blake2b(ipad + b"\x01").digest()).digest()
    out2 = _blake2b(opad + _blake2b(ipad + out1 + b"\x02").digest()).digest()
    if num_outputs == 2:
        return out1, out2
    out3 = _blake2b(opad + _blake2b(ipad + out2 + b"\x03").digest()).digest()
    return out1, out2, out3


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519, signalling an error for low-order public keys (all-zero output), as spec §4.1 allows."""
    if len(public) != DHLEN:  # libsodium would read 32 bytes regardless: never hand it fewer
        raise RemoteProtocolError(f"public key of {len(public)} bytes, expected {DHLEN}")
    try:
        shared = crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError as exc:  # libsodium refuses all-zero outputs itself
        raise RemoteProtocolError("X25519 with the peer's key gave all zeros (low-order point)") from exc
    if hmac.compare_digest(shared, _ZERO_DH):  # constant time: `shared` is secret
        raise RemoteProtocolError("X25519 with the peer's key gave all zeros (low-order point)")
    return shared


def _encrypt(key: bytes, nonce: int, ad: bytes, plaintext: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _NONCE.pack(nonce), key)


def _decrypt(key: bytes, nonce: int, ad: bytes, ciphertext: bytes) -> bytes:
    """Decrypt or raise RemoteProtocolError; never lets a nacl or cffi exception through."""
    if len(ciphertext) < TAGLEN:
        raise RemoteProtocolError(f"ciphertext of {len(ciphertext)} bytes is shorter than its tag")
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _NONCE.pack(nonce), key)
    except nacl.exceptions.CryptoError as exc:
        raise RemoteProtocolError("message failed authentication (wrong key or tampered)") from exc


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return crypto_scalarmult_base(_key32("private key", private))


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as ``(private, public)``."""
    public, private = crypto_box_keypair()
    return private, public


# A few static keys' public halves, keyed by object identity: a node handshakes with the same
# `bytes` key over and over (a local cluster runs several nodes in one process), and the
# scalarmult costs ~10% of a handshake. Identity on immutable bytes cannot go stale and
# compares nothing secret; the cache holds no key its caller does not already hold.
_STATIC_CACHE_SIZE: Final = 8
_static_cache: tuple[tuple[bytes, bytes], ...] = ()


def _static_public(private: bytes) -> bytes:
    global _static_cache
    for cached_private, cached_public in _static_cache:
        if cached_private is private:
            return cached_public
    public = crypto_scalarmult_base(private)
    _static_cache = ((private, public), *_static_cache[: _STATIC_CACHE_SIZE - 1])
    return public


# --- transport ------------------------------------------------------------------------------


class CipherState:
    """One direction of a transport session: ChaChaPoly with an implicit 64-bit counter nonce."""

    __slots__ = ("_k", "_n", "_broken")

    def __init__(self, key: bytes) -> None:
        self._k: bytes | None = _key32("CipherState key", key)
        self._n = 0
        self._broken: str | None = None  # why this object may no longer be used

    @classmethod
    def _unusable(cls, reason: str) -> CipherState:
        """A placeholder for the direction a one-way pattern never uses."""
        cipher = cls.__new__(cls)
        cipher._k, cipher._n, cipher._broken = None, 0, reason
        return cipher

    @property
    def nonce(self) -> int:
        """The counter the next message will use."""
        return self._n

    def _check(self, call: str) -> bytes:
        if self._broken is not None:
            raise LocalProtocolError(f"CipherState.{call}() on an unusable cipher: {self._broken}")
        assert self._k is not None
        return self._k

    def _fail(self, reason: str) -> RemoteProtocolError:
        self._broken = reason
        self._k = None
        return RemoteProtocolError(reason)

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        """Encrypt one transport message (at most MAX_TRANSPORT_PAYLOAD bytes of plaintext)."""
        key = self._check("encrypt")
        plaintext = _as_bytes("plaintext", plaintext)
        if len(plaintext) > MAX_TRANSPORT_PAYLOAD:
            raise LocalProtocolError(
                f"CipherState.encrypt(): {len(plaintext)} bytes exceed the {MAX_TRANSPORT_PAYLOAD}-byte "
                "payload limit of a Noise message; chunk it"
            )
        n = self._n
        if n >= MAX_NONCE:
            raise LocalProtocolError("CipherState.encrypt(): nonces exhausted; start a new session")
        ciphertext = _encrypt(key, n, _as_bytes("ad", ad), plaintext)
        self._n = n + 1
        return ciphertext

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        """Decrypt one transport message; any failure raises RemoteProtocolError and kills this object."""
        key = self._check("decrypt")
        ciphertext, ad = _as_bytes("ciphertext", ciphertext), _as_bytes("ad", ad)
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise self._fail(f"transport message of {len(ciphertext)} bytes exceeds {MAX_MESSAGE_LEN}")
        n = self._n
        if n >= MAX_NONCE:
            raise self._fail("peer sent more messages than the nonce space allows")
        try:
            plaintext = _decrypt(key, n, ad, ciphertext)
        except RemoteProtocolError as exc:
            raise self._fail(f"transport message {n}: {exc}") from exc
        self._n = n + 1
        return plaintext

    def rekey(self) -> None:
        """Replace the key with ENCRYPT(k, 2^64-1, "", zeros)[:32] (spec §4.2); both sides must call it."""
        key = self._check("rekey")
        self._k = _encrypt(key, MAX_NONCE, b"", _REKEY_ZEROS)[:KEYLEN]

    def __repr__(self) -> str:  # never shows the key
        state = f"unusable: {self._broken}" if self._broken else f"nonce={self._n}"
        return f"<CipherState {state}>"


# --- protocol names -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Protocol:
    """A parsed, checked protocol name with everything a Handshake can precompute."""

    name: str
    pattern: HandshakePattern  # psk tokens already placed
    psk_count: int
    initial_h: bytes
    overheads: tuple[int, ...]  # bytes message i adds to its payload
    needs_static: tuple[bool, bool]  # indexed by `initiator`


@lru_cache(maxsize=128)
def _compile(protocol_name: str) -> _Protocol:
    parts = protocol_name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise LocalProtocolError(f"not a Noise protocol name: {protocol_name!r}")
    if tuple(parts[2:]) != _SUITE:
        raise LocalProtocolError(
            f"unsupported suite {'_'.join(parts[2:])!r} in {protocol_name!r}; only 25519_ChaChaPoly_BLAKE2b"
        )
    pattern, psk_count = pattern_with_modifiers(parts[1], protocol_name)
    name = protocol_name.encode("ascii")
    initial_h = name.ljust(HASHLEN, b"\0") if len(name) <= HASHLEN else _blake2b(name).digest()
    return _Protocol(
        name=protocol_name,
        pattern=pattern,
        psk_count=psk_count,
        initial_h=initial_h,
        overheads=_overheads(pattern, bool(psk_count)),
        needs_static=(needs_static(pattern, False), needs_static(pattern, True)),
    )


def _overheads(pattern: HandshakePattern, psk_mode: bool) -> tuple[int, ...]:
    """Fixed size of each message beyond its payload; also checks the psk rule of spec §9.3."""
    has_key = False
    psk_seen = False
    sent_e = [False, False]
    sizes = []
    for i, tokens in enumerate(pattern.messages):
        side = i % 2
        size = 0
        for token in tokens:
            if token == "e":
                size += DHLEN
                sent_e[side] = True
                has_key = has_key or psk_mode  # in psk mode "e" also calls MixKey
            elif token == "s":
                size += DHLEN + (TAGLEN if has_key else 0)
                if has_key and psk_seen and not sent_e[side]:
                    raise LocalProtocolError(f"{pattern.name}: encrypts after a psk without an ephemeral")
            else:  # a DH or psk token: both call MixKey
                has_key = True
                psk_seen = psk_seen or token == "psk"
        if has_key and psk_seen and not sent_e[side]:
            raise LocalProtocolError(f"{pattern.name}: encrypts after a psk without an ephemeral")
        sizes.append(size + (TAGLEN if has_key else 0))
    return tuple(sizes)


# --- handshake ------------------------------------------------------------------------------


class HandshakeState(enum.Enum):
    """Where a Handshake stands; which calls each state allows is the table _ALLOWED."""

    WRITE = "write"  # our turn: write_message()
    READ = "read"  # the peer's turn: read_message()
    COMPLETE = "complete"  # all messages done: split()
    SPLIT = "split"  # transport ciphers handed out; only the hash and remote key remain
    FAILED = "failed"  # an error aborted the handshake; start a new one


_ALLOWED: Final[dict[str, frozenset[HandshakeState]]] = {
    "write_message": frozenset({HandshakeState.WRITE}),
    "read_message": frozenset({HandshakeState.READ}),
    "split": frozenset({HandshakeState.COMPLETE}),
    "handshake_hash": frozenset({HandshakeState.COMPLETE, HandshakeState.SPLIT}),
}
_WHY: Final[dict[HandshakeState, str]] = {
    HandshakeState.WRITE: "it is our turn to send a handshake message",
    HandshakeState.READ: "it is the peer's turn to send a handshake message",
    HandshakeState.COMPLETE: "the handshake is complete; call split()",
    HandshakeState.SPLIT: "the handshake is over and its transport ciphers were handed out",
    HandshakeState.FAILED: "an earlier error aborted this handshake",
}


class Handshake:
    """One side of a Noise handshake (spec §5.3 HandshakeState with its SymmetricState inlined)."""

    __slots__ = (
        "_proto", "_initiator", "_state", "_index", "_psks",
        "_ck", "_h", "_k", "_n",  # SymmetricState and its CipherState
        "_s", "_s_pub", "_e", "_e_pub", "_rs", "_re", "_fixed_e",
    )  # fmt: skip

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        static_key: bytes | None = None,
        remote_static: bytes | None = None,
        psks: list[bytes] | None = None,
        ephemeral_key: bytes | None = None,
    ) -> None:
        if not isinstance(protocol_name, str):
            raise LocalProtocolError(f"protocol_name must be str, not {type(protocol_name).__name__}")
        proto = _compile(protocol_name)
        pattern = proto.pattern
        self._proto = proto
        self._initiator = bool(initiator)
        role = "initiator" if initiator else "responder"

        if static_key is None:
            if proto.needs_static[self._initiator]:
                raise LocalProtocolError(f"{protocol_name}: the {role} needs static_key")
            self._s = self._s_pub = None
        else:
            if not proto.needs_static[self._initiator]:
                raise LocalProtocolError(f"{protocol_name}: the {role} uses no static_key; refusing one")
            self._s = _key32("static_key", static_key)  # same object for bytes: keeps the cache hit
            self._s_pub = _static_public(self._s)

        remote_pre = pattern.responder_pre if initiator else pattern.initiator_pre
        if remote_static is None:
            if remote_pre:
                raise LocalProtocolError(f"{protocol_name}: the {role} needs remote_static (pre-message)")
            self._rs = None
        else:
            # Refused rather than ignored: a caller who hopes to pin the peer's key this way
            # would otherwise get no check at all. Compare `remote_static` after the handshake.
            if not remote_pre:
                raise LocalProtocolError(
                    f"{protocol_name}: the peer's static key is not a pre-message; check "
                    "Handshake.remote_static after the handshake instead"
                )
            self._rs = _key32("remote_static", remote_static)

        psk_list = list(psks or ())
        if len(psk_list) != proto.psk_count:
            raise LocalProtocolError(f"{protocol_name} takes {proto.psk_count} psks, got {len(psk_list)}")
        self._psks = [_key32("psk", psk) for psk in psk_list]
        self._fixed_e = None if ephemeral_key is None else _key32("ephemeral_key", ephemeral_key)
        self._e = self._e_pub = self._re = None

        # InitializeSymmetric, MixHash(prologue), then the pre-message keys, initiator's first.
        self._h = proto.initial_h
        self._ck = proto.initial_h
        self._k: bytes | None = None
        self._n = 0
        self._mix_hash(_as_bytes("prologue", prologue))
        if pattern.initiator_pre:
            self._mix_hash(self._s_pub if initiator else self._rs)  # type: ignore[arg-type]
        if pattern.responder_pre:
            self._mix_hash(self._rs if initiator else self._s_pub)  # type: ignore[arg-type]
        self._index = 0
        self._state = HandshakeState.WRITE if initiator else HandshakeState.READ

    # -- public surface --

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def protocol_name(self) -> str:
        return self._proto.name

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def complete(self) -> bool:
        return self._state in (HandshakeState.COMPLETE, HandshakeState.SPLIT)

    @property
    def handshake_hash(self) -> bytes:
        """h after the last message: the channel binding value (spec §11.2). Only once complete."""
        self._require("handshake_hash")
        return self._h

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once known (pre-message or received and decrypted)."""
        return self._rs

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message carrying `payload`."""
        self._require("write_message")
        payload = _as_bytes("payload", payload)
        limit = MAX_MESSAGE_LEN - self._proto.overheads[self._index]
        if len(payload) > limit:
            raise LocalProtocolError(
                f"write_message(): payload of {len(payload)} bytes exceeds {limit} for message {self._index}"
            )
        try:
            return self._write(payload)
        except BaseException:
            self._fail()
            raise

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message and return its payload."""
        self._require("read_message")
        message = _as_bytes("message", message)
        try:
            return self._read(message)
        except BaseException:
            self._fail()
            raise

    def split(self) -> tuple[CipherState, CipherState]:
        """``(send, receive)`` transport ciphers for this side; callable once."""
        self._require("split")
        k1, k2 = _hkdf(self._ck, b"", 2)
        c1, c2 = CipherState(k1[:KEYLEN]), CipherState(k2[:KEYLEN])
        self._state = HandshakeState.SPLIT
        self._ck = self._k = None  # type: ignore[assignment]
        if self._proto.pattern.one_way:  # spec §7.4: only initiator -> responder traffic exists
            if self._initiator:
                return c1, CipherState._unusable("one-way pattern: the initiator never receives")
            return CipherState._unusable("one-way pattern: the responder never sends"), c1
        return (c1, c2) if self._initiator else (c2, c1)

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return f"<Handshake {self._proto.name} {role} {self._state.name} message={self._index}>"

    # -- state machine --

    def _require(self, call: str) -> None:
        if self._state not in _ALLOWED[call]:
            raise LocalProtocolError(f"{call}() not allowed in state {self._state.name}: {_WHY[self._state]}")

    def _fail(self) -> None:
        """Any error mid-message leaves h and ck half-updated: nothing may continue from here."""
        self._state = HandshakeState.FAILED
        self._ck = self._k = self._e = self._fixed_e = self._s = None  # type: ignore[assignment]
        self._psks = []

    def _advance(self) -> None:
        self._index += 1
        if self._index == len(self._proto.pattern.messages):
            self._state = HandshakeState.COMPLETE
            self._e = self._fixed_e = self._s = None  # private keys are no longer needed
        else:
            self._state = HandshakeState.READ if self._state is HandshakeState.WRITE else HandshakeState.WRITE

    # -- SymmetricState (spec §5.2) --

    def _mix_hash(self, data: bytes) -> None:
        hasher = _blake2b(self._h)
        hasher.update(data)
        self._h = hasher.digest()

    def _mix_key(self, ikm: bytes) -> None:
        self._ck, temp_k = _hkdf(self._ck, ikm, 2)
        self._k, self._n = temp_k[:KEYLEN], 0

    def _mix_key_and_hash(self, ikm: bytes) -> None:
        self._ck, temp_h, temp_k = _hkdf(self._ck, ikm, 3)
        self._mix_hash(temp_h)
        self._k, self._n = temp_k[:KEYLEN], 0

    def _encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self._k is None:
            ciphertext = plaintext
        else:
            # n cannot near 2^64-1 here: each key encrypts a handful of handshake fields.
            ciphertext = _encrypt(self._k, self._n, self._h, plaintext)
            self._n += 1
        self._mix_hash(ciphertext)
        return ciphertext

    def _decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self._k is None:
            plaintext = ciphertext
        else:
            plaintext = _decrypt(self._k, self._n, self._h, ciphertext)
            self._n += 1
        self._mix_hash(ciphertext)
        return plaintext

    # -- messages (spec §5.3 WriteMessage / ReadMessage) --

    def _dh_token(self, token: str) -> bytes:
        initiator = self._initiator
        if token == "ee":
            return _dh(self._e, self._re)  # type: ignore[arg-type]
        if token == "ss":
            return _dh(self._s, self._rs)  # type: ignore[arg-type]
        if (token == "es") == initiator:  # initiator's es, responder's se
            return _dh(self._e, self._rs)  # type: ignore[arg-type]
        return _dh(self._s, self._re)  # type: ignore[arg-type]

    def _write(self, payload: bytes) -> bytes:
        psk_mode = self._proto.psk_count > 0
        out = []
        for token in self._proto.pattern.messages[self._index]:
            if token == "e":
                if self._fixed_e is not None:
                    self._e, self._e_pub = self._fixed_e, crypto_scalarmult_base(self._fixed_e)
                else:
                    self._e_pub, self._e = crypto_box_keypair()
                out.append(self._e_pub)
                self._mix_hash(self._e_pub)
                if psk_mode:
                    self._mix_key(self._e_pub)
            elif token == "s":
                out.append(self._encrypt_and_hash(self._s_pub))  # type: ignore[arg-type]
            elif token == "psk":
                self._mix_key_and_hash(self._psks.pop(0))
            else:
                self._mix_key(self._dh_token(token))
        out.append(self._encrypt_and_hash(payload))
        self._advance()
        return b"".join(out)

    def _take(self, message: bytes, offset: int, length: int) -> int:
        """End of the next field; re-checks what the up-front size check already promised."""
        end = offset + length
        if end > len(message):
            raise RemoteProtocolError(f"handshake message {self._index} truncated")
        return end

    def _read(self, message: bytes) -> bytes:
        size = len(message)
        if size > MAX_MESSAGE_LEN:
            raise RemoteProtocolError(f"handshake message of {size} bytes exceeds {MAX_MESSAGE_LEN}")
        need = self._proto.overheads[self._index]
        if size < need:
            raise RemoteProtocolError(f"handshake message {self._index} truncated: {size} bytes, need {need}")
        psk_mode = self._proto.psk_count > 0
        offset = 0
        for token in self._proto.pattern.messages[self._index]:
            if token == "e":
                offset = self._take(message, offset, DHLEN)
                self._re = message[offset - DHLEN : offset]
                self._mix_hash(self._re)
                if psk_mode:
                    self._mix_key(self._re)
            elif token == "s":
                start = offset
                offset = self._take(message, offset, DHLEN + (TAGLEN if self._k is not None else 0))
                self._rs = self._decrypt_and_hash(message[start:offset])
            elif token == "psk":
                self._mix_key_and_hash(self._psks.pop(0))
            else:
                self._mix_key(self._dh_token(token))
        payload = self._decrypt_and_hash(message[offset:])
        self._advance()
        return payload
