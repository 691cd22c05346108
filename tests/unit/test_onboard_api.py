"""coordinator/onboard_api.py (the daemon's ``onboard.*``/``tokens.*``) on a real engine in a
temporary LAB_HOME, called in-process with a fake peer; coordinator/onboarding.py's local
backend; an onboarding record that outlived its allowlist entry reads as timed out."""

from __future__ import annotations

import json
import pathlib
import types
from typing import Any

import pytest
import trio
import yaml

from lab.common.errors import NotEntitled, UsageError
from lab.coordinator.cli.app import run
from lab.coordinator.daemon import Coordinator
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.onboard_api import METHODS, handle
from lab.coordinator.onboarding import LocalOnboarding
from lab.coordinator.providers import baremetal as bm

MAC = "52:54:00:12:34:56"


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    assert run(["init", "--local"]) == 0
    capsys.readouterr()
    return tmp_path / "home"


class Daemon:
    """What onboard_api needs of the daemon's Coordinator."""

    operator_engine = Coordinator.operator_engine  # the real admin gate and reload

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.enrollment = types.SimpleNamespace(endpoint="coord.example:7443")


def peer(*roles: str, name: str = "admin") -> Any:
    return types.SimpleNamespace(roles=roles, name=name, address="10.0.0.9:5000")


def call(d: Daemon, method: str, body: dict[str, Any], who: Any = None) -> Any:
    return trio.run(handle, d, who or peer("admin"), method, body)["result"]


def audit(engine: Engine, subject: str) -> list[tuple[str, str]]:
    return [(e.actor, e.action) for e in reversed(engine.state.audit_log(200)) if e.subject == subject]


