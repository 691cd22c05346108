"""`lab describe server NAME`: the engine's data (coordinator/reports.py) and its rendering."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pathlib
import time

import pytest
import yaml

from lab.agent.reporters import build_report, parse_puppet_run
from lab.coordinator.cli.app import run
from lab.coordinator.cli.describe_cmd import describe_server_view
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.reports import describe_server, record_report

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "puppet_reports"
NOW = 1_800_000_000.0


def run_of(kind: str, at: float):
    d = FIXTURES / kind
    r = parse_puppet_run((d / "last_run_summary.yaml").read_text(), (d / "last_run_report.yaml").read_text())
    assert r is not None
    return dataclasses.replace(r, time=at)


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def engine(home: pathlib.Path):
    paths = Paths.resolve()
    Engine.init_local(paths)
    with Engine.open(paths) as e:
        e.add_server("db-1", "baremetal", ["postgres"], environment="prod", region="eu-west")
        yield e


def enroll(engine: Engine, name: str, at: float, serial: str = "42", not_after: float | None = None) -> None:
    engine.state.update_server(name, enrolled_at=at, cert_serial=serial, last_checkin=at)
    detail = {"serial": int(serial)} | ({"not_after": not_after} if not_after else {})
    engine.state.audit("node.enroll", name, detail)


def test_server_without_reports(engine: Engine) -> None:
    v = describe_server(engine, "db-1", NOW)
    assert v["name"] == "db-1" and v["provider"] == "baremetal" and v["labels"] == ["postgres"]
    assert v["size"]["name"] == "large" and v["size"]["detail"]
    assert v["status"] == {"sync": "unknown"}
    p = v["puppet"]
    assert p["pillar"] == "unknown" and p["last_run"] is None and p["next_run"] is None
    assert p["environment"] == "prod" and p["role"] == ["postgres"]
    assert "postgresql::server" in p["classes"]
    assert v["health"]["status"] == "unknown"
    i = v["identity"]
    assert i == {"status": "not enrolled", "dns": None, "addresses": [], "certificate": None, "enrolled_at": None,
                 "last_checkin": None, "last_checkin_seconds_ago": None}  # fmt: skip
    out = io.StringIO()
    describe_server_view(v, out)
    text = out.getvalue()
    assert "Name:       db-1\n" in text and "Size:       large (" in text
    assert "Last run:     — (no report from the agent yet)" in text
    assert "\nHealth:\n" in text and "\nIdentity:\n" in text and "Enrolled:      — (not enrolled)" in text


def test_failed_run_enrolled_with_dns(engine: Engine, home: pathlib.Path) -> None:
    secret = base64.b64encode(b"k" * 32).decode()
    (home / "config.yaml").write_text(
        yaml.safe_dump({"dns": {"zone": "lab.internal", "tsig_key": {"name": "lab-dns", "algorithm": "hmac-sha256", "secret": secret}}})
    )
    (home / "config.yaml").chmod(0o600)  # an inline TSIG secret demands it
    enroll(engine, "db-1", NOW - 3600, not_after=NOW + 86400 * 365)
    record_report(engine.state, "db-1", build_report(run_of("failed", NOW - 120), ["10.0.1.45"], 1800.0), NOW - 38)
    v = describe_server(engine, "db-1", NOW)
    p = v["puppet"]
    assert p["pillar"] == "failed" and p["environment"] == "production"
    assert p["last_run"]["status"] == "failed" and p["last_run"]["time"] == "2027-01-15T07:58:00Z"
    assert p["next_run"] == "2027-01-15T08:28:00Z"
    [f] = p["failed_resources"]
    assert f["resource"] == "File[/tmp/pcap/fail/no/such/dir/file.txt]" and f["line"] == 1
    i = v["identity"]
    assert i["status"] == "enrolled"
    assert i["dns"] == {"name": "db-1.lab.internal", "addresses": ["10.0.1.45"]}
    assert i["certificate"] == {"serial": "42", "expires": "2028-01-15T08:00:00Z"}
    assert i["enrolled_at"] == "2027-01-15T07:00:00Z" and i["last_checkin_seconds_ago"] == 38
    assert engine.warnings == []
    json.dumps(v)  # plain data
    out = io.StringIO()
    describe_server_view(v, out)
    text = out.getvalue()
    assert "Last run:     2027-01-15 07:58:00 UTC (failed)" in text
    assert "Failed resources (1):\n    └── File[/tmp/pcap/fail/no/such/dir/file.txt] (/tmp/pcap/fail.pp:1): change from" in text
    assert "DNS:           db-1.lab.internal (A: 10.0.1.45)" in text
    assert "Certificate:   ✓ signed (serial 42, expires 2028-01-15)" in text
    assert "Last Check-in: 2027-01-15 07:59:22 UTC (38 seconds ago)" in text


def test_stale_run_and_unknown_expiry(engine: Engine) -> None:
    enroll(engine, "db-1", NOW - 86400)
    record_report(engine.state, "db-1", build_report(run_of("ok", NOW - 7200)), NOW - 7200)
    v = describe_server(engine, "db-1", NOW)
    assert v["puppet"]["pillar"] == "stale" and v["puppet"]["last_run"]["status"] == "ok"
    assert v["identity"]["certificate"] == {"serial": "42", "expires": None}
    out = io.StringIO()
    describe_server_view(v, out)
    assert "(success, stale)" in out.getvalue() and "(2 hours ago)" in out.getvalue()


def test_broken_definitions_still_describe(engine: Engine) -> None:
    (engine.paths.definitions / "labels.yaml").write_text("labels: [not, a, mapping\n")
    engine.reload()
    v = describe_server(engine, "db-1", NOW)
    assert v["puppet"]["classes"] == [] and v["name"] == "db-1"
    assert any("definitions not read" in w for w in engine.warnings)


def test_cli_describe_json_yaml_table_and_errors(engine: Engine, capsys: pytest.CaptureFixture[str]) -> None:
    record_report(engine.state, "db-1", build_report(run_of("changed", time.time() - 5)), time.time())
    engine.close()
    assert run(["describe", "server", "db-1", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["puppet"]["pillar"] == "changed" and data["puppet"]["last_run"]["status"] == "changed"
    assert run(["describe", "server", "db-1", "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "db-1"
    assert run(["describe", "server", "db-1"]) == 0
    assert "(success, changes applied)" in capsys.readouterr().out
    assert run(["describe", "server", "nope"]) != 0
    assert "no server named 'nope'" in capsys.readouterr().err
    assert run(["get", "servers", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["puppet"] == "changed"
