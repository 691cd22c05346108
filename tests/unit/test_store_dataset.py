"""Store dataset: HLC versions, record encryption, LMDB dataset, keys, tombstones and GC."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common import wire
from lab.common.errors import ConfigError, LocalProtocolError, RemoteProtocolError, StoreError
from lab.common.identity import NodeKey
from lab.store import keys
from lab.store.dataset import Dataset, leaf_of
from lab.store.hlc import HLC, Version
from lab.store.records import Meta, SecretRecord, check_path, machine_path, open_value, seal_value, split_machine_path

KEY = bytes(range(32))
META = Meta.simple("admin", 1_000)


# -- HLC -------------------------------------------------------------------------------------------


def test_hlc_ticks_are_strictly_increasing_even_when_the_clock_stalls_or_goes_back() -> None:
    c = HLC("n1")
    seen = [c.tick(now) for now in (100, 100, 99, 50, 101, 101)]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[0] == Version(100, 0, "n1") and seen[3] == Version(100, 3, "n1") and seen[4] == Version(101, 0, "n1")


def test_hlc_observe_moves_past_a_peer_ahead_of_us() -> None:
    c = HLC("a")
    c.tick(100)
    c.observe(Version(500, 7, "b"), now_ms=100)
    v = c.tick(100)
    assert v > Version(500, 7, "b") and v == Version(500, 8, "a")


def test_hlc_refuses_versions_from_far_future() -> None:
    with pytest.raises(LocalProtocolError):
        HLC("a").observe(Version(10**15, 0, "b"), now_ms=0)


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5), st.sampled_from("abc")), min_size=2))
def test_version_order_is_total_and_origin_breaks_ties(vs: list[tuple[int, int, str]]) -> None:
    versions = [Version(*v) for v in vs]
    for a in versions:
        for b in versions:
            assert (a < b) + (a == b) + (a > b) == 1
    assert Version.parse(str(versions[0])) == versions[0]


# -- records ------------------------------------------------------------------------------------------


def test_seal_open_round_trip_and_wire_round_trip() -> None:
    rec = seal_value(KEY, "mail/dkim-key", Version(5, 1, "n1"), META, b"s3cret")
    assert open_value(KEY, rec) == b"s3cret"
    again = SecretRecord.decode_untrusted(rec.encode())
    assert again == rec and open_value(KEY, again) == b"s3cret"
    assert b"s3cret" not in rec.encode() and "s3cret" not in repr(rec)


@pytest.mark.parametrize(
    "change",
    [
        {"path": "mail/other"},
        {"wall_ms": 6},
        {"counter": 2},
        {"origin": "n2"},
        {"meta": Meta.simple("admin", 1_000, mode=0o644)},
        {"meta": Meta.simple("mallory", 1_000)},
    ],
)
def test_associated_data_binds_path_version_and_meta(change: dict[str, object]) -> None:
    rec = seal_value(KEY, "mail/dkim-key", Version(5, 1, "n1"), META, b"s3cret")
    with pytest.raises(StoreError, match="does not authenticate"):
        open_value(KEY, dataclasses.replace(rec, **change))


def test_flipped_ciphertext_bit_or_wrong_key_fails() -> None:
    rec = seal_value(KEY, "a", Version(5, 1, "n1"), META, b"v")
    bad = bytearray(rec.ciphertext)
    bad[-1] ^= 1
    with pytest.raises(StoreError):
        open_value(KEY, dataclasses.replace(rec, ciphertext=bytes(bad)))
    with pytest.raises(StoreError):
        open_value(bytes(32), rec)


def test_nonces_are_fresh() -> None:
    a = seal_value(KEY, "a", Version(5, 1, "n1"), META, b"v")
    b = seal_value(KEY, "a", Version(5, 1, "n1"), META, b"v")
    assert a.ciphertext[:24] != b.ciphertext[:24]


def test_record_schema_rejects_inconsistent_tombstones_and_bad_paths() -> None:
    with pytest.raises(LocalProtocolError):
        SecretRecord("a", 1, 0, "n", True, META, b"")
    with pytest.raises(LocalProtocolError):
        SecretRecord("a", 1, 0, "n", False, None, b"")
    for bad in ("", "/a", "a//b", "a/../b", "a b", "../x"):
        with pytest.raises(StoreError):
            check_path(bad)
    assert machine_path("tls/node-cert", "web-1") == "tls/node-cert@web-1"
    assert split_machine_path("tls/node-cert@web-1") == ("tls/node-cert", "web-1")


@given(st.binary(max_size=300))
def test_decoding_random_bytes_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        SecretRecord.decode_untrusted(data)
    except RemoteProtocolError:
        pass


def test_decoding_a_well_formed_map_with_bad_fields_is_a_protocol_error() -> None:
    rec = seal_value(KEY, "a", Version(5, 1, "n1"), META, b"v")
    raw = rec._to_wire()
    raw["path"] = "../etc"
    with pytest.raises(RemoteProtocolError):
        SecretRecord.decode_untrusted(wire.packb(raw))


# -- dataset ---------------------------------------------------------------------------------------------


@pytest.fixture
def ds(tmp_path):
    d = Dataset.create(tmp_path / "store", "n1", durable=False)
    yield d
    d.close()


def test_write_read_reopen(tmp_path) -> None:
    d = Dataset.create(tmp_path / "s", "n1")
    r1 = d.write("mail/dkim-key", b"one", META, 1_000)
    r2 = d.write("mail/dkim-key", b"two", META, 1_000)
    assert r2.version > r1.version
    assert d.value("mail/dkim-key") == b"two" and len(d) == 1
    root = d.root()
    d.close()
    d = Dataset.open(tmp_path / "s", "n1")
    assert d.value("mail/dkim-key") == b"two" and d.root() == root
    assert d.write("x", b"y", META, 5).version > r2.version  # the clock survived the restart
    d.close()


def test_dataset_key_is_wrapped_on_disk_and_machine_key_is_private(tmp_path) -> None:
    d = Dataset.create(tmp_path / "s", "n1")
    with d.export_key() as k:
        key = k.bytes()
    d.write("a", b"plaintext-marker", META, 1)
    d.close()
    for f in (tmp_path / "s").iterdir():
        data = f.read_bytes()
        assert key not in data and b"plaintext-marker" not in data, f
    mk = tmp_path / "s" / "machine.key"
    assert stat.S_IMODE(mk.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s" / "data.mdb").stat().st_mode) == 0o600
    saved = mk.read_bytes()
    os.unlink(mk)  # without the machine key the dataset does not open, and no new key appears
    with pytest.raises(ConfigError, match="not found"):
        Dataset.open(tmp_path / "s", "n1")
    assert not mk.exists()
    keys.load_or_create_machine_key(mk)  # another machine's key: unwrapping fails
    with pytest.raises(StoreError, match="unwrap"):
        Dataset.open(tmp_path / "s", "n1")
    os.unlink(mk)
    mk.write_bytes(saved)
    os.chmod(mk, 0o600)
    Dataset.open(tmp_path / "s", "n1").close()


def test_open_refuses_missing_dataset_and_create_refuses_existing(tmp_path) -> None:
    with pytest.raises(StoreError, match="holds no dataset"):
        Dataset.open(tmp_path / "none", "n1")
    Dataset.create(tmp_path / "s", "n1").close()
    with pytest.raises(StoreError, match="already holds"):
        Dataset.create(tmp_path / "s", "n1")


def test_new_store_joins_with_the_key_sealed_to_its_node_key(tmp_path, ds) -> None:
    rec = ds.write("a", b"v", META, 1)
    newcomer, stranger = NodeKey.generate(), NodeKey.generate()
    sealed = ds.seal_key_for(newcomer.public_key)
    with pytest.raises(StoreError, match="does not open"):
        Dataset.join(tmp_path / "x", "n3", sealed, stranger)
    joined = Dataset.join(tmp_path / "j", "n2", sealed, newcomer, durable=False)
    assert joined.merge([rec]) == [rec] and joined.value("a") == b"v"
    joined.close()


def test_merge_keeps_the_highest_version_and_rejects_foreign_ciphertext(ds) -> None:
    newer = seal_value(ds.export_key().bytes(), "p", Version(10, 0, "n2"), META, b"new")
    older = seal_value(ds.export_key().bytes(), "p", Version(5, 0, "n3"), META, b"old")
    assert ds.merge([newer, older]) == [newer]
    assert ds.merge([older]) == [] and ds.value("p") == b"new"
    assert ds.merge([newer]) == []  # idempotent
    forged = seal_value(bytes(32), "q", Version(11, 0, "n9"), META, b"evil")
    assert ds.merge([forged]) == [] and ds.get("q") is None and "authenticate" in ds.rejected[0][1]


def test_tombstones_replace_values_and_gc_waits_for_every_peer_and_the_grace(ds) -> None:
    ds.write("a", b"1", META, 100)
    t = ds.delete("a", 200)
    assert t is not None and t.deleted and ds.value("a") is None and ds.get("a") == t
    assert ds.delete("a", 300) is None  # nothing live to delete
    assert ds.delete("never", 300) is None
    seq = ds.seq
    assert ds.collect_garbage(["n2", "n3"], now_ms=10**9, grace_ms=0) == 0  # nobody acked
    ds.record_ack("n2", seq)
    assert ds.collect_garbage(["n2", "n3"], now_ms=10**9, grace_ms=0) == 0  # n3 has not
    ds.record_ack("n3", seq)
    assert ds.collect_garbage(["n2", "n3"], now_ms=250, grace_ms=1000) == 0  # too young
    empty_root = Dataset.root.__get__(ds)()
    assert ds.collect_garbage(["n2", "n3"], now_ms=10**9, grace_ms=0) == 1
    assert ds.get("a") is None and ds.tombstones() == [] and len(ds) == 0
    assert ds.root() != empty_root  # the tree changed when the tombstone went


def test_acks_only_grow(ds) -> None:
    ds.record_ack("n2", 5)
    ds.record_ack("n2", 3)
    assert ds.acks() == {"n2": 5}


def test_digest_tree_is_order_independent_and_leaves_index_records(tmp_path) -> None:
    a = Dataset.create(tmp_path / "a", "a", durable=False)
    b = Dataset.with_key(tmp_path / "b", "b", a.export_key(), durable=False)
    recs = [a.write(f"p/{i}", b"%d" % i, META, 100 + i) for i in range(50)]
    recs.append(a.delete("p/3", 500))
    assert b.merge(reversed(recs))
    assert a.root() == b.root() and a.bucket_digests() == b.bucket_digests()
    leaf = leaf_of("p/7")
    assert any(r.path == "p/7" for r in b.records_in_leaves([leaf]))
    assert all(leaf_of(r.path) == leaf for r in b.records_in_leaves([leaf]))
    a.close(), b.close()


def test_changes_since_lists_arrivals_in_order(ds) -> None:
    ds.write("a", b"1", META, 1)
    s = ds.seq
    ds.write("b", b"2", META, 2)
    ds.write("a", b"3", META, 3)
    assert [r.path for _, r in ds.changes_since(s)] == ["b", "a"]
    assert ds.changes_since(ds.seq) == []


def test_listeners_hear_every_change(ds) -> None:
    heard = []
    ds.listeners.append(heard.extend)
    ds.write("a", b"1", META, 1)
    ds.delete("a", 2)
    assert [r.deleted for r in heard] == [False, True]


def test_oversize_value_refused(ds) -> None:
    with pytest.raises(StoreError, match="exceeds"):
        ds.write("big", b"x" * (1 << 20 + 1), META, 1)


def test_a_local_write_always_beats_what_it_replaces_even_with_a_slow_clock(ds) -> None:
    with ds.export_key() as k:
        ahead = seal_value(k.bytes(), "p", Version(10**9, 5, "zz"), META, b"from a fast peer")
    assert ds.merge([ahead]) == [ahead]  # no `now` given (recovery): still witnessed
    mine = ds.write("p", b"mine", META, now_ms=1)
    assert mine.version > ahead.version and ds.value("p") == b"mine"
    assert ds.delete("p", now_ms=1).version > mine.version


def test_a_collected_tombstone_and_older_values_do_not_come_back(ds) -> None:
    with ds.export_key() as k:
        key = k.bytes()
    old_value = ds.write("a", b"1", META, 100)
    t = ds.delete("a", 200)
    assert ds.collect_garbage([], now_ms=10_000, grace_ms=0) == 1
    assert ds.merge([t]) == [] and ds.merge([old_value]) == [] and ds.get("a") is None
    assert ds.rejected == []  # ignored, not refused: the peer did nothing wrong
    newer = seal_value(key, "a", Version(300, 0, "n2"), META, b"new")
    assert ds.merge([newer]) == [newer] and ds.value("a") == b"new"
    # forgotten after the retention: a very late copy is admitted again (and collected again later)
    ds.delete("a", 400)
    ds.collect_garbage([], now_ms=10_000, grace_ms=0)
    ds.collect_garbage([], now_ms=10**12, grace_ms=0, collected_retention_ms=1)
    assert ds.merge([newer]) == [newer]
