"""Benchmark: the secret store's sans-IO cores (dataset, anti-entropy, serving, revocation).

    .venv/bin/python tests/bench/bench_store.py [--secrets 100000] [--differ 10] [--trials 300]

No network: the Noise RPC transport is not wired to the store yet, so every figure is the cost of
the store's own work (LMDB, crypto, encoding, strict decoding) with messages handed over in
memory. Loopback figures (and the etcd comparison) wait for the RPC hook-up.
Prints figures; never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from lab.common import wire
from lab.common.identity import CertificateAuthority, NodeKey
from lab.store.dataset import Dataset
from lab.store.gossip import Gossip
from lab.store.hlc import Version
from lab.store.policy import Enforcer, publish, sign_policy
from lab.store.records import Meta, decode_message_untrusted, seal_value
from lab.store.serve import StoreService, SyncRequest
from lab.store.simulate import Network

META = Meta.simple("bench", 1)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def bench_anti_entropy(n: int, differ: int) -> None:
    with tempfile.TemporaryDirectory() as t:
        a = Dataset.create(Path(t) / "a", "a", durable=False)
        b = Dataset.with_key(Path(t) / "b", "b", a.export_key(), durable=False)
        with a.export_key() as k:
            key = k.bytes()
        t0 = time.perf_counter()
        recs = [seal_value(key, f"bench/{i:06d}", Version(1_000 + i, 0, "a"), META, b"v" * 40) for i in range(n)]
        a.merge(recs)
        b.merge(recs)
        fill = time.perf_counter() - t0
        for i in random.Random(1).sample(range(n), differ):
            a.write(f"bench/{i:06d}", b"changed", META, 10**7 + i)
        ga, gb = Gossip(a, seeds=["a", "b"]), Gossip(b, seeds=["a", "b"])
        nodes = {"a": ga, "b": gb}
        wire_bytes, msgs = 0, 0
        t0 = time.perf_counter()
        queue = [("a", m) for m in ga.start_round(random.Random(0), "b")]
        while queue:
            src, (dst, msg) = queue.pop(0)
            data = wire.encode(msg)
            wire_bytes += len(data)
            msgs += 1
            queue += [(dst, out) for out in nodes[dst].receive(src, decode_message_untrusted(data), 10**8)]
        took = time.perf_counter() - t0
        assert a.root() == b.root()
        print(f"anti-entropy, {n:,} secrets differing in {differ}: {wire_bytes:,} bytes in {msgs} messages, "
              f"{took * 1000:.1f} ms (fill {fill:.1f} s)  [targets < 64 KiB, < 1 s]")
        t0 = time.perf_counter()
        ga.start_round(random.Random(0), "b")
        print(f"anti-entropy round when equal: 1 round trip of {len(wire.encode(ga.start_round(random.Random(0), 'b')[0][1]))} + ~10 bytes, "
              f"{(time.perf_counter() - t0) * 1e6:.0f} µs to start")
        a.close(), b.close()


def bench_write_visible(trials: int) -> None:
    with Network(3, seed=1) as net:
        lat = []
        for i in range(trials):
            t0 = time.perf_counter()
            net.write(net.names[i % 3], f"w/{i % 50}", b"x" * 64)
            net.deliver()
            lat.append(time.perf_counter() - t0)
        assert net.converged()
    print(f"write → merged on all 3 stores (in memory, fsync off): p50 {pct(lat, 50) * 1e3:.2f} ms, p99 {pct(lat, 99) * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory() as t:
        d = Dataset.create(Path(t) / "d", "d")
        lat = []
        for i in range(trials):
            t0 = time.perf_counter()
            d.write(f"w/{i % 50}", b"x" * 64, META, 1000 + i)
            lat.append(time.perf_counter() - t0)
        d.close()
    print(f"durable local write (LMDB commit + fsync, this disk): p50 {pct(lat, 50) * 1e3:.2f} ms, p99 {pct(lat, 99) * 1e3:.2f} ms")


def _served_world(t: str, secrets: int):
    ca = CertificateAuthority.generate()
    ds = Dataset.create(Path(t) / "s", "store-1", durable=False)
    enf = Enforcer(ca.public_key)
    ds.system_checker = enf.system_checker
    with ds.export_key() as k:
        key = k.bytes()
    ds.merge([seal_value(key, f"app/s{i}", Version(1000 + i, 0, "x"), META, b"v" * 64) for i in range(secrets)])
    grants = {f"node-{n}": [f"app/s{i}" for i in range(n * 10, n * 10 + 10)] for n in range(100)}
    publish(ds, sign_policy(ca, grants, ["store-1", "store-2", "store-3"], [], version=1, now=1), 10**7)
    certs = [ca.issue(f"node-{n}", f"node-{n}", NodeKey.generate().public_key, (), 10**6, 1_700_000_000) for n in range(100)]
    return ca, ds, enf, certs


def bench_fetch(n: int = 20_000) -> None:
    with tempfile.TemporaryDirectory() as t:
        ca, ds, enf, certs = _served_world(t, 1000)
        svc = StoreService(ds, enf)
        t0 = time.perf_counter()
        for i in range(n):
            c = certs[i % 100]
            svc.fetch(c, f"app/s{(i % 100) * 10 + i % 10}", 1_700_000_000)
        took = time.perf_counter() - t0
        print(f"fetches per second per store, certificate verified on each (Ed25519 + policy + LMDB + decrypt, one core): {n / took:,.0f}/s")
        t0 = time.perf_counter()
        for i in range(n):
            svc.read(certs[i % 100], f"app/s{(i % 100) * 10 + i % 10}")
        took = time.perf_counter() - t0
        print(f"fetches per second per store inside a session (revocation + policy + LMDB + decrypt, one core): {n / took:,.0f}/s")
        t0 = time.perf_counter()
        for i in range(2000):
            svc.subscribe(certs[i % 100], SyncRequest({}), 1_700_000_000)
        print(f"full syncs (10 secrets each) per second: {2000 / (time.perf_counter() - t0):,.0f}/s")
        ds.close()


def bench_revocation(trials: int) -> None:
    """CRL written at store 1 → pushed → merged at stores 2 and 3 → each store's subscription of the
    revoked node emits its final update (the agent drops everything)."""
    with tempfile.TemporaryDirectory() as t:
        ca, ds1, enf1, certs = _served_world(t, 1000)
        stores = [(ds1, enf1)]
        for i in (2, 3):
            ds = Dataset.with_key(Path(t) / f"s{i}", f"store-{i}", ds1.export_key(), durable=False)
            enf = Enforcer(ca.public_key)
            ds.system_checker = enf.system_checker
            ds.merge(ds1.records(include_deleted=True))
            stores.append((ds, enf))
        names = ["store-1", "store-2", "store-3"]
        gossip = {n: Gossip(ds, enf, seeds=names) for n, (ds, enf) in zip(names, stores)}
        lat, revoked = [], []
        for trial in range(trials):
            victim = certs[trial % 100]
            subs = [StoreService(ds, enf).subscribe(victim, SyncRequest({}), 1_700_000_000)[0] for ds, enf in stores]
            revoked.append(victim)
            t0 = time.perf_counter()
            crl = ca.revoke(enf1.revocations, [victim], 1_700_000_000)
            rec = publish(ds1, crl, 10**8 + trial)
            for dst, msg in gossip["store-1"].local_write([rec]):
                gossip[dst].receive("store-1", decode_message_untrusted(wire.encode(msg)), 10**8 + trial)
            finals = [s.poll() for s in subs]
            lat.append(time.perf_counter() - t0)
            assert all(f is not None and f.final for f in finals), (finals, [ds.rejected for ds, _ in stores])
        print(f"revocation → refused by all 3 stores and the agent's secrets dropped (in memory): "
              f"p50 {pct(lat, 50) * 1e3:.2f} ms, p99 {pct(lat, 99) * 1e3:.2f} ms over {trials} revocations "
              f"(CRL grows to {len(revoked)} entries)  [target p99 < 1 s on loopback]")
        for ds, _ in stores:
            ds.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secrets", type=int, default=100_000)
    ap.add_argument("--differ", type=int, default=10)
    ap.add_argument("--trials", type=int, default=300)
    a = ap.parse_args()
    bench_anti_entropy(a.secrets, a.differ)
    bench_write_visible(a.trials)
    bench_fetch()
    bench_revocation(min(a.trials, 100))


if __name__ == "__main__":
    main()
