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


def test_pxe_serve_needs_exactly_one_mode(home: pathlib.Path, capsys) -> None:
    assert run(["pxe", "serve", "--address", "10.0.0.1"]) == 2
    assert "--pool" in capsys.readouterr().err
