"""The DNS manager against a real BIND 9 ``named`` on 127.0.0.1 with TSIG-authorised updates.

Needs the Debian package ``bind9`` (named, tsig-keygen); ``bind9-dnsutils`` (dig) adds an
independent check. Skipped when named is missing, except under CI, where that is a failure.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
import trio

from lab.common.errors import AuthError, TransportError
from lab.coordinator.dns import DnsAuthError, DnsManager, DnsUpdateError, Rfc2136Backend, TsigKey
from lab.coordinator.dns.config import load_dns_config, parse_tsig_key

ZONE = "lab.internal"
REVERSE_V4 = "10.0.1.0/24"
REVERSE_V6 = "2001:db8:1::/48"
_SBIN = os.pathsep.join(["/usr/sbin", "/sbin", os.environ.get("PATH", "")])


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=_SBIN)


if _which("named") is None:
    if "CI" in os.environ:  # CI must run this test, never skip it
        pytest.fail("CI: BIND's named is missing; apt-get install bind9 bind9-dnsutils", pytrace=False)
    pytest.skip("BIND's named is not installed (apt-get install bind9 bind9-dnsutils)", allow_module_level=True)
if _which("tsig-keygen") is None:  # same Debian package as named; missing means a broken install
    pytest.fail("named is installed but tsig-keygen is not (Debian package bind9)", pytrace=False)


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (named listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def _keygen(name: str) -> str:
    out = subprocess.run([_which("tsig-keygen"), "-a", "hmac-sha256", name], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


SOA = """$TTL 300
@   IN SOA ns.lab.internal. hostmaster.lab.internal. 1 3600 600 86400 300
@   IN NS  ns.lab.internal.
"""


@dataclasses.dataclass
class Bind:
    port: int
    workdir: pathlib.Path
    key_file: pathlib.Path  # the updater key, 0600, tsig-keygen output
    key: TsigKey
    reader: TsigKey  # known to named but not allowed to update
    process: subprocess.Popen

    def backend(self, key: TsigKey | None = None, **kw) -> Rfc2136Backend:
        return Rfc2136Backend(
            ZONE, key or self.key, server="127.0.0.1", port=self.port,
            reverse_zones=["1.0.10.in-addr.arpa", "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"],
            ttl=120, timeout=3.0, **kw,
        )

    def query(self, name: str, rdtype: str) -> list[str]:
        """A plain, unsigned query — independent of the backend under test."""
        q = dns.message.make_query(name, rdtype)
        r = dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=3)
        if r.rcode() == dns.rcode.NXDOMAIN:
            return []
        assert r.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(r.rcode())
        return sorted(rd.to_text() for rrset in r.answer if rrset.rdtype == dns.rdatatype.from_text(rdtype) for rd in rrset)

    def ptr(self, address: str) -> list[str]:
        return self.query(dns.reversename.from_address(address).to_text(), "PTR")


@pytest.fixture(scope="module")
def bind() -> Iterator[Bind]:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="lab-bind-"))
    proc = None
    try:
        port = _free_port()
        updater, reader = _keygen("lab-dns"), _keygen("lab-reader")
        key_file = workdir / "lab-dns.key"
        key_file.write_text(updater)
        key_file.chmod(0o600)
        (workdir / "keys.conf").write_text(updater + reader)
        zones = {
            ZONE: workdir / "forward.zone",
            "1.0.10.in-addr.arpa": workdir / "rev4.zone",
            "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": workdir / "rev6.zone",
        }
        for path in zones.values():
            path.write_text(SOA + ("ns  IN A 127.0.0.1\n" if path.name == "forward.zone" else ""))
        zone_conf = "".join(  # the policy docs/DNS.md recommends: only the record types lab writes
            f'zone "{z}" {{ type primary; file "{p}"; update-policy {{ grant lab-dns zonesub {types}; }}; }};\n'
            for z, p in zones.items()
            for types in ["A AAAA" if z == ZONE else "PTR"]
        )
        conf = workdir / "named.conf"
        conf.write_text(
            f"""options {{
    directory "{workdir}";
    pid-file "{workdir}/named.pid";
    session-keyfile "{workdir}/session.key";
    managed-keys-directory "{workdir}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-transfer {{ none; }};
}};
controls {{ }};
include "{workdir}/keys.conf";
{zone_conf}"""
        )
        with open(workdir / "named.log", "wb") as log:  # the child keeps its own copy of the fd
            proc = subprocess.Popen(
                [_which("named"), "-g", "-c", str(conf)],  # foreground; as root it stays root (no -u)
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            )
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"named exited with {proc.returncode}:\n{(workdir / 'named.log').read_text()[-3000:]}")
            try:
                r = dns.query.tcp(dns.message.make_query(ZONE, "SOA"), "127.0.0.1", port=port, timeout=1)
                if r.rcode() == dns.rcode.NOERROR and r.answer:
                    break
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"named did not answer within 20 s:\n{(workdir / 'named.log').read_text()[-3000:]}")
            time.sleep(0.05)
        yield Bind(port, workdir, key_file, parse_tsig_key(updater), parse_tsig_key(reader), proc)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def test_register_change_revoke(bind: Bind) -> None:
    b = bind.backend()
    change = b.register("web-1", ["10.0.1.5", "2001:db8:1::5"])
    assert change.added == ("10.0.1.5", "2001:db8:1::5") and change.removed == ()
    assert bind.query("web-1.lab.internal", "A") == ["10.0.1.5"]
    assert bind.query("web-1.lab.internal", "AAAA") == ["2001:db8:1::5"]
    assert bind.ptr("10.0.1.5") == ["web-1.lab.internal."]
    assert bind.ptr("2001:db8:1::5") == ["web-1.lab.internal."]

    again = b.register("web-1", ["2001:db8:1::5", "10.0.1.5"])  # idempotent
    assert again.added == () and again.removed == ()

    moved = b.register("web-1", ["10.0.1.6"])  # address change: stale A, AAAA and PTRs go
    assert moved.added == ("10.0.1.6",) and moved.removed == ("10.0.1.5", "2001:db8:1::5")
    assert bind.query("web-1.lab.internal", "A") == ["10.0.1.6"]
    assert bind.query("web-1.lab.internal", "AAAA") == []
    assert bind.ptr("10.0.1.6") == ["web-1.lab.internal."]
    assert bind.ptr("10.0.1.5") == [] and bind.ptr("2001:db8:1::5") == []

    found = b.lookup("web-1")
    assert found.addresses == ("10.0.1.6",) and found.ptr_ok()

    gone = b.remove("web-1")
    assert gone.removed == ("10.0.1.6",)
    assert bind.query("web-1.lab.internal", "A") == [] and bind.ptr("10.0.1.6") == []
    assert b.remove("web-1").removed == ()  # idempotent


def test_stale_record_from_another_writer_is_replaced_and_foreign_ptr_kept(bind: Bind) -> None:
    b = bind.backend()
    b.register("db-1", ["10.0.1.20", "10.0.1.21"])
    b.register("db-2", ["10.0.1.21"])  # .21 moved to db-2: its PTR now says db-2
    assert bind.ptr("10.0.1.21") == ["db-2.lab.internal."]
    b.register("db-1", ["10.0.1.22"])  # db-1's stale .21 must not take db-2's PTR with it
    assert bind.query("db-1.lab.internal", "A") == ["10.0.1.22"]
    assert bind.ptr("10.0.1.21") == ["db-2.lab.internal."]
    assert bind.ptr("10.0.1.20") == []
    b.remove("db-1")
    b.remove("db-2")


def test_dig_sees_the_records(bind: Bind) -> None:
    dig = _which("dig")
    if dig is None:
        pytest.skip("dig (bind9-dnsutils) is not installed")
    bind.backend().register("dig-1", ["10.0.1.30"])
    try:
        a = subprocess.run([dig, "@127.0.0.1", "-p", str(bind.port), "+short", "dig-1.lab.internal", "A"],
                           capture_output=True, text=True, timeout=20)
        ptr = subprocess.run([dig, "@127.0.0.1", "-p", str(bind.port), "+short", "-x", "10.0.1.30"],
                             capture_output=True, text=True, timeout=20)
        assert a.stdout.split() == ["10.0.1.30"], a.stderr
        assert ptr.stdout.split() == ["dig-1.lab.internal."], ptr.stderr
    finally:
        bind.backend().remove("dig-1")


def test_wrong_secret_is_badsig_and_changes_nothing(bind: Bind) -> None:
    bind.backend().register("safe-1", ["10.0.1.40"])
    wrong = TsigKey(bind.key.name, "hmac-sha256", b"\x01" * 32)
    with pytest.raises(DnsAuthError) as info:
        bind.backend(wrong).register("safe-1", ["10.0.1.41"])
    assert isinstance(info.value, AuthError)
    assert info.value.rcode == "BADSIG" and "BADSIG" in str(info.value) and "lab-dns" in str(info.value)
    assert bind.query("safe-1.lab.internal", "A") == ["10.0.1.40"]
    assert bind.ptr("10.0.1.41") == []
    bind.backend().remove("safe-1")


def test_unknown_key_is_badkey(bind: Bind) -> None:
    stranger = TsigKey("nobody", "hmac-sha256", b"\x02" * 32)
    with pytest.raises(DnsAuthError, match="BADKEY"):
        bind.backend(stranger).register("x-1", ["10.0.1.50"])


def test_key_without_update_rights_is_refused(bind: Bind) -> None:
    with pytest.raises(DnsAuthError) as info:
        bind.backend(bind.reader).register("x-2", ["10.0.1.51"])
    assert info.value.rcode == "REFUSED" and "REFUSED" in str(info.value)
    assert bind.query("x-2.lab.internal", "A") == []


def test_unreachable_server_is_a_transport_error(bind: Bind) -> None:
    b = Rfc2136Backend(ZONE, bind.key, server="127.0.0.1", port=_free_port(), timeout=1.0)
    with pytest.raises(DnsUpdateError, match="cannot reach DNS server") as info:
        b.register("x-3", ["10.0.1.52"])
    assert isinstance(info.value, TransportError)


def test_manager_from_config_yaml_with_audit(bind: Bind, tmp_path: pathlib.Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(
        f"""dns:
  zone: {ZONE}
  server: 127.0.0.1
  port: {bind.port}
  tsig_key_file: {bind.key_file}
  reverse_zones: [{REVERSE_V4}, "{REVERSE_V6}"]
  ttl: 60
  timeout: 3
