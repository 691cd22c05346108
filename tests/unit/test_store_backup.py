"""Backup files (age, one per path, plaintext index) and recovery, without git."""

from __future__ import annotations

import os

import pyrage
import pytest
import yaml

from lab.common.errors import ConfigError, StoreError
from lab.common.identity import CertificateAuthority
from lab.store.backup import load_identities, parse_recipients, recover, write_backup
from lab.store.dataset import Dataset
from lab.store.policy import Enforcer, publish, sign_policy
from lab.store.records import Meta

META = Meta.simple("admin", 1_000, mode=0o640, owner="postfix")


@pytest.fixture
def world(tmp_path):
    ident = pyrage.x25519.Identity.generate()
    ca = CertificateAuthority.generate()
    ds = Dataset.create(tmp_path / "store", "store-1", durable=False)
    enf = Enforcer(ca.public_key)
    ds.system_checker = enf.system_checker
    ds.write("mail/dkim-key", b"dkim", META, 1_000)
    ds.write("tls/node-cert@mail-1", b"per machine", META, 1_001)
    ds.write("gone/soon", b"x", META, 1_002)
    publish(ds, sign_policy(ca, {"mail-1": ["mail/dkim-key", "tls/node-cert"]}, ["store-1"], ["tls/node-cert"], version=1, now=1), 1_003)
    yield ds, ident, ca
    ds.close()


def test_backup_then_recover_gives_the_same_dataset(world, tmp_path) -> None:
    ds, ident, ca = world
    res = write_backup(ds, tmp_path / "bk", [str(ident.to_public())], now=5)
    assert res.total == 4 and res.written == 5  # four paths and the dataset key
    assert pyrage.decrypt((tmp_path / "bk/secrets/mail/dkim-key.age").read_bytes(), [ident]) == b"dkim"
    index = yaml.safe_load((tmp_path / "bk/index.yaml").read_text())
    assert index["secrets"]["mail/dkim-key"]["mode"] == "0640" and index["secrets"]["mail/dkim-key"]["owner"] == "postfix"
    assert index["policy"]["grants"] == {"mail-1": ["mail/dkim-key", "tls/node-cert"]}
    for f in (tmp_path / "bk").rglob("*.age"):
        assert b"dkim" not in f.read_bytes()
    idfile = tmp_path / "id.txt"
    idfile.write_text(f"# created: now\n{ident}\n")
    os.chmod(idfile, 0o600)
    back = recover(tmp_path / "bk", idfile, tmp_path / "restored", "store-9", durable=False)
    assert back.versions() == {r.path: r.version for r in ds.records()}
    assert back.root() == ds.root()
    assert back.value("tls/node-cert@mail-1") == b"per machine"
    with back.export_key() as a, ds.export_key() as b:
        assert a.equals(b)  # same dataset key: the recovered store can rejoin survivors
    enf = Enforcer(ca.public_key)
    enf.load_from(back.reveal, back.records())
    assert enf.policy is not None and enf.policy.version == 1
    back.close()


def test_unchanged_backup_rewrites_nothing_and_deletes_remove_files(world, tmp_path) -> None:
    ds, ident, _ = world
    rcpt = [str(ident.to_public())]
    write_backup(ds, tmp_path / "bk", rcpt, now=5)
    before = (tmp_path / "bk/secrets/mail/dkim-key.age").read_bytes()
    again = write_backup(ds, tmp_path / "bk", rcpt, now=6)
    assert again.written == 0 and again.removed == 0
    assert (tmp_path / "bk/secrets/mail/dkim-key.age").read_bytes() == before
    ds.delete("gone/soon", 2_000)
    ds.write("mail/dkim-key", b"dkim2", META, 2_001)
    third = write_backup(ds, tmp_path / "bk", rcpt, now=7)
    assert third.removed == 1 and third.written == 1 and not (tmp_path / "bk/secrets/gone").exists()
    assert pyrage.decrypt((tmp_path / "bk/secrets/mail/dkim-key.age").read_bytes(), [ident]) == b"dkim2"


def test_wrong_identity_and_bad_inputs(world, tmp_path) -> None:
    ds, ident, _ = world
    write_backup(ds, tmp_path / "bk", [str(ident.to_public())], now=5)
    with pytest.raises(StoreError, match="cannot decrypt"):
        recover(tmp_path / "bk", [pyrage.x25519.Identity.generate()], tmp_path / "r", "s", durable=False)
    with pytest.raises(StoreError, match="not a lab secret backup"):
        recover(tmp_path, [ident], tmp_path / "r2", "s", durable=False)
    with pytest.raises(ConfigError):
        parse_recipients(["nonsense"])
    with pytest.raises(ConfigError):
        parse_recipients([])
    loose = tmp_path / "loose.txt"
    loose.write_text(str(ident))
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigError, match="group/others"):
        load_identities(loose)
