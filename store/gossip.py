"""Replication between stores, sans-IO: messages in, messages out; no sockets, no clock reads.

Two mechanisms, both carrying ciphertext only:

* **Eager push**: every local write is sent at once to every member store (:meth:`Gossip.local_write`
  returns one :class:`Push` per peer). Receivers merge; nothing is forwarded, anti-entropy
  repairs what a push missed.
* **Anti-entropy** with one random peer per round (:meth:`Gossip.start_round`), over the digest
  tree of :mod:`lab.store.dataset` (root → 256 buckets → 256 leaves per bucket)::

      A → B  AERoot(root, seq)            B: equal? → AEEqual(seq)  (both record an ack watermark)
      B → A  AEBuckets(256 × u64, seq_B)  A: which buckets differ
      A → B  AELeaves(buckets, A's leaf digests of each, seq_A, seq_B)
      B → A  AEDiff(leaves that differ, B's records in them, complete)   A merges what is newer
      A → B  AERecords(A's records in those leaves that B lacks or holds older, holds_yours=seq_B)
      B → A  AEDone(holds_yours=seq_A)                                    B merged them

  Acknowledgements (the watermarks tombstone GC waits for) come from every complete exchange,
  not only from equal roots, so GC keeps up while writes continue: ``seq_X`` is read in the same
  transaction as the bucket digests X compares, so "the peer now holds everything I held up to
  ``seq_X``" holds for equal buckets, equal leaves and exchanged leaves alike. A truncated diff
  (``complete`` false) or a rejected record acknowledges nothing.

  Bytes on the wire grow with the number of differing records, not with the dataset: a bucket
  costs 2 KiB of leaf digests and a leaf holds ~1.5 records at 100,000 secrets.

The responder keeps no state between messages: every message carries what the next step needs,
so exchanges may interleave, and a lost message just ends that round.

**Membership** is the policy's ``stores`` (nodes with the ``secret-store`` label); before any
policy is held, the ``seeds`` given at start. Messages from anyone else are refused (NotEntitled).
Convergence never involves the coordinator: the policy itself is one of the replicated records.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Iterable
from typing import Annotated, Final

from lab.common import wire
from lab.common.errors import LocalProtocolError, NotEntitled, RemoteProtocolError
from lab.store.dataset import BUCKETS, DEFAULT_TOMBSTONE_GRACE_MS, LEAVES_PER_BUCKET, Dataset, leaf_of
from lab.store.policy import Enforcer
from lab.store.records import MESSAGES, SecretRecord

__all__ = ["AEBuckets", "AEDiff", "AEDone", "AEEqual", "AELeaves", "AERecords", "AERoot", "Gossip", "Outgoing", "Push"]

MAX_RECORDS_PER_MESSAGE: Final = 4096
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024  # half the wire's 16 MiB message cap
_DIGESTS = struct.Struct(f">{LEAVES_PER_BUCKET}Q")
_ARRAY_LEN: Final = _DIGESTS.size  # 2 KiB: 256 × u64, both for buckets and for one bucket's leaves
_Records = Annotated[tuple[SecretRecord, ...], wire.List(wire.Struct(SecretRecord), max_items=MAX_RECORDS_PER_MESSAGE)]
_Seq = Annotated[int, wire.UInt()]


@wire.message("store.gossip.push", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class Push(wire.Message):
    records: _Records


@wire.message("store.ae.root", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AERoot(wire.Message):
    root: Annotated[bytes, wire.Bytes(min_len=16, max_len=16)]
    seq: _Seq  # the initiator's local sequence the root covers


@wire.message("store.ae.equal", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AEEqual(wire.Message):
    seq: _Seq  # echoed from AERoot


@wire.message("store.ae.buckets", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AEBuckets(wire.Message):
    digests: Annotated[bytes, wire.Bytes(min_len=_ARRAY_LEN, max_len=_ARRAY_LEN)]
    responder_seq: _Seq  # the responder's sequence these digests cover


@wire.message("store.ae.leaves", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AELeaves(wire.Message):
    buckets: Annotated[tuple[int, ...], wire.List(wire.Int(0, BUCKETS - 1), max_items=BUCKETS, unique=True)]
    digests: Annotated[bytes, wire.Bytes(max_len=BUCKETS * _ARRAY_LEN)]
    initiator_seq: _Seq  # the initiator's sequence its bucket comparison covered
    responder_seq: _Seq  # echoed

    def _check(self) -> None:
        if len(self.digests) != len(self.buckets) * _ARRAY_LEN:
            raise wire.Invalid("one 2 KiB leaf digest array per bucket")


_Leaves = Annotated[tuple[int, ...], wire.List(wire.Int(0, BUCKETS * LEAVES_PER_BUCKET - 1), max_items=BUCKETS * LEAVES_PER_BUCKET)]


@wire.message("store.ae.diff", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AEDiff(wire.Message):
    leaves: _Leaves
    records: _Records
    complete: Annotated[bool, wire.Bool()]  # False: too many records, only some leaves covered
    initiator_seq: _Seq  # echoed
    responder_seq: _Seq  # echoed


@wire.message("store.ae.records", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AERecords(wire.Message):
    records: _Records
    last: Annotated[bool, wire.Bool()]
    initiator_seq: Annotated[int | None, wire.Optional(wire.UInt())]  # on the last part of a complete exchange
    holds_yours: Annotated[int | None, wire.Optional(wire.UInt())]  # "I hold all you held up to this"


@wire.message("store.ae.done", registry=MESSAGES)
@dataclasses.dataclass(frozen=True)
class AEDone(wire.Message):
    holds_yours: _Seq  # the responder now holds everything the initiator held up to this


Outgoing = tuple[str, wire.Message]


def _chunks(records: list[SecretRecord]) -> Iterable[tuple[SecretRecord, ...]]:
    """Records in messages of at most MAX_RECORDS_PER_MESSAGE records and ~MAX_MESSAGE_BYTES."""
    batch: list[SecretRecord] = []
    size = 0
    for r in records:
        n = len(r.ciphertext) + len(r.path) + 128
        if batch and (len(batch) >= MAX_RECORDS_PER_MESSAGE or size + n > MAX_MESSAGE_BYTES):
            yield tuple(batch)
            batch, size = [], 0
        batch.append(r)
        size += n
    if batch:
        yield tuple(batch)


class Gossip:
    """One store's replication engine. Feed it what arrives; send what it returns."""

    def __init__(self, dataset: Dataset, enforcer: Enforcer | None = None, seeds: Iterable[str] = (),
                 *, tombstone_grace_ms: int = DEFAULT_TOMBSTONE_GRACE_MS) -> None:
        self.dataset = dataset
        self.node = dataset.node
        self.enforcer = enforcer
        self.seeds = tuple(s for s in seeds if s != dataset.node)
        self.tombstone_grace_ms = tombstone_grace_ms
        self.stats = {"sent_records": 0, "received_records": 0, "merged": 0, "rejected": 0, "rounds": 0, "equal": 0}
        self._refused_from: dict[str, int] = {}  # records refused per peer since its last AERecords(last)

    @property
    def peers(self) -> tuple[str, ...]:
        """The other member stores: the policy's, else the seeds."""
        stores = self.enforcer.stores if self.enforcer is not None else ()
        return tuple(s for s in (stores or self.seeds) if s != self.node)

    # -- local events ----------------------------------------------------------------------------

    def local_write(self, records: Iterable[SecretRecord]) -> list[Outgoing]:
        """Eager push of records written here to every member."""
        records = list(records)
        if not records:
            return []
        out: list[Outgoing] = []
        for peer in self.peers:
            for chunk in _chunks(records):
                out.append((peer, Push(chunk)))
                self.stats["sent_records"] += len(chunk)
        return out

    def start_round(self, rng: random.Random, peer: str | None = None) -> list[Outgoing]:
        """Begin anti-entropy with ``peer`` (default: a random member)."""
        peers = self.peers
        if peer is None:
            if not peers:
                return []
            peer = rng.choice(peers)
        self.stats["rounds"] += 1
        root, seq = self.dataset.root_and_seq()
        return [(peer, AERoot(root, seq))]

    def collect_garbage(self, now_ms: int) -> int:
        return self.dataset.collect_garbage(self.peers, now_ms, self.tombstone_grace_ms)

    # -- messages from peers -----------------------------------------------------------------------

    def _merge(self, peer: str, records: tuple[SecretRecord, ...], now_ms: int) -> None:
        self.stats["received_records"] += len(records)
        changed = self.dataset.merge(records, now_ms)
        self.stats["merged"] += len(changed)
        if self.dataset.rejected:
            self.stats["rejected"] += len(self.dataset.rejected)
            self._refused_from[peer] = self._refused_from.get(peer, 0) + len(self.dataset.rejected)

    def receive(self, peer: str, msg: wire.Message, now_ms: int) -> list[Outgoing]:
        """Handle one message from ``peer`` (an authenticated store); return the replies."""
        if peer not in self.peers:
            raise NotEntitled(f"{peer!r} is not a member store")
        ds = self.dataset
        if isinstance(msg, Push):
            self._merge(peer, msg.records, now_ms)
            return []
        if isinstance(msg, AERoot):
            root, seq = ds.root_and_seq()
            if root == msg.root:
                ds.record_ack(peer, seq)
                self.stats["equal"] += 1
                return [(peer, AEEqual(msg.seq))]
            buckets, seq = ds.buckets_and_seq()
            return [(peer, AEBuckets(buckets, seq))]
        if isinstance(msg, AEEqual):
            ds.record_ack(peer, msg.seq)
            self.stats["equal"] += 1
            return []
        if isinstance(msg, AEBuckets):
            buckets, my_seq = ds.buckets_and_seq()
            mine, theirs = _DIGESTS.unpack(buckets), _DIGESTS.unpack(msg.digests)
            differ = tuple(b for b in range(BUCKETS) if mine[b] != theirs[b])
            if not differ:  # became equal meanwhile: each holds what the other had
                return [(peer, AERecords((), True, my_seq, msg.responder_seq))]
            digests = b"".join(ds.leaf_digests(b) for b in differ)
            return [(peer, AELeaves(differ, digests, my_seq, msg.responder_seq))]
        if isinstance(msg, AELeaves):
            leaves = []
            for i, b in enumerate(msg.buckets):
                theirs = _DIGESTS.unpack_from(msg.digests, i * _ARRAY_LEN)
                mine = _DIGESTS.unpack(ds.leaf_digests(b))
                leaves += [b * LEAVES_PER_BUCKET + j for j in range(LEAVES_PER_BUCKET) if mine[j] != theirs[j]]
            records = ds.records_in_leaves(leaves)
            first = next(iter(_chunks(records)), ())
            complete = len(first) == len(records)
            if not complete:  # too much for one message: diff the leaves it covers;
                covered = {leaf_of(r.path) for r in first}  # later rounds do the rest
                leaves = [x for x in leaves if x in covered]
                first = tuple(r for r in records if leaf_of(r.path) in covered)
            self.stats["sent_records"] += len(first)
            return [(peer, AEDiff(tuple(leaves), tuple(first), complete, msg.initiator_seq, msg.responder_seq))]
        if isinstance(msg, AEDiff):
            asked = set(msg.leaves)
            if any(leaf_of(r.path) not in asked for r in msg.records):
                raise RemoteProtocolError("AEDiff carries a record outside its leaves")
            theirs = {r.path: r.version for r in msg.records}
            self._merge(peer, msg.records, now_ms)
            held_all = msg.complete and not ds.rejected
            newer = [r for r in ds.records_in_leaves(msg.leaves) if r.path not in theirs or theirs[r.path] < r.version]
            self.stats["sent_records"] += len(newer)
            parts = list(_chunks(newer)) or [()]
            out: list[Outgoing] = [(peer, AERecords(c, False, None, None)) for c in parts[:-1]]
            out.append((peer, AERecords(parts[-1], True, msg.initiator_seq if msg.complete else None,
                                        msg.responder_seq if held_all else None)))
            return out
        if isinstance(msg, AERecords):
            self._merge(peer, msg.records, now_ms)
            if msg.holds_yours is not None:
                ds.record_ack(peer, msg.holds_yours)
            if msg.last:
                refused = self._refused_from.pop(peer, 0)
                if msg.initiator_seq is not None and not refused:
                    return [(peer, AEDone(msg.initiator_seq))]
            return []
        if isinstance(msg, AEDone):
            ds.record_ack(peer, msg.holds_yours)
            return []
        raise LocalProtocolError(f"Gossip.receive: {type(msg).__name__} is not a gossip message")
