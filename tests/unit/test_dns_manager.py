"""DnsManager with a fake backend: what it calls, what it audits, what it filters."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest
import trio

from lab.common.errors import AuthError
from lab.coordinator.dns import DnsAuthError, DnsBackend, DnsChange, DnsManager, DnsRecords
from lab.coordinator.dns._names import parse_addresses


class FakeBackend:
    """Holds records in a dict, like a server would, and records each call."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.records: dict[str, set[str]] = {}
        self.calls: list[tuple] = []
        self.fail = fail
        self.closed = False

    def register(self, name: str, addresses: Iterable) -> DnsChange:
        want = {str(a) for a in parse_addresses(addresses)}
        self.calls.append(("register", name, tuple(sorted(want))))
        if self.fail:
            raise self.fail
        have = self.records.get(name, set())
        self.records[name] = want
        return DnsChange(f"{name}.lab.internal.", tuple(sorted(want)), tuple(sorted(want - have)), tuple(sorted(have - want)))

    def remove(self, name: str, addresses: Iterable | None = None) -> DnsChange:
        have = self.records.get(name, set())
        gone = set(have) if addresses is None else {str(a) for a in parse_addresses(addresses)}
        self.calls.append(("remove", name, None if addresses is None else tuple(sorted(gone))))
        self.records[name] = have - gone
        return DnsChange(f"{name}.lab.internal.", tuple(sorted(have - gone)), removed=tuple(sorted(gone & have)))

    def lookup(self, name: str) -> DnsRecords:
        have = tuple(sorted(self.records.get(name, ())))
        return DnsRecords(f"{name}.lab.internal.", have, {a: (f"{name}.lab.internal.",) for a in have})

    def close(self) -> None:
        self.closed = True


def make(backend: FakeBackend):
    entries: list[tuple[str, str, dict]] = []
    return DnsManager(backend, audit=lambda a, s, d: entries.append((a, s, dict(d)))), entries


def test_fake_is_a_backend() -> None:
    assert isinstance(FakeBackend(), DnsBackend)


def test_enroll_change_revoke() -> None:
    backend = FakeBackend()
    manager, entries = make(backend)

    async def main() -> None:
        c = await manager.node_enrolled("web-1", ["10.0.1.5", "127.0.0.1", "fe80::1", "::1", "0.0.0.0", "ff02::1"])
        assert c is not None and c.addresses == ("10.0.1.5",)  # never loopback/link-local/multicast
        await manager.address_changed("web-1", ["10.0.1.5"], ["10.0.1.6", "2001:db8:1::6"])
        found = await manager.lookup("web-1")
        assert found is not None and found.addresses == ("10.0.1.6", "2001:db8:1::6") and found.ptr_ok()
        gone = await manager.node_revoked("web-1", ["10.0.1.6", "2001:db8:1::6"])
        assert gone is not None and gone.removed == ("10.0.1.6", "2001:db8:1::6")

    trio.run(main)
    assert backend.calls == [
        ("register", "web-1", ("10.0.1.5",)),
        ("register", "web-1", ("10.0.1.6", "2001:db8:1::6")),
        ("remove", "web-1", None),
    ]
    assert [(a, s) for a, s, _ in entries] == [("dns.register", "web-1"), ("dns.update", "web-1"), ("dns.remove", "web-1")]
    assert entries[1][2]["removed"] == ["10.0.1.5"] and entries[1][2]["added"] == ["10.0.1.6", "2001:db8:1::6"]


def test_old_addresses_missing_from_dns_still_lose_their_ptr() -> None:
    backend = FakeBackend()
    manager, _ = make(backend)
    trio.run(manager.address_changed, "web-1", ["10.0.1.4"], ["10.0.1.5"])
    assert backend.calls == [("register", "web-1", ("10.0.1.5",)), ("remove", "web-1", ("10.0.1.4",))]


def test_revoke_cleans_ptrs_of_known_addresses_dns_had_lost() -> None:
    backend = FakeBackend()
    manager, _ = make(backend)
    trio.run(manager.node_revoked, "web-1", ["10.0.1.4"])
    assert backend.calls == [("remove", "web-1", None), ("remove", "web-1", ("10.0.1.4",))]


def test_a_failure_is_audited_and_raised() -> None:
    backend = FakeBackend(fail=DnsAuthError("DNS server 127.0.0.1:53 rejected ... (BADSIG)", "BADSIG"))
    manager, entries = make(backend)
    with pytest.raises(AuthError, match="BADSIG"):
        trio.run(manager.node_enrolled, "web-1", ["10.0.1.5"])
    assert entries == [
        ("dns.register.failed", "web-1", {"addresses": ["10.0.1.5"], "error": "DNS server 127.0.0.1:53 rejected ... (BADSIG)", "rcode": "BADSIG"})
    ]


def test_a_broken_audit_hook_does_not_hide_the_change(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args):
        raise RuntimeError("disk full")

    manager = DnsManager(FakeBackend(), audit=broken)
    change = trio.run(manager.node_enrolled, "web-1", ["10.0.1.5"])
    assert change is not None and change.added == ("10.0.1.5",)
    assert "event=dns_audit_failed" in caplog.text


def test_disabled_manager_does_nothing() -> None:
    manager = DnsManager(None, audit=lambda *a: pytest.fail("no audit when disabled"))
    assert not manager.enabled
    assert trio.run(manager.node_enrolled, "web-1", ["10.0.1.5"]) is None
    assert trio.run(manager.node_revoked, "web-1") is None
    assert trio.run(manager.lookup, "web-1") is None
    manager.close()


def test_close_closes_the_backend() -> None:
    backend = FakeBackend()
    DnsManager(backend).close()
    assert backend.closed


def test_works_with_the_state_db_audit_signature(tmp_path) -> None:
    from lab.coordinator.state import StateDB

    state = StateDB.open(tmp_path)
    try:
        manager = DnsManager(FakeBackend(), audit=state.audit)
        trio.run(manager.node_enrolled, "web-1", ["10.0.1.5"])
        entry = state.audit_log(1)[0]
        assert (entry.action, entry.subject, entry.detail["addresses"]) == ("dns.register", "web-1", ["10.0.1.5"])
    finally:
        state.close()


def test_logs_are_key_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    manager = DnsManager(FakeBackend(), audit=lambda *a: (_ for _ in ()).throw(OSError("x")))
    trio.run(manager.node_enrolled, "web-1", ["10.0.1.5"])
    assert "action=dns.register subject=web-1" in caplog.text


def test_no_publishable_address_keeps_the_records() -> None:
    backend = FakeBackend()
    manager, entries = make(backend)
    trio.run(manager.node_enrolled, "web-1", ["10.0.1.5"])
    assert trio.run(manager.address_changed, "web-1", ["10.0.1.5"], ["fe80::1", "127.0.0.1"]) is None
    assert trio.run(manager.node_enrolled, "web-2", ["::1"]) is None
    assert backend.records == {"web-1": {"10.0.1.5"}}
    assert [(a, s) for a, s, _ in entries[1:]] == [("dns.update.skipped", "web-1"), ("dns.register.skipped", "web-2")]
    assert entries[1][2] == {"old": ["10.0.1.5"], "new": ["127.0.0.1", "fe80::1"], "reason": "no publishable address"}
