"""The coordinator announcement (``_lab/coordinator``): the signed record (store/policy.py), the
store's read and publish (store/announce.py), the coordinator's publishing and the agent's
following (coordinator/migrate/announce.py). No sockets: the store calls are replaced."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
import test_migrate
from test_store_node import _identity, _node, _peer, _req

from lab.common.errors import AuthError, RemoteProtocolError
from lab.common.identity import CertificateAuthority
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.migrate import announce, role
from lab.store.policy import COORDINATOR_PATH, CoordinatorAnnouncement, Enforcer, publish, sign_announcement

EP_A, EP_B = "127.0.0.1:7443", "10.0.0.7:7443"
home = test_migrate.home  # the coordinator home fixture: servers, CA, config


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


# -- the record ----------------------------------------------------------------------------------


def test_round_trip_and_signature(ca: CertificateAuthority) -> None:
    doc = sign_announcement(ca, EP_B, version=7, now=1)
    back = CoordinatorAnnouncement.decode_untrusted(doc.encode())
    assert back == doc and back.endpoint == EP_B and back.ca == ca.fingerprint
    back.verify(ca.public_key)
    with pytest.raises(AuthError):  # another cluster's CA
        back.verify(CertificateAuthority.generate().public_key)
    with pytest.raises(RemoteProtocolError):
        CoordinatorAnnouncement.decode_untrusted(doc.encode()[:-3])
    with pytest.raises(Exception):
        sign_announcement(ca, "not an endpoint", version=1, now=1)


def test_forgeries_are_refused(ca: CertificateAuthority) -> None:
    doc = sign_announcement(ca, EP_B, version=7, now=1)
    moved = dataclasses.replace(doc, endpoint="10.6.6.6:7443")  # the signature no longer covers the body
    with pytest.raises(AuthError):
        CoordinatorAnnouncement.decode_untrusted(moved.encode()).verify(ca.public_key)
    unsigned = dataclasses.replace(doc, signature=bytes(64))
    with pytest.raises(AuthError):
        CoordinatorAnnouncement.decode_untrusted(unsigned.encode()).verify(ca.public_key)
    # signed by this CA but naming another CA's fingerprint: refused too
    other = sign_announcement(CertificateAuthority.generate(), EP_B, version=7, now=1)
    wrong_ca = dataclasses.replace(doc, ca=other.ca)
    resigned = dataclasses.replace(wrong_ca, signature=ca._sign(b"lab.coordinator.v1\x00", wrong_ca.body_bytes()))
    with pytest.raises(AuthError):
        resigned.verify(ca.public_key)
    # a policy signature is not an announcement signature (domain separation)
    cross = dataclasses.replace(doc, signature=ca._sign(b"lab.policy.v1\x00", doc.body_bytes()))
    with pytest.raises(AuthError):
        cross.verify(ca.public_key)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.builds(lambda a, b: msgpack.packb([a, b]), st.binary(max_size=80), st.binary(max_size=80))))
def test_random_bytes_only_raise_the_protocol_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        CoordinatorAnnouncement.decode_untrusted(raw)


def test_enforcer_keeps_the_newest(ca: CertificateAuthority) -> None:
    e = Enforcer(ca.public_key)
    v5, v6 = sign_announcement(ca, EP_A, version=5, now=1), sign_announcement(ca, EP_B, version=6, now=2)
    assert e.load_announcement(v5) and e.load_announcement(v6)
    assert not e.load_announcement(v5) and not e.load_announcement(sign_announcement(ca, EP_A, version=6, now=3))
    assert e.announcement == v6
    with pytest.raises(AuthError):
        e.load_announcement(sign_announcement(CertificateAuthority.generate(), EP_A, version=99, now=1))
    assert e.announcement == v6


# -- the store -----------------------------------------------------------------------------------------


def test_store_publish_read_gossip_and_refusals(ca: CertificateAuthority, tmp_path: Path) -> None:
    a = _node(ca, tmp_path, "s1")
    b = _node(ca, tmp_path, "s2", a.dataset.export_key())
    admin = _peer(_identity(ca, "op", ["admin"]))
    agent_id = _identity(ca, "web-1", ["agent"])
    agent = _peer(agent_id)
    try:
        assert a.handle(agent, _req("store.coordinator", {})) == {"announcement": None}
        v1 = sign_announcement(ca, EP_A, version=1, now=time.time())
        v2 = sign_announcement(ca, EP_B, version=2, now=time.time())
        assert a.handle(admin, _req("store.publish", {"coordinator": v2.encode()}))["published"]
        out = a.handle(admin, _req("store.publish", {"coordinator": v1.encode()}))  # older: skipped
        assert out == {"path": COORDINATOR_PATH, "version": 2, "published": False}
        assert CoordinatorAnnouncement.decode_untrusted(a.handle(agent, _req("store.coordinator", {}))["announcement"]) == v2
        rogue = sign_announcement(CertificateAuthority.generate(), "10.6.6.6:1", version=9, now=time.time())
        with pytest.raises(AuthError):
            a.handle(admin, _req("store.publish", {"coordinator": rogue.encode()}))
        with pytest.raises(AuthError):  # only writers publish
            a.handle(agent, _req("store.publish", {"coordinator": v2.encode()}))
        with pytest.raises(AuthError):
            a.handle(admin, _req("store.publish", {"coordinator": "text"}))
        # gossip carries it to another store; a forged record is refused at merge
        b.dataset.merge([r for r in a.dataset.records() if r.path == COORDINATOR_PATH])
        assert b.enforcer.announcement == v2
        with pytest.raises(AuthError):
            publish(b.dataset, rogue, int(time.time() * 1000))
        assert b.enforcer.announcement == v2
        # a certificate revoked since: no answer
        a.enforcer.load_revocations(ca.revoke(None, [agent_id.certificate], time.time()))
        with pytest.raises(AuthError):
            a.handle(agent, _req("store.coordinator", {}))
    finally:
        a.dataset.close()
        b.dataset.close()


def test_verified_logs_and_drops_what_does_not_verify(ca: CertificateAuthority, caplog: pytest.LogCaptureFixture) -> None:
    doc = sign_announcement(ca, EP_B, version=3, now=1)
    assert announce.verified(doc.encode(), ca.public_key, "s1") == doc
    assert announce.verified(None, ca.public_key, "s1") is None
    with caplog.at_level(logging.WARNING, "lab.migrate"):
        assert announce.verified(b"junk", ca.public_key, "s1") is None
        assert announce.verified(doc.encode(), CertificateAuthority.generate().public_key, "s2") is None
        assert announce.verified(dataclasses.replace(doc, signature=bytes(64)).encode(), ca.public_key, "s3") is None
    refused = [r.getMessage() for r in caplog.records if "announcement.refused" in r.getMessage()]
    assert len(refused) == 3 and "store=s2" in refused[1], refused


# -- the coordinator publishing -------------------------------------------------------------------------


class _Published:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, held: Any) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.held = held

        async def newest(stores: Any, identity: Any) -> Any:
            return self.held

        async def publish_everywhere(stores: Any, identity: Any, bodies: Any) -> dict[str, str]:
            self.bodies += bodies
            return {s: "ok" for s in stores}

        monkeypatch.setattr(announce, "newest_announcement", newest)
        monkeypatch.setattr("lab.coordinator.identity_ops.publish_everywhere", publish_everywhere)


def _announcer(home: Path, ca: CertificateAuthority, now: float) -> tuple[announce.Announcer, Engine]:
    engine = Engine.open(Paths(home, home / "definitions", "default"))
    return announce.Announcer(engine, ca, None, lambda: ["127.0.0.1:7444"], clock=lambda: now), engine


def test_the_version_grows_past_a_held_one_whatever_the_clock(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.load(home / "ca.key")
    far = sign_announcement(ca, EP_A, version=4_000_000_000_000, now=1)  # signed on a host whose clock ran ahead
    pub = _Published(monkeypatch, far)
    ann, engine = _announcer(home, ca, 1_800_000_000.0)
    try:
        assert trio.run(ann.publish, EP_B)
        doc = CoordinatorAnnouncement.decode_untrusted(pub.bodies[0]["coordinator"])
        doc.verify(ca.public_key)
        assert doc.endpoint == EP_B and doc.version == far.version + 1
        pub.held, pub.bodies = doc, []
        assert trio.run(ann.publish, EP_B) and pub.bodies == []  # already announced: nothing written
        pub.held = None
        trio.run(ann.publish, EP_A)
        assert CoordinatorAnnouncement.decode_untrusted(pub.bodies[0]["coordinator"]).version == 1_800_000_000_000
    finally:
        engine.close()
        ca.close()


def test_a_migrated_coordinator_announces_itself_only_once_adopted(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.load(home / "ca.key")
    pub = _Published(monkeypatch, None)
    (home / "migrated.json").write_text('{"node": "node-a"}')
    ann, engine = _announcer(home, ca, 1_800_000_000.0)
    try:
        trio.run(ann.at_start, EP_B)
        assert pub.bodies == []  # an abort may still drop it: not announced before the switch
        engine.state.set_labels("node-a", ["app", "lab-server"])
        trio.run(ann.at_start, EP_B)
        assert len(pub.bodies) == 1
    finally:
        engine.close()
        ca.close()


def test_the_start_announcement_is_retried_until_a_store_holds_it(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    ca = CertificateAuthority.load(home / "ca.key")
    pub = _Published(monkeypatch, None)
    outcomes = iter(["unreachable: connection refused", "ok"])

    async def publish_everywhere(stores: Any, identity: Any, bodies: Any) -> dict[str, str]:
        pub.bodies += bodies
        return {s: next(outcomes) for s in stores}

    monkeypatch.setattr("lab.coordinator.identity_ops.publish_everywhere", publish_everywhere)
    ann, engine = _announcer(home, ca, 1_800_000_000.0)
    try:
        with caplog.at_level(logging.INFO, "lab.migrate"):
            trio.run(ann.at_start, EP_A, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        engine.close()
        ca.close()
    assert len(pub.bodies) == 2
    lines = [r.getMessage() for r in caplog.records]
    assert any("announcement.not_published" in m and "connection refused" in m for m in lines), lines
    assert any("announcement.published" in m for m in lines), lines


# -- the agent following ---------------------------------------------------------------------------------


@pytest.fixture
def agent_home(tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp_path / "enrollment.yaml").write_text(yaml.safe_dump(
        {"node": "web-1", "coordinator": EP_A, "stores": ["127.0.0.1:7444"]}, sort_keys=False))
    seen: dict[str, Any] = {"home": tmp_path, "held": None, "checkins": [], "answers": True}

    async def newest(stores: Any, identity: Any) -> Any:
        return seen["held"]

    async def checkin_once(home: Path, coordinator: str) -> None:
        seen["checkins"].append(coordinator)
        if not seen["answers"]:
            raise OSError("connection refused")

    monkeypatch.setattr(announce, "newest_announcement", newest)
    monkeypatch.setattr("lab.agent.sync.checkin_once", checkin_once)
    monkeypatch.setattr("lab.store.node.load_home_identity", lambda home: None)
    return seen


def _enrollment(home: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((home / "enrollment.yaml").read_text())
    return doc


def test_agent_follows_a_newer_announcement_after_checking_in_there(agent_home: dict[str, Any], ca: CertificateAuthority) -> None:
    h = agent_home["home"]
    agent_home["held"] = sign_announcement(ca, EP_B, version=9, now=1)
    assert trio.run(announce.follow_announcement, h, EP_A) == EP_B
    assert agent_home["checkins"] == [EP_B]
    assert _enrollment(h) == {"node": "web-1", "coordinator": EP_B, "stores": ["127.0.0.1:7444"], "coordinator_version": 9}
    assert sorted(p.name for p in h.iterdir()) == ["enrollment.yaml"]  # atomic: no temp file left
    # the same one again, or an older one pointing elsewhere: ignored
    assert trio.run(announce.follow_announcement, h, EP_B) is None
    agent_home["held"] = sign_announcement(ca, EP_A, version=8, now=1)
    assert trio.run(announce.follow_announcement, h, EP_B) is None
    assert agent_home["checkins"] == [EP_B] and _enrollment(h)["coordinator"] == EP_B


def test_agent_stays_when_the_announced_coordinator_does_not_answer(agent_home: dict[str, Any], ca: CertificateAuthority) -> None:
    h = agent_home["home"]
    agent_home["held"], agent_home["answers"] = sign_announcement(ca, EP_B, version=9, now=1), False
    assert trio.run(announce.follow_announcement, h, EP_A) is None
    assert _enrollment(h)["coordinator"] == EP_A and "coordinator_version" not in _enrollment(h)


def test_agent_without_an_announcement_stays(agent_home: dict[str, Any]) -> None:
    assert trio.run(announce.follow_announcement, agent_home["home"], EP_A) is None
    assert agent_home["checkins"] == []


def test_the_redirect_uses_the_same_switch(agent_home: dict[str, Any]) -> None:
    h = agent_home["home"]
    assert trio.run(lambda: role.on_checkin_reply(object(), h, EP_A, {"moved_to": EP_B})) == EP_B
    assert _enrollment(h)["coordinator"] == EP_B and agent_home["checkins"] == [EP_B]
