"""Inventory changes republish the signed secret policy to the stores (config.yaml `stores:`):
`lab server add|relabel|remove` in-process and the daemon's `engine.*` writes, a store that does
not answer being a warning, never a failure. Store RPC replaced by fakes (no sockets)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from lab.common import rpc, wire
from lab.common.errors import TransportError
from lab.common.identity import CertificateAuthority
from lab.coordinator import cluster, identity_ops
from lab.coordinator.cli.app import run
from lab.coordinator.daemon import Coordinator
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.enrollment import EnrollmentService, load_identity
from lab.store.policy import PolicyDocument

STORES = ["127.0.0.1:1", "127.0.0.1:2"]


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    monkeypatch.delenv("LAB_PUPPET_MODULES", raising=False)
    assert run(["init", "--local"]) == 0
    return tmp_path / "home"


def _stores(home: Path) -> None:
    cfg = home / "config.yaml"
    cfg.write_text((cfg.read_text() if cfg.exists() else "") + f"\nstores: {STORES!r}\n")


def _fake_stores(monkeypatch: pytest.MonkeyPatch, answering: list[str]) -> list[PolicyDocument]:
    published: list[PolicyDocument] = []

    def fake_call(home: Path, stores: list[str], method: str, body: dict[str, Any], *, every: bool = False) -> list[tuple[str, Any]]:
        assert method == "store.publish" and every
        doc = PolicyDocument.decode_untrusted(body["policy"])
        published.append(doc)
        if not answering:
            raise TransportError("no store reachable (127.0.0.1:1: refused)")
        return [(ep, {"version": doc.version}) for ep in stores if ep in answering]

    monkeypatch.setattr(cluster, "store_call", fake_call)
    return published


def test_no_stores_configured_nothing_is_published(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    published = _fake_stores(monkeypatch, STORES)
    assert run(["server", "add", "db-1", "-p", "ssh", "--labels", "postgres"]) == 0
    assert published == [] and "policy" not in capsys.readouterr().err


def test_relabel_add_remove_republish_the_recompiled_policy(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _stores(home)
    published = _fake_stores(monkeypatch, STORES)
    assert run(["server", "add", "db-1", "-p", "ssh", "--labels", "postgres"]) == 0
    assert published[-1].grants["db-1"] == ("postgres/master-password",)
    err = capsys.readouterr().err
    assert "published to 2 store(s)" in err and "warning" not in err
    assert run(["server", "relabel", "db-1", "--labels", "mailserver", "-o", "json"]) == 0
    out = capsys.readouterr().out
    assert out.lstrip().startswith("{")  # the JSON on stdout stays clean
    assert "mail/relay-credentials" in published[-1].grants["db-1"]
    assert "postgres/master-password" not in published[-1].grants["db-1"]
    assert published[-1].version > published[-2].version
    assert run(["server", "add", "vault-1", "-p", "ssh", "--labels", "secret-store"]) == 0
    assert "vault-1" in published[-1].stores
    assert run(["server", "remove", "db-1"]) == 0
    assert "db-1" not in published[-1].grants and len(published) == 4
    # the CA signed it: a store would accept it
    published[-1].verify(CertificateAuthority.load(home / "ca.key").public_key)


def test_unreachable_store_is_a_warning_not_a_failure(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _stores(home)
    _fake_stores(monkeypatch, STORES[:1])
    assert run(["server", "add", "db-1", "-p", "ssh", "--labels", "postgres"]) == 0
    err = capsys.readouterr().err
    assert f"lab: warning: store {STORES[1]} unreachable" in err and "gossip" in err
    _fake_stores(monkeypatch, [])
    assert run(["server", "relabel", "db-1", "--labels", "mailserver"]) == 0
    err = capsys.readouterr().err
    assert "lab: warning: secret policy not republished" in err and "lab cluster publish" in err
    assert "Traceback" not in err


def test_daemon_inventory_writes_republish_without_blocking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path, tmp_path / "definitions", "default")
    Engine.init_local(paths)
    calls: list[tuple[list[str], PolicyDocument]] = []

    async def fake_publish(stores: list[str], identity: Any, bodies: list[dict[str, Any]]) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        calls.append((list(stores), PolicyDocument.decode_untrusted(bodies[0]["policy"])))
        return {STORES[0]: "ok", STORES[1]: "unreachable: refused"}

    monkeypatch.setattr(identity_ops, "publish_everywhere", fake_publish)
    with Engine.open(paths) as engine:
        ca = CertificateAuthority.load(tmp_path / "ca.key")
        coordinator = Coordinator(engine, EnrollmentService(engine.state, ca, endpoint="x:1"))
        admin = load_identity(tmp_path, "admin")

        class Ops:  # what the daemon's IdentityService offers the hook
            def __init__(self) -> None:
                self.engine, self.ca, self.identity = engine, ca, admin

            def stores(self) -> list[str]:
                return STORES

        peer = rpc.PeerInfo(admin.certificate, b"")

        def call(method: str, body: dict[str, Any]) -> dict[str, Any]:
            return trio.run(coordinator.handle, peer, wire.Request(id=1, method=method, body=body))

        call("engine.add_server", {"name": "db-1", "provider": "ssh", "labels": ["postgres"]})
        assert calls == []  # no identity service: nothing to publish with
        coordinator.identity_ops = Ops()  # type: ignore[attr-defined]
        out = call("engine.set_labels", {"name": "db-1", "labels": ["mailserver"]})
        assert calls[-1][0] == STORES and "mail/relay-credentials" in calls[-1][1].grants["db-1"]
        assert any(STORES[1] in w and "unreachable" in w for w in out["warnings"])
        assert not any(STORES[0] in w for w in out["warnings"])
        call("engine.get_servers", {})
        assert len(calls) == 1  # reads publish nothing
        call("engine.remove_server", {"name": "db-1"})
        assert "db-1" not in calls[-1][1].grants and calls[-1][1].version >= calls[0][1].version
        ca.close()
    assert time.time() > 0
