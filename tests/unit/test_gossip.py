"""Gossip between stores: convergence under loss and partitions (simulated), CRDT merge laws."""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.common import wire
from lab.common.errors import NotEntitled, RemoteProtocolError
from lab.store.dataset import Dataset, leaf_of
from lab.store.gossip import AEDiff, AERoot, Gossip, Push
from lab.store.hlc import Version
from lab.store.records import Meta, SecretRecord, decode_message_untrusted, seal_value
from lab.store.simulate import Network

PATHS = [f"app/p{i}" for i in range(6)]
META = Meta.simple("sim", 1)

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3), st.sampled_from(PATHS), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 3), st.sampled_from(PATHS)),
    st.tuples(st.just("partition"), st.integers(1, 3)),
    st.tuples(st.just("heal")),
    st.tuples(st.just("round")),
    st.tuples(st.just("tick"), st.integers(0, 50)),
    st.tuples(st.just("gc")),
)


def _apply_model(model: dict[str, tuple[Version, bytes | None]], rec: SecretRecord | None, value: bytes | None) -> None:
    if rec is None:
        return
    cur = model.get(rec.path)
    if cur is None or cur[0] < rec.version:
        model[rec.path] = (rec.version, value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, max_size=40),
    n=st.integers(2, 4),
    loss=st.sampled_from([0.0, 0.2, 0.5]),
    seed=st.integers(0, 2**16),
    skew=st.lists(st.integers(-500, 500), min_size=4, max_size=4),
    gc=st.booleans(),
)
def test_stores_converge_to_the_model_after_loss_and_partitions_heal(ops, n, loss, seed, skew, gc) -> None:
    """With ``gc`` tombstones are collected whenever acknowledged (grace 0): nothing deleted
    comes back. Without, every store also ends with the same tombstones."""
    model: dict[str, tuple[Version, bytes | None]] = {}
    with Network(n, seed=seed, loss=loss, clock_offsets=skew[:n], tombstone_grace_ms=0 if gc else 10**9) as net:
        for o in ops:
            if o[0] == "write":
                name = net.names[o[1] % n]
                _apply_model(model, net.write(name, o[2], o[3]), o[3])
            elif o[0] == "delete":
                _apply_model(model, net.delete(net.names[o[1] % n], o[2]), None)
            elif o[0] == "partition":
                k = o[1] % n or 1
                net.partition(net.names[:k], net.names[k:])
            elif o[0] == "heal":
                net.heal()
            elif o[0] == "round":
                net.anti_entropy_round()
            elif o[0] == "gc":
                net.collect_garbage()
            else:
                net.advance(o[1])
            net.deliver()
        net.heal()
        net.loss = 0.0
        net.deliver()
        net.settle(max_rounds=40)
        assert net.converged()
        want = {p: (v, val) for p, (v, val) in model.items() if val is not None}
        for name in net.names:
            assert net.live(name) == want
            versions = net.stores[name].dataset.versions()
            if gc:
                assert {p: v for p, v in versions.items() if p in want} == {p: v for p, (v, _) in want.items()}
            else:
                assert versions == {p: v for p, (v, _) in model.items()}  # tombstones too


def test_tombstones_are_collected_everywhere_once_acknowledged() -> None:
    with Network(3, seed=3, tombstone_grace_ms=0) as net:
        for i in range(20):
            net.write(net.names[i % 3], f"p/{i}", b"v")
        net.deliver()
        for i in range(0, 20, 2):
            net.delete(net.names[(i + 1) % 3], f"p/{i}")
        net.deliver()
        net.advance(10)
        for _ in range(30):
            net.anti_entropy_round()
            net.collect_garbage()
            if all(not g.dataset.tombstones() for g in net.stores.values()) and net.converged():
                break
        assert all(g.dataset.tombstones() == [] for g in net.stores.values())
        assert net.converged() and sorted(net.live("s0")) == sorted(f"p/{i}" for i in range(1, 20, 2))


def test_eager_push_reaches_every_reachable_store_without_anti_entropy() -> None:
    with Network(4, seed=1) as net:
        net.partition(["s0", "s1", "s2"], ["s3"])
        net.write("s0", "a/b", b"v")
        net.deliver()
        assert all(net.live(n).get("a/b") for n in ("s1", "s2")) and "a/b" not in net.live("s3")
        net.heal()
        assert net.settle() >= 1 and net.live("s3")["a/b"][1] == b"v"


