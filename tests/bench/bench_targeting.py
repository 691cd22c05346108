"""Benchmark: the targeting engine at fleet scale, and `lab get servers` wall time.

    .venv/bin/python tests/bench/bench_targeting.py [--servers 100000] [--cli-servers 10000]

Fleet: N servers with 3 of 2,000 labels each, 500 groups as a tree nested 5 deep (4 roots, each
group nesting 3 of the next level; leaves match labels and regions, inner groups add servers of
their own) with exclusions by name, by label+environment and by group at every level,
and 1,000 alerts (700 by label, 250 by group, 50 by environment+region), each with an exclusion.
Targets (issue 2): full compile < 3 s, one server < 20 ms, one relabel < 5 ms,
`lab get servers` at 10,000 servers < 1 s. Prints figures; never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from lab.common.config import Alert, Definitions, Exclude, Group, Label, Selector
from lab.common.targeting import Fleet

ENVS = ["prod", "dev", "staging"]
REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"]


@dataclasses.dataclass(frozen=True, slots=True)
class S:
    name: str
    labels: tuple[str, ...]
    environment: str
    region: str
    size: str | None = None


def make_world(n_servers: int, seed: int = 7) -> tuple[Definitions, list[S]]:
    rnd = random.Random(seed)
    labels = {f"label-{i}": Label(f"label-{i}", puppet_classes=(f"class{i}::a", f"class{i}::b"), secrets=(), alerts=(f"check_{i % 50}",)) for i in range(2000)}
    names = list(labels)
    servers = [
        S(f"srv-{i:06d}", tuple(rnd.sample(names, 3)), rnd.choice(ENVS), rnd.choice(REGIONS)) for i in range(n_servers)
    ]
    # 500 groups as a tree 5 deep: 4 roots, each group nesting 3 of the next level (4+12+36+108+340).
    sizes = [4, 12, 36, 108, 340]
    groups: dict[str, Group] = {}
    leaf_labels = [names[i::340] for i in range(340)]  # every label belongs to one leaf's match
    for level in reversed(range(5)):
        for j in range(sizes[level]):
            name = f"g{level}-{j}"
            subs = tuple(f"g{level + 1}-{j * 3 + k}" for k in range(3) if j * 3 + k < sizes[level + 1]) if level < 4 else ()
            if level == 4:
                match = Selector(labels=frozenset(leaf_labels[j]), regions=frozenset(rnd.sample(REGIONS, 3)))
            else:  # inner groups also pull in servers of their own, by label and environment
                match = Selector(labels=frozenset(rnd.sample(names, 4)), environments=frozenset({"prod"}))
            exclude = Exclude(
                servers=frozenset(f"srv-{rnd.randrange(n_servers):06d}" for _ in range(3)),
                groups=frozenset({f"g4-{rnd.randrange(340)}"}) if level < 3 else frozenset(),
                attributes=Selector(labels=frozenset(rnd.sample(names, 2)), environments=frozenset({"staging"})),
            )
            groups[name] = Group(name, match=match, groups=subs, exclude=exclude)
    # 1,000 alerts: 700 by label, 250 by group (any level), 50 by environment and region;
    # each excludes one server by name.
    alerts = {}
    all_groups = list(groups)
    for i in range(1000):
        if i < 700:
            target = Selector(labels=frozenset(rnd.sample(names, 5)))
        elif i < 950:
            target = Selector(groups=frozenset({rnd.choice(all_groups)}))
        else:
            target = Selector(environments=frozenset({rnd.choice(ENVS)}), regions=frozenset({rnd.choice(REGIONS)}))
        alerts[f"alert-{i}"] = Alert(f"alert-{i}", target, "x > 1", exclude=Exclude(servers=frozenset({servers[rnd.randrange(n_servers)].name})))
    return Definitions(None, labels, groups, alerts, {}, {}), servers


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_engine(n: int) -> None:
    t0 = time.perf_counter()
    defs, servers = make_world(n)
    print(f"world: {n} servers, {len(defs.labels)} labels, {len(defs.groups)} groups (5 levels), {len(defs.alerts)} alerts"
          f" — generated in {time.perf_counter() - t0:.1f} s")

    def index():
        return Fleet(defs, servers)

    t_index, fleet = timed(index)
    t0 = time.perf_counter()
    fleet._group_sets()
    fleet._alert_sets()
    t_sets = time.perf_counter() - t0
    t0 = time.perf_counter()
    fleet.compile()
    t_reverse = time.perf_counter() - t0
    memberships = sum(len(x) for x in fleet._server_groups)
    applied = sum(len(x) for x in fleet._server_alerts)
    print(f"full compile: index servers {t_index:.2f} s + every group and alert set {t_sets:.3f} s"
          f" + per-server reverse indexes {t_reverse:.2f} s ({memberships} group memberships, {applied} alert applications)")
    print(f"full compile total: {t_index + t_sets + t_reverse:.2f} s   (target < 3 s)")
    sample = random.Random(5).sample(sorted(fleet.servers), 2000)
    t0 = time.perf_counter()
    items = sum(len(v.puppet_classes) + len(v.alerts) + len(v.secrets) for v in (fleet.server(n) for n in sample))
    per_view = (time.perf_counter() - t0) / len(sample)
    print(f"complete view of a compiled server (groups, classes, alerts, secrets with sources): {per_view * 1000:.2f} ms each"
          f" ({items / len(sample):.0f} items per server)")

    cold = Fleet(defs, servers)
    picks = random.Random(1).sample(sorted(cold.servers), 50)
    per = [timed(lambda n=name: cold.server(n))[0] for name in picks]
    print(f"one server (show server, no full compile): median {statistics.median(per) * 1000:.2f} ms, max {max(per) * 1000:.2f} ms   (target < 20 ms)")
    per = [timed(lambda n=name: fleet.server(n))[0] for name in picks]
    print(f"one server from the compiled fleet: median {statistics.median(per) * 1000:.2f} ms")

    rnd = random.Random(2)
    names = list(defs.labels)
    per = []
    for name in picks:
        old = fleet.servers[name]
        new = dataclasses.replace(old, labels=tuple(rnd.sample(names, 3)))
        t0 = time.perf_counter()
        fleet.relabel(name, new)
        per.append(time.perf_counter() - t0)
    print(f"one relabel recomputed (sets, reverse indexes and its view): median {statistics.median(per) * 1000:.2f} ms, max {max(per) * 1000:.2f} ms   (target < 5 ms)")


def bench_cli(n: int) -> None:
    from lab.coordinator.state import StateDB

    lab = shutil.which("lab") or str(pathlib.Path(sys.executable).with_name("lab"))
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, LAB_HOME=tmp, NO_COLOR="1")
        env.pop("LAB_DEFINITIONS", None)
        subprocess.run([lab, "init", "--local"], env=env, check=True, capture_output=True)
        labels = ["k8s-worker", "production", "eu-west", "postgres", "app", "mailserver"]
        rnd = random.Random(3)
        with StateDB.open(pathlib.Path(tmp)) as state:
            state.add_servers_bulk(
                {"name": f"srv-{i:05d}", "provider": "aws", "labels": rnd.sample(labels, 2), "environment": rnd.choice(ENVS), "region": rnd.choice(REGIONS)}
                for i in range(n)
            )
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = subprocess.run([lab, "get", "servers"], env=env, check=True, capture_output=True)
            runs.append(time.perf_counter() - t0)
        lines = out.stdout.count(b"\n")
        print(f"`lab get servers` at {n} servers ({lines} lines): median {statistics.median(runs):.3f} s, best {min(runs):.3f} s   (target < 1 s)")
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([lab, "get", "servers", "--group", "production", "-o", "json"], env=env, check=True, capture_output=True)
            runs.append(time.perf_counter() - t0)
        print(f"`lab get servers --group production -o json` at {n} servers: median {statistics.median(runs):.3f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=100_000)
    p.add_argument("--cli-servers", type=int, default=10_000)
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    bench_engine(args.servers)
    bench_cli(args.cli_servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
