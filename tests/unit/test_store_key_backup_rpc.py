"""The store's new RPC methods without sockets: `store.key` (dataset-key handoff to a new store of
the signed policy), `store.backup` (age-encrypted at the store, admins only, paged) and
`store.restore` (recovery: the backup's values win, metadata kept)."""

from __future__ import annotations

import time
from pathlib import Path

import pyrage
import pytest
from test_store_node import _identity, _node, _peer, _req

from lab.common.errors import AuthError, ConfigError, UsageError
from lab.common.identity import CertificateAuthority
from lab.store import backup as backup_mod
from lab.store import keys
from lab.store.dataset import Dataset
from lab.store.policy import sign_policy
from lab.store.records import Meta


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def test_key_handed_only_to_a_valid_unrevoked_store_of_the_policy(ca: CertificateAuthority, tmp_path: Path) -> None:
    node = _node(ca, tmp_path, "store-1")
    admin = _peer(_identity(ca, "op", ["admin"]))
    new = _identity(ca, "store-3", ["store"])
    try:
        node.dataset.write("db/password", b"s3cret", Meta.simple("op", 1), int(time.time() * 1000))
        with pytest.raises(AuthError, match="current signed policy"):  # no policy yet: nobody is a member
            node.handle(_peer(new), _req("store.key", {}))
        node.handle(admin, _req("store.publish", {"policy": sign_policy(
            ca, {}, ["store-1", "store-3"], [], version=1, now=time.time()).encode()}))
        for refused, match in (
            (_identity(ca, "web-1", ["agent"]), "not a store"),
            (_identity(ca, "op", ["admin"]), "not a store"),
            (_identity(ca, "store-9", ["store"]), "current signed policy"),  # a store the policy does not name
        ):
            with pytest.raises(AuthError, match=match):
                node.handle(_peer(refused), _req("store.key", {}))
        sealed = node.handle(_peer(new), _req("store.key", {}))["sealed"]
        assert isinstance(sealed, bytes) and len(sealed) == 32 + 48  # sealed box, not the key in the clear
        with node.dataset.export_key() as key:
            assert key.bytes() not in sealed
        with pytest.raises(Exception):  # sealed to store-3's key: nobody else opens it
            keys.open_sealed(sealed, _identity(ca, "store-3", ["store"]).key)
        with Dataset.join(tmp_path / "joined", "store-3", sealed, new.key, durable=False) as joined:
            rec = node.dataset.get("db/password")
            assert rec is not None and joined.reveal(rec) == b"s3cret"
        # revoked afterwards: refused, although its certificate is otherwise valid and in the policy
        crl = ca.revoke(None, [new.certificate], time.time())
        node.handle(admin, _req("store.publish", {"revocations": crl.encode()}))
        with pytest.raises(AuthError):
            node.handle(_peer(new), _req("store.key", {}))
        # a certificate from another CA naming a member store: refused
        with pytest.raises(AuthError):
            node.handle(_peer(_identity(CertificateAuthority.generate(), "store-1", ["store"])), _req("store.key", {}))
    finally:
        node.dataset.close()


def _age() -> tuple[pyrage.x25519.Identity, str]:
    i = pyrage.x25519.Identity.generate()
    return i, str(i.to_public())


