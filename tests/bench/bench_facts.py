"""Benchmark: `lab-agent facts -o json` against `facter -j` (Puppet's fact tool, Debian package
`facter`) on the same host, in the same run — wall time and hardware coverage.

    .venv/bin/python tests/bench/bench_facts.py [--runs 15]

Runs are interleaved (lab, facter, lab, facter, …) after one untimed warm-up of each, so load
drifts hit both alike. Target: lab median ≤ 0.5× facter median. Then one coverage table: per
category (CPU model and cores, memory, disks, NICs, GPUs, virtualisation), what each tool
reports on this machine, read from their JSON (facter: processors, memory.system, disks,
networking.interfaces, hypervisors/virtual; lab: facts.cpu, memory_bytes, disks, nics, gpus,
virtualization). Prints figures with the commands and the machine; never fails on a slow host.
Without facter installed it says so and times lab alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LAB = [str(Path(sys.executable).with_name("lab-agent")), "facts", "-o", "json"]
FACTER = ["facter", "-j"]


FACTER_STATUS: set[str] = set()


def timed(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False, env=dict(os.environ, NO_COLOR="1"))
    dt = time.perf_counter() - t
    if r.returncode != 0:
        # facter exits 1 after logging an ERROR for a fact it could not read (in a container:
        # "Permission denied - /proc/1/environ") but still prints every other fact: accept it.
        if cmd[0] == "facter" and r.stdout.lstrip().startswith("{"):
            errors = sorted({re.sub(r"\x1b\[[0-9;]*m", "", line.split(" - ", 1)[-1]).strip() for line in r.stderr.splitlines() if "ERROR" in line})
            FACTER_STATUS.add(f"exit {r.returncode}; errors: {'; '.join(errors)[:300]}")
        else:
            raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[:500]}")
    return dt, r.stdout


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else xs[0]


def gib(n: Any) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, int) else "—"


def lab_rows(d: dict[str, Any]) -> dict[str, str]:
    f = d["facts"]
    cpu = f["cpu"]
    disks = f["disks"]
    nics = f["nics"]
    gpus = f["gpus"]
    return {
        "CPU model": f"{cpu['model']} ({cpu['vendor']}, {cpu['arch']})",
        "CPU cores / threads": f"{cpu['cores']} / {cpu['threads']}",
        "memory": gib(f["memory_bytes"]),
        "disks": "; ".join(f"{x['name']} {gib(x['size_bytes'])} {x['kind']} model={x['model']}{' (system)' if x['system'] else ''}" for x in disks)
        if disks is not None
        else "unknown",
        "NICs": "; ".join(
            f"{n['name']} {n['mac']} speed={n['speed_mbps']} {'up' if n['up'] else 'down'}{' virtual' if n['virtual'] else ''} driver={n['driver']} addrs={len(n['addresses'])}"
            for n in nics
        )
        if nics is not None
        else "unknown",
        "GPUs": ("none" if gpus == [] else "; ".join(f"{g['vendor']} {g['model']} {gib(g['memory_bytes'])} driver={g['driver']}" for g in gpus))
        if gpus is not None
        else "unknown",
        "virtualisation": f"{f['virtualization']}" + (f", container {f['container']}" if f.get("container") else ""),
    }


def facter_rows(d: dict[str, Any]) -> dict[str, str]:
    p = d.get("processors") or {}
    models = p.get("models") or []
    mem = (d.get("memory") or {}).get("system") or {}
    disks = d.get("disks") or {}
    ifs = (d.get("networking") or {}).get("interfaces") or {}
    virt = d.get("virtual") or ",".join(sorted(d.get("hypervisors") or {})) or "—"
    return {
        "CPU model": f"{models[0] if models else '—'} (isa {p.get('isa', '—')})",
        "CPU cores / threads": f"count={p.get('count')} cores={p.get('cores')} threads/core={p.get('threads')} sockets={p.get('physicalcount')}",
        "memory": gib(mem.get("total_bytes")),
        "disks": "; ".join(f"{k} {gib(v.get('size_bytes'))} {v.get('type', '—')} model={v.get('model')} vendor={v.get('vendor')}" for k, v in sorted(disks.items()))
        or "—",
        "NICs": "; ".join(
            f"{k} {v.get('mac', '—')} speed={v.get('speed', '—')} mtu={v.get('mtu')} addrs={len(v.get('bindings', [])) + len(v.get('bindings6', []))}"
            for k, v in sorted(ifs.items())
        )
        or "—",
        "GPUs": "— (facter has no GPU fact)",
        "virtualisation": virt,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    have_facter = shutil.which(FACTER[0]) is not None
    facter_version = subprocess.run(["facter", "--version"], capture_output=True, text=True, check=False).stdout.strip() if have_facter else None
    load0 = os.getloadavg()
    _, lab_out = timed(LAB)  # warm-up: byte-compile, page cache
    facter_out = timed(FACTER)[1] if have_facter else None
    lab_t: list[float] = []
    facter_t: list[float] = []
    for _ in range(args.runs):
        lab_t.append(timed(LAB)[0])
        if have_facter:
            facter_t.append(timed(FACTER)[0])
    load1 = os.getloadavg()
    print(f"machine: {platform.node()} {platform.machine()} {platform.platform()} cpus={os.cpu_count()} python={platform.python_version()}")
    print(f"load average (1 min) before {load0[0]:.2f}, after {load1[0]:.2f}; {args.runs} interleaved runs each after one warm-up")
    lm = statistics.median(lab_t)
    print(f"lab:    {' '.join(LAB)}")
    print(f"        median {lm * 1000:.0f} ms, p90 {p90(lab_t) * 1000:.0f} ms, min {min(lab_t) * 1000:.0f} ms, max {max(lab_t) * 1000:.0f} ms")
    if not have_facter:
        print("facter: not installed (Debian: apt-get install facter) — no comparison")
        return
    fm = statistics.median(facter_t)
    print(f"facter: {' '.join(FACTER)}  ({facter_version})")
    print(f"        median {fm * 1000:.0f} ms, p90 {p90(facter_t) * 1000:.0f} ms, min {min(facter_t) * 1000:.0f} ms, max {max(facter_t) * 1000:.0f} ms")
    if FACTER_STATUS:
        print(f"        facter output used although it {' / '.join(sorted(FACTER_STATUS))}")
    ratio = lm / fm
    print(f"ratio lab/facter (medians): {ratio:.2f}x  (target <= 0.5x: {'met' if ratio <= 0.5 else 'NOT met'})")
    lab_cov = lab_rows(json.loads(lab_out))
    facter_cov = facter_rows(json.loads(facter_out or "{}"))
    print()
    print("| category | lab-agent facts | facter -j |")
    print("|---|---|---|")
    for key in lab_cov:
        print(f"| {key} | {lab_cov[key]} | {facter_cov.get(key, '—')} |")


if __name__ == "__main__":
    main()
