"""Secret records: the unit that the dataset stores, gossip replicates and backups write.

A record is ``(path, version, deleted, meta, ciphertext)``. The value is sealed with the dataset
key by XChaCha20-Poly1305 (random 24-byte nonce, stored in front of the ciphertext); the associated
data binds the path, the version and the metadata, so a record cannot be replayed under another
path, another version, or with other delivery metadata (owner/group/mode)::

    AD = "lab.secret.v1\\0" || msgpack([path, wall_ms, counter, origin, meta])

A tombstone (``deleted``) has no meta and an empty ciphertext.

Paths: ``segment(/segment)*``, segments of ``[A-Za-z0-9_.-]``, at most 256 characters, no ``.``
or ``..`` segments. Two forms are reserved: ``_lab/...`` for the store's own system records (the
signed policy and revocation list), and ``PATH@NODE`` for the per-machine value of ``PATH``.
"""

from __future__ import annotations

import dataclasses
import re
import secrets as _random
from typing import Annotated, Final

import nacl.bindings
import nacl.exceptions

from lab.common import wire
from lab.common.errors import RemoteProtocolError, StoreError
from lab.store.hlc import Version

__all__ = [
    "KEY_LEN", "MAX_VALUE", "MESSAGES", "decode_message_untrusted", "PATH_PATTERN", "SYSTEM_PREFIX", "Meta", "SecretRecord",
    "check_path", "machine_path", "open_value", "seal_value", "split_machine_path",
]

KEY_LEN: Final = 32
NONCE_LEN: Final = 24
TAG_LEN: Final = 16
MAX_VALUE: Final = 1 << 20
SYSTEM_PREFIX: Final = "_lab/"
_SEGMENT: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
PATH_PATTERN: Final = rf"{_SEGMENT}(?:/{_SEGMENT})*(?:@[A-Za-z0-9][A-Za-z0-9._:-]*)?"
_PATH_RE: Final = re.compile(PATH_PATTERN)
_AD_DOMAIN: Final = b"lab.secret.v1\x00"
NODE_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:-]*"

MESSAGES: Final = wire.Registry()
"""The store protocol's message types (gossip between stores, agent sync). A registry of their
own: they are decoded only on store and agent sessions, and their fixed-size digest fields do not
fit the generic message strategies of the shared wire tests (their round trips are tested in
tests/unit/test_gossip.py and test_store_policy.py)."""


def decode_message_untrusted(data: bytes | bytearray | memoryview) -> wire.Message:
    """Decode one store-protocol message; anything wrong → RemoteProtocolError."""
    return MESSAGES.decode_untrusted(data)


_PathStr = Annotated[str, wire.Str(max_len=320, min_len=1, pattern=PATH_PATTERN)]
_Name = Annotated[str, wire.Str(max_len=64, min_len=1)]
_U63 = wire.UInt()


def check_path(path: str) -> str:
    """A valid secret path or StoreError (local use; the wire schema checks remote paths)."""
    if not isinstance(path, str) or len(path) > 320 or not _PATH_RE.fullmatch(path):
        raise StoreError(f"invalid secret path {str(path)[:80]!r}")
    return path


def machine_path(path: str, node: str) -> str:
    """Where the per-machine value of ``path`` for ``node`` is stored: ``path@node``."""
    if "@" in path or not re.fullmatch(NODE_PATTERN, node):
        raise StoreError(f"cannot make a per-machine path of {path!r} for {node!r}")
    return check_path(f"{path}@{node}")


def split_machine_path(stored: str) -> tuple[str, str | None]:
    """``path@node`` → (path, node); a plain path → (path, None)."""
    path, sep, node = stored.partition("@")
    return (path, node) if sep else (path, None)


