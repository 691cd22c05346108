"""Join tokens at rest: hash only, single use under real concurrency, expiry, reasons."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from lab.common.errors import UsageError
from lab.common.identity import CertificateAuthority, hash_token_secret, parse_token_untrusted
from lab.coordinator import tokens
from lab.coordinator.state import StateDB

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture
def state(tmp_path: Path):
    db = StateDB.open(tmp_path, now=lambda: NOW)
    yield db
    db.close()


def test_only_the_hash_is_stored(state: StateDB, ca: CertificateAuthority, tmp_path: Path) -> None:
    text, record = tokens.create_token(state, ca.fingerprint, "web-1", ["app"], environment="prod", ttl=600, now=NOW)
    tok = parse_token_untrusted(text)
    assert tok.fingerprint == ca.fingerprint and text.startswith("lab1.")
    assert record.name == "web-1" and record.labels == ("app",) and record.expires_at == NOW + 600
    state.close()
    raw = sqlite3.connect(tmp_path / "state.db")
    rows = raw.execute("SELECT * FROM tokens").fetchall()
    raw.close()
    assert len(rows) == 1
    flat = repr(rows)
    secret_text = text.rsplit(".", 1)[1]
    assert secret_text not in flat and tok.secret.hex() not in flat and tok.secret not in rows[0]
    assert hash_token_secret(tok.secret) in rows[0]
    for f in tmp_path.rglob("state.db*"):
        data = f.read_bytes()
        assert secret_text.encode() not in data and tok.secret not in data


def test_list_shows_no_secret_or_hash(state: StateDB, ca: CertificateAuthority) -> None:
    text, _ = tokens.create_token(state, ca.fingerprint, "web-1", now=NOW)
    listed = tokens.list_tokens(state, NOW)
    assert listed[0]["status"] == "valid" and listed[0]["name"] == "web-1"
    assert "secret_hash" not in listed[0] and text.rsplit(".", 1)[1] not in repr(listed)


def test_single_use_under_concurrent_connections(tmp_path: Path, ca: CertificateAuthority) -> None:
    home = tmp_path / "home"
    with StateDB.open(home) as db:
        text, _ = tokens.create_token(db, ca.fingerprint, "web-1", ttl=600)
    secret_hash = parse_token_untrusted(text).secret_hash
    n = 16
    barrier = threading.Barrier(n)
    wins: list[object] = []
    errors: list[BaseException] = []

    def attempt(i: int) -> None:
        try:
            with StateDB.open(home) as db:  # one connection per thread, as separate processes would have
                barrier.wait()
                got = db.consume_token(secret_hash, f"key-{i}")
                if got is not None:
                    wins.append(got)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(wins) == 1
    with StateDB.open(home) as db:
        (rec,) = db.list_tokens()
        assert rec.used_at is not None and rec.used_by == wins[0].used_by  # type: ignore[attr-defined]


def test_expiry_uses_the_given_now(state: StateDB, ca: CertificateAuthority) -> None:
    text, _ = tokens.create_token(state, ca.fingerprint, "web-1", ttl=60, now=NOW)
    tok = parse_token_untrusted(text)
    with pytest.raises(tokens.TokenRejected) as info:
        tokens.redeem(state, tok, ca.fingerprint, "k", now=NOW + 60)
    assert info.value.reason == "expired"
    assert state.list_tokens()[0].used_at is None
    assert tokens.redeem(state, tok, ca.fingerprint, "k", now=NOW + 59).name == "web-1"


def test_reasons(state: StateDB, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate()
    text, _ = tokens.create_token(state, ca.fingerprint, "web-1", now=NOW)
    tok = parse_token_untrusted(text)

    def reason(t, fpr=ca.fingerprint, **kw) -> str:
        with pytest.raises(tokens.TokenRejected) as info:
            with state.transaction():
                tokens.redeem(state, t, fpr, "k", now=NOW + 1, **kw)
        return info.value.reason

    assert reason(tok, other.fingerprint) == "wrong-server"
    foreign, _ = tokens.create_token(state, ca.fingerprint, "x-1", now=NOW)
    state.revoke_tokens("x-1")
    assert reason(parse_token_untrusted(foreign)) == "revoked"
    # asking to be another server: refused, and the rollback leaves the token unused
    assert reason(tok, name="db-1") == "wrong-server"
    assert state.find_token(tok.secret_hash).used_at is None  # type: ignore[union-attr]
    with state.transaction():
        tokens.redeem(state, tok, ca.fingerprint, "k", now=NOW + 1, name="web-1")
    assert reason(tok) == "used"
    made, _ = tokens.create_token(state, ca.fingerprint, "z-1", now=NOW)
    head, fpr, secret = made.split(".")
    flipped = ("b" if secret[0] == "a" else "a") + secret[1:]
    assert reason(parse_token_untrusted(f"{head}.{fpr}.{flipped}")) == "unknown"
    with pytest.raises(tokens.TokenRejected) as info:
        tokens.parse_presented("lab1.nope")
    assert info.value.reason == "malformed"
    with pytest.raises(tokens.TokenRejected):
        tokens.parse_presented(42)


def test_revoke_and_ttl_parsing(state: StateDB, ca: CertificateAuthority) -> None:
    tokens.create_token(state, ca.fingerprint, "web-1", now=NOW)
    assert tokens.revoke_tokens(state, "web-1") == 1
    with pytest.raises(UsageError):
        tokens.revoke_tokens(state, "web-1")
    assert tokens.list_tokens(state, NOW)[0]["status"] == "revoked"
    assert tokens.parse_ttl(None) == 30 * 60
    assert tokens.parse_ttl("2h") == 7200
    for bad in ("0m", "soon", "30", "9w"):
        with pytest.raises(UsageError):
            tokens.parse_ttl(bad)


def test_bad_token_fields_are_refused(state: StateDB, ca: CertificateAuthority) -> None:
    with pytest.raises(UsageError):
        tokens.create_token(state, ca.fingerprint, "Not A Name", now=NOW)
    with pytest.raises(UsageError):
        tokens.create_token(state, ca.fingerprint, "web-1", ["Bad Label"], now=NOW)
    assert state.list_tokens() == []