def test_anti_entropy_sends_only_what_differs() -> None:
    with Network(2, seed=2) as net:
        a, b = (net.stores[n].dataset for n in net.names)
        recs = [a.write(f"bulk/{i}", b"x" * 32, META, 1000 + i) for i in range(2000)]
        b.merge(recs)
        for i in range(5):
            a.write(f"bulk/{i * 7}", b"changed", META, 5000 + i)
        before = net.link.bytes
        net._send("s0", net.stores["s0"].start_round(net.rng, "s1"))
        net.deliver()
        assert net.converged() and b.value("bulk/7") == b"changed"
        assert net.link.bytes - before < 48 * 1024
        net.anti_entropy_round()  # equal roots: acks recorded both ways
        assert a.acks().get("s1") == a.seq and b.acks().get("s0") == b.seq


def test_messages_round_trip_and_members_only(tmp_path) -> None:
    ds = Dataset.create(tmp_path / "a", "s0", durable=False)
    g = Gossip(ds, seeds=["s0", "s1"])
    rec = ds.write("a", b"v", META, 1)
    [(peer, push)] = g.local_write([rec])
    assert peer == "s1" and decode_message_untrusted(wire.encode(push)) == push
    with pytest.raises(NotEntitled):
        g.receive("intruder", Push((rec,)), 10)
    root = AERoot(ds.root(), 1)
    assert decode_message_untrusted(wire.encode(root)) == root
    other = "zz/other"
    assert leaf_of(other) != leaf_of("a")
    with pytest.raises(RemoteProtocolError):
        g.receive("s1", AEDiff((leaf_of(other),), (rec,), True, 1, 1), 10)
    ds.close()


# -- CRDT laws over the real dataset ---------------------------------------------------------------

KEY = bytes(range(32))
rec_spec = st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 2), st.sampled_from(["a", "b", "c"]))
_made: dict[tuple[int, Version], SecretRecord] = {}


def _records(specs) -> list[SecretRecord]:
    """One write is one (path, version): the same spec always gives the same record."""
    out = []
    for p, wall, counter, origin in specs:
        v = Version(wall, counter, origin)
        if (p, v) not in _made:
            deleted = (wall + counter + ord(origin)) % 3 == 0
            _made[p, v] = SecretRecord.tombstone(f"k/{p}", v) if deleted else seal_value(KEY, f"k/{p}", v, META, f"{p}{v}".encode())
        out.append(_made[p, v])
    return out


def _state(tmp: Path, *batches: list[SecretRecord]) -> tuple[dict[str, Version], bytes]:
    from lab.common.securemem import SecretBuffer

    ds = Dataset.with_key(tmp / f"d{random.random()}", "x", SecretBuffer.from_bytes(KEY), durable=False)
    try:
        for b in batches:
            ds.merge(b)
        return ds.versions(), ds.root()
    finally:
        ds.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(rec_spec, max_size=8), st.lists(rec_spec, max_size=8), st.lists(rec_spec, max_size=8))
def test_merge_is_commutative_associative_idempotent(a, b, c) -> None:
    A, B, C = _records(a), _records(b), _records(c)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        ab = _state(tmp, A, B)
        assert ab == _state(tmp, B, A)  # commutative
        assert _state(tmp, A, B, C) == _state(tmp, A, C, B) == _state(tmp, C, B, A)  # associative (any grouping)
        assert _state(tmp, A, A, B, B) == ab  # idempotent
        # and the result is "highest version per path"
        want: dict[str, Version] = {}
        for r in A + B:
            want[r.path] = max(want.get(r.path, r.version), r.version)
        assert ab[0] == want


@settings(max_examples=15, deadline=None)
@given(st.lists(rec_spec, min_size=1, max_size=6), st.randoms())
def test_any_delivery_order_converges(specs, rnd) -> None:
    recs = _records(specs)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        first = _state(tmp, recs)
        for _ in range(3):
            shuffled = recs[:]
            rnd.shuffle(shuffled)
            assert _state(tmp, *[[r] for r in shuffled]) == first


