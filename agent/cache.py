"""The agent's encrypted secret cache: LMDB, values re-encrypted under a machine cache key.

Layout under the agent home (``/var/lib/lab``)::

    cache/          LMDB environment, directory 0700, data.mdb/lock.mdb 0600
    cache.key       the 32-byte cache key, base64, 0600        (key_protection: file)
    cache.key.tpm   or: the key sealed by the TPM, 0600         (key_protection: tpm)

Each LMDB value is a msgpack map ``{v, path, version, type, ttl, expires_at, owner, group, mode,
fetched_at, nonce, ct}``: metadata in clear (``list()`` never decrypts), the secret value as
XChaCha20-Poly1305 ciphertext. The associated data binds the path, the version and the delivery
metadata, so a record cannot be moved to another path, replayed as another version, or given
another owner/mode without the decryption failing::

    AD = "lab.agent.cache.v1\\0" || msgpack([path, version, type, owner, group, mode, ttl, expires_at])

The key lives in a :class:`~lab.common.securemem.SecretBuffer` (mlock'd, MADV_DONTDUMP).

Freshness (``get`` returns it with the value; a stale or expired value is still served — delivery
never turns a missing source into an empty secret):

* ``fresh``   — confirmed by a store (fetched, or a sync said "still current") within ``stale_after``;
* ``stale``   — not confirmed for longer than that (stores unreachable);
* ``expired`` — past the record's own expiry (``expires_at``, or ``fetched_at + ttl``): served anyway.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import os
import re
import secrets as _random
import shutil
import stat
import time
from pathlib import Path
from typing import Any, Final

import lmdb
import msgpack
import nacl.bindings
import nacl.exceptions

from lab.agent import _tpm
from lab.common import wire
from lab.common.errors import ConfigError, RemoteProtocolError, StoreError
from lab.common.identity import read_private_file, write_private_file
from lab.common.securemem import SecretBuffer

__all__ = [
    "DEFAULT_STALE_AFTER", "KEY_LEN", "CacheKey", "CacheRecord", "Freshness", "SecretCache", "Version",
    "check_path", "load_or_create_key", "records_from_import", "wipe",
]

KEY_LEN: Final = 32
NONCE_LEN: Final = 24
MAX_VALUE: Final = 1 << 20
DEFAULT_STALE_AFTER: Final = 300.0
DEFAULT_MAP_SIZE: Final = 256 * 1024 * 1024
CACHE_DIR: Final = "cache"
KEY_FILE: Final = "cache.key"
TPM_KEY_FILE: Final = "cache.key.tpm"
_KEY_HEADER: Final = b"lab-cache-key"
_AD_DOMAIN: Final = b"lab.agent.cache.v1\x00"
_FORMAT: Final = 1
_META_LAST_SYNC: Final = b"last_sync"
_SEGMENT: Final = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
PATH_PATTERN: Final = rf"{_SEGMENT}(?:/{_SEGMENT})*"
_PATH_RE: Final = re.compile(PATH_PATTERN)

Version = tuple[int, int, str] | bytes
"""A store version: the HLC ``(wall_ms, counter, origin)``, or opaque bytes."""


def check_path(path: object) -> str:
    """A deliverable secret path (``seg/seg``, no ``.``/``..``, ≤ 256 chars) or StoreError."""
    if not isinstance(path, str) or len(path) > 256 or not _PATH_RE.fullmatch(path):
        raise StoreError(f"invalid secret path {str(path)[:80]!r}")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise StoreError(f"invalid secret path {path[:80]!r}")
    return path


def _check_version(v: object) -> Version:
    if isinstance(v, bytes) and 0 < len(v) <= 256:
        return v
    if isinstance(v, (tuple, list)) and len(v) == 3:
        wall, counter, origin = v
        if (
            isinstance(wall, int) and not isinstance(wall, bool) and wall >= 0
            and isinstance(counter, int) and not isinstance(counter, bool) and counter >= 0
            and isinstance(origin, str) and len(origin) <= 128
        ):
            return (wall, counter, origin)
    raise StoreError(f"invalid version {str(v)[:80]}")


class Freshness(str, enum.Enum):
    FRESH = "fresh"
    STALE = "stale"
    EXPIRED = "expired"


@dataclasses.dataclass(frozen=True)
class CacheRecord:
    """One cached secret. ``repr`` never shows the value."""

    path: str
    value: bytes = dataclasses.field(repr=False)
    version: Version
    type: str = "static"
    ttl: int | None = None
    expires_at: float | None = None
    owner: str = "root"
    group: str = "root"
    mode: int = 0o400
    fetched_at: float = 0.0

    def __post_init__(self) -> None:
        check_path(self.path)
        object.__setattr__(self, "version", _check_version(self.version))
        if not isinstance(self.value, bytes) or len(self.value) > MAX_VALUE:
            raise StoreError(f"{self.path}: value must be bytes of at most {MAX_VALUE}")
        for name in ("type", "owner", "group"):
            v = getattr(self, name)
            if not isinstance(v, str) or not 0 < len(v) <= 64:
                raise StoreError(f"{self.path}: invalid {name} {str(v)[:40]!r}")
        if not isinstance(self.mode, int) or isinstance(self.mode, bool) or not 0 <= self.mode <= 0o777:
            raise StoreError(f"{self.path}: mode must be 0..0o777")
        if self.ttl is not None and (not isinstance(self.ttl, int) or isinstance(self.ttl, bool) or self.ttl <= 0):
            raise StoreError(f"{self.path}: ttl must be a positive number of seconds")

    @property
    def expiry(self) -> float | None:
        """When the value itself expires (explicit expiry, else fetched_at + ttl), or None."""
        if self.expires_at is not None:
            return self.expires_at
        return self.fetched_at + self.ttl if self.ttl is not None else None

    def meta(self) -> dict[str, Any]:
        return {
            "path": self.path, "version": _version_text(self.version), "type": self.type, "ttl": self.ttl,
            "expires_at": self.expiry, "owner": self.owner, "group": self.group, "mode": self.mode,
            "fetched_at": self.fetched_at,
        }


def _version_text(v: Version) -> str:
    return v.hex() if isinstance(v, bytes) else f"{v[0]}.{v[1]}.{v[2]}"


def _ad(path: str, version: Version, type_: str, owner: str, group: str, mode: int, ttl: int | None, expires_at: float | None) -> bytes:
    ver = version if isinstance(version, bytes) else list(version)
    return _AD_DOMAIN + wire.packb([path, ver, type_, owner, group, mode, ttl, expires_at])


# ---------------------------------------------------------------------------------------------
# The cache key


@dataclasses.dataclass
class CacheKey:
    """The machine cache key in locked memory, and how it is protected on disk."""

    buffer: SecretBuffer
    protection: str  # "tpm" | "file"

    def close(self) -> None:
        self.buffer.close()


def _key_file_bytes(key: bytes | memoryview) -> bytearray:
    return bytearray(_KEY_HEADER + b" " + base64.b64encode(key) + b"\n")


def _parse_key_file(raw: bytearray, path: Path) -> SecretBuffer:
    head, sep, body = bytes(raw).strip().partition(b" ")
    if head != _KEY_HEADER or not sep:
        raise ConfigError("not a lab cache key file", file=str(path))
    try:
        key = bytearray(base64.b64decode(body, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("cache key file is not valid base64", file=str(path)) from exc
    if len(key) != KEY_LEN:
        raise ConfigError(f"cache key must be {KEY_LEN} bytes", file=str(path))
    return SecretBuffer.from_bytes(key, wipe_source=True)


def load_or_create_key(home: Path, *, protection: str = "auto", tpm_runner: _tpm.Runner | None = None) -> CacheKey:
    """Load the cache key from ``home`` or make one.

    ``protection``: ``auto`` (TPM if one is usable, else file), ``tpm`` or ``file`` — only for a
    new key; an existing key keeps the protection it was created with. A TPM-sealed key that the
    TPM cannot unseal is an error (never silently replaced: that would orphan the cache).
    """
    if protection not in ("auto", "tpm", "file"):
        raise ConfigError(f"key protection must be auto, tpm or file, not {protection!r}")
    run = tpm_runner or _tpm._run
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    tpm_path, file_path = home / TPM_KEY_FILE, home / KEY_FILE
    if tpm_path.exists():
        raw = read_private_file(tpm_path, max_size=2 * _tpm.MAX_PART + 64)
        key = _tpm.unseal(bytes(raw), home, run)
        if len(key) != KEY_LEN:
            raise _tpm.TpmError("unsealed cache key has the wrong length")
        return CacheKey(SecretBuffer.from_bytes(key, wipe_source=True), "tpm")
    if file_path.exists():
        raw = read_private_file(file_path, max_size=256)
        try:
            return CacheKey(_parse_key_file(raw, file_path), "file")
        finally:
            raw[:] = bytes(len(raw))
    use_tpm = protection == "tpm" or (protection == "auto" and _tpm.available())
    key = bytearray(_random.token_bytes(KEY_LEN))
    try:
        if use_tpm:
            write_private_file(tpm_path, _tpm.seal(bytes(key), home, run))
            return CacheKey(SecretBuffer.from_bytes(key), "tpm")
        line = _key_file_bytes(key)
        try:
            write_private_file(file_path, line)
        finally:
            line[:] = bytes(len(line))
        return CacheKey(SecretBuffer.from_bytes(key), "file")
    finally:
        key[:] = bytes(len(key))


# ---------------------------------------------------------------------------------------------
# The cache


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("cache path is not a directory", file=str(path))
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


class SecretCache:
    """The LMDB cache. Not thread-safe; one per process (LMDB allows other processes)."""

    def __init__(self, home: Path, key: CacheKey, *, stale_after: float = DEFAULT_STALE_AFTER, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.home = Path(home)
        self.dir = self.home / CACHE_DIR
        self.key = key
        self.stale_after = stale_after
        _ensure_private_dir(self.dir)
        old = os.umask(0o077)
        try:
            self._env = lmdb.open(str(self.dir), map_size=map_size, max_dbs=2, mode=0o600, subdir=True, lock=True)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open cache {self.dir}: {exc}") from exc
        finally:
            os.umask(old)
        self._db = self._env.open_db(b"secrets")
        self._meta = self._env.open_db(b"meta")

    @classmethod
    def open(cls, home: Path, *, protection: str = "auto", stale_after: float = DEFAULT_STALE_AFTER) -> SecretCache:
        key = load_or_create_key(Path(home), protection=protection)
        try:
            return cls(Path(home), key, stale_after=stale_after)
        except BaseException:
            key.close()
            raise

    @property
    def key_protection(self) -> str:
        return self.key.protection

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None  # type: ignore[assignment]
        self.key.close()

    def __enter__(self) -> SecretCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------------

    def put(self, record: CacheRecord) -> None:
        """Store (or replace) a record, encrypting its value under the cache key."""
        nonce = _random.token_bytes(NONCE_LEN)
        ad = _ad(record.path, record.version, record.type, record.owner, record.group, record.mode, record.ttl, record.expires_at)
        with self.key.buffer.view() as k:
            ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(record.value, ad, nonce, bytes(k))
        doc = {
            "v": _FORMAT, "path": record.path,
            "version": record.version if isinstance(record.version, bytes) else list(record.version),
            "type": record.type, "ttl": record.ttl, "expires_at": record.expires_at, "owner": record.owner,
            "group": record.group, "mode": record.mode, "fetched_at": float(record.fetched_at), "nonce": nonce, "ct": ct,
        }
        try:
            with self._env.begin(write=True, db=self._db) as txn:
                txn.put(record.path.encode(), wire.packb(doc))
        except lmdb.Error as exc:
            raise StoreError(f"cache write failed: {exc}") from exc

    def remove(self, path: str) -> bool:
        """Drop a path; True if it was there."""
        try:
            with self._env.begin(write=True, db=self._db) as txn:
                return bool(txn.delete(check_path(path).encode()))
        except lmdb.Error as exc:
            raise StoreError(f"cache write failed: {exc}") from exc

    def mark_synced(self, now: float | None = None) -> None:
        """A store confirmed that everything held is current (called by the sync component)."""
        stamp = wire.packb(float(time.time() if now is None else now))
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(_META_LAST_SYNC, stamp)

    def last_sync(self) -> float | None:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_META_LAST_SYNC)
        if raw is None:
            return None
        v = msgpack.unpackb(raw)
        return float(v) if isinstance(v, (int, float)) else None

    # -- reads ---------------------------------------------------------------------------------

    def _raw(self, path: str) -> bytes | None:
        with self._env.begin(db=self._db) as txn:
            return txn.get(path.encode())

    @staticmethod
    def _decode(path: str, raw: bytes) -> dict[str, Any]:
        try:
            doc = wire.unpackb_untrusted(raw, max_size=MAX_VALUE + 4096, max_items=64)
        except RemoteProtocolError as exc:
            raise StoreError(f"cache entry {path} is corrupt: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("v") != _FORMAT or doc.get("path") != path:
            raise StoreError(f"cache entry {path} is corrupt (bad format or moved)")
        return doc

    def _record(self, path: str, doc: dict[str, Any], value: bytes) -> CacheRecord:
        ver = doc.get("version")
        try:
            return CacheRecord(
                path=path, value=value, version=ver if isinstance(ver, bytes) else tuple(ver or ()),  # type: ignore[arg-type]
                type=doc.get("type"), ttl=doc.get("ttl"), expires_at=doc.get("expires_at"),  # type: ignore[arg-type]
                owner=doc.get("owner"), group=doc.get("group"), mode=doc.get("mode"),  # type: ignore[arg-type]
                fetched_at=float(doc.get("fetched_at") or 0.0),
            )
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cache entry {path} is corrupt: {exc}") from exc

    def _open(self, path: str, doc: dict[str, Any]) -> bytes:
        nonce, ct, ver = doc.get("nonce"), doc.get("ct"), doc.get("version")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN or not isinstance(ct, bytes):
            raise StoreError(f"cache entry {path} is corrupt (nonce/ciphertext)")
        try:
            version = _check_version(ver)
            ad = _ad(path, version, doc.get("type"), doc.get("owner"), doc.get("group"), doc.get("mode"), doc.get("ttl"), doc.get("expires_at"))  # type: ignore[arg-type]
            with self.key.buffer.view() as k:
                out: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ct, ad, nonce, bytes(k))
        except (nacl.exceptions.CryptoError, ValueError, TypeError, StoreError) as exc:
            raise StoreError(f"cache entry {path} does not authenticate under the cache key (tampered?)") from exc
        return out

    def freshness(self, record: CacheRecord, now: float | None = None, last_sync: float | None = None) -> tuple[Freshness, float]:
        """(status, confirmed_at): expired beats stale beats fresh."""
        now = time.time() if now is None else now
        confirmed = max(record.fetched_at, last_sync or 0.0)
        exp = record.expiry
        if exp is not None and now >= exp:
            return Freshness.EXPIRED, confirmed
        if now - confirmed > self.stale_after:
            return Freshness.STALE, confirmed
        return Freshness.FRESH, confirmed

    def get_record(self, path: str) -> CacheRecord | None:
        """The full record (value decrypted), or None if absent. StoreError if tampered."""
        raw = self._raw(check_path(path))
        if raw is None:
            return None
        doc = self._decode(path, raw)
        return self._record(path, doc, self._open(path, doc))

    def get(self, path: str, now: float | None = None) -> tuple[bytes, Freshness] | None:
        """(value, fresh|stale|expired) or None when the path is not cached. Stale/expired still serve."""
        rec = self.get_record(path)
        if rec is None:
            return None
        status, _ = self.freshness(rec, now, self.last_sync())
        return rec.value, status

    def list(self, now: float | None = None) -> list[dict[str, Any]]:
        """Metadata of every entry (no values, nothing decrypted), with its status, sorted by path."""
        last = self.last_sync()
        out: list[dict[str, Any]] = []
        with self._env.begin(db=self._db) as txn:
            items = list(txn.cursor())
        for k, raw in items:
            path = k.decode("utf-8", "replace")
            try:
                doc = self._decode(path, raw)
                rec = self._record(path, doc, b"")
            except StoreError:
                out.append({"path": path, "status": "corrupt"})
                continue
            status, confirmed = self.freshness(rec, now, last)
            meta = rec.meta()
            meta.update(status=status.value, confirmed_at=confirmed)
            out.append(meta)
        return out

    def records(self) -> list[CacheRecord]:
        """Every decryptable record (for delivery to /run/secrets); corrupt entries are skipped."""
        out = []
        for meta in self.list():
            try:
                rec = self.get_record(meta["path"])
            except StoreError:
                continue
            if rec is not None:
                out.append(rec)
        return out

    def paths(self) -> list[str]:
        with self._env.begin(db=self._db) as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def wipe(self) -> None:
        """Close and destroy the cache and its key (for `lab identity revoke`)."""
        home = self.home
        self.close()
        wipe(home)


def _shred(path: Path) -> None:
    try:
        size = path.stat().st_size
        with open(path, "r+b", buffering=0) as f:
            f.write(bytes(size))
            os.fsync(f.fileno())
    except OSError:
        pass
    path.unlink(missing_ok=True)


def wipe(home: Path) -> None:
    """Remove the cache directory and the cache key (overwritten first) from an agent home."""
    home = Path(home)
    for name in (KEY_FILE, TPM_KEY_FILE):
        if (home / name).exists():
            _shred(home / name)
    cache = home / CACHE_DIR
    if cache.exists():
        for f in cache.iterdir():
            if f.is_file():
                _shred(f)
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Seeding (test / bootstrap aid: `lab-agent cache import --from FILE.yaml`)

_IMPORT_KEYS: Final = frozenset({"path", "value", "value_file", "version", "type", "ttl", "expires_at", "owner", "group", "mode", "fetched_at"})


def records_from_import(doc: object, now: float, *, base_dir: Path | None = None) -> list[CacheRecord]:
    """Parse ``{secrets: [{path, value | value_file, version?, type?, ttl?, owner?, group?, mode?, fetched_at?}]}``.

    ``version`` is ``[wall_ms, counter, origin]`` (default ``[now_ms, 0, "import"]``); ``ttl`` is
    seconds or a duration (``90d``); ``mode`` an int or an octal string (``"0440"``).
    """
    from lab.common.config import parse_duration

    if not isinstance(doc, dict) or set(doc) != {"secrets"} or not isinstance(doc["secrets"], list):
        raise ConfigError("cache import file must be a map with one key, 'secrets', holding a list")
    out: list[CacheRecord] = []
    for i, item in enumerate(doc["secrets"]):
        where = f"secrets[{i}]"
        if not isinstance(item, dict) or not set(item) <= _IMPORT_KEYS or "path" not in item:
            raise ConfigError(f"{where}: needs 'path' and only {sorted(_IMPORT_KEYS)}")
        if ("value" in item) == ("value_file" in item):
            raise ConfigError(f"{where}: give exactly one of 'value' and 'value_file'")
        if "value" in item:
            v = item["value"]
            value = v.encode() if isinstance(v, str) else v
            if not isinstance(value, bytes):
                raise ConfigError(f"{where}: value must be a string or !!binary")
        else:
            f = Path(str(item["value_file"]))
            value = ((base_dir / f) if base_dir and not f.is_absolute() else f).read_bytes()
        ver = item.get("version", [int(now * 1000), 0, "import"])
        ttl = item.get("ttl")
        if isinstance(ttl, str):
            try:
                ttl = parse_duration(ttl)
            except ValueError as exc:
                raise ConfigError(f"{where}: bad ttl {ttl!r}") from exc
        mode = item.get("mode", 0o400)
        if isinstance(mode, str):
            try:
                mode = int(mode, 8)
            except ValueError as exc:
                raise ConfigError(f"{where}: bad mode {mode!r}") from exc
        try:
            out.append(CacheRecord(
                path=item["path"], value=value, version=ver if isinstance(ver, bytes) else tuple(ver),
                type=item.get("type", "static"), ttl=ttl, expires_at=item.get("expires_at"),
                owner=str(item.get("owner", "root")), group=str(item.get("group", "root")), mode=mode,
                fetched_at=float(item.get("fetched_at", now)),
            ))
        except (StoreError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return out
