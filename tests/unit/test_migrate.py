"""coordinator/migrate/: the pure parts of `lab server migrate` — endpoint choice, plan text,
config switch, bundle build/verify/install, who may fetch, and the daemon's check-in decisions and
write freeze. No sockets, no processes (the whole move: tests/integration/test_migrate_cluster.py)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.common.errors import ConfigError, NotEntitled, RemoteProtocolError, StateError, UsageError
from lab.common.identity import CertificateAuthority
from lab.coordinator import migrate as m
from lab.coordinator.migrate import bundle, role
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.enrollment import ensure_cluster_identity, load_ca_public_key

NOW = 1_800_000_000.0


# -- endpoint, plan, config --------------------------------------------------------------------


def test_choose_endpoint() -> None:
    assert m.choose_endpoint("10.0.0.5:7000", ["192.168.1.2"]) == "10.0.0.5:7000"
    assert m.choose_endpoint("0.0.0.0:7443", ["127.0.0.1", "192.168.1.2/24", "10.0.0.1"]) == "192.168.1.2:7443"
    assert m.choose_endpoint("0.0.0.0", ["127.0.0.1"]) == "127.0.0.1:7443"  # only loopback: that one
    assert m.choose_endpoint("[::]:7443", ["fd00::5"]) == "[fd00::5]:7443"
    with pytest.raises(UsageError, match="no address"):
        m.choose_endpoint("0.0.0.0:7443", [])


def test_render_plan_names_what_moves_and_the_config_change() -> None:
    plan = {"to": "node-a", "listen": "0.0.0.0:7443", "endpoint": "10.0.0.7:7443", "from_node": None,
            "from_endpoint": "127.0.0.1:7443", "ca": "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "certificates": 4, "grace": 60.0,
            "servers": 5, "tokens": 2, "audit": 17}
    text = m.render_plan(plan, "/home/me/.lab")
    assert "from local (/home/me/.lab)" in text and "to node-a" in text
    assert "5 servers, 2 tokens, 17 audit entries, 4 certificates, CA ABCDEFGHIJKLMNOP" in text
    assert "server: 10.0.0.7:7443" in text and "lab-server" in text and "unlabel" not in text
    text = m.render_plan({**plan, "from_node": "node-b"}, "/h")
    assert "from node-b" in text and "unlabel node-b" in text


def test_switch_config_keeps_the_rest_atomically(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"stores": ["a:1"], "definitions": "/d", "server": "old:1"}))
    m.switch_config(tmp_path, "10.0.0.7:7443")
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert doc == {"stores": ["a:1"], "definitions": "/d", "server": "10.0.0.7:7443"}
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left
    (tmp_path / "new").mkdir()
    m.switch_config(tmp_path / "new", "h:1")
    assert yaml.safe_load((tmp_path / "new" / "config.yaml").read_text()) == {"server": "h:1"}


def test_config_for_bundle_drops_server_and_definitions() -> None:
    assert m.config_for_bundle({"server": "x:1", "definitions": "/d", "stores": ["s:1"], "dns": {"a": 1}}) == {
        "stores": ["s:1"], "dns": {"a": 1}}


# -- bundle --------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A coordinator home: cluster identity, state with servers (some rows only in the WAL), a
    certificate, config and definitions."""
    h = tmp_path / "coord"
    paths = Paths(h, h / "definitions", "default")
    Engine.init_local(paths)
    ensure_cluster_identity(h)
    engine = Engine.open(paths)
    try:
        for name in ("web-1", "db-1", "node-a"):
            engine.state.add_server(name, "manual", ["app"])
        engine.state.update_server("node-a", enrolled_at=NOW, cert_serial="77")
        engine.state.audit("test.entry", "web-1", {"n": 1})
    finally:
        engine.close()
    (h / "certs").mkdir(exist_ok=True)
    (h / "certs" / "web-1.cert").write_bytes(b"cert-bytes")
    (h / "config.yaml").write_text(yaml.safe_dump({"server": "10.1.1.1:7443", "stores": ["127.0.0.1:7444"]}))
    (h / "definitions" / ".git").mkdir(parents=True, exist_ok=True)
    (h / "definitions" / ".git" / "HEAD").write_text("ref")
    return h


