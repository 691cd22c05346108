"""An in-memory network of stores for the gossip protocol: tests, ``tools/gossip_sim.py``, benchmarks.

Each store is a real :class:`~lab.store.dataset.Dataset` (LMDB in a temporary directory, fsync off)
driven by a real :class:`~lab.store.gossip.Gossip`; every message is encoded to bytes and decoded
with the strict decoder on the way, as a socket would. The network loses each message with
probability ``loss``, drops everything across a partition, and delivers the rest in FIFO order.
Time is a number the simulation advances; each store may see it with a fixed clock offset.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lab.common import wire
from lab.common.securemem import SecretBuffer
from lab.store.dataset import Dataset
from lab.store.gossip import Gossip
from lab.store.hlc import Version
from lab.store.policy import Enforcer, publish
from lab.store.records import Meta, SecretRecord, decode_message_untrusted

__all__ = ["Network"]


@dataclasses.dataclass
class _Link:
    sent: int = 0
    bytes: int = 0
    lost: int = 0


class Network:
    """``n`` stores named ``s0..s{n-1}`` sharing one dataset key."""

    def __init__(self, n: int, directory: str | Path | None = None, *, seed: int = 0, loss: float = 0.0,
                 clock_offsets: Iterable[int] | None = None, tombstone_grace_ms: int = 0,
                 ca_public_key: bytes | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="lab-gossip-sim-") if directory is None else None
        root = Path(self._tmp.name if self._tmp else directory)  # type: ignore[arg-type]
        self.rng = random.Random(seed)
        self.loss = loss
        self.now_ms = 1_700_000_000_000
        self.names = [f"s{i}" for i in range(n)]
        self.offsets = dict(zip(self.names, clock_offsets or [0] * n))
        first = Dataset.create(root / self.names[0], self.names[0], durable=False)
        self.stores: dict[str, Gossip] = {}
        for name in self.names:
            ds = first if name == self.names[0] else Dataset.with_key(root / name, name, first.export_key(), durable=False)
            enforcer = None
            if ca_public_key is not None:  # stores that verify and apply signed policy/revocations
                enforcer = Enforcer(ca_public_key)
                ds.system_checker = enforcer.system_checker
            self.stores[name] = Gossip(ds, enforcer, seeds=self.names, tombstone_grace_ms=tombstone_grace_ms)
        self.groups: list[set[str]] | None = None  # partition: who can reach whom
        self.queue: collections.deque[tuple[str, str, bytes]] = collections.deque()
        self.link = _Link()

    def close(self) -> None:
        for g in self.stores.values():
            g.dataset.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topology ---------------------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def reachable(self, a: str, b: str) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    # -- events -------------------------------------------------------------------------------------

    def clock(self, name: str) -> int:
        return self.now_ms + self.offsets.get(name, 0)

    def advance(self, ms: int = 1) -> None:
        self.now_ms += ms

    def _send(self, src: str, outs: Iterable[tuple[str, wire.Message]]) -> None:
        for dst, msg in outs:
            data = wire.encode(msg)
            self.link.sent += 1
            self.link.bytes += len(data)
            if not self.reachable(src, dst) or (self.loss and self.rng.random() < self.loss):
                self.link.lost += 1
                continue
            self.queue.append((src, dst, data))

    def write(self, name: str, path: str, value: bytes) -> SecretRecord:
        g = self.stores[name]
        rec = g.dataset.write(path, value, Meta.simple("sim", self.clock(name)), self.clock(name))
        self._send(name, g.local_write([rec]))
        return rec

    def publish(self, name: str, signed: object) -> SecretRecord:
        """A signed policy or revocation list written at store ``name`` and pushed like a write."""
        g = self.stores[name]
        rec = publish(g.dataset, signed, self.clock(name))  # type: ignore[arg-type]
        self._send(name, g.local_write([rec]))
        return rec

    def delete(self, name: str, path: str) -> SecretRecord | None:
        g = self.stores[name]
        rec = g.dataset.delete(path, self.clock(name))
        if rec is not None:
            self._send(name, g.local_write([rec]))
        return rec

    def deliver(self, limit: int = 100_000) -> int:
        """Deliver queued messages (and the replies they cause) until the queue is empty."""
        n = 0
        while self.queue and n < limit:
            src, dst, data = self.queue.popleft()
            msg = decode_message_untrusted(data)
            self._send(dst, self.stores[dst].receive(src, msg, self.clock(dst)))
            n += 1
        return n

    def anti_entropy_round(self) -> None:
        """Every store starts one exchange with a random peer; deliver everything."""
        for name, g in self.stores.items():
            self._send(name, g.start_round(self.rng))
        self.deliver()

    def collect_garbage(self) -> int:
        return sum(g.collect_garbage(self.clock(n)) for n, g in self.stores.items())

    # -- observation --------------------------------------------------------------------------------

    def roots(self) -> dict[str, bytes]:
        return {n: g.dataset.root() for n, g in self.stores.items()}

    def converged(self) -> bool:
        return len(set(self.roots().values())) == 1

    def settle(self, max_rounds: int = 50) -> int:
        """Anti-entropy rounds until every root is equal; returns the rounds it took."""
        for i in range(max_rounds):
            if self.converged():
                return i
            self.anti_entropy_round()
        return max_rounds

    def live(self, name: str) -> dict[str, tuple[Version, bytes]]:
        ds = self.stores[name].dataset
        return {r.path: (r.version, ds.reveal(r)) for r in ds.records()}

    def shared_key(self) -> SecretBuffer:
        return self.stores[self.names[0]].dataset.export_key()
