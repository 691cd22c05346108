"""The daemon's small parts, and the remote CLI (RemoteEngine) against the daemon's handler over
in-memory streams."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml

from _memory_rpc import memory_connect

from lab.common import rpc
from lab.common.errors import UsageError
from lab.common.identity import CertificateAuthority
from lab.coordinator import client as client_mod
from lab.coordinator.cli.app import run as lab
from lab.coordinator.daemon import ENGINE_READ, Coordinator, parse_endpoint, sd_notify
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.enrollment import EnrollmentService, ensure_cluster_identity, load_identity


def test_parse_endpoint() -> None:
    assert parse_endpoint("10.0.0.1:9000") == ("10.0.0.1", 9000)
    assert parse_endpoint("coord") == ("coord", 7443)
    assert parse_endpoint("[::1]:7443") == ("::1", 7443)
    assert parse_endpoint("[fd00::5]") == ("fd00::5", 7443)
    for bad in ("", "host:x", "host:0", "host:70000", "[::1"):
        with pytest.raises(UsageError):
            parse_endpoint(bad)


def test_sd_notify_without_systemd() -> None:
    assert sd_notify("READY=1", environ={}) is False


def test_cluster_identity_is_idempotent(tmp_path: Path) -> None:
    first = ensure_cluster_identity(tmp_path)
    assert set(first.created) == {"ca.key", "ca.pub", "coordinator.cert", "admin.cert"}
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = ensure_cluster_identity(tmp_path)
    assert again.created == () and again.ca_fingerprint == first.ca_fingerprint
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    for f in ("ca.key", "coordinator.key", "admin.key"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o600
    assert load_identity(tmp_path, "admin").certificate.roles == ("admin",)
    assert load_identity(tmp_path, "coordinator").certificate.roles == ("coordinator",)
    # a certificate close to expiry is renewed, with the same key
    (tmp_path / "admin.cert").unlink()
    assert ensure_cluster_identity(tmp_path).created == ("admin.cert",)


def test_remote_cli_goes_through_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "lab"
    monkeypatch.setenv("LAB_HOME", str(home))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    assert lab(["init", "--local"]) == 0
    paths = Paths.resolve()
    engine = Engine.open(paths)
    engine.add_server("db-1", "ssh", ["postgres"])
    ca = CertificateAuthority.load(home / "ca.key")
    service = EnrollmentService(engine.state, ca, endpoint="127.0.0.1:7443")
    server = rpc.Server(load_identity(home, "coordinator"), Coordinator(engine, service).handle, enroll_handler=service.enroll)
    seen: list[str] = []

    monkeypatch.setattr(client_mod.rpc, "connect", memory_connect(server, seen))
    (home / "config.yaml").write_text(yaml.safe_dump({"server": "127.0.0.1:7443"}))
    try:
        capsys.readouterr()
        assert lab(["get", "servers", "-o", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["name"] for r in rows] == ["db-1"] and seen == ["127.0.0.1:7443"]
        assert lab(["server", "add", "web-1", "-p", "ssh", "-l", "app"]) == 0
        assert engine.state.get_server("web-1").labels == ("app",)
        assert lab(["show", "server", "nope"]) == 3  # NotFound travels as not-found
        assert "no server named 'nope'" in capsys.readouterr().err
    finally:
        ca.close()
        engine.close()


def test_engine_allowlist_is_read_only_plus_inventory() -> None:
    assert all(m.startswith(("get_", "show_", "targets_", "describe_")) for m in ENGINE_READ)


def test_engine_results_are_wire_data(tmp_path: Path) -> None:
    paths = Paths(tmp_path, tmp_path / "definitions", "default")
    Engine.init_local(paths)
    with Engine.open(paths) as engine:
        engine.add_server("db-1", "ssh", ["postgres"])
        ca = CertificateAuthority.load(tmp_path / "ca.key")
        coordinator = Coordinator(engine, EnrollmentService(engine.state, ca, endpoint="x:1"))
        admin = load_identity(tmp_path, "admin")
        peer = rpc.PeerInfo(admin.certificate, b"")
        from lab.common import wire

        for method in sorted(ENGINE_READ):
            body: dict[str, Any] = {} if method.startswith("get_") else {"name": "db-1"}
            if method in ("show_label",):
                body = {"name": "postgres"}
            if method in ("show_group", "show_alert", "show_secret"):
                continue
            req = wire.Request(id=1, method=f"engine.{method}", body=body)
            out = trio.run(coordinator.handle, peer, req)
            wire.Response.success(1, out)  # validates as wire data
        ca.close()
    assert time.time() > 0
