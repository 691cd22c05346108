"""Node keys, the cluster CA, certificates, revocation lists and one-time join tokens.

* **Node key**: X25519, the node's Noise static key. Generated on the node; the private half is
  held in a :class:`~lab.common.securemem.SecretBuffer` and never leaves the host.
* **Cluster CA**: Ed25519, held by the coordinator.
* **Fingerprint** of a public key: ``base32(BLAKE2b-256(key, person="lab.fpr.v1"))``, lowercase,
  no padding: 52 characters. Tokens carry the CA's fingerprint so that a joining agent can pin
  the CA it is given before trusting anything signed by it (no trust on first use).
* **Certificate**: ``msgpack([body, signature])`` where ``body`` is the canonical msgpack map
  ``{v, serial, node_id, name, noise_pub, roles, not_before, not_after}`` and ``signature`` the
  CA's Ed25519 signature over ``"lab.cert.v1\\0" + body``. Decoding demands the canonical body
  (re-encoding the fields must give the same bytes), so a certificate has exactly one encoding.
* **Revocation list**: ``msgpack([body, signature])``, body ``{v, version, issued_at, serials,
  keys}`` with both lists strictly ascending, signed over ``"lab.crl.v1\\0" + body``. A certificate
  is refused if its serial *or* its noise key is listed; a higher ``version`` replaces a lower one.
* **Join token**: ``lab1.<CA fingerprint>.<32 random bytes, base32>``. The coordinator keeps only
  :func:`hash_token_secret` of the secret (BLAKE2b-256, person ``"lab.token.v1"``).

Times are integer Unix seconds passed in as ``now``; verification allows :data:`CLOCK_SKEW`
(5 minutes, as Kerberos does) on both ends of the validity window.

Key files hold one line, ``<kind> <base64 of the 32 secret bytes>``; they are created 0600 from
the start, written atomically, and refused when group or others may read them.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final

import nacl.bindings
import nacl.exceptions

from lab.common import wire
from lab.common.errors import AuthError, ConfigError, LocalProtocolError, RemoteProtocolError
from lab.common.securemem import SecretBuffer

__all__ = [
    "CLOCK_SKEW", "FINGERPRINT_LEN", "KEY_LEN", "TOKEN_PREFIX",
    "Certificate", "CertificateAuthority", "JoinToken", "NodeKey", "RevocationList",
    "fingerprint", "hash_token_secret", "matches_fingerprint", "mint_token", "parse_token_untrusted",
    "load_key_file", "read_private_file", "save_key_file", "token_matches", "verify_certificate", "verify_token",
    "write_private_file",
]

KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
CLOCK_SKEW: Final = 300
DEFAULT_CERT_LIFETIME: Final = 365 * 24 * 3600
MAX_CERT_SIZE: Final = 4096
MAX_REVOKED: Final = 65536
MAX_CRL_SIZE: Final = 4 * 1024 * 1024

_CERT_DOMAIN: Final = b"lab.cert.v1\x00"
_CRL_DOMAIN: Final = b"lab.crl.v1\x00"
_FPR_PERSON: Final = b"lab.fpr.v1"
_TOKEN_PERSON: Final = b"lab.token.v1"

# ---------------------------------------------------------------------------------------------
# base32 and fingerprints

_B32_RE: Final = re.compile(r"[a-z2-7]*")


def b32(data: bytes) -> str:
    """Lowercase, unpadded base32."""
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _b32_len(nbytes: int) -> int:
    return -(-nbytes * 8 // 5)


def _unb32(text: str, nbytes: int, what: str) -> bytes:
    """Strict inverse of :func:`b32` for exactly ``nbytes``; raises RemoteProtocolError."""
    want = _b32_len(nbytes)
    if len(text) != want:
        raise RemoteProtocolError(f"{what} must be {want} characters, got {len(text)}")
    if not _B32_RE.fullmatch(text):
        raise RemoteProtocolError(f"{what} is not lowercase base32 (a-z, 2-7)")
    try:
        raw = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError(f"{what} is not valid base32") from exc
    if b32(raw) != text:  # unused low bits of the last character must be zero
        raise RemoteProtocolError(f"{what} is not canonical base32")
    return raw


FINGERPRINT_LEN: Final = _b32_len(32)


def fingerprint(public_key: bytes) -> str:
    """The 52-character fingerprint of a 32-byte public key."""
    if len(public_key) != KEY_LEN:
        raise LocalProtocolError("fingerprint of a key that is not 32 bytes")
    return b32(hashlib.blake2b(bytes(public_key), digest_size=32, person=_FPR_PERSON).digest())


def matches_fingerprint(public_key: bytes, expected: str) -> bool:
    """Constant-time check of a key against a pinned fingerprint."""
    if len(public_key) != KEY_LEN:
        return False
    return hmac.compare_digest(fingerprint(public_key).encode(), expected.encode("ascii", "replace"))


# ---------------------------------------------------------------------------------------------
# Private files


def write_private_file(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, overwrite: bool = False) -> None:
    """Write a secret file atomically: 0600 temp file in the same directory, fsync, rename, fsync dir.

    The temp file is created 0600 (``os.open``), never chmod-ed later, so the data is never
    readable by others, even for an instant. Without ``overwrite`` an existing file is kept.
    """
    path = Path(path)
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, path)
            else:
                _link_exclusive(tmp, path)
        finally:
            # Gone after a rename; still there after a link or a failed write.
            if os.path.lexists(tmp):
                os.unlink(tmp)
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except FileExistsError as exc:
        raise ConfigError("already exists; refusing to overwrite a key file", file=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", file=str(path)) from exc


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Atomic "create only if absent": hard-link the temp file into place."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        # Filesystems without hard links: fall back to check-then-rename (racy, but only there).
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from exc
        os.replace(tmp, path)


def read_private_file(path: str | os.PathLike[str], *, max_size: int = 65536) -> bytearray:
    """Read a secret file, refusing one that group/others can access or another user owns.

    Returns a bytearray so that the caller can wipe it.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise ConfigError("key file not found", file=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot open key file: {exc.strerror or exc}", file=str(path)) from exc
    try:
        st = os.fstat(fd)  # fstat the open file: no window for a swap after the check
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("key file is not a regular file", file=str(path))
        if st.st_mode & 0o077:
            raise ConfigError(
                f"key file is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"fix with: chmod 600 {path}",
                file=str(path),
            )
        if hasattr(os, "geteuid") and st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"key file is owned by uid {st.st_uid}, not by this user or root", file=str(path))
        if st.st_size > max_size:
            raise ConfigError(f"key file larger than {max_size} bytes", file=str(path))
        buf = bytearray(max_size + 1)
        n = 0
        with memoryview(buf) as mv:  # read straight into the wipeable buffer
            while n <= max_size:
                got = os.readv(fd, [mv[n:]])
                if got == 0:
                    break
                n += got
        if n > max_size:
            buf[:] = bytes(len(buf))
            raise ConfigError(f"key file larger than {max_size} bytes", file=str(path))
        del buf[n:]
        return buf
    except OSError as exc:
        raise ConfigError(f"cannot read key file: {exc.strerror or exc}", file=str(path)) from exc
    finally:
        os.close(fd)


