"""Backups in a real Git repository, decrypted by the stock `age` binary; total-disaster recovery."""

from __future__ import annotations

import os
import shutil
import subprocess

import pyrage
import pytest

from lab.common.identity import CertificateAuthority, NodeKey
from lab.store.backup import backup, recover_from_git
from lab.store.dataset import Dataset
from lab.store.policy import Enforcer, publish, sign_policy
from lab.store.records import Meta
from lab.store.serve import StoreService, SyncRequest


def need(binary: str) -> str:
    """The binary's path; skip when missing, except under CI where a missing tool is a failure."""
    found = shutil.which(binary)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is required under CI (Debian package: {binary})")
        pytest.skip(f"{binary} not installed")
    return found


@pytest.fixture
def ident(tmp_path):
    i = pyrage.x25519.Identity.generate()
    f = tmp_path / "backup-identity.txt"
    f.write_text(f"# lab backup identity\n{i}\n")
    os.chmod(f, 0o600)
    return i, f


def _store(tmp_path, ca):
    ds = Dataset.create(tmp_path / "store", "store-1")
    enf = Enforcer(ca.public_key)
    ds.system_checker = enf.system_checker
    meta = Meta.simple("admin", 1_000)
    ds.write("mail/relay-credentials", b"user:hunter2\n", meta, 1_000)
    ds.write("mail/dkim-key", b"-----BEGIN PRIVATE KEY-----\n...", meta, 1_001)
    publish(ds, sign_policy(ca, {"mail-1": ["mail/dkim-key", "mail/relay-credentials"]}, ["store-1"], [], version=1, now=1), 1_002)
    return ds


def test_git_repository_is_created_committed_and_pushed(tmp_path, ident) -> None:
    git = need("git")
    i, _ = ident
    ca = CertificateAuthority.generate()
    remote = tmp_path / "remote.git"
    subprocess.run([git, "init", "-q", "--bare", str(remote)], check=True)
    with _store(tmp_path, ca) as ds:
        r1 = backup(ds, tmp_path / "bk", [str(i.to_public())], now=1, remote=str(remote))
        assert r1.commit is not None
        r2 = backup(ds, tmp_path / "bk", [str(i.to_public())], now=2, remote=str(remote))
        assert r2.commit is None  # nothing changed, nothing committed
        ds.write("mail/dkim-key", b"rotated", Meta.simple("admin", 2_000), 2_000)
        r3 = backup(ds, tmp_path / "bk", [str(i.to_public())], now=3, remote=str(remote))
        assert r3.commit is not None and r3.written == 1
    log = subprocess.run([git, "-C", str(remote), "log", "--format=%s", "main"], check=True, capture_output=True, text=True).stdout
    assert log.count("lab secret backup") == 2
    files = subprocess.run([git, "-C", str(tmp_path / "bk"), "ls-files"], check=True, capture_output=True, text=True).stdout.split()
    assert "index.yaml" in files and "secrets/mail/dkim-key.age" in files and "dataset-key.age" in files


def test_stock_age_binary_decrypts_backup_files(tmp_path, ident) -> None:
    age = need("age")
    need("git")
    i, idfile = ident
    with _store(tmp_path, CertificateAuthority.generate()) as ds:
        backup(ds, tmp_path / "bk", [str(i.to_public())], now=1)
    out = subprocess.run([age, "-d", "-i", str(idfile), str(tmp_path / "bk/secrets/mail/relay-credentials.age")],
                         check=True, capture_output=True)
    assert out.stdout == b"user:hunter2\n"


def test_total_disaster_only_the_git_backup_survives(tmp_path, ident) -> None:
    """Clone the pushed backup, recover an empty store from it, and serve an agent again."""
    git = need("git")
    i, idfile = ident
    ca = CertificateAuthority.generate()
    remote = tmp_path / "remote.git"
    subprocess.run([git, "init", "-q", "--bare", str(remote)], check=True)
    with _store(tmp_path / "old", ca) as ds:
        backup(ds, tmp_path / "bk", [str(i.to_public())], now=1, remote=str(remote))
    shutil.rmtree(tmp_path / "old")
    shutil.rmtree(tmp_path / "bk")
    subprocess.run([git, "clone", "-q", "-b", "main", str(remote), str(tmp_path / "clone")], check=True)
    with recover_from_git(tmp_path / "clone", idfile, tmp_path / "new-store", "store-2") as ds:
        enf = Enforcer(ca.public_key)
        enf.load_from(ds.reveal, ds.records())
        ds.system_checker = enf.system_checker
        cert = ca.issue("mail-1", "mail-1", NodeKey.generate().public_key, (), 3600, 1_700_000_000)
        _, first = StoreService(ds, enf).subscribe(cert, SyncRequest({}), 1_700_000_000)
        assert {r.path: r.value for r in first.records} == {
            "mail/relay-credentials": b"user:hunter2\n", "mail/dkim-key": b"-----BEGIN PRIVATE KEY-----\n...",
        }
