"""Enrollment end to end over in-memory streams: the agent's enroll_over against the daemon's
handlers on a real rpc.Server (no sockets). Also the enrollment handshake mode of the session."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import yaml

from lab.agent.enroll import (
    EnrollmentFailed,
    enroll_over,
    load_agent_identity,
    local_addresses,
    read_enrollment,
    save_enrollment,
)
from lab.common import rpc
from lab.common.errors import AuthError, NotEntitled, NotFound, UsageError
from lab.common.identity import CertificateAuthority, NodeKey, mint_token
from lab.coordinator import tokens
from lab.coordinator.daemon import Coordinator
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.enrollment import EnrollmentService, load_identity, roles_for_labels

ENDPOINT = "coord.test:7443"
ADDR = ("10.0.0.9", 50000)


@dataclasses.dataclass
class Env:
    home: Path
    engine: Engine
    ca: CertificateAuthority
    service: EnrollmentService
    server: rpc.Server
    now: list[float]

    def token(self, name: str = "web-1", labels: tuple[str, ...] = ("secret-store",), ttl: int = 600) -> str:
        text, _ = tokens.create_token(self.engine.state, self.ca.fingerprint, name, labels, environment="prod", ttl=ttl, now=self.now[0])
        return text

    def connect(self, nursery: trio.Nursery, server: rpc.Server | None = None) -> trio.abc.Stream:
        client, srv = trio.testing.memory_stream_pair()
        nursery.start_soon((server or self.server).handle_connection, srv, ADDR)
        return client


@pytest.fixture
def env(tmp_path: Path) -> Any:
    paths = Paths(tmp_path / "coord", tmp_path / "coord" / "definitions", "default")
    Engine.init_local(paths)
    engine = Engine.open(paths)
    ca = CertificateAuthority.load(paths.home / "ca.key")
    now = [time.time()]
    service = EnrollmentService(engine.state, ca, endpoint=ENDPOINT, clock=lambda: now[0])
    coordinator = Coordinator(engine, service)
    server = rpc.Server(load_identity(paths.home, "coordinator"), coordinator.handle, enroll_handler=service.enroll)
    yield Env(paths.home, engine, ca, service, server, now)
    ca.close()
    engine.close()


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def run(fn: Any) -> Any:
    try:
        return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseExceptionGroup as group:  # the helpers' nurseries wrap what the call raised
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        raise exc from None


def enroll(env: Env, token: str, key: NodeKey, **kw: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            try:
                return await enroll_over(env.connect(nursery), token, key, endpoint=ENDPOINT, **kw)
            finally:
                nursery.cancel_scope.cancel()

    return run(main)  # type: ignore[no-any-return]


FACTS = {"hostname": "web-1", "nics": [{"name": "eth0", "addresses": ["10.0.0.5", "fe80::1", "127.0.0.1"]}]}


def test_enroll_success_issues_cert_for_the_agent_key(env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token()
    key = NodeKey.generate()
    reply = enroll(env, token, key, facts=FACTS, addresses=local_addresses(FACTS), endpoints={"store": "10.0.0.5:7444"})
    cert = reply["_certificate"]
    assert cert.noise_pub == key.public_key and cert.name == "web-1"
    assert cert.roles == ("agent", "store") and reply["labels"] == ["secret-store"]
    assert reply["ca_public_key"] == env.ca.public_key and reply["coordinator"] == ENDPOINT
    assert reply["stores"] == ["10.0.0.5:7444"]  # itself: the first enrolled store
    server = env.engine.state.get_server("web-1")
    assert server.enrolled_at and server.cert_serial == str(cert.serial) and server.environment == "prod"
    assert server.facts == FACTS and server.addresses == ["10.0.0.5"] and server.labels == ("secret-store",)
    assert env.engine.get_servers()[0]["identity"] == "enrolled"
    entry = env.engine.state.audit_log(5)[0]
    assert entry.action == "node.enroll" and entry.subject == "web-1"
    # the agent side writes its home
    home = tmp_path / "agent"
    done = save_enrollment(home, key, reply, ENDPOINT, now=123.0)
    assert done.node == "web-1" and done.stores == ("10.0.0.5:7444",)
    assert os.stat(home / "node.key").st_mode & 0o777 == 0o600
    assert NodeKey.load(home / "node.key").public_key == key.public_key
    doc = yaml.safe_load((home / "enrollment.yaml").read_text())
    assert doc["node"] == "web-1" and doc["coordinator"] == ENDPOINT and doc["labels"] == ["secret-store"]
    assert doc["node_id"] == cert.node_id and doc["enrolled_at"] == 123.0
    assert token.rsplit(".", 1)[1] not in caplog.text
    assert not any(p.name.startswith(".") for p in home.iterdir())  # no temp files left
    ident = load_agent_identity(home)
    assert ident.certificate == cert and ident.ca_public_key == env.ca.public_key
    assert read_enrollment(home)["stores"] == ["10.0.0.5:7444"]


def test_enroll_updates_an_existing_server(env: Env) -> None:
    env.engine.add_server("web-1", "ssh", ["app"], region="eu-west")
    enroll(env, env.token(labels=()), NodeKey.generate())
    s = env.engine.state.get_server("web-1")
    assert s.provider == "ssh" and s.labels == ("app",) and s.region == "eu-west" and s.enrolled_at


REJECTED = f"enrollment rejected by {ENDPOINT} (token expired, used, unknown or for another server)"


def _reason(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if "event=enroll.rejected" in r.getMessage()]
    assert lines, "no rejection logged"
    return lines[-1].split("reason=")[1].split()[0]


def test_reused_token_is_refused(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token()
    enroll(env, token, NodeKey.generate())
    with pytest.raises(EnrollmentFailed) as info:
        enroll(env, token, NodeKey.generate())
    assert str(info.value) == REJECTED
    assert _reason(caplog) == "used"
    assert env.engine.state.audit_log(1)[0].action == "node.enroll_rejected"
    assert token.rsplit(".", 1)[1] not in caplog.text


def test_expired_token_is_refused(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token(ttl=60)
    env.now[0] += 61
    with pytest.raises(EnrollmentFailed, match="token expired, used, unknown"):
        enroll(env, token, NodeKey.generate())
    assert _reason(caplog) == "expired"
    with pytest.raises(NotFound):
        env.engine.state.get_server("web-1")


def test_unknown_and_malformed_tokens(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    unknown, _ = mint_token(env.ca.fingerprint)
    with pytest.raises(EnrollmentFailed, match="rejected"):
        enroll(env, unknown, NodeKey.generate())
    assert _reason(caplog) == "unknown"
    with pytest.raises(UsageError, match="malformed"):  # refused before anything is sent
        enroll(env, "lab1.abc.def", NodeKey.generate())

    # a hand-made client sending garbage in the token field is refused the same way
    async def raw() -> None:
        key = NodeKey.generate()
        async with trio.open_nursery() as nursery:
            async with rpc.open_connection(env.connect(nursery), identity=rpc.Enrollee(key, env.ca.fingerprint)) as conn:
                with pytest.raises(rpc.RemoteError) as info:
                    await conn.call("enroll", {"token": "lab1.x.y", "noise_pub": key.public_key})
                assert info.value.code == "rejected" and info.value.message == "rejected"
                with pytest.raises(rpc.RemoteError):  # someone else's key: refused
                    await conn.call("enroll", {"token": env.token(), "noise_pub": NodeKey.generate().public_key})
            nursery.cancel_scope.cancel()

    run(raw)
    assert _reason(caplog) == "malformed"


def test_wrong_fingerprint_never_reaches_the_coordinator(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    other = CertificateAuthority.generate()
    # same secret store, but a token minted for another CA: the agent refuses the coordinator
    text, _ = tokens.create_token(env.engine.state, other.fingerprint, "web-1", now=env.now[0])
    with pytest.raises(EnrollmentFailed) as info:
        enroll(env, text, NodeKey.generate())
    assert str(info.value) == f"{ENDPOINT} is not the coordinator this token was minted by (fingerprint mismatch)"
    assert env.engine.state.list_tokens()[0].used_at is None
    assert "event=enroll.rejected" not in caplog.text  # no enroll request was ever sent


def test_an_enrolled_node_cannot_pose_as_the_coordinator(env: Env) -> None:
    # a store node has a certificate from the right CA, but not the coordinator role
    key = NodeKey.generate()
    cert = env.ca.issue("store-1", "store-1", key.public_key, ("agent", "store"), 3600, time.time())
    impostor = rpc.Server(rpc.Identity(key, cert, env.ca.public_key), env.server.handler, enroll_handler=env.service.enroll)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(AuthError, match="not a coordinator"):
                await enroll_over(env.connect(nursery, impostor), env.token(), NodeKey.generate(), endpoint=ENDPOINT)
            nursery.cancel_scope.cancel()

    run(main)
    assert env.engine.state.list_tokens()[0].used_at is None


def test_enrollment_needs_an_enroll_handler(env: Env) -> None:
    plain = rpc.Server(env.server.identity, env.server.handler)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(EnrollmentFailed, match="does not accept enrollment"):
                await enroll_over(env.connect(nursery, plain), env.token(), NodeKey.generate(), endpoint=ENDPOINT)
            nursery.cancel_scope.cancel()

    run(main)


def test_unauthenticated_session_may_only_enroll(env: Env) -> None:
    async def main() -> None:
        key = NodeKey.generate()
        async with trio.open_nursery() as nursery:
            async with rpc.open_connection(env.connect(nursery), identity=rpc.Enrollee(key, env.ca.fingerprint)) as conn:
                assert conn.session.ca_public_key == env.ca.public_key and conn.peer.name == "coordinator"
                for method in ("engine.get_servers", "checkin", "ping"):
                    with pytest.raises(AuthError, match="not enrolled"):
                        await conn.call(method, {})
            nursery.cancel_scope.cancel()

    run(main)


def _identity(env: Env, name: str, roles: tuple[str, ...]) -> rpc.Identity:
    key = NodeKey.generate()
    return rpc.Identity(key, env.ca.issue(name, name, key.public_key, roles, 3600, time.time()), env.ca.public_key)


def call(env: Env, identity: rpc.Identity, method: str, body: dict[str, Any]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with trio.open_nursery() as nursery:
            try:
                async with rpc.open_connection(env.connect(nursery), identity=identity) as conn:
                    return await conn.call(method, body)
            finally:
                nursery.cancel_scope.cancel()

    return run(main)  # type: ignore[no-any-return]


def test_admin_allowlist(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.engine.add_server("db-1", "ssh", ["postgres"])
    admin = load_identity(env.home, "admin")
    got = call(env, admin, "engine.get_servers", {"labels": ["postgres"]})
    assert [s["name"] for s in got["result"]] == ["db-1"]
    assert call(env, admin, "engine.show_server", {"name": "db-1"})["result"]["labels"] == ["postgres"]
    assert call(env, admin, "engine.add_server", {"name": "web-9", "provider": "ssh", "labels": ["app"]})["result"]["name"] == "web-9"
    with pytest.raises(NotFound):
        call(env, admin, "engine.close", {})  # not on the allowlist
    with pytest.raises(NotFound):
        call(env, admin, "engine.show_server", {"name": "nope"})
    for roles in ((), ("agent", "store"), ("coordinator",)):
        with pytest.raises(NotEntitled):
            call(env, _identity(env, "web-2", roles), "engine.get_servers", {})
        with pytest.raises(NotEntitled):
            call(env, _identity(env, "web-2", roles), "engine.remove_server", {"name": "db-1"})
    assert env.engine.state.get_server("db-1")
    assert "event=api.denied" in caplog.text


def test_checkin_updates_last_checkin_and_addresses(env: Env) -> None:
    key = NodeKey.generate()
    reply = enroll(env, env.token(), key, addresses=["10.0.0.5"])
    me = rpc.Identity(key, reply["_certificate"], env.ca.public_key)
    env.now[0] += 100
    out = call(env, me, "checkin", {"addresses": ["10.0.0.6"]})
    assert out["labels"] == ["secret-store"] and out["coordinator"] == ENDPOINT
    s = env.engine.state.get_server("web-1")
    assert s.addresses == ["10.0.0.6"] and s.last_checkin == env.now[0]
    assert env.engine.state.audit_log(1)[0].action == "node.addresses"
    # an older certificate for the same name is no longer accepted for check-ins
    with pytest.raises(AuthError, match="not the current one"):
        call(env, _identity(env, "web-1", ("agent",)), "checkin", {})


def test_checkin_carries_the_agents_puppet_report(env: Env) -> None:
    from lab.agent.reporters import build_report, parse_puppet_run
    from lab.coordinator.reports import puppet_pillar

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "puppet_reports" / "failed"
    run = parse_puppet_run((fixtures / "last_run_summary.yaml").read_text(), (fixtures / "last_run_report.yaml").read_text())
    key = NodeKey.generate()
    reply = enroll(env, env.token(), key)
    me = rpc.Identity(key, reply["_certificate"], env.ca.public_key)
    call(env, me, "checkin", {"report": build_report(run)})
    s = env.engine.state.get_server("web-1")
    assert puppet_pillar(s.puppet, run.time or env.now[0]) == "failed"
    with pytest.raises(UsageError):
        call(env, me, "checkin", {"report": {"puppet": "not a run"}})


def test_roles_for_labels() -> None:
    assert roles_for_labels(["app"]) == ("agent",)
    assert roles_for_labels(["secret-store", "lab-server", "secret-store"]) == ("agent", "store", "coordinator")


def test_enrollee_is_initiator_only(env: Env) -> None:
    from lab.common._rpc_session import SecureSession
    from lab.common.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        SecureSession(rpc.Enrollee(NodeKey.generate(), env.ca.fingerprint), initiator=False, now=0)
    with pytest.raises(LocalProtocolError):
        rpc.Enrollee(NodeKey.generate(), "short")


def test_an_impostor_cannot_borrow_the_public_ca_key(env: Env) -> None:
    # The CA public key is no secret: an impostor can send it in rpc.enroll_ready, but its own
    # certificate is not signed by that CA, so the pin holds.
    rogue_ca = CertificateAuthority.generate()
    key = NodeKey.generate()
    cert = rogue_ca.issue("coordinator", "coordinator", key.public_key, ("coordinator",), 3600, time.time())
    impostor = rpc.Server(rpc.Identity(key, cert, env.ca.public_key), env.server.handler, enroll_handler=env.service.enroll)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(EnrollmentFailed, match="not signed by this cluster CA"):
                await enroll_over(env.connect(nursery, impostor), env.token(), NodeKey.generate(), endpoint=ENDPOINT)
            nursery.cancel_scope.cancel()

    run(main)
    assert env.engine.state.list_tokens()[0].used_at is None


@pytest.mark.parametrize(
    "body",
    [
        {"token": None},
        {"token": 42},
        {"token": "lab1.a.b", "noise_pub": "text"},
        {"noise_pub": None, "facts": [1, 2]},
        {"addresses": "10.0.0.1"},
        {"endpoints": {"store": 5}},
        {"name": ""},
    ],
)
def test_odd_enroll_bodies_are_rejected_not_internal_errors(env: Env, body: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        key = NodeKey.generate()
        real = {"token": env.token(), "noise_pub": key.public_key}
        async with trio.open_nursery() as nursery:
            async with rpc.open_connection(env.connect(nursery), identity=rpc.Enrollee(key, env.ca.fingerprint)) as conn:
                with pytest.raises(rpc.RemoteError) as info:
                    await conn.call("enroll", {**real, **body})
                assert info.value.code == "rejected"
            nursery.cancel_scope.cancel()

    run(main)
    assert "event=rpc.handler_error" not in caplog.text
    assert env.engine.state.list_tokens()[0].used_at is None
