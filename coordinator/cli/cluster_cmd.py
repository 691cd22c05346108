"""`lab cluster up|status|stop|start|down|publish`: a local cluster of real processes on 127.0.0.1.

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. The work is in
:mod:`lab.coordinator.cluster`; see docs/CLUSTER.md.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, TextIO

import typer

from lab.coordinator.cli.app import Output, _format, subcommand
from lab.common.render import emit, table

cluster_app = subcommand("cluster", "A local cluster on 127.0.0.1: coordinator, stores and agents as real processes.")

DirOpt = Annotated[str, typer.Option("--dir", help="The cluster's directory (one home per node inside).")]


def parse_agents(values: list[str] | None) -> list[tuple[str, list[str]]]:
    from lab.common.errors import UsageError
    from lab.coordinator.cluster import parse_agent_spec

    out = [parse_agent_spec(v) for v in values or ()]
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"agent named twice: {', '.join(dup)}")
    return out


@cluster_app.command("up")
def cluster_up(
    dir_: DirOpt,
    definitions: Annotated[str | None, typer.Option(
        "--definitions", help="Definitions directory for the coordinator (default: lab init's examples).")] = None,
    stores: Annotated[int, typer.Option("--stores", help="Number of store nodes (labelled secret-store).")] = 2,
    agent: Annotated[list[str] | None, typer.Option("--agent", help="NAME=label1,label2 (repeat).")] = None,
    output: Output = "table",
) -> None:
    """Start a coordinator, N stores and the named agents; return once all are enrolled and serving."""
    from lab.coordinator import cluster

    fmt = _format(output)
    agents = parse_agents(agent)
    spec = cluster.up(dir_, stores=stores, agents=agents, definitions=definitions,
                      progress=lambda m: print(f"  ✓ {m}", file=sys.stderr))
    emit({**spec.to_dict(), "processes": cluster.status_rows(spec)}, fmt, lambda _r, out: out.write(cluster.describe(spec) + "\n"))


@cluster_app.command("status")
def cluster_status(dir_: DirOpt, output: Output = "table") -> None:
    """Each process: node, role, pid, port, alive."""
    from lab.coordinator import cluster

    fmt = _format(output)
    rows = cluster.status_rows(cluster.load(dir_))

    def human(rs: list[dict[str, Any]], out: TextIO) -> None:
        table(["NODE", "ROLE", "PID", "PORT", "ALIVE"],
              [[r["node"], r["role"], str(r["pid"] or "—"), str(r["port"] or "—"), "yes" if r["alive"] else "no"] for r in rs], out)

    emit(rows, fmt, human)


@cluster_app.command("stop")
def cluster_stop(dir_: DirOpt, node: Annotated[str, typer.Argument(help="The node to take down.")]) -> None:
    """Take one node's processes down (SIGTERM, then SIGKILL after a timeout)."""
    from lab.coordinator import cluster

    spec = cluster.load(dir_)
    pids = cluster.stop_node(spec.node(node))
    print(f"✓ {node} stopped" + (f" (pids {', '.join(map(str, pids))})" if pids else " (was not running)"))


@cluster_app.command("start")
def cluster_start(dir_: DirOpt, node: Annotated[str, typer.Argument(help="The node to bring back.")]) -> None:
    """Start one node's processes again (same ports, same home) and wait until they serve."""
    from lab.coordinator import cluster

    spec = cluster.load(dir_)
    n = spec.node(node)
    cluster.start_node(n)
    cluster.save(spec)
    print(f"✓ {node} running (pids {', '.join(str(p.pid) for p in n.processes)})")


@cluster_app.command("down")
def cluster_down(dir_: DirOpt) -> None:
    """Stop every process the cluster started (idempotent); the directory is left for inspection."""
    from lab.coordinator import cluster

    spec = cluster.load(dir_)
    pids = cluster.down(spec)
    print(f"✓ cluster in {spec.dir} is down" + (f" ({len(pids)} processes stopped)" if pids else " (nothing was running)"))


@cluster_app.command("publish")
def cluster_publish(dir_: DirOpt, output: Output = "table") -> None:
    """Recompile the secrets policy (definitions + enrolled nodes) and publish it, signed, to the stores."""
    from pathlib import Path

    from lab.coordinator import cluster

    fmt = _format(output)
    spec = cluster.load(dir_)
    r = cluster.publish_policy(Path(spec.coordinator.home))

    def human(res: dict[str, Any], out: TextIO) -> None:
        out.write(f"✓ policy v{res['version']} published to {', '.join(res['stores'])}\n")
        for n, paths in res["grants"].items():
            out.write(f"  {n:<14} {', '.join(paths) or '—'}\n")

    emit(r, fmt, human)