@wire.record
@dataclasses.dataclass(frozen=True)
class Meta(wire.Record):
    """What is known about a value besides the value: kind, provenance and delivery."""

    type: Annotated[str, wire.Str(max_len=32, min_len=1, pattern=r"[a-z][a-z0-9-]*")]
    set_by: _Name
    set_at: Annotated[int, _U63]  # ms since the epoch
    rotate_every: Annotated[int | None, wire.Optional(_U63)]  # seconds
    ttl: Annotated[int | None, wire.Optional(_U63)]  # seconds
    owner: Annotated[str, wire.Str(max_len=32, min_len=1)]
    group: Annotated[str, wire.Str(max_len=32, min_len=1)]
    mode: Annotated[int, wire.Int(0, 0o7777)]

    @classmethod
    def simple(cls, set_by: str, set_at: int, type: str = "static", **kw: object) -> Meta:
        fields: dict[str, object] = dict(rotate_every=None, ttl=None, owner="root", group="root", mode=0o400)
        fields.update(kw)
        return cls(type=type, set_by=set_by, set_at=set_at, **fields)  # type: ignore[arg-type]


@wire.record
@dataclasses.dataclass(frozen=True)
class SecretRecord(wire.Record):
    """One path's current state. Ordered by :attr:`version`; the highest wins everywhere."""

    path: _PathStr
    wall_ms: Annotated[int, _U63]
    counter: Annotated[int, wire.UInt(2**32 - 1)]
    origin: Annotated[str, wire.Str(max_len=64, min_len=1, pattern=NODE_PATTERN)]
    deleted: Annotated[bool, wire.Bool()]
    meta: Annotated[Meta | None, wire.Optional(wire.Struct(Meta))]
    ciphertext: Annotated[bytes, wire.Bytes(max_len=MAX_VALUE + NONCE_LEN + TAG_LEN)]

    def _check(self) -> None:
        if self.deleted:
            if self.meta is not None or self.ciphertext:
                raise wire.Invalid("a tombstone carries no meta and no ciphertext")
        elif self.meta is None or len(self.ciphertext) < NONCE_LEN + TAG_LEN:
            raise wire.Invalid("a live record needs meta and a ciphertext")

    @property
    def version(self) -> Version:
        return Version(self.wall_ms, self.counter, self.origin)

    @property
    def is_system(self) -> bool:
        return self.path.startswith(SYSTEM_PREFIX)

    def encode(self) -> bytes:
        return wire.packb(self._to_wire())

    @classmethod
    def decode_untrusted(cls, data: bytes | bytearray | memoryview) -> SecretRecord:
        raw = wire.unpackb_untrusted(data, max_size=MAX_VALUE + 4096, max_items=64)
        if not isinstance(raw, dict):
            raise RemoteProtocolError("record must be a map")
        try:
            return cls._from_wire(raw)
        except wire.Invalid as exc:
            raise RemoteProtocolError(f"bad record: {exc}") from exc

    @classmethod
    def tombstone(cls, path: str, version: Version) -> SecretRecord:
        return cls(path, version.wall_ms, version.counter, version.origin, True, None, b"")

    def __repr__(self) -> str:  # never the ciphertext
        kind = "tombstone" if self.deleted else f"{len(self.ciphertext)}B"
        return f"<SecretRecord {self.path} v{self.version} {kind}>"


def _ad(path: str, version: Version, meta: Meta) -> bytes:
    return _AD_DOMAIN + wire.packb([path, version.wall_ms, version.counter, version.origin, meta._to_wire()])


def seal_value(key: bytes | memoryview, path: str, version: Version, meta: Meta, value: bytes | bytearray | memoryview) -> SecretRecord:
    """Encrypt ``value`` for ``path`` at ``version`` into a live record."""
    if len(value) > MAX_VALUE:
        raise StoreError(f"secret value of {len(value)} bytes exceeds {MAX_VALUE}")
    nonce = _random.token_bytes(NONCE_LEN)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(value), _ad(path, version, meta), nonce, bytes(key))
    return SecretRecord(path, version.wall_ms, version.counter, version.origin, False, meta, nonce + ct)


def open_value(key: bytes | memoryview, record: SecretRecord) -> bytes:
    """Decrypt a live record; StoreError if it does not authenticate (tampered, wrong key, moved)."""
    if record.deleted or record.meta is None:
        raise StoreError(f"{record.path} is deleted")
    nonce, ct = record.ciphertext[:NONCE_LEN], record.ciphertext[NONCE_LEN:]
    try:
        out: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ct, _ad(record.path, record.version, record.meta), nonce, bytes(key)
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise StoreError(f"record {record.path} v{record.version} does not authenticate under the dataset key") from exc
    return out
