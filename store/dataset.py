"""The store dataset: every secret record in one LMDB environment, crash-safe by transactions.

Tables (LMDB named databases) in ``<dir>/``:

==========  ============================  =================================================
table       key                           value
==========  ============================  =================================================
records     path (UTF-8)                  msgpack of :class:`SecretRecord` (ciphertext only)
seq         path                          local arrival sequence (u64 BE) of the record held
log         sequence (u64 BE)             path: what changed, in arrival order (serving, GC)
tombs       sequence (u64 BE)             path, for tombstones only (garbage collection)
leaves      bucket (1 byte)               256 × u64 XOR digests of the bucket's leaves
byleaf      leaf (u16 BE), dupsort        paths in that leaf (anti-entropy fetches by leaf)
collected   path                          version of a tombstone collected here (for a while)
acks        peer node id                  highest local sequence that peer is known to hold
meta        name                          replica id, wrapped dataset key, clock, counters
==========  ============================  =================================================

Every change to a record updates all tables in one write transaction, so a crash at any instant
leaves either the state before or the state after it (LMDB's copy-on-write B+tree with
``sync=True``). Nothing else is ever written in place.

**Digest tree** (anti-entropy): a path falls in leaf ``L = BLAKE2b-16bit(path)`` (65,536 leaves)
and bucket ``L >> 8`` (256 buckets). A leaf's digest is the XOR of the 64-bit BLAKE2b digests of
``(path, version, deleted)`` of its records, a bucket's the XOR of its leaves, and the root is
BLAKE2b of the 256 bucket digests. XOR makes each write O(1): the old entry is XORed out, the new
one in. Replicas holding the same records have the same tree.

**Tombstone garbage collection**: peers acknowledge what they hold as a local sequence watermark:
when two stores find equal roots, each records "the peer holds everything I held up to my current
sequence". A tombstone is collected once every store in the membership has acknowledged a
watermark at or above the tombstone's sequence and it is older than a grace period
(:data:`DEFAULT_TOMBSTONE_GRACE_MS`), which bounds how late a delayed push may still arrive.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Final

import lmdb

from lab.common import wire
from lab.common.errors import LocalProtocolError, StoreError
from lab.common.identity import NodeKey
from lab.common.securemem import SecretBuffer
from lab.store import keys
from lab.store.hlc import HLC, MAX_DRIFT_MS, Version
from lab.store.records import Meta, SecretRecord, check_path, open_value, seal_value

__all__ = ["BUCKETS", "DEFAULT_MAP_SIZE", "DEFAULT_TOMBSTONE_GRACE_MS", "LEAVES_PER_BUCKET", "Dataset", "leaf_of"]

DEFAULT_MAP_SIZE: Final = 1 << 30
DEFAULT_TOMBSTONE_GRACE_MS: Final = 3600 * 1000
DEFAULT_COLLECTED_RETENTION_MS: Final = 7 * 24 * 3600 * 1000
BUCKETS: Final = 256
LEAVES_PER_BUCKET: Final = 256
_U64 = struct.Struct(">Q")
_LEAF_KEY = struct.Struct(">H")
_LEAF_ARRAY = struct.Struct(f">{LEAVES_PER_BUCKET}Q")
_BUCKET_ARRAY = struct.Struct(f">{BUCKETS}Q")
_EMPTY_ARRAY: Final = bytes(_LEAF_ARRAY.size)

SystemChecker = Callable[[SecretRecord, bytes], None]


def _pack_version(v: Version) -> bytes:
    return wire.packb([v.wall_ms, v.counter, v.origin])


def _unpack_version(raw: bytes) -> Version:
    wall, counter, origin = wire.unpackb_untrusted(raw, max_size=256, max_items=4)
    return Version(wall, counter, origin)


def leaf_of(path: str) -> int:
    """The digest-tree leaf (0..65535) that ``path`` falls in; its bucket is ``leaf >> 8``."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=2, person=b"lab.leaf.v1").digest(), "big")


