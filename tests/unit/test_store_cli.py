"""`lab secret set/rm/audit` in local mode, in-process, against a temporary LAB_HOME."""

from __future__ import annotations

import io
import json
import pathlib

import pytest

from lab.coordinator.cli.app import run
from lab.store.dataset import Dataset

MODULES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "puppet" / "modules"


class Stdin(io.TextIOWrapper):
    def isatty(self) -> bool:
        return False


@pytest.fixture()
def home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    monkeypatch.delenv("LAB_PUPPET_MODULES", raising=False)
    assert run(["init", "--local"]) == 0
    assert run(["server", "add", "mail-1", "-p", "ssh", "--labels", "mailserver"]) == 0
    capsys.readouterr()
    return tmp_path / "home"


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", Stdin(io.BytesIO(data)))


def test_set_reads_stdin_and_stores_encrypted(home, monkeypatch, capsys) -> None:
    _stdin(monkeypatch, b"hunter2")
    assert run(["secret", "set", "mail/relay-credentials"]) == 0
    out = capsys.readouterr().out
    assert "Accessible by: mailserver (1 server)" in out and "hunter2" not in out
    with Dataset.open(home / "store", "local") as ds:
        rec = ds.get("mail/relay-credentials")
        assert ds.value("mail/relay-credentials") == b"hunter2"
        assert rec.meta.owner == "postfix" and rec.meta.mode == 0o600  # from the definition
    assert b"hunter2" not in (home / "store" / "data.mdb").read_bytes()


def test_value_is_never_taken_from_argv(home, monkeypatch, capsys) -> None:
    _stdin(monkeypatch, b"x")
    assert run(["secret", "set", "mail/dkim-key", "the-value"]) == 2
    assert "unexpected extra argument" in capsys.readouterr().err.lower()


def test_empty_value_per_machine_and_bad_paths_refused(home, monkeypatch, capsys) -> None:
    _stdin(monkeypatch, b"")
    assert run(["secret", "set", "mail/dkim-key"]) == 2
    _stdin(monkeypatch, b"v")
    assert run(["secret", "set", "tls/node-cert"]) == 2
    assert "per-machine" in capsys.readouterr().err
    _stdin(monkeypatch, b"v")
    assert run(["secret", "set", "tls/node-cert", "--node", "mail-1"]) == 0
    _stdin(monkeypatch, b"v")
    assert run(["secret", "set", "_lab/policy"]) != 0
    with Dataset.open(home / "store", "local") as ds:
        assert ds.value("tls/node-cert@mail-1") == b"v"


def test_rm_then_audit(home, monkeypatch, capsys) -> None:
    _stdin(monkeypatch, b"v")
    assert run(["secret", "set", "mail/dkim-key"]) == 0
    assert run(["secret", "rm", "mail/dkim-key"]) == 0
    assert run(["secret", "rm", "mail/dkim-key"]) == 3
    capsys.readouterr()
    assert run(["secret", "audit", "--modules", str(MODULES), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = {(f["kind"], f["path"]) for f in data["findings"]}
    assert ("never-set", "mail/dkim-key") in kinds
    assert ("never-set", "mail/after-escape") in kinds  # found in the postfix manifest
    assert run(["secret", "audit"]) == 0
    assert "never set — empty!" in capsys.readouterr().out


def test_rotate_generated_secrets(home, monkeypatch, capsys) -> None:
    defs = home / "definitions" / "secrets.yaml"
    defs.write_text(defs.read_text() + "\n  app/session-key:\n    type: dynamic\n    generator: random\n"
                    "  app/db-pass:\n    type: dynamic\n    generator: password\n")
    assert run(["secret", "rotate", "app/session-key"]) == 0
    assert run(["secret", "rotate", "app/db-pass", "--length", "30"]) == 0
    assert run(["secret", "rotate", "mail/tls-cert"]) == 2  # acme: not built in
    assert "not built in" in capsys.readouterr().err
    assert run(["secret", "rotate", "mail/dkim-key"]) == 2  # static
    assert run(["server", "add", "w-1", "-p", "ssh", "--labels", "k8s-worker"]) == 0
    assert run(["secret", "rotate", "tls/node-cert", "--generator", "random"]) == 0
    with Dataset.open(home / "store", "local") as ds:
        first = ds.value("app/session-key")
        assert len(first) == 43 and len(ds.value("app/db-pass")) == 30
        assert ds.value("tls/node-cert@w-1") is not None and ds.get("mail/tls-cert") is None
    assert run(["secret", "rotate", "app/session-key"]) == 0
    with Dataset.open(home / "store", "local") as ds:
        assert ds.value("app/session-key") != first


def test_status_of_the_local_store(home, monkeypatch, capsys) -> None:
    from lab.common.errors import NotFound
    from lab.coordinator.cli.secret_cmd import render_store_status, store_status

    with pytest.raises(NotFound):
        store_status()
    _stdin(monkeypatch, b"v")
    assert run(["secret", "set", "mail/dkim-key"]) == 0
    data = store_status()
    assert data["secrets"] == 1 and data["node"] == "local"
    out = io.StringIO()
    render_store_status(data, out)
    assert "1 secrets" in out.getvalue()
