"""agent/cache.py: encryption at rest, tamper detection, freshness, wipe, key files, TPM sealing (fake runner)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lmdb
import msgpack
import pytest

from lab.agent import _tpm
from lab.agent.cache import (
    KEY_FILE,
    TPM_KEY_FILE,
    CacheRecord,
    Freshness,
    SecretCache,
    check_path,
    load_or_create_key,
    records_from_import,
    wipe,
)
from lab.common.errors import ConfigError, StoreError

VALUE = b"correct-horse-battery-staple-7f3a9c"
NOW = 1_800_000_000.0


def rec(path: str = "db/main-password", value: bytes = VALUE, **kw: object) -> CacheRecord:
    kw.setdefault("version", (1_700_000_000_000, 0, "store-1"))
    kw.setdefault("fetched_at", NOW)
    return CacheRecord(path=path, value=value, **kw)  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path):
    c = SecretCache.open(tmp_path / "home", protection="file")
    yield c
    c.close()


def _raw_files(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (home / "cache").iterdir())


def test_round_trip_and_no_plaintext_on_disk(cache: SecretCache, tmp_path: Path) -> None:
    cache.put(rec())
    cache.put(rec("app/token", b"another-secret-value-x9", owner="www-data", group="www-data", mode=0o440, ttl=3600))
    assert cache.get("db/main-password", NOW) == (VALUE, Freshness.FRESH)
    r = cache.get_record("app/token")
    assert r is not None and (r.owner, r.group, r.mode, r.ttl) == ("www-data", "www-data", 0o440, 3600)
    cache._env.sync(True)
    raw = _raw_files(tmp_path / "home")
    assert VALUE not in raw and b"another-secret-value-x9" not in raw
    assert b"db/main-password" in raw  # metadata is in clear: list() never decrypts


def test_list_is_metadata_only(cache: SecretCache) -> None:
    cache.put(rec())
    [entry] = cache.list(NOW)
    assert entry["path"] == "db/main-password" and entry["status"] == "fresh"
    assert VALUE not in repr(entry).encode() and "value" not in entry
    assert "correct-horse" not in repr(rec())


def test_modes(cache: SecretCache, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cache.put(rec())
    assert stat.S_IMODE((home / "cache").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / KEY_FILE).stat().st_mode) == 0o600
    for f in (home / "cache").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert cache.key.buffer.locked or os.geteuid() != 0
    assert cache.key_protection == "file"


def test_key_file_with_loose_mode_is_refused(tmp_path: Path) -> None:
    load_or_create_key(tmp_path, protection="file").close()
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match="group/others"):
        load_or_create_key(tmp_path)


def test_key_persists(tmp_path: Path) -> None:
    with SecretCache.open(tmp_path, protection="file") as c:
        c.put(rec())
    with SecretCache.open(tmp_path) as c:
        assert c.get("db/main-password", NOW) == (VALUE, Freshness.FRESH)


def test_wrong_key_does_not_authenticate(tmp_path: Path) -> None:
    with SecretCache.open(tmp_path, protection="file") as c:
        c.put(rec())
    (tmp_path / KEY_FILE).unlink()
    with SecretCache.open(tmp_path, protection="file") as c:
        with pytest.raises(StoreError, match="does not authenticate"):
            c.get("db/main-password")


def _patch(cache: SecretCache, path: str, **changes: object) -> None:
    with cache._env.begin(write=True, db=cache._db) as txn:
        doc = msgpack.unpackb(txn.get(path.encode()))
        doc.update(changes)
        txn.put(path.encode(), msgpack.packb(doc, use_bin_type=True))


@pytest.mark.parametrize(
    "changes",
    [
        {"owner": "nobody"},
        {"mode": 0o444},
        {"group": "users"},
        {"version": [1_700_000_000_001, 0, "store-1"]},
        {"ttl": 99999},
    ],
)
def test_metadata_tamper_detected(cache: SecretCache, changes: dict) -> None:
    cache.put(rec())
    _patch(cache, "db/main-password", **changes)
    with pytest.raises(StoreError, match="does not authenticate"):
        cache.get("db/main-password")


def test_ciphertext_tamper_detected(cache: SecretCache) -> None:
    cache.put(rec())
    with cache._env.begin(db=cache._db) as txn:
        ct = msgpack.unpackb(txn.get(b"db/main-password"))["ct"]
    _patch(cache, "db/main-password", ct=bytes([ct[0] ^ 1]) + ct[1:])
    with pytest.raises(StoreError, match="does not authenticate"):
        cache.get("db/main-password")


def test_moved_record_detected(cache: SecretCache) -> None:
    cache.put(rec())
    with cache._env.begin(write=True, db=cache._db) as txn:
        raw = txn.get(b"db/main-password")
        doc = msgpack.unpackb(raw)
        doc["path"] = "db/other"
        txn.put(b"db/other", msgpack.packb(doc, use_bin_type=True))
        txn.put(b"db/third", raw)
    with pytest.raises(StoreError, match="does not authenticate"):
        cache.get("db/other")
    with pytest.raises(StoreError, match="corrupt"):
        cache.get("db/third")


def test_garbage_entry_is_corrupt_not_crash(cache: SecretCache) -> None:
    with cache._env.begin(write=True, db=cache._db) as txn:
        txn.put(b"x/y", b"\xc1garbage")
    with pytest.raises(StoreError):
        cache.get("x/y")
    assert cache.list(NOW) == [{"path": "x/y", "status": "corrupt"}]
    assert cache.records() == []


def test_freshness(cache: SecretCache) -> None:
    cache.put(rec())  # fetched at NOW, default stale_after 300 s
    assert cache.get("db/main-password", NOW + 299)[1] is Freshness.FRESH
    assert cache.get("db/main-password", NOW + 301) == (VALUE, Freshness.STALE)  # still served
    cache.mark_synced(NOW + 1000)  # a store confirmed everything is current
    assert cache.get("db/main-password", NOW + 1100)[1] is Freshness.FRESH
    assert cache.last_sync() == NOW + 1000


def test_expired_is_still_served(cache: SecretCache) -> None:
    cache.put(rec(ttl=60))
    assert cache.get("db/main-password", NOW + 59)[1] is Freshness.FRESH
    assert cache.get("db/main-password", NOW + 61) == (VALUE, Freshness.EXPIRED)
    cache.put(rec("a/b", expires_at=NOW + 10))
    assert cache.get("a/b", NOW + 11) == (VALUE, Freshness.EXPIRED)
    [a, _] = cache.list(NOW + 11)
    assert a["path"] == "a/b" and a["status"] == "expired" and a["expires_at"] == NOW + 10


def test_remove_and_missing(cache: SecretCache) -> None:
    cache.put(rec())
    assert cache.remove("db/main-password") is True
    assert cache.remove("db/main-password") is False
    assert cache.get("db/main-password") is None


def test_replace_on_rotation(cache: SecretCache) -> None:
    cache.put(rec())
    cache.put(rec(value=b"rotated", version=(1_700_000_000_500, 0, "store-2")))
    assert cache.get("db/main-password", NOW)[0] == b"rotated"
    assert cache.paths() == ["db/main-password"]


def test_opaque_version(cache: SecretCache) -> None:
    cache.put(rec(version=b"\x01\x02opaque"))
    r = cache.get_record("db/main-password")
    assert r is not None and r.version == b"\x01\x02opaque"


def test_wipe(tmp_path: Path) -> None:
    c = SecretCache.open(tmp_path, protection="file")
    c.put(rec())
    c.wipe()
    assert not (tmp_path / "cache").exists() and not (tmp_path / KEY_FILE).exists()
    wipe(tmp_path)  # idempotent


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "a b", "x" * 300, "a/b@node", None])
def test_bad_paths(bad: object) -> None:
    with pytest.raises(StoreError):
        check_path(bad)


@pytest.mark.parametrize(
    "kw", [{"mode": 0o1777}, {"mode": True}, {"owner": ""}, {"ttl": 0}, {"version": (1, 2)}, {"version": "x"}, {"value": "str"}]
)
def test_bad_records(kw: dict) -> None:
    with pytest.raises(StoreError):
        rec(**kw)


def test_lmdb_errors_translated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise lmdb.Error("disk on fire")

    monkeypatch.setattr(lmdb, "open", boom)
    with pytest.raises(StoreError, match="disk on fire"):
        SecretCache.open(tmp_path, protection="file")


# -- TPM sealing, with a fake tpm2-tools runner (the real one runs in tests/integration) --------


class FakeTpm:
    """Mimics tpm2_create/load/unseal closely enough: 'seals' by XOR with a per-TPM secret."""

    def __init__(self, seed: int = 0x5A) -> None:
        self.seed = seed
        self.calls: list[list[str]] = []

    def __call__(self, argv, stdin):
        argv = list(argv)
        self.calls.append(argv)
        tool = argv[0]
        if tool == "tpm2_createprimary":
            Path(argv[argv.index("-c") + 1]).write_bytes(b"primary")
        elif tool == "tpm2_create":
            assert argv[argv.index("-i") + 1] == "-" and stdin is not None
            Path(argv[argv.index("-u") + 1]).write_bytes(b"pub")
            Path(argv[argv.index("-r") + 1]).write_bytes(bytes(b ^ self.seed for b in stdin))
        elif tool == "tpm2_load":
            priv = Path(argv[argv.index("-r") + 1]).read_bytes()
            Path(argv[argv.index("-c") + 1]).write_bytes(priv)
        elif tool == "tpm2_unseal":
            return bytes(b ^ self.seed for b in Path(argv[argv.index("-c") + 1]).read_bytes())
        elif tool != "tpm2_flushcontext":
            raise AssertionError(tool)
        return b""


def test_tpm_sealed_key_round_trip(tmp_path: Path) -> None:
    fake = FakeTpm()
    k1 = load_or_create_key(tmp_path, protection="tpm", tpm_runner=fake)
    secret = k1.buffer.bytes()
    assert k1.protection == "tpm" and not (tmp_path / KEY_FILE).exists()
    blob = (tmp_path / TPM_KEY_FILE).read_bytes()
    assert secret not in blob and stat.S_IMODE((tmp_path / TPM_KEY_FILE).stat().st_mode) == 0o600
    # the key is never on a command line
    assert all(secret.hex() not in " ".join(c) and str(secret) not in " ".join(c) for c in fake.calls)
    k2 = load_or_create_key(tmp_path, tpm_runner=fake)
    assert k2.protection == "tpm" and k2.buffer.bytes() == secret
    k1.close()
    k2.close()
    assert not list(tmp_path.glob(".tpm-*"))  # temp dirs cleaned


def test_tpm_unseal_failure_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    load_or_create_key(tmp_path, protection="tpm", tpm_runner=FakeTpm()).close()

    def broken(argv, stdin):
        if argv[0] == "tpm2_load":
            raise _tpm.TpmError("tpm2_load exited 1")
        return b""

    with pytest.raises(_tpm.TpmError):
        load_or_create_key(tmp_path, tpm_runner=broken)
    assert (tmp_path / TPM_KEY_FILE).exists()


@pytest.mark.parametrize("blob", [b"", b"junk", _tpm.MAGIC, _tpm.MAGIC + b"\x00\x00\x00\x05ab", _tpm.pack_blob(b"a", b"b") + b"x"])
def test_tpm_blob_strict(blob: bytes) -> None:
    with pytest.raises(_tpm.TpmError):
        _tpm.unpack_blob(blob)


def test_tpm_available_needs_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tpm.shutil, "which", lambda name: None)
    assert _tpm.available({"TPM2TOOLS_TCTI": "swtpm:port=1"}) is False
    monkeypatch.setattr(_tpm.shutil, "which", lambda name: "/usr/bin/" + name)
    assert _tpm.available({"TPM2TOOLS_TCTI": "swtpm:port=1"}) is True


# -- seeding ----------------------------------------------------------------------------------


def test_import_parsing(tmp_path: Path) -> None:
    (tmp_path / "v.bin").write_bytes(b"\x00\x01bin")
    doc = {
        "secrets": [
            {"path": "a/b", "value": "s1", "ttl": "90d", "mode": "0440", "owner": "nobody", "group": "nogroup"},
            {"path": "c", "value_file": "v.bin", "version": [5, 1, "store-2"], "fetched_at": 7},
        ]
    }
    a, c = records_from_import(doc, NOW, base_dir=tmp_path)
    assert (a.value, a.ttl, a.mode, a.owner, a.version[2]) == (b"s1", 90 * 86400, 0o440, "nobody", "import")
    assert (c.value, c.version, c.fetched_at) == (b"\x00\x01bin", (5, 1, "store-2"), 7.0)


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"secrets": {}},
        {"secrets": [{"value": "x"}]},
        {"secrets": [{"path": "a", "value": "x", "value_file": "y"}]},
        {"secrets": [{"path": "a", "value": "x", "extra": 1}]},
        {"secrets": [{"path": "a", "value": "x", "mode": "99"}]},
        {"secrets": [{"path": "../a", "value": "x"}]},
    ],
)
def test_import_strict(doc: object) -> None:
    with pytest.raises(ConfigError):
        records_from_import(doc, NOW)