def save_key_file(path: str | os.PathLike[str], kind: str, secret: memoryview | bytes, overwrite: bool = False) -> None:
    """Write a 32-byte key as one line ``KIND base64``, 0600 from the first byte."""
    line = bytearray(kind.encode() + b" " + base64.b64encode(secret) + b"\n")
    try:
        write_private_file(path, line, overwrite=overwrite)
    finally:
        line[:] = bytes(len(line))


def load_key_file(path: str | os.PathLike[str], kind: str) -> SecretBuffer:
    """Read a key written by :func:`save_key_file` into locked memory; a wrong kind, bad base64
    or wrong length is a ConfigError naming the file."""
    raw = read_private_file(path, max_size=256)
    try:
        head, sep, body = bytes(raw).strip().partition(b" ")
        if head != kind.encode() or not sep:
            raise ConfigError(f"not a {kind} file (first word {head[:32]!r})", file=str(path))
        try:
            secret = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("key file is not valid base64", file=str(path)) from exc
        if len(secret) != KEY_LEN:
            raise ConfigError(f"key must be {KEY_LEN} bytes, file has {len(secret)}", file=str(path))
        return SecretBuffer.from_bytes(secret)
    finally:
        raw[:] = bytes(len(raw))


# ---------------------------------------------------------------------------------------------
# Node key (X25519)


