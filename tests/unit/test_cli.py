"""The `lab` CLI in local mode, run in-process against a temporary LAB_HOME."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from lab.coordinator.cli.app import run


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    return tmp_path / "home"


def lab(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def fleet(home: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> pathlib.Path:
    assert lab(capsys, "init", "--local")[0] == 0
    for args in (
        ["worker-5", "-p", "aws", "--labels", "k8s-worker,production,eu-west", "-e", "prod", "-r", "eu-west"],
        ["batch-worker-1", "-p", "aws", "--labels", "k8s-worker", "-e", "prod", "-r", "eu-west"],
        ["test-box-1", "-p", "ssh", "--labels", "k8s-worker", "-e", "dev", "-r", "eu-west"],
        ["db-1", "-p", "baremetal", "--labels", "postgres,production,eu-west", "-e", "prod", "-r", "eu-west"],
        ["mail-1", "-p", "xcpng", "--labels", "mailserver", "-e", "prod", "-r", "us-east", "--size", "small"],
    ):
        code, _, err = lab(capsys, "server", "add", *args)
        assert code == 0, err
    return home


def test_init_creates_state_and_example_definitions(home: pathlib.Path, capsys) -> None:
    code, out, _ = lab(capsys, "init", "--local")
    assert code == 0
    assert (home / "state.db").is_file()
    assert (home / "definitions" / "labels.yaml").is_file()
    assert "✓ State:" in out and "10 labels" in out
    assert (home.stat().st_mode & 0o777) == 0o700


def test_definitions_flag_is_remembered_and_env_overrides(home: pathlib.Path, tmp_path: pathlib.Path, capsys, monkeypatch) -> None:
    custom = tmp_path / "infra"
    assert lab(capsys, "init", "--local", "--definitions", str(custom))[0] == 0
    assert (custom / "groups.yaml").is_file()
    assert yaml.safe_load((home / "config.yaml").read_text())["definitions"] == str(custom)
    (custom / "extra.yaml").write_text("labels:\n  only-here: {}\n")
    code, out, _ = lab(capsys, "get", "labels", "-o", "json")
    assert "only-here" in [r["name"] for r in json.loads(out)]
    other = tmp_path / "other"
    other.mkdir()
    (other / "l.yaml").write_text("labels:\n  from-env: {}\n")
    monkeypatch.setenv("LAB_DEFINITIONS", str(other))
    code, out, _ = lab(capsys, "get", "labels", "-o", "json")
    assert [r["name"] for r in json.loads(out)] == ["from-env"]
    code, out, _ = lab(capsys, "get", "labels", "-o", "json", "--definitions", str(custom))
    assert "only-here" in [r["name"] for r in json.loads(out)]


def test_get_servers_table_json_yaml(fleet, capsys) -> None:
    code, out, _ = lab(capsys, "get", "servers")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["NAME", "PROVIDER", "LABELS", "SIZE", "SYNC", "PUPPET", "HEALTH", "IDENTITY"]
    assert "worker-5" in out and "k8s-worker,production,eu-west" in out
    rows = json.loads(lab(capsys, "get", "servers", "-o", "json")[1])
    assert {r["name"] for r in rows} == {"worker-5", "batch-worker-1", "test-box-1", "db-1", "mail-1"}
    w5 = next(r for r in rows if r["name"] == "worker-5")
    assert w5["provider"] == "aws" and w5["labels"] == ["k8s-worker", "production", "eu-west"] and w5["environment"] == "prod"
    assert w5["size"] == "large"  # from its label
    assert next(r for r in rows if r["name"] == "mail-1")["size"] == "small"  # explicit wins
    assert yaml.safe_load(lab(capsys, "get", "servers", "-o", "yaml")[1]) == rows


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--label", "k8s-worker"], {"worker-5", "batch-worker-1", "test-box-1"}),
        (["--label", "k8s-worker", "--environment", "prod", "--exclude", "batch-worker-1"], {"worker-5"}),
        (["--label", "postgres,mailserver"], {"db-1", "mail-1"}),
        (["--region", "us-east"], {"mail-1"}),
        (["--group", "eu-infrastructure"], {"worker-5", "batch-worker-1", "db-1"}),
        (["--group", "production", "--label", "postgres"], {"db-1"}),
        (["--environment", "staging"], set()),
    ],
)
def test_get_servers_filters(fleet, capsys, args, expected) -> None:
    code, out, err = lab(capsys, "get", "servers", "-o", "json", *args)
    assert code == 0, err
    assert {r["name"] for r in json.loads(out)} == expected


def test_show_server_json_contract(fleet, capsys) -> None:
    code, out, _ = lab(capsys, "show", "server", "worker-5", "-o", "json")
    assert code == 0
    v = json.loads(out)
    for key in ("name", "labels", "groups", "environment", "region", "puppet_classes", "alerts", "secrets", "excluded_from"):
        assert key in v
    assert {"name": "base::hardening", "source": "label:production"} in v["puppet_classes"]
    alerts = {a["name"]: a["source"] for a in v["alerts"]}
    assert alerts["disk_space_low"] == "group:production"
    assert alerts["cert_expiry"] == "auto:identity"
    assert {"path": "k8s/join-token", "source": "label:k8s-worker", "type": "dynamic"} in v["secrets"]
    excl = json.loads(lab(capsys, "show", "server", "batch-worker-1", "-o", "json")[1])["excluded_from"]
    assert excl == [{"kind": "alert", "name": "memory_pressure", "reason": "by name"}]


def test_show_server_tree(fleet, capsys) -> None:
    out = lab(capsys, "show", "server", "worker-5")[1]
    assert "FROM LABEL k8s-worker:" in out
    assert "FROM GROUP production:" in out
    assert "AUTO-GENERATED:" in out
    assert "cpu_threshold (from size: large)" in out
    out = lab(capsys, "show", "server", "test-box-1")[1]
    assert "Excluded From:" in out and 'group "eu-infrastructure"' in out


def test_show_label_group_alert_secret(fleet, capsys) -> None:
    v = json.loads(lab(capsys, "show", "label", "k8s-worker", "-o", "json")[1])
    assert [s["name"] for s in v["servers"]] == ["batch-worker-1", "test-box-1", "worker-5"]
    assert v["secrets"] == ["k8s/join-token", "tls/node-cert"]
    g = json.loads(lab(capsys, "show", "group", "eu-infrastructure", "-o", "json")[1])
    assert [m["name"] for m in g["members"]] == ["batch-worker-1", "db-1", "worker-5"]
    assert g["excluded"] == [{"server": "test-box-1", "reason": "by name"}]
    assert [s["name"] for s in g["subgroups"]] == ["eu-west-compute", "eu-west-storage", "eu-west-network"]
    out = lab(capsys, "show", "group", "eu-infrastructure")[1]
    assert "Contains: 3 subgroups, 3 servers (1 excluded)" in out and "test-box-1 (by name)" in out
    a = json.loads(lab(capsys, "show", "alert", "memory_pressure", "-o", "json")[1])
    assert [s["name"] for s in a["servers"]] == ["test-box-1", "worker-5"]
    assert a["excluded"] == [{"server": "batch-worker-1", "reason": "by name"}]
    auto = json.loads(lab(capsys, "show", "alert", "smtp_check", "-o", "json")[1])
    assert auto["servers"] == [{"name": "mail-1", "provider": "xcpng", "source": "auto:port:25"}]
    s = json.loads(lab(capsys, "show", "secret", "postgres/master-password", "-o", "json")[1])
    assert s["accessible_by"] == [{"label": "postgres", "servers": [{"name": "db-1", "provider": "baremetal"}]}]
    assert "value" not in json.dumps(s)


def test_get_lists_with_filters(fleet, capsys) -> None:
    secrets = json.loads(lab(capsys, "get", "secrets", "--label", "k8s-worker", "-o", "json")[1])
    assert {s["path"] for s in secrets} == {"k8s/join-token", "tls/node-cert"}
    groups = json.loads(lab(capsys, "get", "groups", "-o", "json")[1])
    assert next(g for g in groups if g["name"] == "production")["servers"] == 4
    alerts = json.loads(lab(capsys, "get", "alerts", "--environment", "dev", "-o", "json")[1])
    assert {a["name"] for a in alerts} == {"memory_pressure"}
    out = lab(capsys, "get", "labels")[1]
    assert out.splitlines()[0].split()[:3] == ["LABEL", "PUPPET", "CLASSES"]


def test_targets_server(fleet, capsys) -> None:
    out = lab(capsys, "targets", "server", "db-1")[1]
    assert "Everything targeting db-1:" in out
    assert "postgresql::server" in out and "(from label: postgres)" in out
    assert "storage_iops" in out and "(from group: eu-west-storage)" in out


def test_relabel_and_remove(fleet, capsys) -> None:
    code, out, _ = lab(capsys, "server", "relabel", "mail-1", "--labels", "k8s-worker", "-o", "json")
    assert code == 0 and json.loads(out)["labels"] == ["k8s-worker"]
    assert lab(capsys, "server", "remove", "mail-1")[0] == 0
    assert lab(capsys, "show", "server", "mail-1")[0] == 3


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["show", "server", "nope"], 3, "lab: no server named 'nope'\n"),
        (["show", "label", "nope"], 3, "lab: no label named 'nope'\n"),
        (["show", "group", "nope"], 3, "lab: no group named 'nope'\n"),
        (["show", "secret", "nope/x"], 3, "lab: no secret named 'nope/x'\n"),
        (["get", "servers", "--group", "nope"], 3, "lab: no group named 'nope'\n"),
        (["server", "add", "x1", "-p", "aws", "--labels", "nosuch"], 2, "lab: label not defined in"),
        (["server", "add", "worker-5", "-p", "aws"], 2, "lab: server 'worker-5' already exists\n"),
        (["server", "add", "Bad_Name", "-p", "aws"], 2, "lab: "),
        (["server", "add", "x2", "-p", "aws", "--size", "huge"], 2, "lab: size 'huge' is not defined"),
    ],
)
def test_user_mistakes_are_one_line(fleet, capsys, argv, code, message) -> None:
    got, out, err = lab(capsys, *argv)
    assert got == code
    assert err.startswith(message)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


def test_usage_errors_exit_2_without_traceback(fleet, capsys) -> None:
    code, _, err = lab(capsys, "get", "servers", "-o", "xml")
    assert code == 2 and "'xml' is not one of" in err and "Traceback" not in err
    code, _, err = lab(capsys, "get", "nothing")
    assert code == 2 and "No such command" in err


def test_broken_definitions_report_file_and_line(fleet, capsys) -> None:
    defs = fleet / "definitions" / "labels.yaml"
    defs.write_text(defs.read_text().replace("    ports: [25, 587, 993]", "    ports: [25, 587, 993]\n    colour: blue"))
    code, out, err = lab(capsys, "show", "server", "worker-5")
    assert code == 2 and out == ""
    assert err == f"lab: {defs}:10: label 'mailserver': unknown key 'colour' (expected one of: puppet_classes, ports, size, alerts, secrets, description)\n"
    # The inventory can still be listed; only the size column needs definitions.
    code, out, err = lab(capsys, "get", "servers", "-o", "json")
    assert code == 0 and "sizes not shown" in err and len(json.loads(out)) == 5


def test_corrupt_state_is_restored_from_snapshot_with_a_warning(fleet, capsys) -> None:
    db = fleet / "state.db"
    # init took a snapshot before any server existed; take one now that has all five.
    from lab.coordinator.state import StateDB

    with StateDB.open(fleet) as state:
        state.snapshot()
    for suffix in ("-wal", "-shm"):
        (fleet / f"state.db{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    code, out, err = lab(capsys, "get", "servers", "-o", "json")
    assert code == 0
    assert "lab: warning:" in err and "restored snapshot" in err
    assert len(json.loads(out)) == 5