def _bundle(home: Path, **kw: Any) -> m.Bundle:
    ca = CertificateAuthority.load(home / "ca.key")
    try:
        fpr = ca.fingerprint
    finally:
        ca.close()
    args = {"id": "0123456789abcdef", "source": "127.0.0.1:7443", "node": "node-a", "ca_fingerprint": fpr, "now": NOW}
    return m.build_bundle(home, home / "definitions", **{**args, **kw})


def test_bundle_round_trip_and_install(home: Path, tmp_path: Path) -> None:
    b = _bundle(home)
    assert {"state.db", "ca.key", "ca.pub", "certs/web-1.cert", "config.yaml"} <= set(b.files)
    assert not any(".git" in f for f in b.files)
    assert any(f.startswith("definitions/") for f in b.files)
    assert b.files["ca.key"] not in repr(b).encode()
    assert yaml.safe_load(b.files["config.yaml"]) == {"stores": ["127.0.0.1:7444"]}  # no server:
    ca_pub = load_ca_public_key(home / "ca.pub")
    got = m.decode_bundle_untrusted(m.encode_bundle(b), ca_pub)
    assert got.files == b.files and got.node == "node-a" and got.id == b.id
    assert m.count_rows(got.files["state.db"]) == {"servers": 3, "tokens": 0, "audit": m.count_rows(home / "state.db")["audit"]}

    target = tmp_path / "agent" / "coordinator"
    (target).mkdir(parents=True)
    (target / "stale").write_text("left by an earlier attempt")
    m.install_bundle(got, target)
    assert not (target / "stale").exists()
    assert oct(target.stat().st_mode & 0o777) == "0o700"
    for f in ("ca.key", "state.db", "certs/web-1.cert", m.ORIGIN_FILE):
        assert oct((target / f).stat().st_mode & 0o777) == "0o600", f
    assert m.origin_node(target) == "node-a"
    engine = Engine.open(Paths(target, target / "definitions", "default"))
    try:
        assert sorted(s.name for s in engine.state.list_servers()) == ["db-1", "node-a", "web-1"]
    finally:
        engine.close()
    assert [p.name for p in target.parent.iterdir()] == ["coordinator"]  # no staging dir left


def test_db_copy_of_a_live_wal_database_has_the_uncheckpointed_rows(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE servers (x)")
    conn.execute("CREATE TABLE tokens (x)")
    conn.execute("CREATE TABLE audit (x)")
    conn.executemany("INSERT INTO servers VALUES (?)", [(i,) for i in range(50)])
    assert (tmp_path / "state.db-wal").stat().st_size > 0  # still in the WAL
    copy = bundle._db_copy(db)
    conn.close()
    assert m.count_rows(copy)["servers"] == 50


def test_bundle_from_another_ca_is_refused(home: Path) -> None:
    other = CertificateAuthority.generate()
    with pytest.raises(NotEntitled, match="not this node's CA"):
        m.decode_bundle_untrusted(m.encode_bundle(_bundle(home)), other.public_key)


def test_bundle_with_a_ca_key_not_matching_ca_pub_is_not_installed(home: Path, tmp_path: Path) -> None:
    b = _bundle(home)
    other = CertificateAuthority.generate()
    other.save(tmp_path / "other.key")
    forged = m.Bundle(b.id, b.source, b.node, b.ca_fingerprint, b.created, {**b.files, "ca.key": (tmp_path / "other.key").read_bytes()})
    target = tmp_path / "t" / "coordinator"
    with pytest.raises(NotEntitled, match="does not belong"):
        m.install_bundle(forged, target)
    assert not target.exists() and list((tmp_path / "t").iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../b", "a//b", ".hidden", ""])
def test_bundle_with_an_unsafe_name_is_refused(home: Path, name: str) -> None:
    b = _bundle(home)
    raw = msgpack.packb({"kind": m.BUNDLE_KIND, "id": b.id, "source": b.source, "node": b.node, "ca": b.ca_fingerprint,
                         "created": NOW, "files": {**b.files, name: b"x"}})
    with pytest.raises(RemoteProtocolError):
        m.decode_bundle_untrusted(raw, load_ca_public_key(home / "ca.pub"))


def test_bundle_without_state_is_refused(home: Path) -> None:
    b = _bundle(home)
    files = {k: v for k, v in b.files.items() if k != "state.db"}
    raw = msgpack.packb({"kind": m.BUNDLE_KIND, "id": b.id, "source": b.source, "node": b.node, "ca": b.ca_fingerprint,
                         "created": NOW, "files": files})
    with pytest.raises(RemoteProtocolError, match="missing state.db"):
        m.decode_bundle_untrusted(raw, load_ca_public_key(home / "ca.pub"))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.builds(msgpack.packb, st.dictionaries(st.text(max_size=8), st.text(max_size=8)))))