class NodeKey:
    """This node's X25519 static key for Noise. ``repr`` shows the fingerprint only."""

    KIND: Final = "lab-node-key-v1"

    def __init__(self, private: SecretBuffer) -> None:
        if len(private) != KEY_LEN:
            raise LocalProtocolError("X25519 private key must be 32 bytes")
        self._private = private
        with private.view() as sk:
            self.public_key: bytes = nacl.bindings.crypto_scalarmult_base(bytes(sk))

    @classmethod
    def generate(cls) -> NodeKey:
        pk, sk = nacl.bindings.crypto_box_keypair()
        return cls(SecretBuffer.from_bytes(sk))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeKey:
        return cls(load_key_file(path, cls.KIND))

    @classmethod
    def load_or_generate(cls, path: str | os.PathLike[str]) -> NodeKey:
        """First start generates and saves the key; later starts load it."""
        if Path(path).exists():
            return cls.load(path)
        key = cls.generate()
        key.save(path)
        return key

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        with self._private.view() as sk:
            save_key_file(path, self.KIND, sk, overwrite)

    def private_view(self) -> memoryview:
        """Read-only view of the private scalar; release it soon (``with key.private_view() as v``)."""
        return self._private.view()

    def private_bytes(self) -> bytes:
        """A bytes copy for APIs that need one (PyNaCl); it cannot be wiped, keep it short-lived."""
        return self._private.bytes()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def close(self) -> None:
        self._private.close()

    def __enter__(self) -> NodeKey:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NodeKey {self.fingerprint}>"


# ---------------------------------------------------------------------------------------------
# Certificates

_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
NAME_PATTERN: Final = rf"{_LABEL}(?:\.{_LABEL})*"
NODE_ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
ROLE_PATTERN: Final = r"[a-z][a-z0-9-]*"
_U63 = wire.UInt()
_Key = Annotated[bytes, wire.Bytes(min_len=KEY_LEN, max_len=KEY_LEN)]
_Sig = Annotated[bytes, wire.Bytes(min_len=SIGNATURE_LEN, max_len=SIGNATURE_LEN)]


