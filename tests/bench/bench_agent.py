"""Benchmark: the agent daemon — start-to-first-answer from cache with no store, idle RSS and CPU.

    .venv/bin/python tests/bench/bench_agent.py [--secrets 100] [--starts 20] [--idle 10]

Every store is "down" (none is configured at all: the sync component is not wired yet), so each
start measures the offline-first path: spawn `lab-agent run` → first successful `agent.get` reply
on the socket (target < 300 ms). Then the agent idles for --idle seconds: RSS (target < 40 MB) and
CPU time used while idle (from /proc/PID/stat). Prints figures; never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.agent import localclient

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secrets", type=int, default=100)
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lab-bench-agent-"))
    env = dict(os.environ, LAB_HOME=str(root / "home"), LAB_RUNTIME_DIR=str(root / "run"), LAB_SECRETS_DIR=str(root / "secrets"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: byte-compiled
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    sock = str(root / "run/agent.sock")
    seed = root / "seed.yaml"
    seed.write_text("secrets:\n" + "".join(f'  - path: bench/s{i}\n    value: "value-{i:06d}-{"x" * 40}"\n    ttl: 30d\n' for i in range(args.secrets)))
    subprocess.run([str(BIN / "lab-agent"), "cache", "import", "--from", str(seed)], env=env, check=True, capture_output=True)
    times = []
    proc = None
    load_before = os.getloadavg()
    try:
        for i in range(args.starts + 1):
            t0 = time.monotonic()
            proc = subprocess.Popen([str(BIN / "lab-agent"), "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while True:
                try:
                    if localclient.request({"t": "agent.get", "path": "bench/s0"}, sock, timeout=5)["ok"]:
                        break
                except localclient.AgentError:
                    time.sleep(0.001)
            dt = time.monotonic() - t0
            if i:  # the first start byte-compiles; not counted
                times.append(dt)
            if i < args.starts:
                proc.terminate()
                proc.wait(timeout=10)
        assert proc is not None
        load = os.getloadavg()
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]
        print(f"machine: {platform.node()} {platform.machine()} {platform.platform()} cpus={os.cpu_count()} python={platform.python_version()}")
        print(f"command: {BIN / 'lab-agent'} run  (cache of {args.secrets} secrets, no store configured)")
        print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")
        print(
            f"start-to-first-answer (no store reachable): median {statistics.median(times) * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, "
            f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {len(times)} starts (target < 300 ms)"
        )
        time.sleep(1.0)
        c0, w0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)
        c1, w1 = cpu_seconds(proc.pid), time.monotonic()
        print(f"idle RSS {status_kb(proc.pid, 'VmRSS') / 1024:.1f} MB (target < 40 MB), VmLck {status_kb(proc.pid, 'VmLck')} kB")
        print(f"idle CPU {100 * (c1 - c0) / (w1 - w0):.2f}% of one core over {w1 - w0:.0f} s")
        n = 2000
        t = time.perf_counter()
        for i in range(n):
            localclient.request({"t": "agent.get", "path": f"bench/s{i % args.secrets}"}, sock)
        dt = time.perf_counter() - t
        print(f"socket get (in-process client, sequential): {n / dt:.0f} req/s, {dt / n * 1e6:.0f} µs each")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
