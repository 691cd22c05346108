"""`lab server migrate --to NODE` with real processes on 127.0.0.1 (docs/LIFECYCLE.md, "Moving the coordinator").

`lab cluster up` with 2 stores and four agents (node-a, node-b, web-1 labelled app; db-1
postgres), agents checking in every second. Then:

1. local mode → node-a: the cluster's coordinator daemon is stopped (the laptop is in local
   mode), `lab server migrate` serves the home in-process on the agents' endpoint while node-a's
   agent pulls the state and starts the coordinator role;
2. node-a → node-b: the CLI now talks to node-a's coordinator; a non-target node asking for the
   bundle is refused; node-b takes over, node-a's coordinator stops and is not restarted.

Each time: a secret set before, one during and one after arrive on the agents; `lab get servers`
through the new endpoint shows the same inventory with `lab-server` on the new host only; agents'
certificate serials do not change (no re-enrollment) and their enrollment.yaml points at the new
coordinator; the old coordinator no longer answers. db-1's agent is down during the whole second
move: started once node-a's coordinator is gone, it learns node-b's endpoint from the stores (the
CA-signed coordinator announcement) and checks in there with its old certificate. Finally node-b's
agent restarts and its coordinator role comes back with it; SIGKILLed, it takes the role's child
with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import cluster_cli
from cluster_cli import LAB, eventually, ok

pytestmark = pytest.mark.slow

MON = "monitoring/api-key"
PG = "postgres/master-password"
APP_NODES = ("node-a", "node-b", "web-1")
ALL_NODES = ("store-1", "store-2", "node-a", "node-b", "web-1", "db-1")
ENV = {"LAB_CHECKIN_INTERVAL": "1"}


def lab(*args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return cluster_cli.lab(*args, env=ENV, **kw)


def _our_pids(root: Path) -> list[int]:
    """Processes started for this cluster (their command line or LAB_HOME names its directory)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(root).encode() in text:
            out.append(int(proc.name))
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("migcluster") / "c"
    r = lab("cluster", "up", "--dir", str(d), "--stores", "2", "--agent", "node-a=app", "--agent", "node-b=app",
            "--agent", "web-1=app,production", "--agent", "db-1=postgres,production")
    try:
        ok(r)
        yield d
    finally:
        if (d / "cluster.yaml").exists():
            lab("cluster", "down", "--dir", str(d))
        for pid in _our_pids(d):  # a coordinator child an agent left behind, a migrate still running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def get(d: Path, node: str, path: str) -> bytes:
    r = lab("secret", "get", path, home=d / node)
    return r.stdout if r.returncode == 0 else b""


def set_secret(home: Path, path: str, value: bytes) -> None:
    ok(lab("secret", "set", path, home=home, stdin=value))


def arrives(d: Path, value: bytes, nodes: tuple[str, ...] = APP_NODES, path: str = MON) -> None:
    for node in nodes:
        eventually(lambda node=node: get(d, node, path) == value, 30, f"{path}={value!r} on {node}")


def serial(d: Path, node: str) -> int:
    from lab.common.identity import Certificate

    return Certificate.decode_untrusted((d / node / "node.cert").read_bytes()).serial


def enrolled_coordinator(d: Path, node: str) -> str:
    return str(yaml.safe_load((d / node / "enrollment.yaml").read_text())["coordinator"])


def servers(home: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in json.loads(ok(lab("get", "servers", "-o", "json", home=home)))}


