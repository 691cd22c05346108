"""The daemon's ``lifecycle.*`` methods (coordinator/lifecycle_api.py) and RemoteEngine.lifecycle,
over in-memory streams: plans stored in the daemon's home, stale plans refused with the local exit
status, admin role checked before anything else, request bodies checked, audit names the admin."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml

from _memory_rpc import memory_connect

from lab.common import rpc, wire
from lab.common.errors import NotEntitled, NotFound, UsageError
from lab.common.identity import DEFAULT_CERT_LIFETIME, CertificateAuthority, NodeKey
from lab.coordinator import client as client_mod
from lab.coordinator import lifecycle, lifecycle_api
from lab.coordinator.client import RemoteEngine
from lab.coordinator.daemon import Coordinator
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.enrollment import EnrollmentService, load_identity


@pytest.fixture()
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, Coordinator, Path]]:
    """A coordinator home with its Coordinator handler, and a CLI home connected to it through
    memory streams (rpc.connect replaced by a pair of in-memory streams to the handler)."""
    home, cli = tmp_path / "coord", tmp_path / "cli"
    paths = Paths(home, home / "definitions", "default")
    Engine.init_local(paths)
    engine = Engine.open(paths)
    ca = CertificateAuthority.load(home / "ca.key")
    service = EnrollmentService(engine.state, ca, endpoint="127.0.0.1:7443")
    coordinator = Coordinator(engine, service)
    server = rpc.Server(load_identity(home, "coordinator"), coordinator.handle, enroll_handler=service.enroll)

    monkeypatch.setattr(client_mod.rpc, "connect", memory_connect(server))
    cli.mkdir()
    for f in ("ca.pub", "admin.key", "admin.cert"):
        shutil.copy2(home / f, cli / f)
    (cli / "config.yaml").write_text(yaml.safe_dump({"server": "127.0.0.1:7443"}))
    try:
        yield engine, coordinator, cli
    finally:
        ca.close()
        engine.close()


def remote(cli: Path) -> RemoteEngine:
    return RemoteEngine.open(Paths(cli, cli / "definitions", "default"))


def peer_with_roles(home: Path, roles: tuple[str, ...]) -> rpc.PeerInfo:
    ca = CertificateAuthority.load(home / "ca.key")
    try:
        key = NodeKey.generate()
        cert = ca.issue("ops", "ops-1", key.public_key, roles, DEFAULT_CERT_LIFETIME, time.time())
    finally:
        ca.close()
    return rpc.PeerInfo(cert, b"")


def test_plan_is_stored_on_the_coordinator_and_applied_there(daemon: Any) -> None:
    engine, _, cli = daemon
    ops = lifecycle_api.ops(remote(cli))
    plan = ops.plan("web-1", labels=["app"], provider="ssh")
    home = engine.paths.home
    assert plan["path"] == str(home / "plans" / "web-1.json") and Path(plan["path"]).is_file()
    assert not (cli / "plans").exists()
    assert [c["what"] for c in plan["changes"]][:2] == ["server", "label"]
    result = ops.apply("web-1")
    assert result["lines"][0] == "✓ registered web-1 in the inventory (provider ssh; labels: app)"
    assert "publish_due" not in result and not (home / "plans" / "web-1.json").exists()
    engine.reload()
    assert engine.state.get_server("web-1").labels == ("app",)
    assert ops.diff("web-1") == lifecycle.diff(engine, "web-1")
    synced = ops.sync("web-1")
    assert synced["done"] == [] and synced["before"] == "unknown" and "publish_due" not in synced
    actions = [(a.actor, a.action) for a in reversed(engine.state.audit_log(10))]
    assert actions == [("cert:admin", "server.plan"), ("cert:admin", "server.add"), ("cert:admin", "server.sync")]


def test_stale_plan_keeps_its_exit_status_through_the_daemon(daemon: Any) -> None:
    engine, _, cli = daemon
    ops = remote(cli).lifecycle
    ops.plan("web-2", labels=["app"], provider="ssh")
    with (engine.paths.definitions / "labels.yaml").open("a") as f:
        f.write("\n  extra-label: {}\n")
    with pytest.raises(lifecycle.StalePlan) as info:
        ops.apply("web-2")
    assert info.value.exit_code == 3 and "lab plan server web-2" in str(info.value)
    with pytest.raises(UsageError, match="no plan for 'web-3'"):
        ops.apply("web-3")
    with pytest.raises(NotFound, match="no server named 'nope'"):
        ops.diff("nope")


def test_ssh_onboarding_is_refused_before_anything_changes(daemon: Any) -> None:
    engine, _, cli = daemon
    ops = remote(cli).lifecycle
    ops.plan("web-9", labels=["app"], provider="ssh", hosts=["10.0.0.5"], ssh={"port": 22, "user": "root", "identity": None, "server": None})
    with pytest.raises(UsageError, match="on the coordinator host .*nothing was changed"):
        ops.apply("web-9")
    assert (engine.paths.home / "plans" / "web-9.json").is_file()
    assert [s.name for s in engine.state.list_servers()] == []


@pytest.mark.parametrize("method", ["lifecycle.diff", "lifecycle.plan", "lifecycle.apply", "lifecycle.sync", "lifecycle.nope"])
def test_only_admins_get_in_and_before_anything_else(daemon: Any, method: str) -> None:
    engine, coordinator, _ = daemon
    req = wire.Request(id=1, method=method, body={"name": "web-1", "labels": ["app"], "provider": "ssh"})
    with pytest.raises(NotEntitled, match=f"{method} needs the 'admin' role"):
        trio.run(coordinator.handle, peer_with_roles(engine.paths.home, ("node",)), req)
    assert engine.state.audit_log(5) == [] and not (engine.paths.home / "plans").exists()
    admin = peer_with_roles(engine.paths.home, ("admin",))
    if method == "lifecycle.nope":
        with pytest.raises(NotFound):
            trio.run(coordinator.handle, admin, req)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"name": 5}, "name must be a server name"),
        ({"name": "w", "labels": "app"}, "labels must be a list of strings"),
        ({"name": "w", "labels": ["app", 3]}, "labels must be a list of strings"),
        ({"name": "w", "provider": ["ssh"]}, "provider must be a string"),
        ({"name": "w", "ssh": {"port": True}}, "ssh.port must be a port number"),
        ({"name": "w", "ssh": {"port": 70000}}, "ssh.port must be a port number"),
        ({"name": "w", "ssh": {"shell": "x"}}, "ssh must be a mapping"),
        ({"name": "w", "ssh": {"user": 1}}, "user must be a string"),
        ({"name": "w", "hosts": "10.0.0.5"}, "hosts must be a list of strings"),
        ({"name": "w", "definitions_hash": "x"}, "unknown plan option"),
    ],
)
def test_plan_bodies_are_checked(daemon: Any, body: dict[str, Any], why: str) -> None:
    engine, coordinator, _ = daemon
    admin = peer_with_roles(engine.paths.home, ("admin",))
    with pytest.raises(UsageError, match=why):
        trio.run(coordinator.handle, admin, wire.Request(id=1, method="lifecycle.plan", body=body))
    assert not (engine.paths.home / "plans").exists()


def test_policy_publication_is_left_to_the_caller_when_asked(daemon: Any) -> None:
    engine, _, _ = daemon
    engine.add_server("db-1", "ssh", ["postgres"])
    run = lifecycle_api.Lifecycle(engine, actor="cert:admin", publish=False)
    run.plan("db-1", labels=["postgres", "production"])
    result = run.apply("db-1")
    assert result["publish_due"] is True and result["lines"] == ["✓ labels: postgres,production"]
    assert lifecycle_api.Lifecycle.published(result, "→ policy version 7 published to 1 store(s)")["lines"][-1] == "  → policy version 7 published to 1 store(s)"
    synced = run.sync("db-1")
    assert synced["publish_due"] is True
    assert lifecycle_api.Lifecycle.published(synced, "→ published")["done"][0] == "→ published"
    assert lifecycle_api.Lifecycle.published({"done": []}, None) == {"done": [], "publish_due": False}
    # in-process (local mode) publishes itself: no stores configured, so nothing to say
    local = lifecycle_api.Lifecycle(engine)
    local.plan("db-1", labels=["postgres"])
    applied = local.apply("db-1")
    assert applied["lines"] == ["✓ labels: postgres"] and applied["publish_due"] is False
    assert [a.actor for a in engine.state.audit_log(1)] == ["local"]