"""
    )
    config = load_dns_config(home)
    assert config is not None and "secret" not in repr(config.tsig).replace("secret=<hidden>", "")
    entries: list[tuple[str, str, dict]] = []
    manager = DnsManager.from_home(home, audit=lambda action, subject, detail: entries.append((action, subject, dict(detail))))

    async def lifecycle() -> None:
        await manager.node_enrolled("node-7", ["10.0.1.70", "127.0.0.1", "fe80::1"])
        assert bind.query("node-7.lab.internal", "A") == ["10.0.1.70"]
        assert bind.ptr("10.0.1.70") == ["node-7.lab.internal."]
        await manager.address_changed("node-7", ["10.0.1.70"], ["10.0.1.71", "2001:db8:1::71"])
        assert bind.query("node-7.lab.internal", "A") == ["10.0.1.71"]
        assert bind.ptr("2001:db8:1::71") == ["node-7.lab.internal."] and bind.ptr("10.0.1.70") == []
        records = await manager.lookup("node-7")
        assert records is not None and records.ptr_ok()
        await manager.node_revoked("node-7", ["10.0.1.71", "2001:db8:1::71"])
        assert bind.query("node-7.lab.internal", "A") == [] and bind.ptr("10.0.1.71") == []

    trio.run(lifecycle)
    assert [(a, s) for a, s, _ in entries] == [("dns.register", "node-7"), ("dns.update", "node-7"), ("dns.remove", "node-7")]
    assert entries[0][2]["addresses"] == ["10.0.1.70"]
    assert entries[2][2]["removed"] == ["10.0.1.71", "2001:db8:1::71"]
    assert not any(bind.key.secret.hex() in repr(e) for e in entries)


def test_manager_records_a_failed_update(bind: Bind) -> None:
    entries: list[tuple[str, str, dict]] = []
    wrong = TsigKey(bind.key.name, "hmac-sha256", b"\x03" * 32)
    manager = DnsManager(bind.backend(wrong), audit=lambda a, s, d: entries.append((a, s, dict(d))))
    with pytest.raises(DnsAuthError):
        trio.run(manager.node_enrolled, "bad-1", [ipaddress.ip_address("10.0.1.80")])
    assert entries[0][0] == "dns.register.failed" and entries[0][2]["rcode"] == "BADSIG"
    assert bind.query("bad-1.lab.internal", "A") == []


def test_prerequisites_catch_a_concurrent_writer(bind: Bind) -> None:
    """Another writer changes the name between our read and our update: the server rejects the
    update (prerequisite), we read again and replace the intruder's address too."""
    import dns.tsig
    import dns.update

    from lab.coordinator.dns.rfc2136 import TcpTransport

    real = TcpTransport("127.0.0.1", bind.port)
    rcodes: list[str] = []
    intruded = False

    def racing(message, timeout):
        nonlocal intruded
        if isinstance(message, dns.update.UpdateMessage) and message.prerequisite and not intruded:
            intruded = True
            other = dns.update.UpdateMessage(ZONE)
            other.use_tsig(dns.tsig.Key(bind.key.name, bind.key.secret, bind.key.algorithm))
            other.add("race-1", 60, "A", "10.0.1.99")
            assert dns.query.tcp(other, "127.0.0.1", port=bind.port, timeout=3).rcode() == dns.rcode.NOERROR
        response = real(message, timeout)
        if isinstance(message, dns.update.UpdateMessage):
            rcodes.append(dns.rcode.to_text(response.rcode()))
        return response

    change = bind.backend(transport=racing).register("race-1", ["10.0.1.90"])
    assert rcodes[0] in ("NXRRSET", "YXRRSET") and rcodes[1:] == ["NOERROR", "NOERROR"]
    assert change.removed == ("10.0.1.99",)
    assert bind.query("race-1.lab.internal", "A") == ["10.0.1.90"]
    bind.backend().remove("race-1")
