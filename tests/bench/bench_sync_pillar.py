"""Benchmark: `lab get servers` at 10,000 servers with facts and Puppet runs recorded (SYNC pillar).

    .venv/bin/python tests/bench/bench_sync_pillar.py [--servers 10000] [--runs 5]

Fleet: N servers with 2 of 6 example labels each, every one with parsed facts (from the fixtures in
tests/fixtures/facts/, as enrollment stores them) and a Puppet run (ok, changed or failed), in a
temporary LAB_HOME with the example definitions. Measures

* the engine call alone (`Engine.get_servers()`: read state, four pillars incl. SYNC), in-process;
* the whole command `lab get servers` as a subprocess (interpreter start, imports, table).

Target (issue 6 item 2/3): `lab get servers` at 10,000 servers < 1 s. Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from lab.agent.facts import parse_facts
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.state import StateDB

ROOT = pathlib.Path(__file__).resolve().parents[2]
LABELS = ["k8s-worker", "production", "eu-west", "postgres", "app", "mailserver"]
RUNS = [
    {"status": "ok", "environment": "prod", "failed_resources": [], "errors": [], "resources": {"total": 9}},
    {"status": "changed", "environment": "prod", "failed_resources": [], "errors": [], "resources": {"total": 9, "changed": 1}},
    {"status": "failed", "environment": "prod", "errors": [], "resources": {"total": 9, "failed": 1},
     "failed_resources": [{"resource": "File[/etc/x]", "message": "boom", "file": "/etc/puppet/code/modules/postfix/manifests/init.pp", "line": 3}]},
]


def make_home(tmp: str, n: int) -> Paths:
    paths = Paths(pathlib.Path(tmp), pathlib.Path(tmp) / "definitions", "default")
    Engine.init_local(paths)
    facts = [parse_facts(json.loads(p.read_text())).to_dict() for p in sorted((ROOT / "tests/fixtures/facts").glob("*.json"))]
    rnd = random.Random(3)
    names = [f"srv-{i:05d}" for i in range(n)]
    with StateDB.open(paths.home) as state:
        state.add_servers_bulk(
            {"name": name, "provider": rnd.choice(["aws", "xcpng", "baremetal", "ssh"]), "labels": rnd.sample(LABELS, 2),
             "environment": "prod", "region": rnd.choice(["eu-west", "us-east"])}
            for name in names
        )
        now = time.time()
        with state.transaction():
            for name in names:
                run = dict(rnd.choice(RUNS), time=now - 60, received_at=now)
                state.update_server(name, facts=rnd.choice(facts), puppet=run, enrolled_at=now - 3600, last_checkin=now)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.servers} servers with facts and Puppet runs")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = make_home(tmp, args.servers)
        print(f"setup: {time.perf_counter() - t0:.1f} s")
        runs = []
        rows: list[dict] = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            with Engine.open(paths) as engine:
                rows = engine.get_servers()
            runs.append(time.perf_counter() - t0)
        counts = collections.Counter(r["sync"] for r in rows)
        print(f"Engine.get_servers(): median {statistics.median(runs):.3f} s, best {min(runs):.3f} s   SYNC: {dict(sorted(counts.items()))}")
        lab = shutil.which("lab") or str(pathlib.Path(sys.executable).with_name("lab"))
        env = dict(os.environ, LAB_HOME=tmp, NO_COLOR="1")
        env.pop("LAB_DEFINITIONS", None)
        runs = []
        out = b""
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run([lab, "get", "servers"], env=env, check=True, capture_output=True).stdout
            runs.append(time.perf_counter() - t0)
        lines = out.count(b"\n")
        print(f"`lab get servers` at {args.servers} servers ({lines} lines): median {statistics.median(runs):.3f} s, "
              f"best {min(runs):.3f} s   (target < 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