def test_random_bytes_only_raise_the_protocol_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.decode_bundle_untrusted(raw, bytes(32))


# -- who may fetch ---------------------------------------------------------------------------------


class _Server:
    def __init__(self, serial: str | None = "77", enrolled: float | None = NOW) -> None:
        self.cert_serial, self.enrolled_at = serial, enrolled


def test_may_fetch_only_the_target_with_its_current_certificate() -> None:
    p = m.Pending("0123456789abcdef", "node-a", "0.0.0.0:7443", "10.0.0.7:7443", NOW)
    m.may_fetch(p, p.id, "node-a", 77, _Server())
    with pytest.raises(NotEntitled, match="not to web-1"):
        m.may_fetch(p, p.id, "web-1", 77, _Server())
    with pytest.raises(NotEntitled, match="not the pending"):
        m.may_fetch(p, "ffffffffffffffff", "node-a", 77, _Server())
    with pytest.raises(NotEntitled, match="current"):
        m.may_fetch(p, p.id, "node-a", 76, _Server())  # an older (renewed-away) certificate
    with pytest.raises(NotEntitled, match="current"):
        m.may_fetch(p, p.id, "node-a", 77, _Server("revoked:77"))
    with pytest.raises(NotEntitled, match="current"):
        m.may_fetch(p, p.id, "node-a", 77, _Server(enrolled=None))
    with pytest.raises(NotEntitled, match="no migration"):
        m.may_fetch(None, p.id, "node-a", 77, _Server())
    p.stage = "failed"
    with pytest.raises(NotEntitled, match="no migration"):
        m.may_fetch(p, p.id, "node-a", 77, _Server())


# -- the daemon's decisions ---------------------------------------------------------------------------


class _Peer:
    def __init__(self, name: str, roles: tuple[str, ...], serial: int = 77) -> None:
        self.name, self.roles, self.address = name, roles, "127.0.0.1:1"
        self.certificate = type("C", (), {"serial": serial})()


@pytest.fixture
def service(home: Path) -> Any:
    engine = Engine.open(Paths(home, home / "definitions", "default"))
    ca = CertificateAuthority.load(home / "ca.key")
    stopped: list[bool] = []
    svc = m.MigrationService(engine, ca, "127.0.0.1:7443", stop=lambda: stopped.append(True), clock=lambda: NOW)
    svc.stopped = stopped  # type: ignore[attr-defined]
    yield svc
    engine.close()
    ca.close()