def answers(endpoint: str) -> bool:
    import socket

    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def fetch_as(home: Path, endpoint: str, id: str) -> str:
    """``migrate.fetch`` with the identity in ``home``: the error text, or "" when a bundle came."""
    import trio

    from lab.common import rpc
    from lab.common.errors import LabError
    from lab.store.node import load_home_identity

    identity = load_home_identity(home)
    host, port = rpc.parse_endpoint(endpoint, 7443)

    async def main() -> str:
        try:
            async with rpc.connect(host, port, identity=identity, timeout=5) as conn:
                reply = await conn.call("migrate.fetch", {"id": id}, timeout=10)
        except (LabError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return "" if isinstance(reply.get("bundle"), bytes) else "no bundle"

    return trio.run(main)


def announced(d: Path) -> str | None:
    """The coordinator endpoint the stores announce (``store.coordinator``, as web-1's agent asks)."""
    import trio

    from lab.coordinator.migrate.announce import newest_announcement
    from lab.store.node import load_home_identity

    stores = yaml.safe_load((d / "web-1" / "enrollment.yaml").read_text())["stores"]
    doc = trio.run(newest_announcement, stores, load_home_identity(d / "web-1"))
    return None if doc is None else str(doc.endpoint)


def admin_call(home: Path, endpoint: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
    import trio

    from lab.coordinator.enrollment import load_identity
    from lab.coordinator.migrate.command import _call

    return trio.run(_call, endpoint, load_identity(home, "admin"), method, body)


def migrate(home: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NO_COLOR="1", LAB_HOME=str(home), **ENV)
    for k in ("LAB_DEFINITIONS", "LAB_RUNTIME_DIR", "LAB_SECRETS_DIR"):
        env.pop(k, None)
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen([LAB, "server", "migrate", *args], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    try:
        proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
    return text


def test_local_to_a_to_b(cluster: Path, tmp_path: Path) -> None:
    from lab.coordinator.cluster import free_ports

    d = cluster
    coord = d / "coordinator"
    rows = json.loads(ok(lab("cluster", "status", "--dir", str(d), "-o", "json")))
    cport = next(r["port"] for r in rows if r["role"] == "coordinator")
    old_endpoint = f"127.0.0.1:{cport}"
    port_a, port_b = free_ports(2)
    ep_a, ep_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"

    # -- before: secrets flow, the inventory and the serials we must keep
    set_secret(coord, MON, b"mon-1")
    set_secret(coord, PG, b"pg-1")
    arrives(d, b"mon-1")
    arrives(d, b"pg-1", ("db-1",), PG)
    before = servers(coord)
    assert set(before) == set(ALL_NODES)
    serials = {n: serial(d, n) for n in ALL_NODES}
    assert all(enrolled_coordinator(d, n) == old_endpoint for n in ALL_NODES)
    eventually(lambda: announced(d) == old_endpoint, 40, "the coordinator announcing itself in the stores")

    # no terminal and no --yes: refused, nothing moves
    r = lab("server", "migrate", "--to", "node-a", "--listen", ep_a, home=coord)
    assert r.returncode != 0 and b"--yes" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    # an unknown node: one clear line
    r = lab("server", "migrate", "--to", "nope", "--listen", ep_a, "--yes", home=coord)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and b"nope" in r.stderr, r.stderr
    assert not (d / "node-a" / "coordinator-role.yaml").exists()

    # -- move 1: local mode (no daemon) → node-a
    ok(lab("cluster", "stop", "--dir", str(d), "coordinator"))
    assert not answers(old_endpoint)
    writer = tmp_path / "writer"  # the laptop's admin files, for writing secrets whatever `server:` says meanwhile
    shutil.copytree(coord, writer, ignore=shutil.ignore_patterns("*.log", "snapshots"))
    proc = migrate(coord, "--to", "node-a", "--listen", ep_a, "--serve", old_endpoint, "--grace", "40", "--yes",
                   log=tmp_path / "migrate1.log")
    set_secret(writer, MON, b"mon-2")  # during the move (straight to the stores)
    out = finish(proc, tmp_path / "migrate1.log")
    assert "Plan" in out and "node-a" in out and ep_a in out, out
    assert yaml.safe_load((coord / "config.yaml").read_text())["server"] == ep_a
    assert (coord / "moved.json").exists()
    assert not answers(old_endpoint)  # the in-process coordinator ended with the command
    assert announced(d) == ep_a  # announced at the switch, for agents the redirect misses
    assert (d / "node-a" / "coordinator-role.yaml").exists()
    home_a = d / "node-a" / "coordinator"
    assert oct((home_a).stat().st_mode & 0o777) == "0o700"
    assert oct((home_a / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert b"mon-" not in (home_a / "coordinator.log").read_bytes()
    after = servers(coord)  # through the new endpoint (config.yaml server:)
    assert set(after) == set(before)
    assert "lab-server" in after["node-a"]["labels"]
    assert all(enrolled_coordinator(d, n) == ep_a for n in ALL_NODES), {n: enrolled_coordinator(d, n) for n in ALL_NODES}
    arrives(d, b"mon-2")
    set_secret(home_a, MON, b"mon-3")  # after, from the new coordinator's home
    arrives(d, b"mon-3")
    assert {n: serial(d, n) for n in ALL_NODES} == serials  # nobody re-enrolled
    # the old home refuses to serve again (two coordinators with one CA)
    r = lab("server", "run", "--listen", f"127.0.0.1:{free_ports(1)[0]}", home=coord)
    assert r.returncode != 0 and b"moved to" in r.stderr, r.stderr

    # -- a move that fails leaves the coordinator authoritative: db-1's agent is down, nobody takes the state
    ok(lab("cluster", "stop", "--dir", str(d), "db-1"))
    r = lab("server", "migrate", "--to", "db-1", "--listen", f"127.0.0.1:{free_ports(1)[0]}", "--timeout", "3", "--yes",
            home=coord)
    err = r.stderr.decode()
    assert r.returncode != 0 and len(err.strip().splitlines()) == 1, err
    assert "waiting for db-1 failed" in err and "stays authoritative" in err and "Traceback" not in err, err
    assert yaml.safe_load((coord / "config.yaml").read_text())["server"] == ep_a
    assert admin_call(coord, ep_a, "migrate.status", {})["pending"]["stage"] == "failed"
    ok(lab("cluster", "start", "--dir", str(d), "db-1"))

    # -- an attempt aborted after node-b took the state: node-b drops what it installed, node-a thaws
    started = admin_call(coord, ep_a, "migrate.start", {"to": "node-b", "listen": ep_b})
    eventually(lambda: admin_call(coord, ep_a, "migrate.status", {})["pending"]["stage"] == "ready", 30, "node-b ready")
    assert answers(ep_b) and (d / "node-b" / "coordinator-role.yaml").exists()
    with pytest.raises(Exception, match="moving to"):  # frozen: a write would be lost
        admin_call(coord, ep_a, "engine.remove_server", {"name": "no-such-server"})
    assert admin_call(coord, ep_a, "migrate.abort", {"id": started["id"], "reason": "test"})["aborted"]
    eventually(lambda: not (d / "node-b" / "coordinator-role.yaml").exists() and not answers(ep_b), 20,
               "node-b dropping the aborted coordinator")
    assert not (d / "node-b" / "coordinator").exists()
    with pytest.raises(Exception) as refused:
        admin_call(coord, ep_a, "engine.remove_server", {"name": "no-such-server"})
    assert "moving" not in str(refused.value)  # thawed: refused only because there is no such server

    # -- move 2: node-a → node-b, with db-1's agent down the whole time (it learns the move from the stores)
    ok(lab("cluster", "stop", "--dir", str(d), "db-1"))
    proc = migrate(coord, "--to", "node-b", "--listen", ep_b, "--grace", "10", "--yes", log=tmp_path / "migrate2.log")
    pending: dict[str, Any] = {}

    def pending_seen() -> bool:
        try:
            now = admin_call(coord, ep_a, "migrate.status", {}).get("pending") or {}
        except Exception:  # noqa: BLE001 - not up yet
            return False
        pending.clear()
        pending.update(now)
        return now.get("id") not in (None, started["id"]) and now.get("target") == "node-b" and now.get("stage") != "failed"

    eventually(pending_seen, 30, "the pending migration on node-a's coordinator")
    refused = fetch_as(d / "web-1", ep_a, pending["id"])
    assert "node-b" in refused and "web-1" in refused, refused  # not the target: NotEntitled
    set_secret(home_a, MON, b"mon-4")  # during
    out = finish(proc, tmp_path / "migrate2.log")
    assert "from node-a" in out, out
    assert yaml.safe_load((coord / "config.yaml").read_text())["server"] == ep_b
    eventually(lambda: not answers(ep_a), 20, "node-a's coordinator gone")
    assert (home_a / "moved.json").exists()
    eventually(lambda: not (d / "node-a" / "coordinator-role.yaml").exists(), 20, "node-a's agent dropping the role")
    time.sleep(2.5)  # a supervisor that wrongly restarts would do it within its 1-2 s backoff
    assert not answers(ep_a)
    final = servers(coord)
    assert set(final) == set(before)
    assert "lab-server" in final["node-b"]["labels"] and "lab-server" not in final["node-a"]["labels"]
    online = [n for n in ALL_NODES if n != "db-1"]
    assert all(enrolled_coordinator(d, n) == ep_b for n in online), {n: enrolled_coordinator(d, n) for n in ALL_NODES}
    assert enrolled_coordinator(d, "db-1") == ep_a  # missed the redirect: node-a's coordinator is gone for good
    ok(lab("cluster", "start", "--dir", str(d), "db-1"))
    assert announced(d) == ep_b
    eventually(lambda: enrolled_coordinator(d, "db-1") == ep_b, 40, "db-1 following the stores' announcement to node-b")
    assert "via=announcement" in (d / "db-1" / "agent.log").read_text()
    arrives(d, b"mon-4")
    home_b = d / "node-b" / "coordinator"
    set_secret(home_b, MON, b"mon-5")
    arrives(d, b"mon-5")
    arrives(d, b"pg-1", ("db-1",), PG)
    assert {n: serial(d, n) for n in ALL_NODES} == serials
    for node in ALL_NODES:  # the CA key went only where the coordinator runs
        has = (d / node / "coordinator" / "ca.key").exists()
        assert has == (node in ("node-a", "node-b")), node

    # -- node-b's agent restarts: its coordinator role comes back with it
    ok(lab("cluster", "stop", "--dir", str(d), "node-b"))
    eventually(lambda: not answers(ep_b), 20, "node-b's coordinator stopping with its agent")
    ok(lab("cluster", "start", "--dir", str(d), "node-b"))
    eventually(lambda: answers(ep_b), 30, "node-b's coordinator back")
    eventually(lambda: len(servers(coord)) == len(before), 20, "lab get servers through node-b again")
    set_secret(home_b, MON, b"mon-6")
    arrives(d, b"mon-6")

    # -- the coordinator child dies: node-b's agent starts it again
    child = coordinator_child(home_b)
    assert child is not None
    os.kill(child, signal.SIGKILL)
    eventually(lambda: coordinator_child(home_b) not in (None, child) and answers(ep_b), 30, "the coordinator restarted")
    assert len(servers(coord)) == len(before)

    # -- node-b's agent killed outright (SIGKILL): its coordinator child goes with it, nothing left serving
    child = coordinator_child(home_b)
    agent = agent_pid(d / "node-b")
    assert child is not None and agent is not None
    os.kill(agent, signal.SIGKILL)
    eventually(lambda: coordinator_child(home_b) is None and not answers(ep_b), 10, "the coordinator child dying with its agent")
    ok(lab("cluster", "start", "--dir", str(d), "node-b"))
    eventually(lambda: answers(ep_b), 30, "node-b's coordinator back after the kill")


def agent_pid(home: Path) -> int | None:
    """The pid of the `lab-agent run --home HOME` process."""
    for pid in _our_pids(home):
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run" in argv and b"--home" in argv and str(home).encode() in argv and b"server" not in argv:
            return pid
    return None


def coordinator_child(home: Path) -> int | None:
    """The pid of the `lab server run` serving ``home`` (LAB_HOME), if one runs."""
    for pid in _our_pids(home):
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in argv and b"run" in argv and f"LAB_HOME={home}".encode() in env:
            return pid
    return None
