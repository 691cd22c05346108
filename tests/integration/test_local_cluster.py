"""`lab cluster up` with real processes on 127.0.0.1: a coordinator, two stores, three agents with
different labels, all started through the CLI (docs/CLUSTER.md).

Proves: each agent ends with exactly its entitled secrets; `lab secret get` of a non-entitled path
fails with a clear error and the value appears nowhere in that node's home; with both stores and
the coordinator stopped, a restarted agent answers from its cache; one store back, a rotated value
(`lab secret set` from the coordinator's home, straight to the store) arrives; `lab cluster down`
leaves no process behind (pids checked), and is idempotent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_cli import eventually, lab, ok, running_cluster

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
AGENTS = {"web-1": "app,production", "db-1": "postgres,production", "mon-1": "app"}
PG, MON = "postgres/master-password", "monitoring/api-key"




def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_socket():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    agents = [a for name, labels in AGENTS.items() for a in ("--agent", f"{name}={labels}")]
    with running_cluster(tmp_path_factory.mktemp("cluster") / "c", "--stores", "2", *agents) as d:
        yield d


def status(d: Path) -> list[dict[str, Any]]:
    return list(json.loads(ok(lab("cluster", "status", "--dir", str(d), "-o", "json"))))


def get(d: Path, node: str, path: str) -> subprocess.CompletedProcess[bytes]:
    return lab("secret", "get", path, home=d / node)


def test_up_then_entitlements_offline_and_down(cluster: Path) -> None:
    d = cluster
    rows = status(d)
    assert {(r["node"], r["role"]) for r in rows} == {
        ("coordinator", "coordinator"), ("store-1", "store"), ("store-1", "agent"), ("store-2", "store"), ("store-2", "agent"),
        ("web-1", "agent"), ("db-1", "agent"), ("mon-1", "agent")}
    assert all(r["alive"] for r in rows)
    pids = [r["pid"] for r in rows]

    servers = json.loads(ok(lab("get", "servers", "-o", "json", home=d / "coordinator")))
    assert sorted((s["name"], s["identity"]) for s in servers) == sorted(
        (n, "enrolled") for n in ["store-1", "store-2", *AGENTS])

    coord = d / "coordinator"
    ok(lab("secret", "set", PG, home=coord, stdin=b"pg-value-1"))
    ok(lab("secret", "set", MON, home=coord, stdin=b"mon-value-1"))
    entitled = {"db-1": {PG: b"pg-value-1"}, "web-1": {MON: b"mon-value-1"}, "mon-1": {MON: b"mon-value-1"}}

    for node, want in entitled.items():
        for path, value in want.items():
            eventually(lambda: get(d, node, path).stdout == value, 20, f"{path} on {node}")
        # exactly its entitlement: the secret files and the agent's cache list
        files = sorted(str(p.relative_to(d / node / "secrets")) for p in (d / node / "secrets").rglob("*")
                       if p.is_file() and not p.name.startswith("."))
        assert files == sorted(want), (node, files)
        cached = json.loads(ok(lab("secret", "cache", "-o", "json", home=d / node)))
        assert sorted(c["path"] for c in cached) == sorted(want), cached

    # not entitled: a clear error, and the value is nowhere in that node's home
    for node, path, value in (("web-1", PG, b"pg-value-1"), ("mon-1", PG, b"pg-value-1"), ("db-1", MON, b"mon-value-1")):
        r = get(d, node, path)
        assert r.returncode != 0 and r.stdout == b""
        err = r.stderr.decode()
        assert path in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert files_containing(d / node, value) == [], node
    for node in ("store-1", "store-2"):  # stores hold values encrypted only; their agents are entitled to nothing
        assert files_containing(d / node, b"pg-value-1") == []

    # offline: stores and coordinator down, db-1 restarted → answers from its cache
    for node in ("store-1", "store-2", "coordinator"):
        ok(lab("cluster", "stop", "--dir", str(d), node))
    down = {r["node"] for r in status(d) if not r["alive"]}
    assert down == {"store-1", "store-2", "coordinator"}
    ok(lab("cluster", "stop", "--dir", str(d), "db-1"))
    ok(lab("cluster", "start", "--dir", str(d), "db-1"))
    r = get(d, "db-1", PG)
    assert r.returncode == 0 and r.stdout == b"pg-value-1", r.stderr

    # one store back: a rotation written by `lab secret set` (straight to the store) arrives
    ok(lab("cluster", "start", "--dir", str(d), "store-2"))
    ok(lab("secret", "set", PG, home=coord, stdin=b"pg-value-2"))
    eventually(lambda: get(d, "db-1", PG).stdout == b"pg-value-2", 45, "the rotated value on db-1")
    assert (d / "db-1" / "secrets" / PG).read_bytes() == b"pg-value-2"
    assert b"pg-value-2" not in get(d, "web-1", PG).stdout

    # down: every process gone, twice is fine
    pids = sorted(set(pids) | {r["pid"] for r in status(d)})
    ok(lab("cluster", "down", "--dir", str(d)))
    assert [p for p in pids if pid_alive(p)] == []
    assert not any(r["alive"] for r in status(d))
    assert "nothing was running" in ok(lab("cluster", "down", "--dir", str(d)))
    for node in ("db-1", "web-1"):
        assert b"pg-value" not in (d / node / "agent.log").read_bytes()
