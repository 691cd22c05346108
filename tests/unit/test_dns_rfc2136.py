"""RFC 2136 update construction and error mapping, without a server (scripted transport)."""

from __future__ import annotations

import ipaddress
import logging

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
import pytest

from lab.common.errors import AuthError, TransportError, UsageError
from lab.coordinator.dns import DnsAuthError, DnsBackend, DnsUpdateError, Rfc2136Backend, TsigKey
from lab.coordinator.dns.rfc2136 import MAX_ATTEMPTS

SECRET = bytes(range(32))
KEY = TsigKey("lab-dns", "hmac-sha256", SECRET)
REV4 = "1.0.10.in-addr.arpa"
REV6 = "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
FQDN = "web-1.lab.internal."


def backend(**kw) -> Rfc2136Backend:
    return Rfc2136Backend("lab.internal", KEY, reverse_zones=[REV4, REV6], ttl=120, **kw)


def sections(msg: dns.message.Message) -> dict[str, list[str]]:
    """The message's text form split by section (``;ZONE``, ``;PREREQ``, ``;UPDATE``)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in msg.to_text().splitlines():
        if line.startswith(";"):
            current = line[1:]
            out[current] = []
        elif current is not None and current != "ADDITIONAL":
            out[current].append(line)
    return out


def ip(*texts: str):
    return [ipaddress.ip_address(t) for t in texts]


def test_backend_satisfies_the_interface() -> None:
    assert isinstance(backend(), DnsBackend)


def test_first_register_v4_and_v6() -> None:
    plan = backend().plan_register("web-1", ["10.0.1.5", "2001:db8:1::5"], current=[])
    fwd = sections(plan.forward)
    assert fwd["ZONE"] == ["lab.internal. IN SOA"]
    assert fwd["PREREQ"] == [f"{FQDN} NONE A", f"{FQDN} NONE AAAA"]  # RRsets must not exist yet
    assert fwd["UPDATE"] == [
        f"{FQDN} ANY A",
        f"{FQDN} 120 IN A 10.0.1.5",
        f"{FQDN} ANY AAAA",
        f"{FQDN} 120 IN AAAA 2001:db8:1::5",
    ]
    assert [sections(m)["ZONE"] for m in plan.reverse] == [[f"{REV4}. IN SOA"], [f"{REV6}. IN SOA"]]
    rev4, rev6 = (sections(m) for m in plan.reverse)
    assert rev4["PREREQ"] == [] and rev4["UPDATE"] == [
        "5.1.0.10.in-addr.arpa. ANY PTR",
        f"5.1.0.10.in-addr.arpa. 120 IN PTR {FQDN}",
    ]
    nibbles = "5." + "0." * 19 + "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."
    assert rev6["UPDATE"] == [f"{nibbles} ANY PTR", f"{nibbles} 120 IN PTR {FQDN}"]
    assert plan.change.added == ("10.0.1.5", "2001:db8:1::5") and plan.change.removed == ()


def test_re_register_replaces_stale_addresses_atomically() -> None:
    plan = backend().plan_register("web-1", ["10.0.1.6"], current=ip("10.0.1.5", "2001:db8:1::5"))
    fwd = sections(plan.forward)
    # value-dependent prerequisites: the sets are still exactly what we read (TTL 0 per RFC 2136)
    assert fwd["PREREQ"] == [f"{FQDN} 0 IN A 10.0.1.5", f"{FQDN} 0 IN AAAA 2001:db8:1::5"]
    assert fwd["UPDATE"] == [f"{FQDN} ANY A", f"{FQDN} 120 IN A 10.0.1.6", f"{FQDN} ANY AAAA"]
    rev4, rev6 = (sections(m)["UPDATE"] for m in plan.reverse)
    # a stale PTR goes only if it still points at this node (class NONE = delete this RR)
    assert rev4 == [
        f"5.1.0.10.in-addr.arpa. 0 NONE PTR {FQDN}",
        "6.1.0.10.in-addr.arpa. ANY PTR",
        f"6.1.0.10.in-addr.arpa. 120 IN PTR {FQDN}",
    ]
    assert rev6 == [f"5.{'0.' * 19}1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa. 0 NONE PTR {FQDN}"]
    assert plan.change.removed == ("10.0.1.5", "2001:db8:1::5") and plan.change.added == ("10.0.1.6",)


def test_same_addresses_again_is_a_no_op_change() -> None:
    plan = backend().plan_register("web-1", ["10.0.1.5"], current=ip("10.0.1.5"))
    assert plan.change.added == () and plan.change.removed == ()


def test_address_outside_reverse_zones_gets_no_ptr() -> None:
    plan = backend().plan_register("web-1", ["192.0.2.7", "10.0.1.5"], current=[])
    assert plan.change.ptr_skipped == ("192.0.2.7",)
    assert [sections(m)["ZONE"] for m in plan.reverse] == [[f"{REV4}. IN SOA"]]
    assert f"{FQDN} 120 IN A 192.0.2.7" in sections(plan.forward)["UPDATE"]


def test_most_specific_reverse_zone_wins() -> None:
    b = Rfc2136Backend("lab.internal", KEY, reverse_zones=["10.in-addr.arpa", REV4])
    plan = b.plan_register("web-1", ["10.0.1.5", "10.9.9.9"], current=[])
    assert [sections(m)["ZONE"][0] for m in plan.reverse] == ["10.in-addr.arpa. IN SOA", f"{REV4}. IN SOA"]
    assert "5.1.0.10.in-addr.arpa. ANY PTR" in sections(plan.reverse[1])["UPDATE"]


def test_remove_everything_and_remove_some() -> None:
    b = backend()
    everything = b.plan_remove("web-1", None, current=ip("10.0.1.5", "2001:db8:1::5"))
    assert sections(everything.forward)["PREREQ"] == []
    assert sections(everything.forward)["UPDATE"] == [f"{FQDN} ANY A", f"{FQDN} ANY AAAA"]
    assert everything.change.removed == ("10.0.1.5", "2001:db8:1::5") and everything.change.addresses == ()
    assert all("NONE PTR" in line for m in everything.reverse for line in sections(m)["UPDATE"])

    some = b.plan_remove("web-1", ["10.0.1.5"], current=ip("10.0.1.5", "10.0.1.6"))
    assert sections(some.forward)["UPDATE"] == [f"{FQDN} 0 NONE A 10.0.1.5"]
    assert some.change.addresses == ("10.0.1.6",) and some.change.removed == ("10.0.1.5",)


def test_updates_are_signed_with_the_tsig_key() -> None:
    plan = backend().plan_register("web-1", ["10.0.1.5", "2001:db8:1::5"], current=[])
    for msg in (plan.forward, *plan.reverse):
        wire = msg.to_wire()
        assert msg.keyname == dns.name.from_text("lab-dns.")
        assert msg.keyalgorithm == dns.name.from_text("hmac-sha256.")
        parsed = dns.message.from_wire(wire, keyring={dns.name.from_text("lab-dns."): dns.tsig.Key("lab-dns", SECRET)})
        assert parsed.had_tsig
        with pytest.raises(dns.tsig.BadSignature):
            dns.message.from_wire(wire, keyring={dns.name.from_text("lab-dns."): dns.tsig.Key("lab-dns", b"x" * 32)})


@pytest.mark.parametrize("bad", ["", "web_1", "-web", "web-", "a" * 64, "a..b", "*", "web 1"])
def test_bad_node_names_are_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="DNS"):
        backend().plan_register(bad, ["10.0.1.5"], current=[])


def test_names_are_relative_to_the_zone() -> None:
    b = backend()
    assert b.fqdn("Web-1").to_text() == FQDN
    assert b.fqdn("web-1.lab.internal").to_text() == FQDN
    assert b.fqdn("a.rack-2").to_text() == "a.rack-2.lab.internal."


@pytest.mark.parametrize("bad", [["10.0.1.300"], ["web-1"], "10.0.1.5"])
def test_bad_addresses_are_refused(bad) -> None:
    with pytest.raises(UsageError):
        backend().plan_register("web-1", bad, current=[])


# -- talking to a scripted server -------------------------------------------------------------


class Script:
    """A transport that answers from a list of callables, recording each message it was sent."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.sent: list[dns.message.Message] = []

    def __call__(self, message: dns.message.Message, timeout: float) -> dns.message.Message:
        self.sent.append(message)
        answer = self.answers.pop(0)
        return answer(message)