def entry_digest(record: SecretRecord) -> int:
    data = wire.packb([record.path, record.wall_ms, record.counter, record.origin, record.deleted])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"lab.ae.v1").digest(), "big")


class _Writer:
    """One write transaction's changes to records, sequence log and digests (flushed on commit)."""

    def __init__(self, ds: Dataset, txn: lmdb.Transaction) -> None:
        self.ds, self.txn = ds, txn
        self.leaves: dict[int, list[int]] = {}
        self.buckets: list[int] | None = None
        raw = txn.get(b"next_seq", db=ds._meta)
        self.next_seq = _U64.unpack(raw)[0] if raw else 1

    def _leaf_array(self, bucket: int) -> list[int]:
        arr = self.leaves.get(bucket)
        if arr is None:
            raw = self.txn.get(bytes([bucket]), db=self.ds._leaves)
            arr = self.leaves[bucket] = list(_LEAF_ARRAY.unpack(raw or _EMPTY_ARRAY))
        return arr

    def _xor(self, record: SecretRecord) -> None:
        leaf = leaf_of(record.path)
        d = entry_digest(record)
        self._leaf_array(leaf >> 8)[leaf & 0xFF] ^= d
        if self.buckets is None:
            raw = self.txn.get(b"buckets", db=self.ds._meta)
            self.buckets = list(_BUCKET_ARRAY.unpack(raw or bytes(_BUCKET_ARRAY.size)))
        self.buckets[leaf >> 8] ^= d

    def put(self, record: SecretRecord, old: SecretRecord | None) -> int:
        key = record.path.encode()
        txn, ds = self.txn, self.ds
        if old is not None:
            self._xor(old)
            old_seq = txn.get(key, db=ds._seq)
            if old_seq is not None:
                txn.delete(old_seq, db=ds._log)
                txn.delete(old_seq, db=ds._tombs)
        else:
            txn.put(_LEAF_KEY.pack(leaf_of(record.path)), key, db=ds._byleaf)
        self._xor(record)
        seq = self.next_seq
        self.next_seq += 1
        sk = _U64.pack(seq)
        txn.put(key, record.encode(), db=ds._records)
        txn.put(key, sk, db=ds._seq)
        txn.put(sk, key, db=ds._log)
        if record.deleted:
            txn.put(sk, key, db=ds._tombs)
        return seq

    def remove(self, record: SecretRecord) -> None:
        key = record.path.encode()
        self._xor(record)
        seq = self.txn.get(key, db=self.ds._seq)
        if seq is not None:
            self.txn.delete(seq, db=self.ds._log)
            self.txn.delete(seq, db=self.ds._tombs)
        self.txn.delete(key, db=self.ds._seq)
        self.txn.delete(key, db=self.ds._records)
        self.txn.delete(_LEAF_KEY.pack(leaf_of(record.path)), key, db=self.ds._byleaf)

    def flush(self) -> None:
        for bucket, arr in self.leaves.items():
            self.txn.put(bytes([bucket]), _LEAF_ARRAY.pack(*arr), db=self.ds._leaves)
        if self.buckets is not None:
            self.txn.put(b"buckets", _BUCKET_ARRAY.pack(*self.buckets), db=self.ds._meta)
        self.txn.put(b"next_seq", _U64.pack(self.next_seq), db=self.ds._meta)
        clock = self.ds.clock.last
        self.txn.put(b"hlc", _U64.pack(clock.wall_ms) + _U64.pack(clock.counter), db=self.ds._meta)