def test_service_flow_freeze_redirect_and_drain(service: Any, home: Path) -> None:
    admin, target, other = _Peer("admin", ("admin",)), _Peer("node-a", ("agent",)), _Peer("web-1", ("agent",), 5)

    async def main() -> None:
        with pytest.raises(StateError, match="not an enrolled agent"):
            await service.handle(admin, "migrate.start", {"to": "web-1", "listen": "127.0.0.1:9000"})
        with pytest.raises(NotEntitled, match="admin"):
            await service.handle(other, "migrate.start", {"to": "node-a", "listen": "127.0.0.1:9000"})
        started = await service.handle(admin, "migrate.start", {"to": "node-a", "listen": "127.0.0.1:9000"})
        assert started["endpoint"] == "127.0.0.1:9000" and started["servers"] == 3
        id = started["id"]
        assert service.on_checkin("web-1") == {}
        assert service.on_checkin("node-a") == {"migrate": {"id": id, "listen": "127.0.0.1:9000", "advertise": "127.0.0.1:9000"}}
        service.check_writable("engine.set_labels")  # not frozen before the fetch
        with pytest.raises(NotEntitled):
            await service.handle(other, "migrate.fetch", {"id": id})
        with pytest.raises(StateError, match="fetch the state first"):
            await service.handle(target, "migrate.ready", {"id": id, "endpoint": "127.0.0.1:9000"})
        reply = await service.handle(target, "migrate.fetch", {"id": id})
        assert m.decode_bundle_untrusted(reply["bundle"], load_ca_public_key(home / "ca.pub")).node == "node-a"
        for method in ("enroll", "engine.set_labels", "identity.revoke", "lifecycle.plan", "secrets.publish", "onboard.register"):
            with pytest.raises(StateError, match="moving to 127.0.0.1:9000"):
                service.check_writable(method)  # writes, and methods nobody listed as reads (default deny)
        for method in ("engine.get_servers", "engine.describe_server", "lifecycle.diff", "secrets.definition", "identity.show"):
            service.check_writable(method)  # reads go on
        with pytest.raises(StateError, match="no migration ready"):
            await service.handle(admin, "migrate.finish", {"id": id, "endpoint": "127.0.0.1:9000"})
        with pytest.raises(UsageError, match="expects"):
            await service.handle(target, "migrate.ready", {"id": id, "endpoint": "10.9.9.9:1"})
        await service.handle(target, "migrate.ready", {"id": id, "endpoint": "127.0.0.1:9000"})
        assert service.on_checkin("node-a") == {}  # ready: no more instructions
        with pytest.raises(UsageError, match="not at 10.9.9.9:1"):
            await service.handle(admin, "migrate.finish", {"id": id, "endpoint": "10.9.9.9:1"})
        with pytest.raises(UsageError, match="grace"):
            await service.handle(admin, "migrate.finish", {"id": id, "endpoint": "127.0.0.1:9000", "grace": -1})
        await service.handle(admin, "migrate.finish", {"id": id, "endpoint": "127.0.0.1:9000", "grace": 5})
        assert (home / m.MOVED_FILE).exists()
        assert service.on_checkin("node-a") == {"coordinator": "127.0.0.1:9000", "moved_to": "127.0.0.1:9000"}
        assert service.drained()  # node-a is the only enrolled node, and it was redirected
        with pytest.raises(ConfigError, match="moved to 127.0.0.1:9000"):
            m.check_not_moved(home)

    trio.run(main)


def test_abort_unfreezes_and_tells_the_target(service: Any) -> None:
    admin = _Peer("admin", ("admin",))
    target = _Peer("node-a", ("agent",))

    async def main() -> None:
        id = (await service.handle(admin, "migrate.start", {"to": "node-a", "listen": "127.0.0.1:9000"}))["id"]
        await service.handle(target, "migrate.fetch", {"id": id})
        assert service.frozen
        assert (await service.handle(admin, "migrate.abort", {"id": id, "reason": "verify failed"}))["aborted"]
        assert not service.frozen
        service.check_writable("engine.set_labels")
        assert service.on_checkin("node-a") == {"migrate_abort": id}
        with pytest.raises(NotEntitled):
            await service.handle(target, "migrate.fetch", {"id": id})
        # a rerun: a fresh id, the abort marker gone for the target
        again = (await service.handle(admin, "migrate.start", {"to": "node-a", "listen": "127.0.0.1:9000"}))["id"]
        assert again != id and "migrate" in service.on_checkin("node-a")

    trio.run(main)


def test_adopt_moves_the_lab_server_label(service: Any) -> None:
    admin = _Peer("admin", ("admin",))
    service.state.set_labels("web-1", ["app", m.SERVER_LABEL])

    async def main() -> None:
        out = await service.handle(admin, "migrate.adopt", {"node": "node-a", "previous": "web-1"})
        assert out["labels"] == ["app", m.SERVER_LABEL]

    trio.run(main)
    assert m.SERVER_LABEL not in service.state.get_server("web-1").labels
    assert service.state.audit_log(1)[0].action == "coordinator.migrate"


def test_plan_refuses_the_node_it_already_runs_on(service: Any, home: Path) -> None:
    (home / m.ORIGIN_FILE).write_text('{"node": "node-a"}')
    with pytest.raises(UsageError, match="already runs on node-a"):
        service.plan("node-a", "127.0.0.1:9000", 10)


def test_update_enrollment_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "enrollment.yaml"
    path.write_text(yaml.safe_dump({"node": "web-1", "coordinator": "a:1", "stores": ["s:1"]}, sort_keys=False))
    os.chmod(path, 0o640)
    role._update_enrollment(path, coordinator="b:2")
    assert yaml.safe_load(path.read_text()) == {"node": "web-1", "coordinator": "b:2", "stores": ["s:1"]}
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert [p.name for p in tmp_path.iterdir()] == ["enrollment.yaml"]