def rcode(code: int):
    def answer(q):
        r = dns.message.make_response(q)
        r.set_rcode(code)
        return r

    return answer


def records(*addresses: str):
    def answer(q):
        r = dns.message.make_response(q)
        rdtype = q.question[0].rdtype
        wanted = [a for a in addresses if (":" in a) == (rdtype == dns.rdatatype.AAAA)]
        if wanted:
            r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", rdtype, *wanted))
        return r

    return answer


def raises(exc: BaseException):
    def answer(q):
        raise exc

    return answer


EMPTY = records()
OK = rcode(dns.rcode.NOERROR)


def test_register_reads_then_updates_forward_then_reverse() -> None:
    script = Script(records("10.0.1.5"), EMPTY, OK, OK)
    change = backend(transport=script).register("web-1", ["10.0.1.6"])
    assert [type(m).__name__ for m in script.sent] == ["QueryMessage", "QueryMessage", "UpdateMessage", "UpdateMessage"]
    assert all(m.keyname is not None for m in script.sent)  # queries are signed too
    assert change.removed == ("10.0.1.5",) and change.added == ("10.0.1.6",)
    assert script.answers == []


def test_failed_prerequisite_reads_again_and_retries() -> None:
    script = Script(EMPTY, EMPTY, rcode(dns.rcode.YXRRSET), records("10.0.1.9"), EMPTY, OK, OK)
    change = backend(transport=script).register("web-1", ["10.0.1.6"])
    assert change.removed == ("10.0.1.9",)
    second = sections(script.sent[5])
    assert second["PREREQ"][0] == f"{FQDN} 0 IN A 10.0.1.9"


