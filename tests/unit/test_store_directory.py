"""The CA-signed store directory (``_lab/stores``: store name → reported endpoint) and how a
store adopts peer links from it, without sockets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_store_node import _identity, _node, _peer, _req

from lab.common.errors import AuthError, RemoteProtocolError
from lab.common.identity import CertificateAuthority
from lab.store.policy import STORES_PATH, Enforcer, StoreDirectory, publish, sign_directory, sign_policy

EPS = {"s1": "127.0.0.1:7001", "s2": "127.0.0.1:7002", "s3": "[::1]:7003", "intruder": "10.0.0.9:7444"}


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def test_directory_round_trip_signature_and_membership(ca: CertificateAuthority) -> None:
    d = sign_directory(ca, EPS, version=5, now=1)
    back = StoreDirectory.decode_untrusted(d.encode())
    assert back == d and list(back.endpoints) == sorted(EPS)
    back.verify(ca.public_key)
    with pytest.raises(AuthError):
        back.verify(CertificateAuthority.generate().public_key)
    with pytest.raises(RemoteProtocolError):
        StoreDirectory.decode_untrusted(d.encode()[:-3])
    with pytest.raises(Exception):
        sign_directory(ca, {"s1": "not an endpoint"}, version=1, now=1)
    e = Enforcer(ca.public_key)
    assert e.load_directory(d) and not e.load_directory(sign_directory(ca, {}, version=5, now=1))
    assert e.endpoints == {}  # no policy: no members, no endpoints
    e.load_policy(sign_policy(ca, {}, ["s1", "s2", "s3"], [], version=1, now=1))
    assert e.endpoints == {k: v for k, v in EPS.items() if k != "intruder"}  # only the policy's stores


def test_a_published_or_gossiped_directory_adds_links_to_new_stores(ca: CertificateAuthority, tmp_path: Path) -> None:
    a = _node(ca, tmp_path, "s1")
    b = _node(ca, tmp_path, "s2", a.dataset.export_key())
    admin = _peer(_identity(ca, "op", ["admin"]))
    try:
        policy = sign_policy(ca, {}, ["s1", "s2", "s3"], [], version=1, now=time.time())
        d1 = sign_directory(ca, {k: v for k, v in EPS.items() if k != "s3"}, version=1, now=time.time())
        out = a.handle(admin, _req("store.publish", {"policy": policy.encode(), "stores": d1.encode()}))
        assert out["version"] == 1 and a.enforcer.directory == d1
        assert [ln.endpoint for ln in a.links] == [EPS["s2"]]  # not itself, not a non-member
        d2 = sign_directory(ca, EPS, version=2, now=time.time())  # s3 added later
        assert a.handle(admin, _req("store.publish", {"stores": d2.encode()}))["path"] == STORES_PATH
        assert [ln.endpoint for ln in a.links] == [EPS["s2"], EPS["s3"]]
        a.handle(admin, _req("store.publish", {"stores": d1.encode()}))  # older: skipped, nothing removed or added
        assert a.enforcer.directory == d2 and len(a.links) == 2
        rogue = sign_directory(CertificateAuthority.generate(), {"s3": "10.6.6.6:1"}, version=9, now=time.time())
        with pytest.raises(AuthError):
            a.handle(admin, _req("store.publish", {"stores": rogue.encode()}))
        with pytest.raises(AuthError):  # only writers publish
            a.handle(_peer(_identity(ca, "s3", ["store"])), _req("store.publish", {"stores": d2.encode()}))
        # the same records reaching another store by gossip: it adopts the links too
        b.dataset.merge([r for r in a.dataset.records() if r.is_system])
        assert b.enforcer.directory == d2 and sorted(ln.endpoint for ln in b.links) == [EPS["s1"], EPS["s3"]]
        # a forged directory record is refused at merge
        with pytest.raises(AuthError):
            publish(b.dataset, rogue, int(time.time() * 1000))
    finally:
        a.dataset.close()
        b.dataset.close()