def test_every_method_refuses_a_certificate_without_the_admin_role(home: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    with Engine.open(Paths.resolve()) as engine:
        d = Daemon(engine)
        for method in sorted(METHODS) + ["onboard.nope"]:
            with pytest.raises(NotEntitled, match="needs the 'admin' role"):
                call(d, method, {"name": "web-1", "provider": "ssh"}, peer("node", name="web-3"))
        assert engine.state.audit_log(10) == [] and engine.state.list_tokens() == []
    assert caplog.text.count("api.denied") == len(METHODS) + 1


def test_ssh_register_token_status_audit_as_the_admin(home: pathlib.Path) -> None:
    with Engine.open(Paths.resolve()) as engine:
        d = Daemon(engine)
        assert call(d, "onboard.status", {"name": "web-1"}) == {
            "server": None, "endpoint": "coord.example:7443", "pxe": None, "image_family": None}
        call(d, "onboard.register", {"name": "web-1", "provider": "ssh", "labels": [], "environment": "staging"})
        call(d, "onboard.register", {"name": "web-1", "provider": "ssh", "labels": []})  # there already: nothing
        first = call(d, "onboard.token", {"name": "web-1", "labels": [], "ttl": 900})["token"]
        second = call(d, "onboard.token", {"name": "web-1", "labels": [], "ttl": 900})["token"]
        assert first.startswith("lab1.") and second != first
        assert [t.status(0) for t in engine.state.list_tokens()].count("valid") == 1  # the older one revoked
        call(d, "onboard.audit", {"name": "web-1", "action": "onboard.start", "detail": {"provider": "ssh"}})
        with pytest.raises(UsageError, match="onboard.audit records onboard"):
            call(d, "onboard.audit", {"name": "web-1", "action": "server.remove", "detail": {}})
        s = call(d, "onboard.status", {"name": "web-1"})["server"]
        assert s["provider"] == "ssh" and s["enrolled_at"] is None
        with pytest.raises(UsageError, match="not defined"):
            call(d, "onboard.register", {"name": "web-2", "provider": "ssh", "labels": ["no-such-label"]})
        assert audit(engine, "web-1") == [("cert:admin", a) for a in ("server.add", "token.create", "token.create", "onboard.start")]
        assert first not in json.dumps([e.detail for e in engine.state.audit_log(50)])


def test_baremetal_allow_writes_the_record_in_the_daemons_home(home: pathlib.Path) -> None:
    (home / "pxe" / "images" / "ubuntu-24.04").mkdir(parents=True)
    (home / "pxe" / "images" / "ubuntu-24.04" / "image.yaml").write_text("family: ubuntu\n")
    with Engine.open(Paths.resolve()) as engine:
        d = Daemon(engine)
        assert call(d, "onboard.status", {"name": "db-1", "image": "ubuntu-24.04"})["image_family"] == "ubuntu"
        call(d, "onboard.register", {"name": "db-1", "provider": "baremetal", "labels": []})
        call(d, "onboard.record", {"name": "db-1", "mac": MAC.upper(), "stage": "waiting", "state": "running",
                                   "history": [], "expires_at": 4e9})
        got = call(d, "onboard.allow", {"name": "db-1", "mac": MAC, "image": "ubuntu-24.04", "labels": [], "wait_s": 600,
                                        "disk_gb": 40, "coordinator": "coord.example:7443"})
        node = yaml.safe_load((home / "pxe" / "nodes" / "52-54-00-12-34-56.yaml").read_text())
        assert node["hostname"] == "db-1" and node["coordinator"] == "coord.example:7443" and node["disk_gb"] == 40
        assert node["token"].startswith("lab1.") and node["expires_at"] == got["expires_at"]
        assert (home / "pxe" / "nodes" / "52-54-00-12-34-56.yaml").stat().st_mode & 0o777 == 0o600
        rec = call(d, "onboard.status", {"name": "db-1"})["server"]["facts"]["onboarding"]
        assert rec["mac"] == MAC and rec["stage"] == "waiting" and rec["expires_at"] == 4e9
        local = LocalOnboarding(engine)
        local.register("db-1", "baremetal", [], None, None)  # not enrolled yet: onboarding it again is fine
        local.register("web-5", "ssh", [], None, None)
        with pytest.raises(UsageError, match="exists with provider ssh"):
            call(d, "onboard.register", {"name": "web-5", "provider": "baremetal", "labels": []})
        with pytest.raises(LookupError, match="nope"):
            call(d, "onboard.allow", {"name": "db-2", "mac": MAC, "image": "nope", "labels": [], "wait_s": 600,
                                      "coordinator": "c:1"})
        with pytest.raises(UsageError, match="stage must be one of"):
            call(d, "onboard.record", {"name": "db-1", "mac": MAC, "stage": "done", "state": "running"})
        assert node["token"] not in json.dumps([e.detail for e in engine.state.audit_log(50)])


def test_tokens_create_list_revoke(home: pathlib.Path) -> None:
    with Engine.open(Paths.resolve()) as engine:
        d = Daemon(engine)
        made = call(d, "tokens.create", {"name": "web-4", "labels": [], "ttl": 600})
        assert made["token"].startswith("lab1.") and made["record"]["status"] == "valid"
        assert [t["name"] for t in call(d, "tokens.list", {})["tokens"]] == ["web-4"]
        assert call(d, "tokens.revoke", {"name": "web-4"}) == {"count": 1}
        with pytest.raises(UsageError, match="no unused token"):
            call(d, "tokens.revoke", {"name": "web-4"})
        with pytest.raises(UsageError, match="ttl must be"):
            call(d, "tokens.create", {"name": "web-4", "ttl": 10**9})
        assert audit(engine, "web-4") == [("cert:admin", "token.create"), ("cert:admin", "token.revoke")]


def test_a_waiting_record_past_its_expiry_reads_as_timed_out() -> None:
    facts = bm.onboarding_facts(MAC, "waiting", expires_at=1000.0)
    assert bm.identity_pillar(facts, now=999.0) == "pxe: waiting for boot request"
    assert bm.identity_pillar(facts, now=1000.0) == "pxe: timed out waiting for boot request"
    moved = bm.advance_onboarding(facts, MAC, "ipxe", at=500.0)
    assert moved is not None and moved["onboarding"]["expires_at"] == 1000.0
    assert bm.identity_pillar(moved, now=2000.0) == "pxe: timed out at serving iPXE"
    failed = bm.onboarding_facts(MAC, "kernel", state="failed", step="power", expires_at=1000.0)
    assert bm.identity_pillar(failed, now=2000.0) == "pxe: failed at step power"
    assert bm.identity_pillar(bm.onboarding_facts(MAC, "kernel"), now=1e12) == "pxe: kernel + initrd"  # no expiry known
