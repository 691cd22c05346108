"""The pure parts of `lab cluster` (coordinator/cluster.py, coordinator/cli/cluster_cmd.py):
agent specs, the plan (nodes, homes, ports, argv), cluster.yaml round trip, status rows and the
socket-path rule of agent/localclient.py. No sockets, no processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lab.agent import localclient
from lab.agent.daemon import AgentConfig
from lab.common.errors import ConfigError, UsageError
from lab.coordinator import cluster
from lab.coordinator.cli.cluster_cmd import parse_agents


def test_parse_agent_spec() -> None:
    assert cluster.parse_agent_spec("web-1=app,production") == ("web-1", ["app", "production"])
    assert cluster.parse_agent_spec("db-1=postgres, production,postgres") == ("db-1", ["postgres", "production"])
    assert cluster.parse_agent_spec("bare") == ("bare", [])
    for bad in ("", "=app", "Web=app", "a b=x", "web-1=App", "-x=a"):
        with pytest.raises(UsageError):
            cluster.parse_agent_spec(bad)


def test_parse_agents_refuses_duplicates() -> None:
    assert parse_agents(["a=x", "b=y"]) == [("a", ["x"]), ("b", ["y"])]
    assert parse_agents(None) == []
    with pytest.raises(UsageError, match="agent named twice: a"):
        parse_agents(["a=x", "a=y"])


def test_plan_nodes_homes_ports_and_argv(tmp_path: Path) -> None:
    spec = cluster.plan(tmp_path, 2, [("web-1", ["app"]), ("db-1", ["postgres"])], [7001, 7002, 7003])
    assert [(n.name, n.kind) for n in spec.nodes] == [
        ("coordinator", "coordinator"), ("store-1", "store"), ("store-2", "store"), ("web-1", "agent"), ("db-1", "agent")]
    assert all(n.home == str(tmp_path.resolve() / n.name) for n in spec.nodes)
    assert spec.port("coordinator", "coordinator") == 7001
    assert spec.store_endpoints() == ["127.0.0.1:7002", "127.0.0.1:7003"]
    assert spec.node("store-1").labels == ["secret-store"]
    s1 = spec.node("store-1")
    assert [p.role for p in s1.processes] == ["store", "agent"]
    argv = s1.processes[0].argv
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:7002" and argv[argv.index("--peer") + 1] == "127.0.0.1:7003"
    assert "--create" not in argv  # store-1's dataset is made by `up`, its key sealed to the others
    agent = spec.node("web-1").processes[0].argv
    home = spec.node("web-1").home
    assert agent[agent.index("--runtime-dir") + 1] == f"{home}/run" and agent[agent.index("--secrets-dir") + 1] == f"{home}/secrets"
    assert spec.node("coordinator").processes[0].argv[-2:] == ["--listen", "127.0.0.1:7001"]
    assert spec.stores == [spec.node("store-1"), spec.node("store-2")]


def test_plan_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="at least one store"):
        cluster.plan(tmp_path, 0, [], [1, 2])
    for taken in ("coordinator", "store-2"):
        with pytest.raises(UsageError, match="is taken"):
            cluster.plan(tmp_path, 2, [(taken, [])], [1, 2, 3])
    with pytest.raises(UsageError, match="no node 'nope'"):
        cluster.plan(tmp_path, 1, [], [1, 2]).node("nope")


def test_cluster_yaml_round_trip(tmp_path: Path) -> None:
    spec = cluster.plan(tmp_path, 1, [("web-1", ["app"])], [7001, 7002], definitions="/defs")
    spec.node("store-1").processes[0].pid = 4242
    spec.node("store-1").processes[0].started = 99
    path = cluster.save(spec)
    assert path == tmp_path.resolve() / "cluster.yaml"
    again = cluster.load(tmp_path)
    assert again == spec
    assert again.definitions == "/defs" and again.node("store-1").processes[0].pid == 4242
    doc = yaml.safe_load(path.read_text())
    assert doc["version"] == 1 and [n["name"] for n in doc["nodes"]] == ["coordinator", "store-1", "web-1"]


def test_cluster_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no cluster here"):
        cluster.load(tmp_path)
    (tmp_path / "cluster.yaml").write_text("version: 2\nnodes: []\n")
    with pytest.raises(ConfigError, match="not a lab cluster file"):
        cluster.load(tmp_path)
    (tmp_path / "cluster.yaml").write_text("version: 1\nnodes: [{name: x, bogus: 1}]\n")
    with pytest.raises(ConfigError, match="malformed"):
        cluster.load(tmp_path)


def test_status_rows_with_an_injected_liveness(tmp_path: Path) -> None:
    spec = cluster.plan(tmp_path, 1, [("web-1", [])], [7001, 7002])
    for i, (n, p) in enumerate((n, p) for n in spec.nodes for p in n.processes):
        p.pid = 100 + i
    rows = cluster.status_rows(spec, alive=lambda p: p.pid % 2 == 0)
    assert [(r["node"], r["role"], r["pid"], r["port"], r["alive"]) for r in rows] == [
        ("coordinator", "coordinator", 100, 7001, True), ("store-1", "store", 101, 7002, False),
        ("store-1", "agent", 102, None, True), ("web-1", "agent", 103, None, False)]
    spec.node("web-1").processes[0].pid = None
    assert cluster.status_rows(spec, alive=lambda p: True)[-1]["alive"] is False


def test_is_alive_checks_the_start_time() -> None:
    me = cluster.Process("agent", [], pid=os.getpid())
    assert cluster.is_alive(me)
    me.started = cluster._start_time(os.getpid())
    assert cluster.is_alive(me)
    me.started += 1  # a reused pid is not ours
    assert not cluster.is_alive(me)
    assert not cluster.is_alive(cluster.Process("agent", [], pid=None))


def test_socket_path_rule(tmp_path: Path) -> None:
    home = tmp_path / "web-1"
    env = {"LAB_HOME": str(home)}
    assert localclient.socket_path(env) == "/run/lab/agent.sock"  # no socket there: the default
    (home / "run").mkdir(parents=True)
    (home / "run" / "agent.sock").write_text("")  # stands for the socket
    assert localclient.socket_path(env) == str(home / "run" / "agent.sock")
    assert localclient.socket_path({**env, "LAB_RUNTIME_DIR": "/x"}) == "/x/agent.sock"  # explicit wins
    assert localclient.socket_path({}) == "/run/lab/agent.sock"
    assert AgentConfig.resolve(environ=env).runtime_dir == home / "run"
    assert AgentConfig.resolve(environ={**env, "LAB_RUNTIME_DIR": "/x"}).runtime_dir == Path("/x")
    assert AgentConfig.resolve(environ={"LAB_HOME": str(tmp_path / "other")}).runtime_dir == Path("/run/lab")
