"""Benchmark: three store processes on loopback (Noise RPC, LMDB with fsync), against etcd.

    .venv/bin/python tests/bench/bench_store_loopback.py [--writes 300] [--revocations 40] [--no-etcd]

1. **write → visible on all 3 stores**: an admin writes through one persistent session to one
   store (rotating over the three); an agent session subscribed to *each* store records when the
   pushed value arrives. Latency = from sending ``store.set`` until all three agents' sessions
   have it (eager push + merge + fsync + subscription push).
2. **etcd, same shape**, when ``etcd`` (Debian ``etcd-server``) is on PATH: a 3-member cluster on
   loopback, ``put`` through one member's HTTP/JSON gateway (rotating), a ``watch`` stream on
   each member; latency = from sending the put until all three watches saw it.
3. **revocation latency**: an agent synced (through store-3) holds its secrets; the revocation
   list is published at store-1; latency = until every store refuses the agent's certificate at
   the handshake *and* the agent has dropped every secret.

Prints figures with the command and the machine; never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_store_cluster import STORES, Cluster, free_port  # noqa: E402

from lab.agent.cache import SecretCache  # noqa: E402
from lab.agent.sync import SyncConfig, _CacheSink, sync_loop  # noqa: E402
from lab.common import rpc, wire  # noqa: E402
from lab.common.errors import AuthError, TransportError  # noqa: E402
from lab.store.records import decode_message_untrusted  # noqa: E402
from lab.store.serve import SyncRequest  # noqa: E402

PATHS = [f"bench/k{i:02d}" for i in range(20)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def fmt(xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return f"p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms, max {max(ms):.2f} ms (n={len(ms)})"


def machine() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.node()} {platform.system()} {platform.release()} {platform.machine()}, {model}, {os.cpu_count()} CPUs, load {load} at start"


# ---------------------------------------------------------------------------------------------
# lab stores


async def bench_lab_writes(cluster: Cluster, writes: int, acks: list[float]) -> list[float]:
    reader = cluster.identity("bench-reader")
    seen: dict[str, dict[bytes, float]] = {s: {} for s in STORES}
    arrived = trio.Event()
    lat: list[float] = []

    async def watch(store: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with rpc.connect("127.0.0.1", cluster.ports[store], identity=reader) as conn:
            async with conn.stream("store.sync", {"msg": wire.encode(SyncRequest({}))}) as items:
                first = True
                async for item in items:
                    now = time.perf_counter()
                    upd = decode_message_untrusted(item["msg"])
                    for r in upd.records:
                        seen[store][r.value] = now
                    arrived.set()
                    if first:
                        first = False
                        task_status.started()

    async with trio.open_nursery() as nursery:
        for s in STORES:
            await nursery.start(watch, s)
        async with rpc.connect("127.0.0.1", cluster.ports["store-1"], identity=cluster.admin) as c1, \
                rpc.connect("127.0.0.1", cluster.ports["store-2"], identity=cluster.admin) as c2, \
                rpc.connect("127.0.0.1", cluster.ports["store-3"], identity=cluster.admin) as c3:
            writers = {"store-1": c1, "store-2": c2, "store-3": c3}
            for i in range(writes):
                store = STORES[i % 3]
                value = f"w{i}".encode()
                arrived = trio.Event()
                t0 = time.perf_counter()
                await writers[store].call("store.set", {"path": PATHS[i % len(PATHS)], "value": value})
                acks.append(time.perf_counter() - t0)
                with trio.fail_after(10):
                    while not all(value in seen[s] for s in STORES):
                        await arrived.wait()
                        arrived = trio.Event()
                lat.append(max(seen[s][value] for s in STORES) - t0)
        nursery.cancel_scope.cancel()
    return lat


async def bench_revocation(cluster: Cluster, trials: int, tmp: Path) -> list[float]:
    lat: list[float] = []
    fast = SyncConfig(backoff_base=0.05, backoff_cap=0.5, connect_timeout=2)
    for t in range(trials):
        name = f"rev-{t}"
        ident = cluster.identity(name)
        await cluster.publish_policy("store-1", {"bench-reader": PATHS, **{f"rev-{j}": PATHS[:5] for j in range(t, trials)}})
        cache = SecretCache.open(tmp / name, protection="file")
        emptied = trio.Event()
        emptied_at = 0.0

        class Sink(_CacheSink):
            def drop(self, path: str) -> None:
                nonlocal emptied_at
                super().drop(path)
                if not self.cache.paths():
                    emptied_at = time.perf_counter()
                    emptied.set()

        status: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: sync_loop(
                cache, ident, [cluster.endpoint("store-3")], status, sink=Sink(cache), config=fast, task_status=task_status))
            with trio.fail_after(10):
                while len(cache.paths()) < 5:
                    await trio.sleep(0.005)
            refused_at: dict[str, float] = {}

            async def probe(store: str) -> None:
                while True:
                    try:
                        async with rpc.connect("127.0.0.1", cluster.ports[store], identity=ident, timeout=2) as conn:
                            await conn.call("store.fetch", {"path": PATHS[0]})
                    except AuthError:
                        refused_at[store] = time.perf_counter()
                        return
                    except TransportError:
                        pass
                    await trio.sleep(0.002)

            t0 = time.perf_counter()
            await cluster.revoke("store-1", ident.certificate)
            with trio.fail_after(10):
                async with trio.open_nursery() as probes:
                    for s in STORES:
                        probes.start_soon(probe, s)
                await emptied.wait()
            lat.append(max(max(refused_at.values()), emptied_at) - t0)
            nursery.cancel_scope.cancel()
        cache.close()
    return lat


# ---------------------------------------------------------------------------------------------
# etcd


class Etcd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.client = [free_port() for _ in range(3)]
        self.peer = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        initial = ",".join(f"m{i}=http://127.0.0.1:{self.peer[i]}" for i in range(3))
        for i in range(3):
            log = open(self.root / f"etcd-{i}.log", "wb")
            self.procs.append(subprocess.Popen([
                "etcd", "--name", f"m{i}", "--data-dir", str(self.root / f"m{i}"),
                "--listen-client-urls", f"http://127.0.0.1:{self.client[i]}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client[i]}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer[i]}",
                "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", "bench",
            ], stdout=log, stderr=log))
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                ok = all(self._health(i) for i in range(3))
            except OSError:
                ok = False
            if ok:
                return
            time.sleep(0.2)
        raise RuntimeError("etcd cluster did not become healthy: " + (self.root / "etcd-0.log").read_text()[-2000:])

    def _health(self, i: int) -> bool:
        c = http.client.HTTPConnection("127.0.0.1", self.client[i], timeout=2)
        c.request("GET", "/health")
        body = c.getresponse().read()
        return b'"true"' in body

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    def version(self) -> str:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else "?"


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def bench_etcd(root: Path, writes: int) -> list[float]:
    etcd = Etcd(root)
    etcd.start()
    try:
        seen: list[dict[bytes, float]] = [{}, {}, {}]
        cond = threading.Condition()
        ready = threading.Barrier(4)

        def watch(i: int) -> None:
            c = http.client.HTTPConnection("127.0.0.1", etcd.client[i], timeout=60)
            body = json.dumps({"create_request": {"key": _b64("bench/"), "range_end": _b64("bench0")}})
            c.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
            resp = c.getresponse()
            ready.wait()
            buf = b""
            while True:
                chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    now = time.perf_counter()
                    try:
                        events = json.loads(line).get("result", {}).get("events", [])
                    except ValueError:
                        continue
                    with cond:
                        for ev in events:
                            seen[i][base64.b64decode(ev["kv"]["value"])] = now
                        cond.notify_all()

        threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        ready.wait()
        time.sleep(0.3)  # the watches are registered once their first (created) message is out
        conns = [http.client.HTTPConnection("127.0.0.1", etcd.client[i], timeout=10) for i in range(3)]
        lat = []
        for n in range(writes):
            value = f"w{n}".encode()
            body = json.dumps({"key": _b64(PATHS[n % len(PATHS)]), "value": _b64(value)})
            t0 = time.perf_counter()
            c = conns[n % 3]
            c.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
            c.getresponse().read()
            with cond:
                if not cond.wait_for(lambda: all(value in s for s in seen), timeout=10):
                    raise RuntimeError(f"etcd watch never saw write {n}")
            lat.append(max(s[value] for s in seen) - t0)
        return lat
    finally:
        etcd.stop()


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--revocations", type=int, default=40)
    ap.add_argument("--no-etcd", action="store_true")
    args = ap.parse_args()
    logging.getLogger("lab").addHandler(logging.NullHandler())  # the agents' warnings are expected here
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="lab-bench-stores-") as t:
        root = Path(t)
        cluster = Cluster(root / "lab", ae_interval=2.0, fsync=True)
        try:
            for s in STORES:
                cluster.start(s)

            acks: list[float] = []

            async def run() -> tuple[list[float], list[float]]:
                for s in STORES:
                    await cluster.wait_ready(s)
                await cluster.publish_policy("store-1", {"bench-reader": PATHS})
                await cluster.converged()
                for i, p in enumerate(PATHS):
                    await cluster.set(STORES[i % 3], p, b"init")
                await cluster.converged()
                w = await bench_lab_writes(cluster, args.writes, acks)
                r = await bench_revocation(cluster, args.revocations, root / "agents")
                return w, r

            writes, revocations = trio.run(run)
        finally:
            cluster.close()
        print(f"lab   store.set acknowledged (local LMDB commit + fsync, Noise round trip): {fmt(acks)}")
        print(f"lab   write → visible on all 3 stores (3 processes, Noise RPC, LMDB fsync): {fmt(writes)}   target p99 < 100 ms")
        if args.no_etcd:
            print("etcd  skipped (--no-etcd)")
        elif shutil.which("etcd") is None:
            print("etcd  not installed (Debian: apt-get install etcd-server): comparison skipped")
        else:
            e = Etcd(root)  # for the version line only
            print(f"etcd  {e.version()}")
            (root / "etcd").mkdir()
            elat = bench_etcd(root / "etcd", args.writes)
            print(f"etcd  put → seen by a watch on all 3 members (3 processes, HTTP/JSON gateway, WAL fsync): {fmt(elat)}")
        print(f"lab   revocation published at store-1 → refused by all 3 stores and the agent's secrets dropped: {fmt(revocations)}   target p99 < 1 s")


if __name__ == "__main__":
    main()
