"""`lab plan|apply|diff|sync server` in local mode, in-process against a temporary LAB_HOME."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from lab.agent.facts import parse_facts
from lab.coordinator.cli.app import run
from lab.coordinator.engine import Engine, Paths

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    assert lab(capsys, "init", "--local")[0] == 0
    return tmp_path / "home"


def lab(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def record(name: str, **fields) -> None:
    with Engine.open(Paths.resolve()) as e:
        e.state.update_server(name, **fields)


def small_vm() -> dict:
    return parse_facts(json.loads((FIXTURES / "facts" / "kvm-epyc-2vcpu-vm.json").read_text())).to_dict()


def test_plan_then_apply_registers_without_host(home: pathlib.Path, capsys) -> None:
    code, out, err = lab(capsys, "plan", "server", "new-1", "--label", "app", "--provider", "ssh")
    assert code == 0, err
    assert "Plan for new-1 (provider ssh, new server):" in out
    assert "+ label: app" in out and "+ class: nginx" in out and "register it in the inventory only" in out
    assert (home / "plans" / "new-1.json").is_file()
    assert json.loads(lab(capsys, "get", "servers", "-o", "json")[1]) == []  # nothing written but the plan
    code, out, err = lab(capsys, "apply", "server", "new-1")
    assert code == 0, err
    assert "✓ registered new-1 in the inventory (provider ssh; labels: app)" in out
    assert "no host given: nothing was installed" in out
    rows = json.loads(lab(capsys, "get", "servers", "-o", "json")[1])
    assert [(r["name"], r["provider"], r["labels"], r["sync"]) for r in rows] == [("new-1", "ssh", ["app"], "unknown")]
    assert not (home / "plans" / "new-1.json").exists()
    code, _, err = lab(capsys, "apply", "server", "new-1")
    assert code == 2 and "no plan for 'new-1'" in err


def test_apply_refuses_a_stale_plan(home: pathlib.Path, capsys) -> None:
    assert lab(capsys, "plan", "server", "new-2", "--label", "app", "--provider", "ssh")[0] == 0
    with (home / "definitions" / "labels.yaml").open("a") as f:
        f.write("\n  extra-label: {}\n")
    code, _, err = lab(capsys, "apply", "server", "new-2")
    assert code == 3 and "stale" in err and "lab plan server new-2" in err
    assert json.loads(lab(capsys, "get", "servers", "-o", "json")[1]) == []


def test_apply_changes_an_existing_server(home: pathlib.Path, capsys) -> None:
    assert lab(capsys, "server", "add", "web-1", "-p", "ssh", "--labels", "app")[0] == 0
    code, out, err = lab(capsys, "plan", "server", "web-1", "--label", "app,production", "--size", "large", "-e", "staging")
    assert code == 0, err
    assert "+ label: production" in out and "~ size: large" in out and "+ environment: staging" in out
    code, out, err = lab(capsys, "apply", "server", "web-1")
    assert code == 0, err
    r = json.loads(lab(capsys, "get", "servers", "-o", "json")[1])[0]
    assert r["labels"] == ["app", "production"] and r["size"] == "large" and r["environment"] == "staging"


def test_other_providers_say_not_implemented(home: pathlib.Path, capsys) -> None:
    code, out, _ = lab(capsys, "plan", "server", "mail-3", "--label", "mailserver", "--provider", "aws")
    assert code == 0 and "provider aws: not implemented yet" in out
    code, _, err = lab(capsys, "apply", "server", "mail-3")
    assert code == 1 and "provider aws: not implemented yet" in err and "nothing was changed" in err


def test_diff_smaller_than_declared_is_drift(home: pathlib.Path, capsys) -> None:
    assert lab(capsys, "server", "add", "db-1", "-p", "baremetal", "--labels", "postgres", "-e", "production")[0] == 0
    code, out, _ = lab(capsys, "diff", "server", "db-1")
    assert code == 0 and "no report from the agent yet" in out and "? cores: 8" in out
    record("db-1", facts=small_vm(), puppet={"status": "ok", "time": time.time() - 60, "environment": "production",
                                             "failed_resources": [], "errors": []})
    code, out, _ = lab(capsys, "diff", "server", "db-1")
    lines = out.splitlines()
    assert "  labels: postgres" in lines
    assert any(x.startswith("- cores: 8") and "← declared, missing" in x for x in lines)
    assert any(x.startswith("+ cores: 2") and "← not in spec" in x for x in lines)
    assert any(x.startswith("- memory: 32GB") for x in lines) and any(x.startswith("+ memory: 24GB") for x in lines)
    assert "  class: postgresql::server" in lines and "db-1: DRIFT DETECTED" in lines
    data = json.loads(lab(capsys, "diff", "server", "db-1", "-o", "json")[1])
    assert data["server"] == "db-1" and data["in_sync"] is False
    assert {i["status"] for i in data["items"]} <= {"ok", "drift", "unknown"}
    cores = next(i for i in data["items"] if i["key"] == "cores")
    assert (cores["declared"], cores["actual"], cores["status"]) == (8, 2, "drift")
    assert all(set(i) >= {"key", "declared", "actual", "status"} for i in data["items"])
    row = json.loads(lab(capsys, "get", "servers", "-o", "json")[1])[0]
    assert row["sync"] == "drift"
    assert "⚠ drift" in lab(capsys, "get", "servers")[1]
    assert json.loads(lab(capsys, "describe", "server", "db-1", "-o", "json")[1])["status"]["sync"] == "drift"


def test_diff_in_sync_and_sync_command(home: pathlib.Path, capsys) -> None:
    assert lab(capsys, "server", "add", "web-1", "-p", "ssh", "--labels", "app", "-e", "production")[0] == 0
    record("web-1", facts=small_vm(), puppet={"status": "ok", "time": time.time() - 60, "environment": "production",
                                              "failed_resources": [], "errors": []})
    code, out, _ = lab(capsys, "plan", "server", "web-1", "--size", "small")
    assert code == 0 and lab(capsys, "apply", "server", "web-1")[0] == 0
    data = json.loads(lab(capsys, "diff", "server", "web-1", "-o", "json")[1])
    assert data["in_sync"] is True and data["sync"] == "sync"
    assert json.loads(lab(capsys, "get", "servers", "-o", "json")[1])[0]["sync"] == "sync"
    code, out, _ = lab(capsys, "sync", "server", "web-1")
    assert code == 0 and "Nothing to reconcile." in out and "web-1: in sync" in out
    record("web-1", environment="staging")
    code, out, _ = lab(capsys, "sync", "server", "web-1")
    assert code == 0 and "To do by hand" in out and "environment: Puppet ran in 'production'" in out
    assert "- environment: staging" in out


def test_apply_with_a_host_hands_over_to_ssh_onboarding(home: pathlib.Path, capsys, monkeypatch) -> None:
    from lab.common.errors import AuthError
    from lab.coordinator.cli import onboard_cmd

    seen = {}

    def refuse(target, home_, accept_new, extra):
        seen.update(host=target.host, port=target.port, user=target.user, accept_new=accept_new)
        raise AuthError("HOST KEY MISMATCH (test)")

    monkeypatch.setattr(onboard_cmd, "_check_host_key", refuse)
    code, out, err = lab(capsys, "plan", "server", "web-9", "--label", "app", "--provider", "ssh", "--host", "10.0.0.5",
                         "--port", "2222", "--user", "admin", "--server", "10.0.0.1:7443")
    assert code == 0, err
    assert "onboard it over SSH at 10.0.0.5" in out
    code, out, err = lab(capsys, "apply", "server", "web-9", "--yes")
    assert "✓ registered web-9 in the inventory" in out and "→ onboarding web-9 over SSH at 10.0.0.5" in out
    assert code == 4 and "onboard failed at step 'connect'" in err and "HOST KEY MISMATCH" in err
    assert seen == {"host": "10.0.0.5", "port": 2222, "user": "admin", "accept_new": False}
    assert json.loads(lab(capsys, "get", "servers", "-o", "json")[1])[0]["labels"] == ["app"]


def test_dash_actions_reach_the_lifecycle(home: pathlib.Path, capsys) -> None:
    from lab.coordinator.tui import models, source

    assert lab(capsys, "server", "add", "db-1", "-p", "baremetal", "--labels", "postgres", "-e", "production")[0] == 0
    record("db-1", facts=small_vm(), puppet={"status": "ok", "time": time.time() - 60, "environment": "production",
                                             "failed_resources": [], "errors": []})
    said: list[str] = []
    with Engine.open(Paths.resolve()) as engine:
        source.run_action(engine, "sync", models.Target("server", "db-1"), said.append)
        assert not any("not available" in line for line in said)
        assert said[0] == "sync db-1: started" and said[-1] == "sync db-1: done"
        assert any(line.startswith("by hand: cores:") for line in said)
        assert any(line.startswith("- cores: 8") for line in said)
        assert engine.state.audit_log(1)[0].action == "server.sync"
        assert engine.plan("db-1") == [line for line in said if line[:2] in ("  ", "- ", "+ ", "? ") or line.startswith("db-1:")]
