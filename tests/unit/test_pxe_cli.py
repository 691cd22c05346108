"""`lab image add|list` and `lab pxe allow|deny`, in-process against a temporary LAB_HOME."""

from __future__ import annotations

import json
import pathlib
import stat

import pytest

from lab.common.identity import b32, mint_token
from lab.coordinator.cli.app import run
from lab.coordinator.pxe.nodes import read_nodes


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    return tmp_path / "home"


def test_image_add_and_list(home: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.gz").write_bytes(b"i")
    assert run(["image", "add", "ubuntu-24.04", "--kernel", str(tmp_path / "vmlinuz"),
                "--initrd", str(tmp_path / "initrd.gz")]) == 0
    assert (home / "pxe" / "images" / "ubuntu-24.04" / "vmlinuz").read_bytes() == b"k"
    capsys.readouterr()
    assert run(["image", "list", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "ubuntu-24.04", "family": "ubuntu", "cmdline": ""}]
    assert run(["image", "add", "plan9", "--kernel", str(tmp_path / "vmlinuz"), "--initrd", str(tmp_path / "initrd.gz")]) == 2
    assert "--family" in capsys.readouterr().err
    assert run(["image", "add", "debian-12", "--kernel", str(tmp_path / "nope"), "--initrd", str(tmp_path / "initrd.gz")]) == 2


def test_pxe_allow_writes_a_private_record_and_deny_removes_it(home: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    token, _ = mint_token(b32(bytes(32)))
    (tmp_path / "tok").write_text(token + "\n")
    assert run(["pxe", "allow", "AA-BB-CC-DD-EE-FF", "--hostname", "beelink-max", "--labels", "k8s-worker,longhorn",
                "--token-file", str(tmp_path / "tok"), "--ttl", "30m"]) == 0
    out = capsys.readouterr().out
    assert token not in out
    (path,) = (home / "pxe" / "nodes").glob("*.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (node,) = read_nodes(home / "pxe" / "nodes")
    assert node.mac == "aa:bb:cc:dd:ee:ff" and node.token == token and node.labels == ("k8s-worker", "longhorn")
    assert run(["pxe", "deny", "aa:bb:cc:dd:ee:ff"]) == 0
    assert read_nodes(home / "pxe" / "nodes") == []
    assert run(["pxe", "deny", "aa:bb:cc:dd:ee:ff"]) == 2


def test_pxe_serve_takes_one_mode(home: pathlib.Path, capsys) -> None:
    """proxyDHCP is the default (safe next to another DHCP server); --pool asks for full DHCP."""
    assert run(["pxe", "serve", "--address", "10.0.0.1", "--pool", "10.0.0.100-10.0.0.110", "--proxy-dhcp"]) == 2
    assert "not both" in capsys.readouterr().err
    assert run(["pxe", "serve", "--address", "10.0.0.1", "--pool", "10.0.0.100"]) == 2
    assert "FIRST-LAST" in capsys.readouterr().err
    assert run(["pxe", "serve", "--address", "10.0.0.1", "--pool", "10.0.0.110-10.0.0.100"]) == 2
    assert "after the last" in capsys.readouterr().err


def test_serve_options_default_to_proxy_dhcp() -> None:
    from lab.coordinator.pxe.service import ServeOptions

    assert ServeOptions("10.0.0.1").mode == "proxy"
    assert ServeOptions("10.0.0.1", pool="10.0.0.100-10.0.0.110").mode == "full"


def _image(home: pathlib.Path, tmp_path: pathlib.Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    assert run(["init", "--local"]) == 0
    assert run(["image", "add", "ubuntu-24.04", "--kernel", str(tmp_path / "k"), "--initrd", str(tmp_path / "i")]) == 0


def test_onboard_no_wait_registers_allows_and_returns(home: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    """No boot services run in-process (no socket here); the record waits for `lab pxe serve` or
    the daemon's pxe:, whose address (from config.yaml) is the agent's default coordinator."""
    _image(home, tmp_path)
    with (home / "config.yaml").open("a") as f:
        f.write("pxe:\n  interface: enp3s0\n  address: 10.9.0.1\n  pool: 10.9.0.100-10.9.0.150\n")
    capsys.readouterr()
    assert run(["onboard", "bm-1", "--provider", "baremetal", "--mac", "AA:BB:CC:DD:EE:01", "--image", "ubuntu-24.04",
                "--yes", "--no-wait", "--timeout", "45m"]) == 0
    out = capsys.readouterr().out
    assert "the boot is left to the coordinator daemon (config.yaml pxe: on enp3s0)" in out
    assert "full mode, address from 10.9.0.100-10.9.0.150" in out and "Start PXE/DHCP/TFTP" not in out
    (node,) = read_nodes(home / "pxe" / "nodes")
    assert node.hostname == "bm-1" and node.coordinator == "10.9.0.1:7443" and node.token.startswith("lab1.")
    assert node.token not in out
    assert run(["get", "servers", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows.get("servers", rows) if isinstance(rows, dict) else rows
    assert [(r["name"], r["identity"]) for r in rows] == [("bm-1", "pxe: waiting for boot request")]


def test_onboard_no_wait_without_boot_services_says_so(home: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    _image(home, tmp_path)
    capsys.readouterr()
    args = ["onboard", "bm-2", "--provider", "baremetal", "--mac", "AA:BB:CC:DD:EE:02", "--image", "ubuntu-24.04",
            "--yes", "--no-wait"]
    assert run(args) == 2
    assert "--server HOST:PORT with --no-wait" in capsys.readouterr().err
    assert run([*args, "--pool", "10.0.0.5-10.0.0.9", "--server", "10.0.0.1:7443"]) == 2
    assert "leave out --pool/--proxy-dhcp" in capsys.readouterr().err
    assert run([*args, "--server", "10.0.0.1:7443"]) == 0
    out = capsys.readouterr().out
    assert "nothing serves this machine until `lab pxe serve` runs" in out and "proxyDHCP" in out