class Dataset:
    """One replica of the secret dataset. Open with :meth:`create`, :meth:`join` or :meth:`open`.

    ``durable=False`` skips fsync at commit (simulations and tests only: a crash may then lose
    the last commits, though never consistency). ``system_checker`` is called with each incoming ``_lab/...`` record and its decrypted value
    before it is merged; raising rejects it (the policy layer verifies CA signatures there).
    """

    def __init__(self, env: lmdb.Environment, node: str, key: SecretBuffer, directory: Path) -> None:
        self.env = env
        self.node = node
        self.directory = directory
        self._key = key
        self._records = env.open_db(b"records")
        self._seq = env.open_db(b"seq")
        self._log = env.open_db(b"log")
        self._tombs = env.open_db(b"tombs")
        self._leaves = env.open_db(b"leaves")
        self._acks = env.open_db(b"acks")
        self._byleaf = env.open_db(b"byleaf", dupsort=True)
        self._collected = env.open_db(b"collected")
        self._meta = env.open_db(b"meta")
        with env.begin() as txn:
            raw = txn.get(b"hlc", db=self._meta)
        last = Version(*_U64.unpack(raw[:8]), *_U64.unpack(raw[8:]), node) if raw else Version(0, 0, node)
        self.clock = HLC(node, last)
        self.system_checker: SystemChecker | None = None
        self.rejected: list[tuple[SecretRecord, str]] = []
        self.listeners: list[Callable[[list[SecretRecord]], None]] = []

    # -- opening -------------------------------------------------------------------------------

    @staticmethod
    def _env(directory: Path, map_size: int, durable: bool) -> lmdb.Environment:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return lmdb.open(str(directory), map_size=map_size, max_dbs=12, mode=0o600, sync=durable, metasync=durable)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store dataset in {directory}: {exc}") from exc

    @classmethod
    def _open(
        cls, directory: str | os.PathLike[str], node: str, key: SecretBuffer | None, machine_key_path: str | os.PathLike[str] | None,
        map_size: int, durable: bool,
    ) -> Dataset:
        directory = Path(directory)
        mk_path = Path(machine_key_path) if machine_key_path is not None else directory / "machine.key"
        env = cls._env(directory, map_size, durable)
        try:
            meta = env.open_db(b"meta")
            with env.begin(write=True) as txn:
                wrapped = txn.get(b"wrapped_key", db=meta)
                if key is None:
                    if wrapped is None:
                        raise StoreError(f"{directory} holds no dataset; create one or join an existing store")
                    rid = txn.get(b"replica_id", db=meta)
                    with keys.load_or_create_machine_key(mk_path, create=False) as mk:
                        key = keys.unwrap(mk, wrapped, rid)
                else:
                    if wrapped is not None:
                        raise StoreError(f"{directory} already holds a dataset; open it instead")
                    rid = secrets.token_bytes(16)
                    with keys.load_or_create_machine_key(mk_path) as mk:
                        txn.put(b"wrapped_key", keys.wrap(mk, key, rid), db=meta)
                    txn.put(b"replica_id", rid, db=meta)
                    txn.put(b"node", node.encode(), db=meta)
        except BaseException:
            env.close()
            if key is not None:
                key.close()
            raise
        return cls(env, node, key, directory)

    @classmethod
    def create(cls, directory: str | os.PathLike[str], node: str, *, machine_key_path: str | os.PathLike[str] | None = None,
               map_size: int = DEFAULT_MAP_SIZE, durable: bool = True) -> Dataset:
        """The first store of a cluster: a fresh dataset key."""
        return cls._open(directory, node, keys.new_dataset_key(), machine_key_path, map_size, durable)

    @classmethod
    def join(cls, directory: str | os.PathLike[str], node: str, sealed_key: bytes, node_key: NodeKey, *,
             machine_key_path: str | os.PathLike[str] | None = None, map_size: int = DEFAULT_MAP_SIZE, durable: bool = True) -> Dataset:
        """A new store: the dataset key sealed to this node by an existing store (:meth:`seal_key_for`)."""
        return cls._open(directory, node, keys.open_sealed(sealed_key, node_key), machine_key_path, map_size, durable)

    @classmethod
    def with_key(cls, directory: str | os.PathLike[str], node: str, key: SecretBuffer, *,
                 machine_key_path: str | os.PathLike[str] | None = None, map_size: int = DEFAULT_MAP_SIZE, durable: bool = True) -> Dataset:
        """A new replica holding a known key (recovery from backup). Takes ownership of ``key``."""
        return cls._open(directory, node, key, machine_key_path, map_size, durable)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], node: str, *, machine_key_path: str | os.PathLike[str] | None = None,
             map_size: int = DEFAULT_MAP_SIZE, durable: bool = True) -> Dataset:
        """An existing replica: the key is unwrapped with the machine key."""
        return cls._open(directory, node, None, machine_key_path, map_size, durable)

    def seal_key_for(self, recipient_public_key: bytes) -> bytes:
        return keys.seal_for(self._key, recipient_public_key)

    def export_key(self) -> SecretBuffer:
        """A copy of the dataset key (backup); close it after use."""
        with self._key.view() as k:
            return SecretBuffer.from_bytes(k)

    def close(self) -> None:
        self.env.close()
        self._key.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------

    def get(self, path: str) -> SecretRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(path.encode(), db=self._records)
        return None if raw is None else self._decode(raw)

    @staticmethod
    def _decode(raw: bytes) -> SecretRecord:
        try:
            return SecretRecord.decode_untrusted(raw)
        except Exception as exc:  # our own disk: anything wrong here is damage, not a peer's fault
            raise StoreError(f"damaged record in the store dataset: {exc}") from exc

    def reveal(self, record: SecretRecord) -> bytes:
        """The plaintext of a live record (StoreError if it does not authenticate)."""
        with self._key.view() as k:
            return open_value(k, record)

    def value(self, path: str) -> bytes | None:
        rec = self.get(path)
        return None if rec is None or rec.deleted else self.reveal(rec)

    def records(self, *, include_deleted: bool = False, after: str | None = None) -> Iterator[SecretRecord]:
        """Records in path order (UTF-8 byte order); ``after``: only paths above it (paging)."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._records)
            if after is not None:
                start = after.encode()
                if not cursor.set_range(start):
                    return
                if cursor.key() == start and not cursor.next():
                    return
            for _, raw in cursor.iternext() if after is not None else cursor:
                rec = self._decode(raw)
                if include_deleted or not rec.deleted:
                    yield rec

    def versions(self) -> dict[str, Version]:
        return {r.path: r.version for r in self.records(include_deleted=True)}

    def __len__(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self._records)["entries"])

    @property
    def seq(self) -> int:
        """The highest local arrival sequence handed out so far."""
        with self.env.begin() as txn:
            raw = txn.get(b"next_seq", db=self._meta)
        return (_U64.unpack(raw)[0] if raw else 1) - 1

    def changes_since(self, seq: int, limit: int = 1000) -> list[tuple[int, SecretRecord]]:
        """Records that arrived after local sequence ``seq``, oldest first."""
        out: list[tuple[int, SecretRecord]] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._log)
            if not cur.set_range(_U64.pack(seq + 1)):
                return out
            for k, path in cur:
                raw = txn.get(path, db=self._records)
                if raw is not None:
                    out.append((_U64.unpack(k)[0], self._decode(raw)))
                if len(out) >= limit:
                    break
        return out

    # -- digest tree -------------------------------------------------------------------------------

    def bucket_digests(self) -> bytes:
        with self.env.begin() as txn:
            return txn.get(b"buckets", db=self._meta) or bytes(_BUCKET_ARRAY.size)

    def root(self) -> bytes:
        return self.root_and_seq()[0]

    def buckets_and_seq(self) -> tuple[bytes, int]:
        """The 256 bucket digests and the local sequence they cover, read in one transaction."""
        with self.env.begin() as txn:
            buckets = txn.get(b"buckets", db=self._meta) or bytes(_BUCKET_ARRAY.size)
            raw = txn.get(b"next_seq", db=self._meta)
        return buckets, (_U64.unpack(raw)[0] if raw else 1) - 1

    def root_and_seq(self) -> tuple[bytes, int]:
        """The digest root and the local sequence it covers, read in one transaction."""
        with self.env.begin() as txn:
            buckets = txn.get(b"buckets", db=self._meta) or bytes(_BUCKET_ARRAY.size)
            raw = txn.get(b"next_seq", db=self._meta)
        seq = (_U64.unpack(raw)[0] if raw else 1) - 1
        return hashlib.blake2b(buckets, digest_size=16, person=b"lab.aeroot.v1").digest(), seq

    def leaf_digests(self, bucket: int) -> bytes:
        with self.env.begin() as txn:
            return txn.get(bytes([bucket]), db=self._leaves) or _EMPTY_ARRAY

    def records_in_leaves(self, leaves: Iterable[int]) -> list[SecretRecord]:
        """Every record (tombstones included) whose path falls in one of ``leaves`` (via the
        ``byleaf`` index: leaf → paths, an LMDB dupsort table)."""
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._byleaf)
            for leaf in sorted(set(leaves)):
                if cur.set_key(_LEAF_KEY.pack(leaf)):
                    for path in cur.iternext_dup():
                        raw = txn.get(path, db=self._records)
                        if raw is not None:
                            out.append(self._decode(raw))
        return out

    # -- writing -------------------------------------------------------------------------------------

    def _commit(self, fn: Callable[[_Writer, lmdb.Transaction], list[SecretRecord]]) -> list[SecretRecord]:
        try:
            with self.env.begin(write=True) as txn:
                w = _Writer(self, txn)
                changed = fn(w, txn)
                w.flush()
        except lmdb.Error as exc:
            raise StoreError(f"store dataset write failed: {exc}") from exc
        if changed:
            for listener in list(self.listeners):
                listener(changed)
        return changed

    def _old(self, txn: lmdb.Transaction, path: str) -> SecretRecord | None:
        raw = txn.get(path.encode(), db=self._records)
        return None if raw is None else self._decode(raw)

    def write(self, path: str, value: bytes | bytearray | memoryview, meta: Meta, now_ms: int) -> SecretRecord:
        """A local write: a new version above everything this replica has seen. A system record
        (``_lab/...``) must pass :attr:`system_checker` first, as it would when merged."""
        check_path(path)

        def do(w: _Writer, txn: lmdb.Transaction) -> list[SecretRecord]:
            old = self._old(txn, path)
            if old is not None:  # the new version must beat the one it replaces, whatever our clock says
                self.clock.witness(old.version)
            version = self.clock.tick(now_ms)
            with self._key.view() as k:
                rec = seal_value(k, path, version, meta, value)
            if rec.is_system and self.system_checker is not None:
                self.system_checker(rec, bytes(value))
            w.put(rec, old)
            return [rec]

        return self._commit(do)[0]

    def delete(self, path: str, now_ms: int) -> SecretRecord | None:
        """A local delete: a tombstone (None when there is nothing live to delete)."""
        check_path(path)

        def do(w: _Writer, txn: lmdb.Transaction) -> list[SecretRecord]:
            old = self._old(txn, path)
            if old is None or old.deleted:
                return []
            self.clock.witness(old.version)
            rec = SecretRecord.tombstone(path, self.clock.tick(now_ms))
            w.put(rec, old)
            return [rec]

        out = self._commit(do)
        return out[0] if out else None

    def _acceptable(self, rec: SecretRecord, now_ms: int | None) -> None:
        """Refuse what must not be merged (StoreError): a value that does not authenticate under
        our key, a system record the checker rejects, a version from too far in the future."""
        if now_ms is not None and rec.wall_ms > now_ms + MAX_DRIFT_MS:
            raise StoreError(f"record {rec.path} has a version {rec.version} far ahead of our clock")
        if rec.deleted:
            return
        value = self.reveal(rec)
        if rec.is_system and self.system_checker is not None:
            self.system_checker(rec, value)

    def merge(self, records: Iterable[SecretRecord], now_ms: int | None = None) -> list[SecretRecord]:
        """Merge records from a peer (or a backup): keep the highest version of each path.

        Returns the records that changed this replica. A record that fails :meth:`_acceptable`
        is skipped (the others still merge) and reported in :attr:`rejected` of the last call."""
        records = list(records)
        self.rejected = []
        ok: list[SecretRecord] = []
        for rec in records:
            try:
                self._acceptable(rec, now_ms)
            except (StoreError, LocalProtocolError) as exc:
                self.rejected.append((rec, str(exc)))
            except Exception as exc:  # a checker's AuthError, ProtocolError...
                self.rejected.append((rec, str(exc)))
            else:
                ok.append(rec)

        def do(w: _Writer, txn: lmdb.Transaction) -> list[SecretRecord]:
            changed = []
            for rec in ok:
                old = self._old(txn, rec.path)
                if old is not None and old.version >= rec.version:
                    continue
                if old is None:
                    gone = txn.get(rec.path.encode(), db=self._collected)
                    if gone is not None and rec.version <= _unpack_version(gone):
                        continue  # deleted and collected here: neither the tombstone nor an older value returns
                    if gone is not None:
                        txn.delete(rec.path.encode(), db=self._collected)
                w.put(rec, old)
                self.clock.witness(rec.version)  # drift was checked in _acceptable
                changed.append(rec)
            return changed

        return self._commit(do) if ok else []

    # -- acknowledgements and garbage collection ---------------------------------------------------

    def record_ack(self, peer: str, seq: int) -> None:
        """``peer`` holds everything this replica held up to local sequence ``seq``."""
        try:
            with self.env.begin(write=True) as txn:
                raw = txn.get(peer.encode(), db=self._acks)
                if raw is None or _U64.unpack(raw)[0] < seq:
                    txn.put(peer.encode(), _U64.pack(seq), db=self._acks)
        except lmdb.Error as exc:
            raise StoreError(f"store dataset write failed: {exc}") from exc

    def acks(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {k.decode(): _U64.unpack(v)[0] for k, v in txn.cursor(db=self._acks)}

    def tombstones(self) -> list[tuple[int, str]]:
        with self.env.begin() as txn:
            return [(_U64.unpack(k)[0], v.decode()) for k, v in txn.cursor(db=self._tombs)]

    def collect_garbage(self, peers: Iterable[str], now_ms: int, grace_ms: int = DEFAULT_TOMBSTONE_GRACE_MS,
                        collected_retention_ms: int = DEFAULT_COLLECTED_RETENTION_MS) -> int:
        """Drop tombstones every peer has acknowledged and that are older than ``grace_ms``.

        A collected tombstone's version is remembered (``collected``) for
        ``collected_retention_ms``: the same tombstone, or an older value, arriving from a store
        that has not collected it yet is ignored instead of re-admitted (no ping-pong between
        stores that collect at different times, no resurrection by a late push)."""
        acks = self.acks()
        peers = [p for p in peers if p != self.node]
        floor = min((acks.get(p, 0) for p in peers), default=self.seq)

        def do(w: _Writer, txn: lmdb.Transaction) -> list[SecretRecord]:
            gone = []
            for k, path in list(txn.cursor(db=self._tombs)):
                if _U64.unpack(k)[0] > floor:
                    break
                rec = self._old(txn, path.decode())
                if rec is not None and rec.deleted and now_ms - rec.wall_ms >= grace_ms:
                    w.remove(rec)
                    txn.put(path, _pack_version(rec.version), db=self._collected)
                    gone.append(rec)
            for path, raw in list(txn.cursor(db=self._collected)):  # forget collected ones after a while
                if now_ms - _unpack_version(raw).wall_ms > collected_retention_ms:
                    txn.delete(path, db=self._collected)
            return gone

        before = list(self.listeners)
        self.listeners = []  # collecting a tombstone changes nothing anyone is served
        try:
            return len(self._commit(do))
        finally:
            self.listeners = before