def test_backup_is_for_admins_only_and_encrypted_at_the_store(ca: CertificateAuthority, tmp_path: Path) -> None:
    node = _node(ca, tmp_path, "store-1")
    ident, recipient = _age()
    try:
        now = int(time.time() * 1000)
        node.dataset.write("mail/dkim-key", b"dkim-private", Meta.simple("op", now, owner="postfix", mode=0o600), now)
        node.dataset.write("tls/node-cert@web-1", b"cert-web-1", Meta.simple("op", now), now)
        body = {"recipients": [recipient], "have": {}, "key": True}
        for who in (_identity(ca, "web-1", ["agent"]), _identity(ca, "store-2", ["store"]),
                    _identity(ca, "coord", ["coordinator"])):
            for method in ("store.backup", "store.restore"):
                with pytest.raises(AuthError, match="needs the admin role"):
                    node.handle(_peer(who), _req(method, body if method == "store.backup" else {"records": []}))
        admin = _peer(_identity(ca, "op", ["admin"]))
        page = node.handle(admin, _req("store.backup", body))
        assert page["next"] is None and sorted(page["secrets"]) == ["mail/dkim-key", "tls/node-cert@web-1"]
        entry = page["secrets"]["mail/dkim-key"]
        assert entry["owner"] == "postfix" and entry["mode"] == "0600" and entry["file"] == "secrets/mail/dkim-key.age"
        assert b"dkim-private" not in entry["age"] and pyrage.decrypt(entry["age"], [ident]) == b"dkim-private"
        with node.dataset.export_key() as key:
            assert pyrage.decrypt(page["key"], [ident]) == key.bytes()
        # what the caller already holds at the same version is not sent again; the key only when asked
        again = node.handle(admin, _req("store.backup", {"recipients": [recipient], "have": {
            "mail/dkim-key": entry["version"], "tls/node-cert@web-1": "1.0.old"}}))
        assert again["secrets"]["mail/dkim-key"]["age"] is None and again["secrets"]["tls/node-cert@web-1"]["age"]
        assert "key" not in again
        with pytest.raises(ConfigError):
            node.handle(admin, _req("store.backup", {"recipients": ["not-a-recipient"]}))
        with pytest.raises(UsageError):
            node.handle(admin, _req("store.backup", {"recipients": []}))
    finally:
        node.dataset.close()


def test_backup_pages_cover_every_path_once(ca: CertificateAuthority, tmp_path: Path) -> None:
    _, recipient = _age()
    parsed = backup_mod.parse_recipients([recipient])
    with Dataset.create(tmp_path / "ds", "s1", durable=False) as ds:
        for i in range(7):
            ds.write(f"app/k{i}", b"v%d" % i, Meta.simple("op", 1), 1_000 + i)
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            page = backup_mod.export_page(ds, parsed, {}, after=after, max_items=3)
            seen += list(page["secrets"])
            pages += 1
            after = page["next"]
            if after is None:
                break
        assert pages == 3 and seen == [f"app/k{i}" for i in range(7)]


def test_restore_writes_values_that_win_with_their_metadata(ca: CertificateAuthority, tmp_path: Path) -> None:
    node = _node(ca, tmp_path, "store-1")
    admin = _peer(_identity(ca, "op", ["admin"]))
    try:
        future = int(time.time() * 1000) + 5_000
        held = node.dataset.write("db/password", b"newer-but-wrong", Meta.simple("op", future), future)
        meta = Meta.simple("alice", 1_600_000_000_000, type="static", owner="postgres", mode=0o640)
        out = node.handle(admin, _req("store.restore", {"records": [
            {"path": "db/password", "value": b"from-backup", "meta": meta._to_wire()},
            {"path": "tls/node-cert@db-1", "value": b"per-machine", "meta": meta._to_wire()},
        ]}))
        rec = node.dataset.get("db/password")
        assert rec is not None and rec.version > held.version and str(rec.version) == out["versions"]["db/password"]
        assert node.dataset.value("db/password") == b"from-backup" and rec.meta == meta  # set_by/set_at kept
        assert node.dataset.value("tls/node-cert@db-1") == b"per-machine"
        with pytest.raises(AuthError):  # CA-signed records go through store.publish
            node.handle(admin, _req("store.restore", {"records": [{"path": "_lab/policy", "value": b"x", "meta": meta._to_wire()}]}))
        with pytest.raises(UsageError):
            node.handle(admin, _req("store.restore", {"records": [{"path": "a/b", "value": b"x", "meta": {"type": "static"}}]}))
    finally:
        node.dataset.close()
