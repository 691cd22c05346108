"""`lab server migrate --target ssh`: option validation (one line, nothing done), NODE's name,
the plan text. The onboard-first step itself: tests/integration/test_migrate_ssh_local.py."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from lab.common.errors import UsageError
from lab.coordinator.cli.app import run
from lab.coordinator.cli.server_cmd import migrate_node_name
from lab.coordinator.migrate.command import render_onboard_plan


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    return tmp_path / "home"


def lab(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "message"), [
    (["--target", "kubernetes", "--cluster", "x"], None),  # typer: no such option (exit 2)
    (["--target", "kubernetes"], "--target kubernetes: not implemented (targets: ssh"),
    (["--target", "nomad", "--host", "h"], "--target 'nomad': unknown (targets: ssh; kubernetes: not implemented)"),
    (["--target", "ssh"], "--target ssh needs --host H"),
    (["--target", "ssh", "--host", "h1", "--to", "a", "--name", "b"], "--to a and --name b disagree"),
    (["--target", "ssh", "--host", "Bad_Host.lan"], "'bad_host' (the first label of --host Bad_Host.lan) is not a server name: pass --name NAME"),
    (["--target", "ssh", "--host", "10.0.0.5"], "--host 10.0.0.5 is an address: pass --name NAME"),
    (["--target", "ssh", "--host", "h1", "--name", "Not_A_Name"], "invalid server name 'Not_A_Name'"),
    (["--host", "h1", "--to", "a"], "--host and --name are for --target ssh"),
    (["--to", "a", "--identity", "k"], "--port/--user/--identity/--accept-new-host-key/--server are for --target ssh"),
    ([], "where to? pass --to NODE (an enrolled agent) or --target ssh --host H"),
])  # fmt: skip
def test_bad_options_are_one_line_and_change_nothing(home: pathlib.Path, capsys: Any, argv: list[str], message: str | None) -> None:
    assert lab(capsys, "init", "--local")[0] == 0
    before = (home / "config.yaml").read_bytes() if (home / "config.yaml").exists() else None
    code, out, err = lab(capsys, "server", "migrate", *argv, "--yes")
    assert code == 2, (out, err)
    if message is not None:
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and out == ""
    assert ((home / "config.yaml").read_bytes() if (home / "config.yaml").exists() else None) == before
    assert not (home / "coordinator.endpoint").exists() and not (home / "known_hosts").exists()


def test_node_name_defaults() -> None:
    assert migrate_node_name("node-a", None, None, None) == "node-a"
    assert migrate_node_name(None, "ssh", "Beelink-SER9-Pro.lan", None) == "beelink-ser9-pro"
    assert migrate_node_name(None, "ssh", "10.0.0.5", "node-x") == "node-x"
    assert migrate_node_name("node-x", "ssh", "10.0.0.5", None) == "node-x"
    assert migrate_node_name("node-x", "ssh", "h", "node-x") == "node-x"  # --to and --name agree
    with pytest.raises(UsageError, match="is an address"):
        migrate_node_name(None, "ssh", "[fd00::5]", None)


def test_no_terminal_and_no_yes_refuses_before_connecting(home: pathlib.Path, capsys: Any) -> None:
    assert lab(capsys, "init", "--local")[0] == 0
    code, out, err = lab(capsys, "server", "migrate", "--target", "ssh", "--host", "h1")  # pytest: stdin is no terminal
    assert code == 2 and "no terminal to ask on, pass --yes (nothing changed)" in err and out == ""


def test_onboard_plan_text() -> None:
    text = render_onboard_plan("node-x", "ssh://root@h1", "10.0.0.1:7443", "0.0.0.0:7443", "10.0.0.1:7443",
                               {"node": None, "ca": "dlue7hpe4czqu5md0123", "servers": 3}, "/home/me/.lab", 120, 4)
    assert "  + onboard node-x over ssh://root@h1: install the lab agent, enroll it with 10.0.0.1:7443" in text
    assert "  ~ migrate lab-server from local (/home/me/.lab) (10.0.0.1:7443) to node-x" in text
    assert "4 servers (with node-x)" in text and "CA dlue7hpe4czqu5md…" in text
    assert "it answers at node-x's first non-loopback address, port 7443" in text
    assert "  + label node-x lab-server\n" in text and "(at most 120 s)" in text