def test_permutations_of_three_writes_all_agree() -> None:
    recs = _records([(0, 1, 0, "a"), (0, 1, 0, "b"), (0, 0, 9, "c")])
    with tempfile.TemporaryDirectory() as t:
        states = [_state(Path(t), *[[r] for r in p]) for p in itertools.permutations(recs)]
    assert all(s == states[0] for s in states) and len(states) == 6


def test_every_store_message_type_round_trips_in_a_real_exchange(monkeypatch) -> None:
    from lab.store.records import MESSAGES

    seen: dict[str, int] = {}
    real_encode = wire.encode

    def spy(msg):
        data = real_encode(msg)
        assert decode_message_untrusted(data) == msg
        seen[msg.TAG] = seen.get(msg.TAG, 0) + 1
        return data

    monkeypatch.setattr(wire, "encode", spy)
    with Network(2, seed=5) as net:
        net.partition(["s0"], ["s1"])
        net.write("s0", "a/x", b"1")
        net.heal()
        net.settle()
        net.anti_entropy_round()
    gossip_tags = {c.TAG for c in MESSAGES.classes() if c.TAG.startswith("store.ae") or c.TAG.startswith("store.gossip")}
    assert gossip_tags <= set(seen)


@given(st.binary(max_size=200))
def test_random_bytes_never_decode_to_anything_but_a_protocol_error(data) -> None:
    try:
        decode_message_untrusted(data)
    except RemoteProtocolError:
        pass


def test_an_empty_store_catches_up_with_messages_kept_small(monkeypatch) -> None:
    import lab.store.gossip as g

    monkeypatch.setattr(g, "MAX_MESSAGE_BYTES", 4096)
    with Network(2, seed=9) as net:
        net.partition(["s0"], ["s1"])
        for i in range(300):
            net.write("s1" if i % 3 == 0 else "s0", f"bulk/{i}", b"x" * 100)
        net.heal()
        rounds = net.settle(max_rounds=200)
        assert net.converged() and len(net.live("s0")) == 300 and rounds > 1


def test_a_revocation_reaches_every_store_without_the_coordinator() -> None:
    """The CA-signed list is written at one store (the coordinator is gone after that) while
    another store is partitioned away; once the partition heals, every store refuses the node."""
    from lab.common.errors import AuthError
    from lab.common.identity import CertificateAuthority, NodeKey
    from lab.store.policy import sign_policy
    from lab.store.serve import StoreService

    ca = CertificateAuthority.generate()
    with Network(3, seed=4, ca_public_key=ca.public_key) as net:
        net.publish("s0", sign_policy(ca, {"web-1": ["app/x"]}, net.names, [], version=1, now=1))
        net.write("s0", "app/x", b"v")
        net.deliver()
        cert = ca.issue("web-1", "web-1", NodeKey.generate().public_key, (), 3600, 1_700_000_000)
        services = {n: StoreService(g.dataset, g.enforcer) for n, g in net.stores.items()}
        assert all(s.fetch(cert, "app/x", 1_700_000_000).value == b"v" for s in services.values())
        net.partition(["s0", "s1"], ["s2"])
        net.publish("s1", ca.revoke(None, [cert], 1_700_000_000))
        net.deliver()
        with pytest.raises(AuthError):
            services["s0"].fetch(cert, "app/x", 1_700_000_000)
        assert services["s2"].fetch(cert, "app/x", 1_700_000_000)  # not reached yet
        net.heal()
        net.settle()
        for s in services.values():
            with pytest.raises(AuthError, match="revoked"):
                s.fetch(cert, "app/x", 1_700_000_000)


def test_gc_keeps_up_while_writes_never_stop() -> None:
    """Roots are never equal (a write lands between every round), yet tombstones go: completed
    diffs acknowledge too, and a collected tombstone is not handed back and forth."""
    with Network(3, seed=8, tombstone_grace_ms=0) as net:
        for i in range(10):
            net.write("s0", f"old/{i}", b"v")
        net.deliver()
        for i in range(10):
            net.delete("s1", f"old/{i}")
        net.deliver()
        for r in range(40):
            net.write(net.names[r % 3], f"busy/{r}", b"x")  # pushes lost: roots differ every round
            net.queue.clear()
            net.advance(5)
            net.anti_entropy_round()
            net.collect_garbage()
        assert all(g.dataset.tombstones() == [] for g in net.stores.values())
        net.settle()
        assert net.converged() and not any(p.startswith("old/") for p in net.live("s2"))
