"""Store-side enforcement: signed policy and revocations, NotEntitled that reveals nothing, sync."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest

from lab.common.errors import AuthError, NotEntitled, NotFound, RemoteProtocolError
from lab.common.identity import CertificateAuthority, NodeKey
from lab.store.dataset import Dataset
from lab.store.hlc import Version
from lab.store.policy import POLICY_PATH, REVOCATIONS_PATH, Enforcer, PolicyDocument, publish, sign_policy
from lab.store.records import Meta, decode_message_untrusted, seal_value
from lab.store.serve import StoreService, SyncRequest, SyncUpdate, VersionRef

NOW = 1_700_000_000
META = Meta.simple("admin", NOW * 1000)


class World:
    def __init__(self, tmp_path) -> None:
        self.ca = CertificateAuthority.generate()
        self.ds = Dataset.create(tmp_path / "store", "store-1", durable=False)
        self.enf = Enforcer(self.ca.public_key)
        self.ds.system_checker = self.enf.system_checker
        self.svc = StoreService(self.ds, self.enf)
        self.certs = {}
        for name, roles in (("mail-1", ()), ("web-1", ()), ("admin", ("admin",)), ("store-1", ("store",))):
            self.certs[name] = self.ca.issue(name, name, NodeKey.generate().public_key, roles, 86400, NOW - 10)
        self.version = 0
        self.ms = NOW * 1000

    def tick(self) -> int:
        self.ms += 1
        return self.ms

    def grant(self, grants, per_machine=()) -> None:
        self.version += 1
        publish(self.ds, sign_policy(self.ca, grants, ["store-1"], per_machine, version=self.version, now=NOW), self.tick())

    def put(self, path, value):
        return self.ds.write(path, value, META, self.tick())


@pytest.fixture
def w(tmp_path):
    world = World(tmp_path)
    world.put("mail/dkim-key", b"dkim")
    world.put("mail/tls-cert", b"tls")
    world.put("web/token", b"tok")
    world.put("tls/node-cert@mail-1", b"mail-1's own")
    world.put("tls/node-cert@web-1", b"web-1's own")
    world.grant({"mail-1": ["mail/dkim-key", "mail/tls-cert", "tls/node-cert", "mail/unset"], "web-1": ["web/token", "tls/node-cert"]},
                per_machine=["tls/node-cert"])
    yield world
    world.ds.close()


def test_fetch_serves_exactly_the_entitlement(w) -> None:
    mail = w.certs["mail-1"]
    assert w.svc.fetch(mail, "mail/dkim-key", NOW).value == b"dkim"
    assert w.svc.fetch(mail, "tls/node-cert", NOW).value == b"mail-1's own"  # per-machine
    assert w.svc.fetch(w.certs["web-1"], "tls/node-cert", NOW).value == b"web-1's own"
    with pytest.raises(NotEntitled):
        w.svc.fetch(mail, "web/token", NOW)
    with pytest.raises(NotFound):  # entitled but never set: may say so, it is theirs
        w.svc.fetch(mail, "mail/unset", NOW)


@pytest.mark.parametrize("path", ["web/token", "tls/node-cert@web-1", "tls/node-cert@mail-1", "_lab/policy", "no/such-path"])
def test_refusal_is_identical_whether_or_not_the_path_exists(w, path) -> None:
    """Same error type and message shape, and the dataset is never consulted (timing shape)."""
    with mock.patch.object(w.ds, "get", side_effect=AssertionError("dataset consulted")) as get:
        with pytest.raises(NotEntitled) as info:
            w.svc.fetch(w.certs["mail-1"], path, NOW)
    assert get.call_count == 0
    assert str(info.value) == f"not entitled to {path!r}"


def test_forged_certificates_and_names_are_refused(w) -> None:
    other_ca = CertificateAuthority.generate()
    forged = other_ca.issue("mail-1", "mail-1", NodeKey.generate().public_key, (), 86400, NOW)
    with pytest.raises(AuthError, match="not signed"):
        w.svc.fetch(forged, "mail/dkim-key", NOW)
    expired = w.ca.issue("mail-1", "mail-1", NodeKey.generate().public_key, (), 10, NOW - 10_000)
    with pytest.raises(AuthError, match="expired"):
        w.svc.fetch(expired, "mail/dkim-key", NOW)
    tampered = dataclasses.replace(w.certs["web-1"], name="mail-1")  # keeps web-1's signature
    with pytest.raises(AuthError):
        w.svc.fetch(tampered, "mail/dkim-key", NOW)


def test_revocation_by_serial_or_key_is_refused_everywhere(w) -> None:
    mail = w.certs["mail-1"]
    crl = w.ca.revocation_list(1, NOW, serials=[mail.serial])
    publish(w.ds, crl, w.tick())
    with pytest.raises(AuthError, match="revoked"):
        w.svc.fetch(mail, "mail/dkim-key", NOW)
    assert w.enf.entitlement(mail) == {}
    # by key: a re-issued certificate for the same key is refused too
    web = w.certs["web-1"]
    publish(w.ds, w.ca.revocation_list(2, NOW, serials=[mail.serial], keys=[web.noise_pub]), w.tick())
    again = w.ca.issue("web-1", "web-1", web.noise_pub, (), 86400, NOW)
    with pytest.raises(AuthError, match="revoked"):
        w.svc.fetch(again, "web/token", NOW)


def test_revocations_and_policy_replicate_to_a_store_that_never_saw_the_coordinator(w, tmp_path) -> None:
    """Another store merges the gossiped system records and refuses the revoked node itself."""
    publish(w.ds, w.ca.revocation_list(1, NOW, serials=[w.certs["mail-1"].serial]), w.tick())
    other = Dataset.with_key(tmp_path / "other", "store-2", w.ds.export_key(), durable=False)
    enf = Enforcer(w.ca.public_key)
    other.system_checker = enf.system_checker
    assert other.merge(w.ds.records(include_deleted=True), now_ms=w.ms)
    svc = StoreService(other, enf)
    with pytest.raises(AuthError, match="revoked"):
        svc.fetch(w.certs["mail-1"], "mail/dkim-key", NOW)
    assert svc.fetch(w.certs["web-1"], "web/token", NOW).value == b"tok"
    other.close()


def test_unsigned_or_forged_system_records_are_not_merged(w, tmp_path) -> None:
    evil_ca = CertificateAuthority.generate()
    doc = sign_policy(evil_ca, {"web-1": ["mail/dkim-key"]}, ["store-1"], [], version=99, now=NOW)
    with w.ds.export_key() as k:
        rec = seal_value(k.bytes(), POLICY_PATH, Version(w.ms + 100, 0, "evil"), META, doc.encode())
    assert w.ds.merge([rec]) == [] and "not signed" in w.ds.rejected[0][1]
    with pytest.raises(NotEntitled):
        w.svc.fetch(w.certs["web-1"], "mail/dkim-key", NOW)
    with w.ds.export_key() as k:
        junk = seal_value(k.bytes(), REVOCATIONS_PATH, Version(w.ms + 100, 0, "evil"), META, b"\x92junk")
    assert w.ds.merge([junk]) == []
    with pytest.raises(AuthError):  # local writes are checked the same way
        publish(w.ds, doc, w.tick())


def test_older_policy_does_not_replace_newer(w) -> None:
    old = sign_policy(w.ca, {"web-1": ["mail/dkim-key"]}, ["store-1"], [], version=1, now=NOW)
    assert not w.enf.load_policy(old)
    with pytest.raises(NotEntitled):
        w.enf.check(w.certs["web-1"], "mail/dkim-key")


def test_policy_document_rejects_non_canonical_or_system_grants(w) -> None:
    doc = sign_policy(w.ca, {"a": ["x"]}, [], [], version=1, now=NOW)
    with pytest.raises(Exception):
        dataclasses.replace(doc, grants={"a": ("_lab/policy",)})
    with pytest.raises(RemoteProtocolError):
        PolicyDocument.decode_untrusted(b"\x92\xc4\x01a\xc4\x01b")


# -- the sync exchange -----------------------------------------------------------------------------


def _held(update: SyncUpdate) -> dict[str, bytes]:
    return {r.path: r.value for r in update.records}


def test_sync_sends_what_is_newer_and_removals(w) -> None:
    mail = w.certs["mail-1"]
    sub, first = w.svc.subscribe(mail, SyncRequest({}), NOW)
    assert _held(first) == {"mail/dkim-key": b"dkim", "mail/tls-cert": b"tls", "tls/node-cert": b"mail-1's own"}
    assert first.removed == () and not first.final
    # reconnect holding the current dkim version and a stale path: only the rest comes, stale goes
    have = {r.path: r.version for r in first.records if r.path == "mail/dkim-key"}
    have["web/token"] = VersionRef(1, 0, "x")
    _, second = w.svc.subscribe(mail, SyncRequest(have), NOW)
    assert set(_held(second)) == {"mail/tls-cert", "tls/node-cert"} and second.removed == ("web/token",)
    assert sub.poll() is None


def test_subscription_pushes_changes_deletes_and_policy_removals(w) -> None:
    mail = w.certs["mail-1"]
    sub, _ = w.svc.subscribe(mail, SyncRequest({}), NOW)
    w.put("mail/dkim-key", b"dkim v2")
    w.put("web/token", b"not for mail")
    up = sub.poll()
    assert up is not None and _held(up) == {"mail/dkim-key": b"dkim v2"} and up.removed == ()
    w.ds.delete("mail/tls-cert", w.tick())
    up = sub.poll()
    assert up is not None and up.records == () and up.removed == ("mail/tls-cert",)
    assert sub.poll() is None
    # label removed: the policy no longer grants mail/dkim-key → removed within one poll
    w.grant({"mail-1": ["tls/node-cert"], "web-1": ["web/token"]}, per_machine=["tls/node-cert"])
    up = sub.poll()
    assert up is not None and up.removed == ("mail/dkim-key",) and up.records == ()
    # newly granted path with a value → sent
    w.grant({"mail-1": ["tls/node-cert", "web/token"]}, per_machine=["tls/node-cert"])
    up = sub.poll()
    assert up is not None and _held(up) == {"web/token": b"not for mail"}


def test_revoked_subscriber_drops_everything_and_the_session_ends(w) -> None:
    mail = w.certs["mail-1"]
    sub, first = w.svc.subscribe(mail, SyncRequest({}), NOW)
    publish(w.ds, w.ca.revocation_list(1, NOW, serials=[mail.serial]), w.tick())
    up = sub.poll()
    assert up is not None and up.final and set(up.removed) == set(_held(first)) and up.records == ()
    assert sub.closed and sub.poll() is None
    with pytest.raises(AuthError):
        w.svc.subscribe(mail, SyncRequest({}), NOW)


def test_writes_need_the_admin_or_coordinator_role(w) -> None:
    with pytest.raises(AuthError, match="may not write"):
        w.svc.write(w.certs["mail-1"], "mail/dkim-key", b"x", META, NOW)
    rec = w.svc.write(w.certs["admin"], "mail/dkim-key", b"new", META, NOW)
    assert w.ds.value("mail/dkim-key") == b"new" and rec.version.origin == "store-1"
    w.svc.write(w.certs["admin"], "tls/node-cert", b"per", META, NOW, node="mail-1")
    assert w.ds.value("tls/node-cert@mail-1") == b"per"
    with pytest.raises(AuthError):
        w.svc.write(w.certs["admin"], "_lab/policy", b"x", META, NOW)


def test_sync_messages_round_trip(w) -> None:
    from lab.common import wire

    _, first = w.svc.subscribe(w.certs["mail-1"], SyncRequest({}), NOW)
    assert decode_message_untrusted(wire.encode(first)) == first
    req = SyncRequest({r.path: r.version for r in first.records})
    assert decode_message_untrusted(wire.encode(req)) == req


def test_large_updates_are_split_and_handed_out_in_order(w, monkeypatch) -> None:
    import lab.store.serve as serve

    monkeypatch.setattr(serve, "MAX_UPDATE_BYTES", 600)
    names = [f"mail/bulk-{i}" for i in range(5)]
    for n in names:
        w.put(n, b"x" * 200)
    w.grant({"mail-1": names + ["mail/dkim-key"]})
    sub, first = w.svc.subscribe(w.certs["mail-1"], SyncRequest({"mail/tls-cert": VersionRef(1, 0, "x")}), NOW)
    parts = [first]
    while (up := sub.poll()) is not None:
        parts.append(up)
    assert len(parts) > 2 and all(p.removed == () for p in parts[:-1]) and parts[-1].removed == ("mail/tls-cert",)
    assert sorted(r.path for p in parts for r in p.records) == sorted(names + ["mail/dkim-key"])


def test_a_store_without_policy_or_value_never_tells_an_agent_to_drop_its_copy(tmp_path) -> None:
    """Stale beats absent: a new, wiped or recovering store knows less than the agent does."""
    world = World(tmp_path)
    mail = world.certs["mail-1"]
    have = {"mail/dkim-key": VersionRef(1, 0, "x"), "mail/tls-cert": VersionRef(1, 0, "x")}
    sub, first = world.svc.subscribe(mail, SyncRequest(have), NOW)
    assert first.records == () and first.removed == ()  # no policy yet: nothing sent, nothing dropped
    # the policy arrives before the values do: still nothing to drop (entitled, value not here yet)
    world.grant({"mail-1": ["mail/dkim-key", "mail/tls-cert"]})
    assert sub.poll() is None
    _, again = world.svc.subscribe(mail, SyncRequest(have), NOW)
    assert again.removed == ()
    # the value arrives: sent; then a real delete and a lost grant still remove
    world.put("mail/dkim-key", b"dkim")
    up = sub.poll()
    assert up is not None and _held(up) == {"mail/dkim-key": b"dkim"} and up.removed == ()
    world.put("mail/tls-cert", b"tls")
    assert sub.poll() is not None
    world.ds.delete("mail/tls-cert", world.tick())
    up = sub.poll()
    assert up is not None and up.removed == ("mail/tls-cert",)
    world.grant({"mail-1": []})
    up = sub.poll()
    assert up is not None and up.removed == ("mail/dkim-key",)
    world.ds.close()
