"""Benchmark: `lab render alerts` at fleet scale — rule files, file_sd targets and Naemon objects.

    .venv/bin/python tests/bench/bench_alerts.py [--servers 10000] [--alerts 1000] [--repeat 3] [--profile]

World (built in memory, as bench_targeting.py does): N servers over 3 environments and 5 regions,
each with 3 of 300 labels (one in six declares ports 443/25/993/22, one in ten a Puppet class with
an exporter and auto alerts, one in eight a size, one in five names checks), a third of them
bare-metal (Naemon hosts) and half with a recorded address; 200 groups nested 3 deep with
exclusions; 1,000 alerts (600 by label, 300 by group, 100 by environment+region), each excluding
one server, with conditions drawn from the condition language (lab metrics, matchers, raw metrics,
``promql:``). Timed end to end: index the fleet (targeting), collect the rules, render every file,
and write the tree atomically into an empty temporary directory (then once more, unchanged).
Target (issue 8): < 2 s for 10,000 servers and 1,000 alerts. Prints figures; never fails on a slow
machine.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pathlib
import platform
import pstats
import random
import shutil
import sys
import tempfile
import time

from lab.common.config import Alert, Definitions, Exclude, Group, Label, Selector
from lab.common.targeting import Fleet
from lab.coordinator.alerts import render_all, write_tree
from lab.coordinator.alerts.condition import METRICS, _alternative
from lab.coordinator.state import Server

ENVS = ["prod", "dev", "staging"]
REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south"]
PROVIDERS = ["baremetal", "aws", "xcpng"]
PORTS = [443, 25, 993, 22, 8080]
CLASSES = ["postgresql::server", "postfix", "nginx", "kubernetes::node", "profile::base"]
NAMED = ["smtp_connect", "mail_queue_length", "kubelet_healthy", "postgres_connections"]
OPS = [">", ">=", "<", "<="]
COND_METRICS = [m for m in METRICS if m not in ("unit_active",)]


def condition(rnd: random.Random) -> str:
    r = rnd.random()
    if r < 0.05:
        return f"promql: sum by (lab_server) (rate(http_errors_total{{code=~\"5..\"}}[5m])) > {rnd.randint(1, 50)}"
    if r < 0.15:
        return f"custom_metric_{rnd.randrange(20)} {rnd.choice(OPS)} {rnd.randint(0, 1000)}"
    metric = rnd.choice(COND_METRICS)
    matcher = '{mountpoint="/"}' if metric.endswith("usage_percent") and metric.startswith(("disk", "inode")) and rnd.random() < 0.5 else ""
    return f"{metric}{matcher} {rnd.choice(OPS)} {rnd.choice(['85', '90', '0.5', '1e3', '14'])}"


def make_world(n_servers: int, n_alerts: int, seed: int = 8) -> tuple[Definitions, list[Server]]:
    rnd = random.Random(seed)
    labels: dict[str, Label] = {}
    for i in range(300):
        labels[f"label-{i}"] = Label(
            f"label-{i}",
            puppet_classes=(CLASSES[i % len(CLASSES)],) if i % 10 == 0 else (f"role{i}::base",),
            ports=tuple(rnd.sample(PORTS, 2)) if i % 6 == 0 else (),
            size=rnd.choice(["small", "large"]) if i % 8 == 0 else None,
            alerts=(NAMED[i % len(NAMED)],) if i % 5 == 0 else (),
        )
    names = list(labels)
    servers = []
    for i in range(n_servers):
        addresses = {"primary": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"} if i % 2 else None
        servers.append(
            Server(
                f"srv-{i:06d}",
                PROVIDERS[i % 3],
                tuple(rnd.sample(names, 3)),
                rnd.choice(ENVS),
                rnd.choice(REGIONS),
                enrolled_at=1.0 if i % 4 else None,
                addresses=addresses,
            )
        )
    # 200 groups, 3 levels: 8 roots nesting 24 nesting 168 leaves matching labels and regions.
    sizes = [8, 24, 168]
    groups: dict[str, Group] = {}
    for level in reversed(range(3)):
        for j in range(sizes[level]):
            name = f"g{level}-{j}"
            subs = tuple(f"g{level + 1}-{k}" for k in range(j * sizes[level + 1] // sizes[level], (j + 1) * sizes[level + 1] // sizes[level])) if level < 2 else ()
            match = Selector(labels=frozenset(rnd.sample(names, 2)), regions=frozenset(rnd.sample(REGIONS, 3))) if level == 2 else None
            exclude = Exclude(
                servers=frozenset(f"srv-{rnd.randrange(n_servers):06d}" for _ in range(2)),
                attributes=Selector(labels=frozenset(rnd.sample(names, 1)), environments=frozenset({"staging"})),
            )
            groups[name] = Group(name, match=match, groups=subs, exclude=exclude)
    all_groups = list(groups)
    alerts = {}
    for i in range(n_alerts):
        if i < n_alerts * 6 // 10:
            target = Selector(labels=frozenset(rnd.sample(names, 3)))
        elif i < n_alerts * 9 // 10:
            target = Selector(groups=frozenset({rnd.choice(all_groups)}))
        else:
            target = Selector(environments=frozenset({rnd.choice(ENVS)}), regions=frozenset({rnd.choice(REGIONS)}))
        alerts[f"alert-{i}"] = Alert(
            f"alert-{i}",
            target,
            condition(rnd),
            severity=rnd.choice(["warning", "critical"]),
            for_seconds=rnd.choice([None, 60, 300, 900]),
            exclude=Exclude(servers=frozenset({servers[rnd.randrange(n_servers)].name})),
            description=f"benchmark alert {i}",
        )
    return Definitions(None, labels, groups, alerts, {}, {}), servers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=10_000)
    p.add_argument("--alerts", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print the top of a cProfile of one render")
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {platform.machine()} {platform.processor() or ''}".rstrip())
    print(f"command: {' '.join([pathlib.Path(sys.executable).name, *sys.argv])}")
    t0 = time.perf_counter()
    defs, servers = make_world(args.servers, args.alerts)
    print(f"world: {len(servers)} servers, {len(defs.labels)} labels, {len(defs.groups)} groups (3 levels),"
          f" {len(defs.alerts)} alerts — generated in {time.perf_counter() - t0:.1f} s")

    best: dict[str, float] = {}
    stats = {}
    for _ in range(args.repeat):
        _alternative.cache_clear()  # every run starts cold, as a `lab render alerts` process does
        tmp = tempfile.mkdtemp(prefix="bench-alerts-")
        try:
            t0 = time.perf_counter()
            fleet = Fleet(defs, servers)  # what `lab render alerts` builds from the inventory
            t1 = time.perf_counter()
            rendered = render_all(fleet)
            t2 = time.perf_counter()
            written = write_tree(tmp, rendered.files)
            t3 = time.perf_counter()
            again = write_tree(tmp, rendered.files)
            t4 = time.perf_counter()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for key, value in (("index", t1 - t0), ("render", t2 - t1), ("write", t3 - t2), ("total", t3 - t0), ("rewrite", t4 - t3)):
            best[key] = min(best.get(key, float("inf")), value)
        stats = {
            "rules": len(rendered.rules),
            "files": len(rendered.files),
            "bytes": sum(len(b) for b in rendered.files.values()),
            "rule_files": sum(1 for f in rendered.files if f.startswith("rules/")),
            "skipped": len(rendered.skipped),
            "written": sum(1 for f in written if f["status"] == "written"),
            "unchanged": sum(1 for f in again if f["status"] == "unchanged"),
        }
    print(f"output: {stats['rules']} rules (alert × source) in {stats['rule_files']} rule files, {stats['files']} files,"
          f" {stats['bytes'] / 2**20:.1f} MiB; {stats['skipped']} names not rendered")
    print(f"best of {args.repeat}: index the fleet {best['index']:.2f} s + render {best['render']:.2f} s"
          f" + write {stats['written']} files atomically {best['write']:.2f} s")
    print(f"render end to end ({args.servers} servers, {args.alerts} alerts): {best['total']:.2f} s   (target < 2 s)")
    print(f"writing the same tree again ({stats['unchanged']} files unchanged, render not included): {best['rewrite']:.3f} s")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        render_all(Fleet(defs, servers))
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