def _open_signed(data: bytes | bytearray | memoryview, what: str, max_size: int, max_items: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """Split ``msgpack([body, signature])`` and decode the body map; RemoteProtocolError on any flaw."""
    outer = wire.unpackb_untrusted(data, max_size=max_size, max_items=4)
    if not (isinstance(outer, list) and len(outer) == 2 and all(isinstance(x, bytes) for x in outer)):
        raise RemoteProtocolError(f"{what} must be [body, signature] as two byte strings")
    body_bytes, signature = outer
    if len(signature) != SIGNATURE_LEN:
        raise RemoteProtocolError(f"{what} signature must be {SIGNATURE_LEN} bytes")
    body = wire.unpackb_untrusted(body_bytes, max_size=max_size, max_items=max_items)
    if not isinstance(body, dict):
        raise RemoteProtocolError(f"{what} body must be a map")
    if "signature" in body:
        raise RemoteProtocolError(f"{what} body has an unexpected key 'signature'")
    return body_bytes, signature, body


def _verify_sig(domain: bytes, body: bytes, signature: bytes, ca_public_key: bytes) -> bool:
    if len(ca_public_key) != KEY_LEN:
        raise LocalProtocolError("CA public key must be 32 bytes")
    try:
        nacl.bindings.crypto_sign_open(signature + domain + body, bytes(ca_public_key))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


class _Signed(wire.Record):
    """Shared encode/decode of ``[canonical body, signature]`` records."""

    signature: bytes
    _WHAT: str = ""

    def body_bytes(self) -> bytes:
        d = self._to_wire()
        del d["signature"]
        return wire.packb(d)

    def encode(self) -> bytes:
        return wire.packb([self.body_bytes(), self.signature])

    @classmethod
    def _decode(cls, data: bytes | bytearray | memoryview, max_size: int, max_items: int) -> Any:
        body_bytes, signature, body = _open_signed(data, cls._WHAT, max_size, max_items)
        body["signature"] = signature
        try:
            obj = cls._from_wire(body)
        except wire.Invalid as exc:
            raise RemoteProtocolError(f"bad {cls._WHAT}: {exc}") from exc
        if obj.body_bytes() != body_bytes:
            raise RemoteProtocolError(f"{cls._WHAT} body is not in canonical encoding")
        return obj


@wire.record
@dataclasses.dataclass(frozen=True)
class Certificate(_Signed):
    """A node's identity, signed by the cluster CA. Build with :meth:`CertificateAuthority.issue`."""

    v: Annotated[int, wire.Int(1, 1)]
    serial: Annotated[int, wire.Int(1, 2**63 - 1)]
    node_id: Annotated[str, wire.Str(max_len=64, min_len=1, pattern=NODE_ID_PATTERN)]
    name: Annotated[str, wire.Str(max_len=253, min_len=1, pattern=NAME_PATTERN)]
    noise_pub: _Key
    roles: Annotated[tuple[str, ...], wire.List(wire.Str(max_len=32, min_len=1, pattern=ROLE_PATTERN), max_items=16, unique=True)]
    not_before: Annotated[int, _U63]
    not_after: Annotated[int, _U63]
    signature: _Sig = dataclasses.field(repr=False)

    _WHAT = "certificate"

    def _check(self) -> None:
        if self.not_before > self.not_after:
            raise wire.Invalid("not_before is after not_after")

    @classmethod
    def decode_untrusted(cls, data: bytes | bytearray | memoryview) -> Certificate:
        """Strictly decode (no signature check: see :func:`verify_certificate`)."""
        return cls._decode(data, MAX_CERT_SIZE, 64)  # type: ignore[no-any-return]


@wire.record
@dataclasses.dataclass(frozen=True)
class RevocationList(_Signed):
    """Revoked certificate serials and node keys, signed by the CA. Higher version wins."""

    v: Annotated[int, wire.Int(1, 1)]
    version: Annotated[int, _U63]
    issued_at: Annotated[int, _U63]
    serials: Annotated[tuple[int, ...], wire.List(wire.Int(1, 2**63 - 1), max_items=MAX_REVOKED)]
    keys: Annotated[tuple[bytes, ...], wire.List(wire.Bytes(min_len=KEY_LEN, max_len=KEY_LEN), max_items=MAX_REVOKED)]
    signature: _Sig = dataclasses.field(repr=False)

    _WHAT = "revocation list"

    def _check(self) -> None:
        # Strictly ascending: one canonical form, and bisect lookups.
        for name, xs in (("serials", self.serials), ("keys", self.keys)):
            if any(a >= b for a, b in zip(xs, xs[1:])):  # type: ignore[operator]
                raise wire.Invalid(f"{name} must be strictly ascending")

    @classmethod
    def decode_untrusted(cls, data: bytes | bytearray | memoryview) -> RevocationList:
        """Strictly decode (no signature check: call :meth:`verify`)."""
        return cls._decode(data, MAX_CRL_SIZE, 2 * MAX_REVOKED + 16)  # type: ignore[no-any-return]

    def verify(self, ca_public_key: bytes) -> None:
        """Check the CA signature (remembered per CA key, so re-checks are free); AuthError if bad."""
        if self.__dict__.get("_verified_by") == bytes(ca_public_key):
            return
        if not _verify_sig(_CRL_DOMAIN, self.body_bytes(), self.signature, ca_public_key):
            raise AuthError(f"revocation list v{self.version} is not signed by this cluster CA")
        object.__setattr__(self, "_verified_by", bytes(ca_public_key))

    def replaces(self, current: RevocationList | None) -> bool:
        """Should this (verified) list replace ``current``? Only a strictly newer version does."""
        return current is None or self.version > current.version

    def revoked_reason(self, cert: Certificate) -> str | None:
        """Why ``cert`` is revoked (serial or key listed), or None."""
        i = bisect.bisect_left(self.serials, cert.serial)
        if i < len(self.serials) and self.serials[i] == cert.serial:
            return f"serial {cert.serial} is revoked"
        j = bisect.bisect_left(self.keys, cert.noise_pub)
        if j < len(self.keys) and self.keys[j] == cert.noise_pub:
            return f"key {fingerprint(cert.noise_pub)} is revoked"
        return None


def verify_certificate(
    cert: Certificate | bytes,
    ca_public_key: bytes,
    now: float,
    revocations: RevocationList | None,
    expected_noise_pub: bytes | None = None,
    *,
    skew: int = CLOCK_SKEW,
) -> Certificate:
    """Return the certificate if the CA signed it, it is valid at ``now`` (± ``skew``), is not
    revoked, and (when given) names the handshake's remote static key; AuthError otherwise.

    Bytes are decoded first (malformed → RemoteProtocolError). ``revocations`` is checked against
    the same CA key before use.
    """
    if not isinstance(cert, Certificate):
        cert = Certificate.decode_untrusted(cert)
    if not _verify_sig(_CERT_DOMAIN, cert.body_bytes(), cert.signature, ca_public_key):
        raise AuthError(f"certificate for {cert.name!r} is not signed by this cluster CA")
    who = f"certificate {cert.serial} for {cert.name!r}"
    if revocations is not None:
        revocations.verify(ca_public_key)
        reason = revocations.revoked_reason(cert)
        if reason is not None:
            raise AuthError(f"{who} refused: {reason}")
    if now + skew < cert.not_before:
        raise AuthError(f"{who} is not valid before {cert.not_before} (now {int(now)})")
    if now - skew > cert.not_after:
        raise AuthError(f"{who} expired at {cert.not_after} (now {int(now)})")
    if expected_noise_pub is not None and not hmac.compare_digest(cert.noise_pub, bytes(expected_noise_pub)):
        raise AuthError(f"{who} is for key {fingerprint(cert.noise_pub)}, but the peer's handshake key differs")
    return cert


# ---------------------------------------------------------------------------------------------
# Cluster CA (Ed25519)


class CertificateAuthority:
    """The cluster CA. Holds the Ed25519 secret key in secure memory."""

    KIND: Final = "lab-ca-key-v1"

    def __init__(self, seed: SecretBuffer) -> None:
        if len(seed) != KEY_LEN:
            raise LocalProtocolError("Ed25519 seed must be 32 bytes")
        with seed.view() as s:
            pk, sk = nacl.bindings.crypto_sign_seed_keypair(bytes(s))
        self._seed = seed
        self._sk = SecretBuffer.from_bytes(sk)
        self.public_key: bytes = pk

    @classmethod
    def generate(cls) -> CertificateAuthority:
        return cls(SecretBuffer.from_bytes(secrets.token_bytes(KEY_LEN)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CertificateAuthority:
        return cls(load_key_file(path, cls.KIND))

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        with self._seed.view() as s:
            save_key_file(path, self.KIND, s, overwrite)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def _sign(self, domain: bytes, body: bytes) -> bytes:
        signed: bytes = nacl.bindings.crypto_sign(domain + body, self._sk.bytes())
        return signed[:SIGNATURE_LEN]

    def issue(
        self,
        name: str,
        node_id: str,
        noise_pub: bytes,
        roles: Iterable[str],
        lifetime: int,
        now: float,
        *,
        serial: int | None = None,
    ) -> Certificate:
        """Sign a certificate valid from ``now`` for ``lifetime`` seconds (see DEFAULT_CERT_LIFETIME).

        Without ``serial`` a random 63-bit one is drawn, so the CA needs no counter state.
        """
        if serial is None:
            serial = secrets.randbelow(2**63 - 1) + 1
        fields: dict[str, Any] = dict(
            v=1, serial=serial, node_id=node_id, name=name, noise_pub=bytes(noise_pub), roles=tuple(roles),
            not_before=int(now), not_after=int(now) + int(lifetime),
        )
        unsigned = Certificate(**fields, signature=bytes(SIGNATURE_LEN))  # validates the fields
        return dataclasses.replace(unsigned, signature=self._sign(_CERT_DOMAIN, unsigned.body_bytes()))

    def revocation_list(
        self, version: int, now: float, serials: Iterable[int] = (), keys: Iterable[bytes] = ()
    ) -> RevocationList:
        """Sign a revocation list (entries are sorted and deduplicated here)."""
        unsigned = RevocationList(
            v=1, version=version, issued_at=int(now), serials=tuple(sorted(set(serials))),
            keys=tuple(sorted({bytes(k) for k in keys})), signature=bytes(SIGNATURE_LEN),
        )
        return dataclasses.replace(unsigned, signature=self._sign(_CRL_DOMAIN, unsigned.body_bytes()))

    def revoke(self, current: RevocationList | None, certs: list[Certificate], now: float) -> RevocationList:
        """A new list, one version up, adding each certificate's serial and key."""
        serials = set(current.serials if current else ()) | {c.serial for c in certs}
        keys = set(current.keys if current else ()) | {c.noise_pub for c in certs}
        return self.revocation_list((current.version + 1) if current else 1, now, serials, keys)

    def close(self) -> None:
        self._sk.close()
        self._seed.close()

    def __enter__(self) -> CertificateAuthority:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.fingerprint}>"


# ---------------------------------------------------------------------------------------------
# One-time join tokens

TOKEN_PREFIX: Final = "lab1"
TOKEN_SECRET_LEN: Final = 32
_TOKEN_MAX_LEN: Final = 256


@dataclasses.dataclass(frozen=True)
class JoinToken:
    """A parsed join token. ``repr`` hides the secret; :meth:`reveal` gives the token text."""

    fingerprint: str
    secret: bytes = dataclasses.field(repr=False)

    def reveal(self) -> str:
        return f"{TOKEN_PREFIX}.{self.fingerprint}.{b32(self.secret)}"

    @property
    def secret_hash(self) -> bytes:
        return hash_token_secret(self.secret)


def hash_token_secret(secret: bytes) -> bytes:
    """What the coordinator stores for a token: BLAKE2b-256 of the raw secret bytes."""
    return hashlib.blake2b(bytes(secret), digest_size=32, person=_TOKEN_PERSON).digest()


def mint_token(ca_fingerprint: str) -> tuple[str, bytes]:
    """A fresh token for this CA: ``(token text to hand out, hash to store)``."""
    try:
        _unb32(ca_fingerprint, 32, "fingerprint")
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"mint_token: {exc}") from exc
    token = JoinToken(ca_fingerprint, secrets.token_bytes(TOKEN_SECRET_LEN))
    return token.reveal(), token.secret_hash


def parse_token_untrusted(text: str) -> JoinToken:
    """Parse ``lab1.<fingerprint>.<secret>``; RemoteProtocolError says what is wrong."""
    if not isinstance(text, str):
        raise RemoteProtocolError("token must be text")
    text = text.strip()
    if len(text) > _TOKEN_MAX_LEN:
        raise RemoteProtocolError("token is too long")
    parts = text.split(".")
    if parts[0] != TOKEN_PREFIX:
        shown = parts[0][:8]
        if re.fullmatch(r"lab[0-9]+", shown):
            raise RemoteProtocolError(f"unsupported token version {shown!r} (this build reads {TOKEN_PREFIX!r})")
        raise RemoteProtocolError(f"not a lab join token: it must start with '{TOKEN_PREFIX}.'")
    if len(parts) != 3:
        raise RemoteProtocolError(f"token must be {TOKEN_PREFIX}.<fingerprint>.<secret> (3 dot-separated parts, got {len(parts)})")
    _unb32(parts[1], 32, "token fingerprint")
    secret = _unb32(parts[2], TOKEN_SECRET_LEN, "token secret")
    return JoinToken(parts[1], secret)


def token_matches(token: JoinToken | str, stored_hash: bytes) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    if isinstance(token, str):
        token = parse_token_untrusted(token)
    return hmac.compare_digest(token.secret_hash, bytes(stored_hash))


def verify_token(token: JoinToken | str, stored_hash: bytes, ca_fingerprint: str | None = None) -> JoinToken:
    """AuthError unless the token matches ``stored_hash`` (and was minted for ``ca_fingerprint``)."""
    if isinstance(token, str):
        token = parse_token_untrusted(token)
    if ca_fingerprint is not None and not hmac.compare_digest(token.fingerprint.encode(), ca_fingerprint.encode()):
        raise AuthError("join token was minted for another cluster CA")
    if not token_matches(token, stored_hash):
        raise AuthError("join token is not valid")
    return token