def test_a_name_that_keeps_changing_gives_up() -> None:
    script = Script(*[EMPTY, EMPTY, rcode(dns.rcode.NXRRSET)] * MAX_ATTEMPTS)
    with pytest.raises(DnsUpdateError, match="kept changing"):
        backend(transport=script).register("web-1", ["10.0.1.6"])


@pytest.mark.parametrize(
    ("code", "kind", "text"),
    [
        (dns.rcode.REFUSED, DnsAuthError, "REFUSED"),
        (dns.rcode.NOTAUTH, DnsAuthError, "NOTAUTH"),
        (dns.rcode.SERVFAIL, DnsUpdateError, "SERVFAIL"),
        (dns.rcode.NOTZONE, DnsUpdateError, "NOTZONE"),
    ],
)
def test_update_rcodes_become_clear_errors(code, kind, text) -> None:
    script = Script(EMPTY, EMPTY, rcode(code))
    with pytest.raises(kind) as info:
        backend(transport=script).register("web-1", ["10.0.1.6"])
    assert info.value.rcode == text and text in str(info.value) and "127.0.0.1:53" in str(info.value)
    assert isinstance(info.value, AuthError if kind is DnsAuthError else TransportError)


def test_refused_query_is_an_auth_error() -> None:
    with pytest.raises(DnsAuthError, match="REFUSED"):
        backend(transport=Script(rcode(dns.rcode.REFUSED))).lookup("web-1")


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (dns.tsig.PeerBadSignature(), DnsAuthError, "BADSIG"),
        (dns.tsig.PeerBadKey(), DnsAuthError, "BADKEY"),
        (dns.tsig.PeerBadTime(), DnsAuthError, "BADTIME"),
        (dns.tsig.BadSignature(), DnsAuthError, "does not verify"),
        (dns.exception.Timeout(), DnsUpdateError, "did not answer the query within 5s"),
        (ConnectionRefusedError(111, "Connection refused"), DnsUpdateError, "cannot reach DNS server 127.0.0.1:53"),
        (EOFError(), DnsUpdateError, "failed"),
    ],
)
def test_foreign_errors_are_translated(exc, kind, text) -> None:
    with pytest.raises(kind, match=text) as info:
        backend(transport=Script(raises(exc))).register("web-1", ["10.0.1.6"])
    assert info.value.__cause__ is exc


def test_lookup_collects_addresses_and_ptrs() -> None:
    def ptr(q):
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "PTR", FQDN))
        return r

    script = Script(records("10.0.1.5"), records("2001:db8:1::5"), ptr, ptr)
    found = backend(transport=script).lookup("web-1")
    assert found.addresses == ("10.0.1.5", "2001:db8:1::5")
    assert found.ptr_ok() and found.to_dict()["ptr"]["10.0.1.5"] == [FQDN]


def test_nxdomain_reads_as_no_records() -> None:
    found = backend(transport=Script(rcode(dns.rcode.NXDOMAIN), rcode(dns.rcode.NXDOMAIN))).lookup("web-1")
    assert found.addresses == () and not found.ptr_ok()


def test_the_secret_never_shows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    b = backend(transport=Script(EMPTY, EMPTY, OK, OK))
    b.register("web-1", ["10.0.1.6"])
    import base64

    sent = b._transport.sent  # type: ignore[attr-defined]
    for text in (repr(KEY), repr(b), caplog.text, *(repr(m.keyring) for m in sent), *(m.to_text() for m in sent)):
        assert SECRET.hex() not in text and base64.b64encode(SECRET).decode() not in text
    assert "event=dns_registered" in caplog.text and "fqdn=web-1.lab.internal." in caplog.text
