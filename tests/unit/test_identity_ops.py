"""coordinator/identity_ops.py and `lab identity`: revocation-list bookkeeping, the inventory
marker, renewals handed over and confirmed at check-in, and the CLI's decisions. No sockets."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import trio

from lab.common.errors import AuthError, StateError, UsageError
from lab.common.identity import CertificateAuthority, NodeKey, RevocationList, fingerprint
from lab.coordinator import identity_ops as ops
from lab.coordinator.cli import identity_cmd
from lab.coordinator.engine import Engine, Paths

CA = CertificateAuthority.generate()
KEY = NodeKey.generate()
NOW = 1_800_000_000.0


def cert(name: str = "db-1", key: NodeKey = KEY, now: float = NOW) -> Any:
    return CA.issue(name, f"n-{key.fingerprint[:24]}", key.public_key, ["agent"], 86400, now)


# -- pure bookkeeping ------------------------------------------------------------------------------


def test_next_version_is_above_the_current_and_the_clock() -> None:
    assert ops.next_version(None, NOW) == int(NOW * 1000)
    low = CA.revocation_list(5, NOW)
    assert ops.next_version(low, NOW) == int(NOW * 1000)
    high = CA.revocation_list(int(NOW * 1000) + 50, NOW)
    assert ops.next_version(high, NOW) == high.version + 1


def test_revocation_with_keeps_old_entries_adds_new_ones_and_is_signed() -> None:
    a, b = cert("a", NodeKey.generate()), cert("b")
    first = ops.revocation_with(CA, None, NOW, [a.serial], [a.noise_pub])
    second = ops.revocation_with(CA, first, NOW, [b.serial])  # serial only (a renewal)
    second.verify(CA.public_key)
    assert second.replaces(first) and second.version > first.version
    assert set(second.serials) == {a.serial, b.serial} and second.keys == (a.noise_pub,)
    assert second.revoked_reason(a) is not None and second.revoked_reason(b) is not None
    other = cert("b", now=NOW + 1)  # same key as b, new serial: not revoked by a serial-only entry
    assert second.revoked_reason(other) is None
    assert RevocationList.decode_untrusted(second.encode()) == second


def test_serials_to_revoke_and_markers() -> None:
    c = cert()
    serials, keys = ops.serials_to_revoke("123", [c])
    assert serials == {123, c.serial} and keys == {c.noise_pub}
    assert ops.serials_to_revoke(None, []) == (set(), set())
    assert ops.serials_to_revoke("revoked:9", []) == (set(), set())
    assert ops.revoked_marker(42) == "revoked:42" and ops.is_revoked_marker("revoked:42")
    assert not ops.is_revoked_marker("42") and not ops.is_revoked_marker(None)


@pytest.mark.parametrize(("yes", "tty", "want"), [(True, False, "go"), (True, True, "go"), (False, True, "ask"), (False, False, "refuse")])
def test_confirm_decision(yes: bool, tty: bool, want: str) -> None:
    assert ops.confirm_decision(yes, tty) == want


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_confirm_refuses_without_terminal_and_honours_the_answer() -> None:
    with pytest.raises(UsageError, match="--yes"):
        identity_cmd.confirm("db-1", False, stdin=io.StringIO())
    identity_cmd.confirm("db-1", True, stdin=io.StringIO())  # --yes: no question
    asked: list[str] = []
    identity_cmd.confirm("db-1", False, stdin=_Tty(), ask=lambda q: asked.append(q) or True)
    assert "db-1" in asked[0]
    with pytest.raises(UsageError, match="not revoked"):
        identity_cmd.confirm("db-1", False, stdin=_Tty(), ask=lambda q: False)


# -- files ----------------------------------------------------------------------------------------


def test_node_certs_and_pending_renewals_on_file(tmp_path: Path) -> None:
    c, n = cert(), cert(now=NOW + 10)
    assert ops.load_node_cert(tmp_path, "db-1") is None
    ops.save_node_cert(tmp_path, c)
    ops.save_node_cert(tmp_path, n, pending=True)
    assert ops.load_node_cert(tmp_path, "db-1") == c and ops.load_node_cert(tmp_path, "db-1", pending=True) == n
    ops.keep_issued(tmp_path, cert(now=NOW + 20))  # re-enrollment: a stale renewal goes
    assert ops.load_node_cert(tmp_path, "db-1", pending=True) is None
    with pytest.raises(UsageError):
        ops.load_node_cert(tmp_path, "../etc")


def test_revocation_book_follows_the_file_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    book = ops.RevocationBook(tmp_path, CA.public_key)
    assert book.current() is None
    one = ops.revocation_with(CA, None, NOW, [7])
    book.replace(one)
    assert book.current() == one and ops.load_crl(tmp_path, CA.public_key) == one
    two = ops.revocation_with(CA, one, NOW, [8])
    ops.save_crl(tmp_path, two)  # written by another process
    assert book.current() == two
    (tmp_path / ops.CRL_FILE).write_bytes(b"garbage")
    assert book.current() == two  # unusable file: the last good list stays
    forged = CertificateAuthority.generate().revocation_list(two.version + 1, NOW, [9])
    (tmp_path / ops.CRL_FILE).write_bytes(forged.encode())
    assert book.current() == two


def test_daemon_endpoint(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="not running.*nothing was changed"):
        ops.daemon_endpoint(tmp_path)
    (tmp_path / ops.ENDPOINT_FILE).write_text("127.0.0.1:7443\n")
    assert ops.daemon_endpoint(tmp_path) == "127.0.0.1:7443"
    (tmp_path / "config.yaml").write_text("server: coord.example:7443\n")
    assert ops.daemon_endpoint(tmp_path) == "coord.example:7443"


# -- the daemon's service on a real state.db (no network: publishing is replaced) -------------------


class _Peer:
    def __init__(self, name: str, roles: tuple[str, ...]) -> None:
        self.name, self.roles = name, roles


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    paths = Paths(tmp_path / "coord", tmp_path / "coord" / "definitions", "default")
    Engine.init_local(paths)
    engine = Engine.open(paths)
    published: list[Any] = []

    async def fake_publish(stores: Any, identity: Any, bodies: Any) -> dict[str, str]:
        published.append((list(stores), [sorted(b) for b in bodies]))
        return {s: "ok" for s in stores}

    monkeypatch.setattr(ops, "publish_everywhere", fake_publish)
    svc = ops.IdentityService(engine, CA, None, ops.RevocationBook(paths.home, CA.public_key),
                              store_endpoints=lambda: ["127.0.0.1:7444"], clock=lambda: NOW)
    svc.published = published  # type: ignore[attr-defined]
    yield svc
    engine.close()


def _enrolled(svc: Any, name: str = "db-1", key: NodeKey = KEY) -> Any:
    c = cert(name, key)
    svc.state.add_server(name, "manual", [])
    svc.state.update_server(name, enrolled_at=NOW, cert_serial=str(c.serial))
    ops.keep_issued(svc.home, c)
    return c


def test_revoke_lists_serial_and_key_marks_inventory_audits_and_publishes(service: Any) -> None:
    c = _enrolled(service)
    r = trio.run(lambda: service.handle(_Peer("admin", ("admin",)), "identity.revoke", {"name": "db-1"}))
    assert r["serials"] == [str(c.serial)] and r["keys"] == [fingerprint(c.noise_pub)] and r["dns"] == "off"
    crl = service.book.current()
    assert crl.revoked_reason(c) is not None and crl.version == r["crl_version"]
    assert ops.load_crl(service.home, CA.public_key) == crl  # on disk: the daemon's sessions refuse it
    server = service.state.get_server("db-1")
    assert server.cert_serial == f"revoked:{c.serial}" and server.enrolled_at is None
    assert service.engine.get_servers()[0]["identity"] == "revoked"
    assert any(e.action == "node.revoke" and e.subject == "db-1" for e in service.state.audit_log(10))
    assert service.published == [(["127.0.0.1:7444"], [["revocations"], ["policy"]])]
    # again: idempotent, the same list (nothing new to add)
    again = trio.run(lambda: service.revoke("db-1", actor="t"))
    assert again["already_revoked"] and again["crl_version"] == crl.version


def test_revoke_needs_admin_and_an_enrolled_node(service: Any) -> None:
    from lab.common.errors import NotEntitled, NotFound

    with pytest.raises(NotEntitled):
        trio.run(lambda: service.handle(_Peer("web-1", ("agent",)), "identity.revoke", {"name": "db-1"}))
    with pytest.raises(NotFound):
        trio.run(lambda: service.revoke("nope", actor="t"))
    service.state.add_server("fresh", "manual", [])
    with pytest.raises(StateError, match="never enrolled"):
        trio.run(lambda: service.revoke("fresh", actor="t"))


def test_renew_is_handed_over_at_checkin_and_confirmed_with_the_old_serial_revoked(service: Any) -> None:
    old = _enrolled(service)
    r = service.renew("db-1", actor="t")
    new_serial = int(r["serial"])
    assert new_serial != old.serial and service.state.get_server("db-1").cert_serial == str(old.serial)
    # check-in with the old certificate: the renewed one comes back
    extra = service.on_checkin(old)
    handed = ops.Certificate.decode_untrusted(extra["certificate"])
    assert handed.serial == new_serial and handed.noise_pub == old.noise_pub
    # check-in with the new one: confirmed; the old serial (not the key) revoked and published
    assert service.on_checkin(handed) == {}
    assert service.state.get_server("db-1").cert_serial == str(new_serial)
    assert ops.load_node_cert(service.home, "db-1") == handed and ops.load_node_cert(service.home, "db-1", pending=True) is None
    crl = service.book.current()
    assert crl.revoked_reason(old) is not None and crl.revoked_reason(handed) is None
    trio.run(service.after_checkin)
    assert service.published[-1] == (["127.0.0.1:7444"], [["revocations"]])
    shown = ops.show(service.home, service.state, "db-1", crl)
    assert shown["certificate"]["serial"] == str(new_serial) and shown["pending"] is None and shown["status"] == "enrolled"


def test_renew_refuses_revoked_or_unknown_certificates(service: Any) -> None:
    service.state.add_server("web-1", "manual", [])
    service.state.update_server("web-1", enrolled_at=NOW, cert_serial="5")
    with pytest.raises(StateError, match="next check-in"):
        service.renew("web-1", actor="t")
    _enrolled(service)
    trio.run(lambda: service.revoke("db-1", actor="t"))
    with pytest.raises(StateError, match="not enrolled"):
        service.renew("db-1", actor="t")


def test_checkin_learns_the_certificate_of_a_node_enrolled_before(service: Any) -> None:
    c = cert("web-1", NodeKey.generate())
    service.state.add_server("web-1", "manual", [])
    service.state.update_server("web-1", enrolled_at=NOW, cert_serial=str(c.serial))
    assert service.on_checkin(c) == {}
    assert ops.load_node_cert(service.home, "web-1") == c


# -- the agent side ----------------------------------------------------------------------------------


def test_agent_accepts_only_a_renewal_for_its_own_key_and_name() -> None:
    from lab.agent.sync import accept_renewed, checkin_interval
    from lab.common import rpc

    key = NodeKey.generate()
    held = CA.issue("web-1", "n-1", key.public_key, ["agent"], 86400, NOW)
    ident = rpc.Identity(key, held, CA.public_key)
    new = CA.issue("web-1", "n-1", key.public_key, ["agent"], 86400, NOW)
    assert accept_renewed(new.encode(), ident, NOW) == new
    with pytest.raises(AuthError):
        accept_renewed(held.encode(), ident, NOW)  # the one already held
    with pytest.raises(AuthError):
        accept_renewed(CA.issue("web-2", "n-1", key.public_key, ["agent"], 86400, NOW).encode(), ident, NOW)
    with pytest.raises(AuthError):
        accept_renewed(CA.issue("web-1", "n-1", KEY.public_key, ["agent"], 86400, NOW).encode(), ident, NOW)
    with pytest.raises(AuthError):
        other = CertificateAuthority.generate()
        accept_renewed(other.issue("web-1", "n-1", key.public_key, ["agent"], 86400, NOW).encode(), ident, NOW)
    assert checkin_interval({}) == 60.0 and checkin_interval({"LAB_CHECKIN_INTERVAL": "1"}) == 1.0
    assert checkin_interval({"LAB_CHECKIN_INTERVAL": "x"}) == 60.0


def test_agent_revoked_wipes_cache_key_and_files_and_serves_nothing(tmp_path: Path) -> None:
    import os

    from lab.agent.cache import CacheRecord, SecretCache
    from lab.agent.daemon import Agent, AgentConfig
    from lab.agent.delivery import FileDelivery

    home = tmp_path / "home"
    config = AgentConfig(home=home, runtime_dir=tmp_path / "run", secrets_dir=tmp_path / "secrets", key_protection="file")
    cache = SecretCache.open(home, protection="file")
    files = FileDelivery(config.secrets_dir)
    files.prepare()
    agent = Agent(config, cache, files)
    rec = CacheRecord(path="postgres/pw", value=b"s3cret", version=(1, 0, "store-1"), owner=str(os.getuid()), group=str(os.getgid()))
    agent.apply(rec)
    assert any(p.is_file() and p.name != ".lab-managed" for p in config.secrets_dir.rglob("*"))
    agent.revoked("serial 1 is revoked")
    agent.revoked("again")  # once is enough
    assert not [p for p in config.secrets_dir.rglob("*") if p.is_file() and p.name != ".lab-managed"]
    assert not (home / "cache.key").exists()
    assert agent.cache is not cache and agent.service.cache is agent.cache and agent.cache.paths() == []
    assert agent.sync_status["state"] == "revoked"
    for p in home.rglob("*"):
        if p.is_file():
            assert b"s3cret" not in p.read_bytes()
    agent.cache.close()
