"""store/node.py without sockets: the backoff schedule, jitter, the handler's authorisation, and
two store nodes reconciling over an in-memory RPC link."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from lab.common import rpc, wire
from lab.common.errors import AuthError, NotEntitled, RemoteProtocolError, UsageError
from lab.common.identity import CertificateAuthority, NodeKey
from lab.store.dataset import Dataset
from lab.store.gossip import AERoot
from lab.store.node import Backoff, NodeConfig, PeerLink, StoreNode, jittered
from lab.store.policy import sign_policy
from lab.store.records import Meta
from lab.store.serve import SyncRequest


class FixedRandom(random.Random):
    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def test_backoff_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    b = Backoff(base=0.5, cap=4.0, rng=FixedRandom([1.0] * 6))
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.failures == 0 and b.ceiling() == 0.5


def test_backoff_never_goes_below_half_the_base() -> None:
    b = Backoff(base=0.4, cap=10.0, rng=FixedRandom([0.0, 0.5, 0.25]))
    assert [b.next_delay() for _ in range(3)] == [0.2, 0.4, 0.4]


def test_backoff_delays_stay_within_bounds() -> None:
    b = Backoff(base=0.1, cap=3.0, rng=random.Random(7))
    for n in range(40):
        d = b.next_delay()
        assert 0.05 <= d <= min(3.0, 0.1 * 2**n)


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0, cap=1)
    with pytest.raises(ValueError):
        Backoff(base=2, cap=1)


def test_jitter_spreads_around_the_interval() -> None:
    assert jittered(10, FixedRandom([0.0])) == 5.0
    assert jittered(10, FixedRandom([1.0])) == 15.0
    assert jittered(10, FixedRandom([0.5])) == 10.0
    rng = random.Random(1)
    assert all(2.5 <= jittered(5, rng) <= 7.5 for _ in range(200))


# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def _identity(ca: CertificateAuthority, name: str, roles: list[str]) -> rpc.Identity:
    key = NodeKey.generate()
    return rpc.Identity(key, ca.issue(name, f"{name}-id", key.public_key, roles, 3600, time.time()), ca.public_key)


def _node(ca: CertificateAuthority, tmp: Path, name: str, key: object = None) -> StoreNode:
    ident = _identity(ca, name, ["store"])
    if key is None:
        ds = Dataset.create(tmp / name, name, durable=False)
    else:
        ds = Dataset.with_key(tmp / name, name, key, durable=False)  # type: ignore[arg-type]
    return StoreNode(ds, ident.key, ident.certificate, ca.public_key, [], NodeConfig(ae_interval=1), rng=random.Random(3))


def _peer(ident: rpc.Identity) -> rpc.PeerInfo:
    return rpc.PeerInfo(ident.certificate, b"\0" * 64, "test")


def _req(method: str, body: dict) -> wire.Request:
    return wire.Request(id=1, method=method, body=body)


def test_handler_authorises_by_role(ca: CertificateAuthority, tmp_path: Path) -> None:
    node = _node(ca, tmp_path, "s1")
    try:
        agent = _peer(_identity(ca, "web-1", ["agent"]))
        admin = _peer(_identity(ca, "op", ["admin"]))
        root = wire.encode(AERoot(b"\0" * 16, 0))
        with pytest.raises(AuthError):
            node.handle(agent, _req("store.gossip", {"msg": root}))
        with pytest.raises(AuthError):
            node.handle(agent, _req("store.set", {"path": "a/b", "value": b"x"}))
        with pytest.raises(AuthError):
            node.handle(agent, _req("store.status", {}))
        with pytest.raises(UsageError):
            node.handle(admin, _req("store.nope", {}))
        with pytest.raises(UsageError):
            node.handle(admin, _req("store.set", {"path": "a/b", "value": "not bytes"}))
        with pytest.raises(RemoteProtocolError):
            node.handle(_peer(_identity(ca, "s2", ["store"])), _req("store.gossip", {"msg": b"\x93garbage"}))
        assert node.handle(admin, _req("store.set", {"path": "a/b", "value": b"x"}))["path"] == "a/b"
        assert node.dataset.value("a/b") == b"x"
        # before any policy an agent is entitled to nothing, whether or not the path exists
        with pytest.raises(NotEntitled):
            node.handle(agent, _req("store.fetch", {"path": "a/b"}))
    finally:
        node.dataset.close()


def test_publish_refuses_an_older_policy(ca: CertificateAuthority, tmp_path: Path) -> None:
    node = _node(ca, tmp_path, "s1")
    admin = _peer(_identity(ca, "op", ["admin"]))
    try:
        v2 = sign_policy(ca, {"web-1": ["a/b"]}, ["s1"], [], version=2, now=time.time())
        v1 = sign_policy(ca, {"web-1": []}, ["s1"], [], version=1, now=time.time())
        node.handle(admin, _req("store.publish", {"policy": v2.encode()}))
        assert node.enforcer.policy is not None and node.enforcer.policy.version == 2
        with pytest.raises(Exception, match="not newer"):
            node.handle(admin, _req("store.publish", {"policy": v1.encode()}))
        rogue = sign_policy(CertificateAuthority.generate(), {"web-1": ["x/y"]}, ["s1"], [], version=9, now=time.time())
        with pytest.raises(AuthError):
            node.handle(admin, _req("store.publish", {"policy": rogue.encode()}))
    finally:
        node.dataset.close()


def test_two_nodes_reconcile_over_an_in_memory_rpc_link(ca: CertificateAuthority, tmp_path: Path) -> None:
    a = _node(ca, tmp_path, "s1")
    b = _node(ca, tmp_path, "s2", a.dataset.export_key())
    now = int(time.time() * 1000)
    for i in range(30):
        a.dataset.write(f"a/k{i}", b"va%d" % i, Meta.simple("t", now), now)
    for i in range(5):
        b.dataset.write(f"b/k{i}", b"vb%d" % i, Meta.simple("t", now), now)
    link = PeerLink("memory")

    async def main() -> None:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server = rpc.Server(b.identity, b.handle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_stream)
            async with rpc.open_connection(client_stream, identity=a.identity) as conn:
                link.conn, link.name = conn, conn.peer.name
                a._meet(conn.peer.certificate)
                await a.exchange(link)
                assert a.dataset.root() == b.dataset.root()
                # an agent session through the same handler: initial update, then a push
                agent = _identity(ca, "web-1", ["agent"])
                policy = sign_policy(ca, {"web-1": ["a/k1"]}, ["s1", "s2"], [], version=1, now=time.time())
                b.handle(_peer(_identity(ca, "op", ["admin"])), _req("store.publish", {"policy": policy.encode()}))
            nursery.cancel_scope.cancel()
        stream = b.handle(_peer(agent), _req("store.sync", {"msg": wire.encode(SyncRequest({}))}))
        first = await stream.__anext__()
        from lab.store.records import decode_message_untrusted

        update = decode_message_untrusted(first["msg"])
        assert [r.path for r in update.records] == ["a/k1"] and update.records[0].value == b"va1"
        await stream.aclose()

    trio.run(main)
    try:
        assert len(a.dataset) == 35 and len(b.dataset) == 36  # b also holds the policy published after
        assert b.dataset.value("a/k29") == b"va29" and a.dataset.value("b/k4") == b"vb4"
    finally:
        a.dataset.close()
        b.dataset.close()
