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


# -- issue 4, item 5: show secret (who and why), LAST ROTATED, rm/rotate to the cluster, status --store


@pytest.fixture()
def modules(monkeypatch) -> pathlib.Path:
    monkeypatch.setenv("LAB_PUPPET_MODULES", str(MODULES))
    return MODULES


def _add_web_label(home: pathlib.Path) -> None:
    labels = home / "definitions" / "labels.yaml"
    labels.write_text(labels.read_text() + "\n  web:\n    puppet_classes:\n      - web\n")
    secrets = home / "definitions" / "secrets.yaml"
    secrets.write_text(secrets.read_text() + "\n  web/tls-key:\n    type: static\n")


def test_show_secret_says_who_and_why_from_code(home, modules, capsys) -> None:
    assert run(["server", "add", "mail-2", "-p", "ssh", "--labels", "mailserver"]) == 0
    capsys.readouterr()
    assert run(["show", "secret", "mail/relay-credentials"]) == 0
    out = capsys.readouterr().out
    assert ("Label \"mailserver\" → puppet class \"postfix\" → lab::secret('mail/relay-credentials') "
            "at modules/postfix/manifests/init.pp:4") in out
    assert "mail-1 (ssh)" in out and "mail-2 (ssh)" in out and "derived from code" in out
    assert run(["show", "secret", "mail/dkim-key", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accessible_by"][0]["label"] == "mailserver"  # the existing keys stay
    by_source = {g["source"]: g for g in data["grants"]}
    assert set(by_source) == {"label:mailserver", "label:mailserver → class:postfix → modules/postfix/manifests/init.pp:9"}
    code = by_source["label:mailserver → class:postfix → modules/postfix/manifests/init.pp:9"]
    assert code["label"] == "mailserver" and code["classes"] == [{"name": "postfix", "declared_at": None}]
    assert code["call"] == "modules/postfix/manifests/init.pp:9"
    assert [s["name"] for s in code["servers"]] == ["mail-1", "mail-2"]
    assert sorted(data["entitled"]) == ["mail-1", "mail-2"] and data["modules"] == str(MODULES)
    assert data["last_set"] is None and data["store_known"] is False  # no store yet


def test_show_secret_follows_included_classes_and_unapplied_labels(home, modules, capsys) -> None:
    _add_web_label(home)
    capsys.readouterr()
    assert run(["show", "secret", "web/tls-key"]) == 0
    out = capsys.readouterr().out
    assert 'Label "web" → puppet class "web" → lab::secret(\'web/tls-key\') at modules/web/manifests/tls.pp:2' in out
    assert "(no servers carry it yet)" in out
    assert run(["server", "add", "web-1", "-p", "ssh", "--labels", "web"]) == 0
    capsys.readouterr()
    assert run(["show", "secret", "web/tls-key"]) == 0
    out = capsys.readouterr().out
    assert ('Label "web" → puppet class "web" → class "web::tls" (declared at modules/web/manifests/init.pp:4) → '
            "lab::secret('web/tls-key') at modules/web/manifests/tls.pp:2") in out
    assert "web-1 (ssh)" in out and "mail-1" not in out


def test_show_secret_per_machine_notes_and_last_set(home, modules, monkeypatch, capsys) -> None:
    assert run(["server", "add", "w-1", "-p", "ssh", "--labels", "k8s-worker"]) == 0
    assert run(["server", "add", "w-2", "-p", "ssh", "--labels", "k8s-worker"]) == 0
    _stdin(monkeypatch, b"cert-w1")
    assert run(["secret", "set", "tls/node-cert", "--node", "w-1"]) == 0
    capsys.readouterr()
    assert run(["show", "secret", "tls/node-cert", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["per_machine_set"] == [{"server": "w-1", "set": True}, {"server": "w-2", "set": False}]
    assert data["last_set"] and data["last_set_by"]
    assert run(["show", "secret", "tls/node-cert"]) == 0
    out = capsys.readouterr().out
    assert "w-1 (ssh)    own value set" in out and "w-2 (ssh)    own value NOT set" in out
    assert "Last set: " in out and "cert-w1" not in out
    assert "kubernetes::worker" in out


def test_show_secret_without_modules_still_lists_label_grants(home, capsys) -> None:
    assert run(["show", "secret", "mail/relay-credentials"]) == 0
    out = capsys.readouterr().out
    assert 'Label "mailserver" → secrets: mail/relay-credentials' in out
    assert "lab::secret calls not scanned" in out


def test_get_secrets_last_rotated_from_the_local_store(home, monkeypatch, capsys) -> None:
    _stdin(monkeypatch, b"v")
    assert run(["secret", "set", "mail/dkim-key"]) == 0
    capsys.readouterr()
    assert run(["get", "secrets", "-o", "json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mail/dkim-key"]["last_rotated"] and rows["mail/dkim-key"]["set_by"]
    assert rows["mail/tls-cert"]["last_rotated"] is None and rows["mail/tls-cert"]["stored"] == 0
    assert run(["get", "secrets"]) == 0
    out = capsys.readouterr().out
    assert "LAST ROTATED" in out and "SET BY" in out and "— (never set)" in out


def _cluster_home(home: pathlib.Path) -> None:
    cfg = home / "config.yaml"
    cfg.write_text((cfg.read_text() if cfg.exists() else "") + "\nstores: ['127.0.0.1:1', '127.0.0.1:2']\n")


def test_get_secrets_last_rotated_from_the_cluster_stores(home, monkeypatch, capsys) -> None:
    from lab.coordinator.cli import secret_cmd

    _cluster_home(home)
    asked = []

    def fake_meta(h, stores):
        asked.append(list(stores))
        return {"mail/dkim-key": {"version": 1, "set_by": "admin", "set_at": 1_767_225_600_000, "type": "static"},
                "tls/node-cert@w-1": {"version": 2, "set_by": "admin", "set_at": 1_767_312_000_000, "type": "dynamic"},
                "tls/node-cert@w-2": {"version": 3, "set_by": "coordinator", "set_at": 1_767_398_400_000, "type": "dynamic"}}

    monkeypatch.setattr(secret_cmd, "_remote_meta", fake_meta)
    assert run(["get", "secrets", "-o", "json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    assert asked == [["127.0.0.1:1", "127.0.0.1:2"]]
    assert rows["mail/dkim-key"]["last_rotated"] == "2026-01-01 00:00" and rows["mail/dkim-key"]["set_by"] == "admin"
    assert rows["tls/node-cert"]["last_rotated"] == "2026-01-03 00:00" and rows["tls/node-cert"]["set_by"] == "coordinator"
    assert rows["tls/node-cert"]["stored"] == 2
    assert run(["get", "secrets"]) == 0
    out = capsys.readouterr().out
    assert "2026-01-01 00:00" in out and "2026-01-03 00:00 (2 nodes)" in out
    assert not (home / "store").exists()


def test_get_secrets_with_no_store_reachable_warns_once(home, monkeypatch, capsys) -> None:
    from lab.common.errors import TransportError
    from lab.coordinator.cli import secret_cmd

    _cluster_home(home)

    def down(h, stores):
        raise TransportError("no store reachable (127.0.0.1:1: connection refused)")

    monkeypatch.setattr(secret_cmd, "_remote_meta", down)
    assert run(["get", "secrets"]) == 0
    cap = capsys.readouterr()
    assert "mail/dkim-key" in cap.out and "never set" not in cap.out
    warnings = [ln for ln in cap.err.splitlines() if "unreachable" in ln]
    assert len(warnings) == 1 and "Traceback" not in cap.err


def test_rm_and_rotate_go_to_the_cluster_stores(home, monkeypatch, capsys) -> None:
    from lab.coordinator import cluster

    _cluster_home(home)
    defs = home / "definitions" / "secrets.yaml"
    defs.write_text(defs.read_text() + "\n  app/session-key:\n    type: dynamic\n    generator: random\n")
    assert run(["server", "add", "w-1", "-p", "ssh", "--labels", "k8s-worker"]) == 0
    calls: list[tuple] = []

    def fake_call(h, stores, method, body, every=False):
        calls.append((method, body))
        return [("127.0.0.1:1", {"path": body["path"], "deleted": body["path"] != "mail/missing"})]

    def fake_set(h, stores, path, value, meta, node):
        calls.append(("store.set", {"path": path, "node": node, "len": len(value), "type": meta.type}))
        return "1.0.x"

    monkeypatch.setattr(cluster, "store_call", fake_call)
    monkeypatch.setattr(cluster, "remote_set", fake_set)
    assert run(["secret", "rm", "mail/dkim-key"]) == 0
    assert run(["secret", "rm", "mail/missing"]) == 3
    assert run(["secret", "rm", "tls/node-cert", "--node", "w-1"]) == 0
    assert run(["secret", "rotate", "app/session-key"]) == 0
    assert run(["secret", "rotate", "tls/node-cert", "--generator", "random"]) == 0
    assert calls == [
        ("store.delete", {"path": "mail/dkim-key"}), ("store.delete", {"path": "mail/missing"}),
        ("store.delete", {"path": "tls/node-cert@w-1"}),
        ("store.set", {"path": "app/session-key", "node": None, "len": 43, "type": "dynamic"}),
        ("store.set", {"path": "tls/node-cert", "node": "w-1", "len": 43, "type": "dynamic"}),
    ]
    assert not (home / "store").exists()  # nothing written locally


def _fake_status(ep: str) -> dict:
    return {"node": "store-1", "records": 5, "secrets": 3, "root": "ab" * 16, "policy": 7, "agents": 2,
            "last_anti_entropy": 1_000.0, "peers": [{"endpoint": "127.0.0.1:2", "connected": False}]}


def test_status_store_lists_replicas_unreachable_ones_and_consumers(home, modules, monkeypatch, capsys) -> None:
    from lab.common.errors import TransportError
    from lab.coordinator.cli import secret_cmd

    _cluster_home(home)

    def status_of(h, ep):
        if ep.endswith(":2"):
            raise TransportError("no store reachable (127.0.0.1:2: connection refused)")
        return _fake_status(ep)

    monkeypatch.setattr(secret_cmd, "_status_of", status_of)
    assert run(["secret", "status", "--store", "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "cluster" and data["reachable"] == 1 and data["total"] == 2 and data["secrets"] == 3
    assert [(r["endpoint"], r["reachable"]) for r in data["replicas"]] == [("127.0.0.1:1", True), ("127.0.0.1:2", False)]
    assert {c["label"]: (c["machines"], c["secrets"]) for c in data["consumers"]} == {"mailserver": (1, 4)}
    assert run(["secret", "status", "--store"]) == 0
    out = capsys.readouterr().out
    assert "SECRET STORE:" in out and "Replicas:        1/2 healthy" in out
    assert "store-1" in out and "3 secrets" in out and "last anti-entropy" in out
    assert "127.0.0.1:2" in out and "✗ unreachable" in out
    assert "mailserver (1 machine)" in out and "→ 4 secrets" in out


def test_render_store_status_from_fake_data() -> None:
    from lab.coordinator.cli.secret_cmd import render_store_status

    data = {"mode": "cluster", "reachable": 2, "total": 2, "secrets": 47, "in_sync": True,
            "replicas": [{"name": f"store-{i}", "endpoint": f"127.0.0.1:{i}", "state": "reachable", "reachable": True,
                          "secrets": 47, "in_sync": True, "last_anti_entropy": 990.0} for i in (1, 2)],
            "consumers": [{"label": "k8s-worker", "machines": 12, "secrets": 3, "secrets_min": 3},
                          {"label": "lab-server", "machines": 1, "secrets": 2, "secrets_min": 2}]}
    out = io.StringIO()
    render_store_status(data, out, now=1_000.0)
    text = out.getvalue()
    assert "Replicas:        2/2 healthy" in text and text.count("✓ synced") == 2 and "last anti-entropy 10s ago" in text
    assert "Total secrets:   47" in text
    assert "k8s-worker (12 machines)  → 3 secrets each" in text and "lab-server (1 machine)    → 2 secrets\n" in text


def test_secrets_table_renders_rotation_columns() -> None:
    from lab.coordinator.cli import views

    rows = [{"path": "a/b", "type": "static", "used_by": [{"label": "x", "servers": 2}], "rotate_every": None,
             "per_machine": False, "last_rotated": "2026-03-15 14:30", "set_by": "admin", "stored": 1},
            {"path": "c/d", "type": "dynamic", "used_by": [], "rotate_every": "1d", "per_machine": False,
             "last_rotated": None, "set_by": None, "stored": None}]
    out = io.StringIO()
    views.secrets_table(rows, out)
    lines = out.getvalue().splitlines()
    assert "LAST ROTATED" in lines[0] and "SET BY" in lines[0]
    assert "2026-03-15 14:30" in lines[1] and "admin" in lines[1]
    assert "never set" not in lines[2] and "—" in lines[2]


def test_store_meta_rpc_gives_metadata_never_values_and_only_to_writers(tmp_path) -> None:
    import random
    import time

    from lab.common import rpc, wire
    from lab.common.errors import AuthError
    from lab.common.identity import CertificateAuthority, NodeKey
    from lab.store.node import NodeConfig, StoreNode

    ca = CertificateAuthority.generate()

    def peer(name: str, roles: list[str]) -> rpc.PeerInfo:
        key = NodeKey.generate()
        return rpc.PeerInfo(ca.issue(name, f"{name}-id", key.public_key, roles, 3600, time.time()), b"\0" * 64, "test")

    key = NodeKey.generate()
    cert = ca.issue("s1", "s1-id", key.public_key, ["store"], 3600, time.time())
    node = StoreNode(Dataset.create(tmp_path / "s1", "s1", durable=False), key, cert, ca.public_key, [],
                     NodeConfig(ae_interval=1), rng=random.Random(1))
    try:
        admin = peer("op", ["admin"])
        node.handle(admin, wire.Request(id=1, method="store.set", body={"path": "a/b", "value": b"s3cret", "type": "dynamic"}))
        node.handle(admin, wire.Request(id=2, method="store.set", body={"path": "c/d", "value": b"x"}))
        node.handle(admin, wire.Request(id=3, method="store.delete", body={"path": "c/d"}))
        meta = node.handle(admin, wire.Request(id=4, method="store.meta", body={}))
        assert set(meta["records"]) == {"a/b"} and meta["node"] == "s1"
        m = meta["records"]["a/b"]
        assert m["set_by"] == "op" and m["type"] == "dynamic" and m["set_at"] > 0 and m["version"] > 0
        assert b"s3cret" not in repr(meta).encode() and "value" not in repr(meta)
        for who in (peer("web-1", ["agent"]), peer("s2", ["store"])):
            with pytest.raises(AuthError):
                node.handle(who, wire.Request(id=5, method="store.meta", body={}))
        st = node.status()
        assert st["secrets"] == 1 and st["last_anti_entropy"] is None
    finally:
        node.dataset.close()


def test_store_metadata_is_not_fetched_inside_a_trio_loop(home, monkeypatch) -> None:
    import trio

    from lab.coordinator.cli import secret_cmd

    _cluster_home(home)
    monkeypatch.setattr(secret_cmd, "_remote_meta", lambda h, s: pytest.fail("must not block the daemon's loop"))

    async def main() -> tuple:
        return secret_cmd.store_metadata(home)

    records, warning = trio.run(main)
    assert records is None and "daemon" in warning
