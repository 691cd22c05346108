"""lab.common.rpc and its sans-IO session: two real endpoints over in-memory streams, no sockets.

Timeouts run on ``MockClock(autojump_threshold=0)``: when every task waits, time jumps ahead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from lab.common import rpc, wire
from lab.common._rpc_session import NEED_DATA, PeerAuthenticated, SecureSession, SessionState
from lab.common.errors import (
    AuthError,
    LabError,
    LocalProtocolError,
    NotFound,
    NotEntitled,
    RemoteProtocolError,
    TransportError,
)
from lab.common.identity import CertificateAuthority, NodeKey, RevocationList

ADDR = ("10.0.0.7", 40000)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@dataclasses.dataclass
class Cluster:
    ca: CertificateAuthority
    other_ca: CertificateAuthority

    def identity(
        self,
        name: str,
        roles: tuple[str, ...] = (),
        *,
        ca: CertificateAuthority | None = None,
        not_before: float | None = None,
        lifetime: int = 3600,
        serial: int | None = None,
        revocations: RevocationList | None = None,
        key: NodeKey | None = None,
    ) -> rpc.Identity:
        key = key or NodeKey.generate()
        issuer = ca or self.ca
        cert = issuer.issue(name, name, key.public_key, roles, lifetime, time.time() if not_before is None else not_before, serial=serial)
        return rpc.Identity(key, cert, self.ca.public_key, revocations)


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return Cluster(CertificateAuthority.generate(), CertificateAuthority.generate())


@pytest.fixture(scope="module")
def server_id(cluster: Cluster) -> rpc.Identity:
    return cluster.identity("coord-1", ("lab-server",))


@pytest.fixture(scope="module")
def client_id(cluster: Cluster) -> rpc.Identity:
    return cluster.identity("web-1")


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def echo_handler(peer: rpc.PeerInfo, req: wire.Request) -> Any:
    if req.method == "echo":
        return {"peer": peer.name, "roles": list(peer.roles), **req.body}
    if req.method == "sleep":
        await trio.sleep(req.body["s"])
        return {"slept": req.body["s"]}
    if req.method == "count":

        async def items() -> Any:
            for i in range(req.body["n"]):
                yield {"i": i}

        return items()
    if req.method == "missing":
        raise NotFound(f"no server named {req.body.get('name')!r}")
    if req.method == "forbidden":
        raise NotEntitled("not yours")
    if req.method == "boom":
        raise ZeroDivisionError("secret-ish internals")
    if req.method == "bad_body":
        return {"x": object()}
    raise NotFound(f"no method {req.method}")


def start_server(
    nursery: trio.Nursery, identity: rpc.Identity, handler: rpc.Handler = echo_handler, limits: rpc.ServerLimits = rpc.ServerLimits(), server: rpc.Server | None = None
) -> tuple[rpc.Server, trio.abc.Stream]:
    server = server or rpc.Server(identity, handler, limits)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_stream, ADDR)
    return server, client_stream


def rpc_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lab.rpc"]


@pytest.fixture(autouse=True)
def _rpc_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lab.rpc")


# ---------------------------------------------------------------------------------------------
# Requests, streams, multiplexing


def test_call_roundtrip_and_peer_identity(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id, expected_name="coord-1") as conn:
                assert conn.peer.name == "coord-1" and conn.peer.roles == ("lab-server",)
                assert await conn.call("echo", {"x": 1}) == {"peer": "web-1", "roles": [], "x": 1}
                assert await conn.call("echo") == {"peer": "web-1", "roles": []}
            nursery.cancel_scope.cancel()

    run(main)
    lines = rpc_lines(caplog)
    assert any(line.startswith("event=rpc.connected peer=10.0.0.7:40000 name=web-1") for line in lines)
    assert any(line.startswith("event=rpc.closed") and 'reason="peer closed"' in line for line in lines)


def test_stream(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                assert [x async for x in conn.stream("count", {"n": 5})] == [{"i": i} for i in range(5)]
                assert [x async for x in conn.stream("count", {"n": 0})] == []
                # plain calls still work between streams
                assert (await conn.call("echo", {"y": 2}))["y"] == 2
            nursery.cancel_scope.cancel()

    run(main)


def test_stream_async_generator_handler_and_early_exit(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    closed = trio.Event()

    async def handler(peer: rpc.PeerInfo, req: wire.Request) -> Any:
        try:
            for i in range(10**6):
                yield {"i": i}
                await trio.sleep(0)
        finally:
            closed.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id, handler)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                async with conn.stream("endless") as items:
                    async for item in items:
                        if item["i"] == 3:
                            break
                with trio.fail_after(5):
                    await closed.wait()  # the Cancel reached the server and closed the generator
                # the connection is still good
                got = []
                async for item in conn.stream("again"):
                    got.append(item)
                    if len(got) == 2:
                        break
                assert got == [{"i": 0}, {"i": 1}]
            nursery.cancel_scope.cancel()

    run(main)


def test_concurrent_calls_are_multiplexed(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    async def main() -> None:
        results: dict[int, dict[str, Any]] = {}
        finished: list[int] = []
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:

                async def one(i: int) -> None:
                    results[i] = await conn.call("sleep", {"s": 20 - i}, timeout=None)
                    finished.append(i)

                start = trio.current_time()
                async with trio.open_nursery() as calls:
                    for i in range(20):
                        calls.start_soon(one, i)
                assert trio.current_time() - start < 25  # concurrent, not one after another
            nursery.cancel_scope.cancel()
        assert {i: r["slept"] for i, r in results.items()} == {i: 20 - i for i in range(20)}
        assert finished == sorted(finished, reverse=True)  # answered out of order, each to its caller

    run(main)


def test_large_messages_are_chunked(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    blob = os.urandom(1 << 20)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                body = await conn.call("echo", {"blob": blob, "tail": "x"})
                assert body["blob"] == blob and body["tail"] == "x"
            nursery.cancel_scope.cancel()

    run(main)


def test_oversize_message_disconnects(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        limits = rpc.ServerLimits(max_message=64 * 1024)
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id, limits=limits)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                with pytest.raises(TransportError):
                    await conn.call("echo", {"blob": bytes(200 * 1024)})
            nursery.cancel_scope.cancel()

    run(main)
    assert any("event=rpc.disconnected" in line and "exceeds" in line for line in rpc_lines(caplog))


# ---------------------------------------------------------------------------------------------
# Error responses


def test_error_responses_keep_the_connection(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                with pytest.raises(NotFound) as nf:
                    await conn.call("missing", {"name": "db-9"})
                assert isinstance(nf.value, rpc.RemoteError) and nf.value.code == "not-found"
                assert str(nf.value) == "no server named 'db-9'"
                with pytest.raises(NotEntitled):
                    await conn.call("forbidden")
                with pytest.raises(rpc.RemoteError) as internal:
                    await conn.call("boom")
                assert internal.value.code == "internal" and "secret" not in str(internal.value)
                with pytest.raises(rpc.RemoteError) as bad:
                    await conn.call("bad_body")
                assert bad.value.code == "internal"
                assert (await conn.call("echo", {"ok": True}))["ok"] is True
            nursery.cancel_scope.cancel()

    run(main)
    errors = [r for r in caplog.records if r.name == "lab.rpc" and r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.getMessage().startswith("event=rpc.handler_error") for r in errors)
    assert errors[0].exc_info is not None


def test_stream_error_after_items(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    async def handler(peer: rpc.PeerInfo, req: wire.Request) -> Any:
        yield {"i": 0}
        if req.method == "lab":
            raise NotFound("gone")
        raise RuntimeError("bug")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id, handler)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                got: list[Any] = []
                with pytest.raises(NotFound):
                    async for item in conn.stream("lab"):
                        got.append(item)
                assert got == [{"i": 0}]
                with pytest.raises(rpc.RemoteError) as exc:
                    async for item in conn.stream("bug"):
                        pass
                assert exc.value.code == "internal"
            nursery.cancel_scope.cancel()

    run(main)


def test_call_timeout_cancels_on_server(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    cancelled = trio.Event()

    async def handler(peer: rpc.PeerInfo, req: wire.Request) -> Any:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id, handler)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                with pytest.raises(TransportError, match="no answer within 5 s"):
                    await conn.call("hang", timeout=5)
                with trio.fail_after(1):
                    await cancelled.wait()
            nursery.cancel_scope.cancel()

    run(main)


def test_bad_method_is_a_local_error(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                with pytest.raises(LocalProtocolError):
                    await conn.call("Not A Method")
                assert (await conn.call("echo"))["peer"] == "web-1"
            nursery.cancel_scope.cancel()

    run(main)


# ---------------------------------------------------------------------------------------------
# Certificates: every failure, on both sides

CERT_CASES = ["wrong-ca", "expired", "not-yet-valid", "revoked-serial", "revoked-key", "key-mismatch", "garbage-cert"]


def bad_identity(cluster: Cluster, case: str, name: str, roles: tuple[str, ...]) -> tuple[rpc.Identity, RevocationList | None]:
    """An identity with a certificate the other side must refuse, and the CRL that side holds."""
    now = time.time()
    if case == "wrong-ca":
        return cluster.identity(name, roles, ca=cluster.other_ca), None
    if case == "expired":
        return cluster.identity(name, roles, not_before=now - 7200, lifetime=3600), None
    if case == "not-yet-valid":
        return cluster.identity(name, roles, not_before=now + 7200), None
    if case == "revoked-serial":
        crl = cluster.ca.revocation_list(1, now, serials=[424242])
        return cluster.identity(name, roles, serial=424242), crl
    if case == "revoked-key":
        key = NodeKey.generate()
        crl = cluster.ca.revocation_list(1, now, keys=[key.public_key])
        return cluster.identity(name, roles, key=key), crl
    if case == "key-mismatch":  # a valid certificate, but for another key than the handshake's
        ident = cluster.identity(name, roles)
        stolen = cluster.identity("victim", roles).certificate
        object.__setattr__(ident, "certificate_bytes", stolen.encode())
        return ident, None
    if case == "garbage-cert":
        ident = cluster.identity(name, roles)
        object.__setattr__(ident, "certificate_bytes", b"\x92\xc4\x01x\xc4\x01y")
        return ident, None
    raise AssertionError(case)


@pytest.mark.parametrize("case", CERT_CASES)
def test_server_refuses_bad_client_certificate(cluster: Cluster, case: str, caplog: pytest.LogCaptureFixture) -> None:
    bad, crl = bad_identity(cluster, case, "intruder", ())
    server = cluster.identity("coord-1", ("lab-server",), revocations=crl)
    good = cluster.identity("web-2")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            srv, stream = start_server(nursery, server)
            with pytest.raises(AuthError, match="peer refused our certificate"):
                async with rpc.open_connection(stream, identity=bad):
                    pass
            # the same server keeps serving others
            _, stream2 = start_server(nursery, server, server=srv)
            async with rpc.open_connection(stream2, identity=good) as conn:
                assert (await conn.call("echo"))["peer"] == "web-2"
            assert srv.authenticated == 1
            nursery.cancel_scope.cancel()

    run(main)
    rejected = [line for line in rpc_lines(caplog) if line.startswith("event=rpc.rejected")]
    assert len(rejected) == 1 and "peer=10.0.0.7:40000" in rejected[0] and "reason=" in rejected[0]


@pytest.mark.parametrize("case", CERT_CASES)
def test_client_refuses_bad_server_certificate(cluster: Cluster, case: str) -> None:
    bad, crl = bad_identity(cluster, case, "coord-1", ("lab-server",))
    client = cluster.identity("web-1", revocations=crl)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            srv, stream = start_server(nursery, bad)
            with pytest.raises(AuthError):
                async with rpc.open_connection(stream, identity=client):
                    pass
            assert srv.authenticated == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_client_pins_the_server_name(cluster: Cluster, server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            with pytest.raises(AuthError, match="expected 'coord-2'"):
                async with rpc.open_connection(stream, identity=client_id, expected_name="coord-2"):
                    pass
            nursery.cancel_scope.cancel()

    run(main)


def test_revocation_provider_is_asked_at_each_handshake(cluster: Cluster) -> None:
    client = cluster.identity("web-3")
    current: list[RevocationList | None] = [None]
    server = dataclasses.replace(cluster.identity("coord-1"), revocations=lambda: current[0])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            srv, stream = start_server(nursery, server)
            async with rpc.open_connection(stream, identity=client) as conn:
                await conn.call("echo")
            current[0] = cluster.ca.revoke(None, [client.certificate], time.time())
            _, stream = start_server(nursery, server, server=srv)
            with pytest.raises(AuthError, match="revoked"):
                async with rpc.open_connection(stream, identity=client):
                    pass
            nursery.cancel_scope.cancel()

    run(main)


def test_identity_refuses_a_certificate_for_another_key(cluster: Cluster) -> None:
    ident = cluster.identity("web-1")
    with pytest.raises(LocalProtocolError):
        rpc.Identity(NodeKey.generate(), ident.certificate, cluster.ca.public_key)


# ---------------------------------------------------------------------------------------------
# Hostile peers at the byte level


async def raw_peer(server_id: rpc.Identity, limits: rpc.ServerLimits, act: Callable[[trio.abc.Stream], Awaitable[None]]) -> rpc.Server:
    async with trio.open_nursery() as nursery:
        srv, stream = start_server(nursery, server_id, limits=limits)
        await act(stream)
        with trio.fail_after(limits.handshake_timeout + 5):
            while srv.connections:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return srv


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00", b"\xff\xff" + os.urandom(100), b"\x00\x05hello", b"\x00\x20" + os.urandom(32) + b"\x00\x10" + os.urandom(16), os.urandom(5000)],
    ids=["zero-length", "partial-max", "short-msg1", "random-after-msg1", "random"],
)
def test_garbage_bytes_disconnect(server_id: rpc.Identity, garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    limits = rpc.ServerLimits(handshake_timeout=10)

    async def act(stream: trio.abc.Stream) -> None:
        await stream.send_all(garbage)
        # the server answers or closes; either way it never authenticates us
        with trio.move_on_after(20):
            while await stream.receive_some(65536):
                pass

    srv = run(lambda: raw_peer(server_id, limits, act))
    assert srv.authenticated == 0
    assert any(line.startswith("event=rpc.rejected") for line in rpc_lines(caplog))


def test_truncated_handshake_and_timeout(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    msg1 = SecureSession(client_id, initiator=True, now=time.time())
    msg1.initiate()
    first = msg1.data_to_send()

    async def truncated(stream: trio.abc.Stream) -> None:
        await stream.send_all(first[:20])
        await stream.send_eof() if hasattr(stream, "send_eof") else await stream.aclose()

    run(lambda: raw_peer(server_id, rpc.ServerLimits(), truncated))
    assert any("event=rpc.rejected" in line and "during the handshake" in line for line in rpc_lines(caplog))

    caplog.clear()

    async def stall(stream: trio.abc.Stream) -> None:  # slowloris: half a frame, then nothing
        await stream.send_all(first[:20])

    async def main() -> float:
        start = trio.current_time()
        await raw_peer(server_id, rpc.ServerLimits(handshake_timeout=7), stall)
        return trio.current_time() - start

    elapsed = run(main)
    assert 7 <= elapsed < 8
    assert any("event=rpc.rejected" in line and 'reason="handshake timeout"' in line for line in rpc_lines(caplog))


def test_client_handshake_timeout(client_id: rpc.Identity) -> None:
    async def main() -> None:
        client_stream, _server_stream = trio.testing.memory_stream_pair()  # nobody answers
        with pytest.raises(TransportError, match="timed out"):
            async with rpc.open_connection(client_stream, identity=client_id, timeout=3):
                pass

    run(main)


def test_idle_timeout(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        limits = rpc.ServerLimits(idle_timeout=60)
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id, limits=limits)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                await conn.call("sleep", {"s": 100}, timeout=None)  # busy is not idle
                await trio.sleep(59)
                await conn.call("echo")
                await trio.sleep(61)
                with pytest.raises(TransportError):
                    await conn.call("echo")
                assert conn.closed
            nursery.cancel_scope.cancel()

    run(main)
    assert any("event=rpc.closed" in line and 'reason="idle timeout"' in line for line in rpc_lines(caplog))


class Tamper(trio.abc.Stream):
    """Passes bytes through; when armed, flips one bit in the next write."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.armed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.armed and data:
            self.armed = False
            b = bytearray(data)
            b[-1] ^= 0x01
            data = bytes(b)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_tampered_ciphertext_disconnects(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            tamper = Tamper(stream)
            async with rpc.open_connection(tamper, identity=client_id) as conn:
                assert (await conn.call("echo"))["peer"] == "web-1"
                tamper.armed = True
                with pytest.raises(TransportError):
                    await conn.call("echo")
            nursery.cancel_scope.cancel()

    run(main)
    assert any("event=rpc.disconnected" in line and "transport message" in line for line in rpc_lines(caplog))


def test_replayed_handshake_is_refused(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    """Capture a good client's handshake bytes, replay them on a new connection: refused."""
    captured: list[bytes] = []

    class Recorder(Tamper):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            captured.append(bytes(data))
            await self.inner.send_all(data)

    async def replay(stream: trio.abc.Stream) -> None:
        await stream.send_all(captured[0])
        await stream.receive_some(65536)  # a fresh message 2
        await stream.send_all(captured[1])
        with trio.move_on_after(20):
            while await stream.receive_some(65536):
                pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(Recorder(stream), identity=client_id) as conn:
                await conn.call("echo")
            nursery.cancel_scope.cancel()
        srv = await raw_peer(server_id, rpc.ServerLimits(), replay)
        assert srv.authenticated == 0

    run(main)
    rejected = [line for line in rpc_lines(caplog) if line.startswith("event=rpc.rejected")]
    assert len(rejected) == 1


# ---------------------------------------------------------------------------------------------
# Limits


def test_in_flight_limit_stops_reading(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    release = trio.Event()
    running = 0
    most = 0

    async def handler(peer: rpc.PeerInfo, req: wire.Request) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return {"n": req.body["n"]}

    async def main() -> None:
        limits = rpc.ServerLimits(max_in_flight=3)
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id, handler, limits=limits)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                results: list[int] = []

                async def one(n: int) -> None:
                    results.append((await conn.call("wait", {"n": n}, timeout=None))["n"])

                async with trio.open_nursery() as calls:
                    for n in range(10):
                        calls.start_soon(one, n)
                    await trio.sleep(30)
                    assert running == 3  # the other 7 requests are not even read yet
                    release.set()
                assert sorted(results) == list(range(10))
            nursery.cancel_scope.cancel()
        assert most == 3

    run(main)


def test_connection_limits(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        srv = rpc.Server(server_id, echo_handler, rpc.ServerLimits(max_connections=3, max_connections_per_ip=2))
        async with trio.open_nursery() as nursery:

            def start(ip: str) -> trio.abc.Stream:
                c, s = trio.testing.memory_stream_pair()
                nursery.start_soon(srv.handle_connection, s, (ip, 1))
                return c

            async with rpc.open_connection(start("10.0.0.1"), identity=client_id) as a:
                async with rpc.open_connection(start("10.0.0.1"), identity=client_id) as b:
                    with pytest.raises(TransportError):  # third from the same address
                        async with rpc.open_connection(start("10.0.0.1"), identity=client_id):
                            pass
                    async with rpc.open_connection(start("10.0.0.2"), identity=client_id) as c:
                        with pytest.raises(TransportError):  # fourth in all
                            async with rpc.open_connection(start("10.0.0.3"), identity=client_id):
                                pass
                        for conn in (a, b, c):
                            await conn.call("echo")
            # slots free again once connections end
            for _ in range(100):
                if not srv.connections:
                    break
                await trio.sleep(0.01)
            async with rpc.open_connection(start("10.0.0.1"), identity=client_id) as d:
                await d.call("echo")
            nursery.cancel_scope.cancel()

    run(main)
    refused = [line for line in rpc_lines(caplog) if line.startswith("event=rpc.refused")]
    assert any("reason=max-connections-per-ip" in line for line in refused)
    assert any("reason=max-connections " in line + " " for line in refused)


def test_limits_are_validated() -> None:
    with pytest.raises(LabError):
        rpc.ServerLimits(max_in_flight=0)
    with pytest.raises(LabError):
        rpc.ServerLimits(idle_timeout=-1)
    assert rpc.ServerLimits().handshake_timeout == rpc.DEFAULT_HANDSHAKE_TIMEOUT


# ---------------------------------------------------------------------------------------------
# The sans-IO session alone


def pump(a: SecureSession, b: SecureSession) -> list[Any]:
    """Move bytes both ways until quiet; return the events seen (a's then b's)."""
    events: list[Any] = []
    for _ in range(10):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                dst.receive_data(data)
            while (ev := dst.next_event()) is not NEED_DATA:
                events.append(ev)
        if not moved:
            break
    return events


def test_session_state_machine(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    now = time.time()
    client = SecureSession(client_id, initiator=True, now=now)
    server = SecureSession(server_id, initiator=False, now=now)
    with pytest.raises(LocalProtocolError, match="send.*START"):
        client.send(wire.Cancel(id=1))
    with pytest.raises(LocalProtocolError, match="responder cannot handle 'initiate'"):
        server.initiate()
    client.initiate()
    with pytest.raises(LocalProtocolError):
        client.initiate()
    events = pump(client, server)
    assert [type(e) for e in events] == [PeerAuthenticated, PeerAuthenticated]
    assert client.state is server.state is SessionState.OPEN
    assert client.peer is not None and server.peer is not None
    assert client.peer.handshake_hash == server.peer.handshake_hash
    assert client.peer.name == "coord-1" and server.peer.name == "web-1"

    # transport both ways, with a chunked message
    server.receive_data(client.send(wire.Request(id=1, method="a.b", body={"x": bytes(100_000)})))
    ev = server.next_event()
    assert isinstance(ev, wire.Request) and ev.body["x"] == bytes(100_000)
    client.receive_data(server.send(wire.Response.success(1, {"ok": 1})))
    assert client.next_event() == wire.Response.success(1, {"ok": 1})

    # a responder-only message from the initiator is refused
    client._allowed = (wire.Response,)  # (bypass our own side's check by sending raw)
    server.receive_data(client._encrypt_message(wire.Response.success(2, {})))
    with pytest.raises(RemoteProtocolError, match="unexpected message rpc.response"):
        server.next_event()
    assert server.state is SessionState.FAILED
    with pytest.raises(LocalProtocolError):
        server.next_event()


def test_session_tampered_frame(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    now = time.time()
    client = SecureSession(client_id, initiator=True, now=now)
    server = SecureSession(server_id, initiator=False, now=now)
    client.initiate()
    pump(client, server)
    data = bytearray(client.send(wire.Cancel(id=1)))
    data[5] ^= 0x80
    server.receive_data(bytes(data))
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_session_eof(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    now = time.time()
    client = SecureSession(client_id, initiator=True, now=now)
    server = SecureSession(server_id, initiator=False, now=now)
    client.initiate()
    pump(client, server)
    data = client.send(wire.Cancel(id=1))
    server.receive_data(data[:-3])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        server.next_event()

    early = SecureSession(server_id, initiator=False, now=now)
    early.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        early.next_event()


def test_logs_hold_no_key_material(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lab.rpc")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                await conn.call("echo")
            nursery.cancel_scope.cancel()

    run(main)
    text = caplog.text
    for ident in (server_id, client_id):
        secret = ident.key.private_bytes()
        assert secret.hex() not in text and repr(secret)[2:-1] not in text
    assert "Identity" not in repr(client_id) or "key=" in repr(client_id)


def test_peer_that_stops_reading_is_dropped(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    """Sends are bounded: a peer that stops reading is disconnected after send_timeout."""

    async def handler(peer: rpc.PeerInfo, req: wire.Request) -> Any:
        for i in range(10**6):
            yield {"i": i, "pad": bytes(1000)}

    async def main() -> None:
        limits = rpc.ServerLimits(send_timeout=15)
        srv = rpc.Server(server_id, handler, limits)
        client_stream, server_stream = trio.testing.lockstep_stream_pair()  # no buffering at all
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.handle_connection, server_stream, ADDR)
            async with rpc.open_connection(client_stream, identity=client_id) as conn:
                items = conn.stream("flood", buffer=1)
                assert (await items.__anext__())["i"] == 0
                await trio.sleep(100)  # never read again: the client's buffer fills, TCP would push back
                await items.aclose()  # frees the client's reader, which now finds the server gone
                with pytest.raises(TransportError):
                    await conn.call("echo")
            nursery.cancel_scope.cancel()

    run(main)
    assert any("event=rpc.disconnected" in line and "did not read for 15 s" in line for line in rpc_lines(caplog))


def test_revocation_cuts_an_existing_connection(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    client = cluster.identity("web-4")
    current: list[RevocationList | None] = [None]
    server = dataclasses.replace(cluster.identity("coord-1"), revocations=lambda: current[0])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server)
            async with rpc.open_connection(stream, identity=client) as conn:
                await conn.call("echo")
                current[0] = cluster.ca.revoke(None, [client.certificate], time.time())
                with pytest.raises(TransportError, match="auth-failed.*revoked"):
                    await conn.call("echo")
                assert conn.closed
            nursery.cancel_scope.cancel()

    run(main)
    assert any(line.startswith("event=rpc.rejected") and "revoked" in line for line in rpc_lines(caplog))


def test_aclose_inside_the_block_does_not_cancel_the_caller(server_id: rpc.Identity, client_id: rpc.Identity) -> None:
    async def main() -> list[str]:
        steps = []
        async with trio.open_nursery() as nursery:
            _, stream = start_server(nursery, server_id)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                await conn.call("echo")
                await conn.aclose()
                await trio.sleep(1)  # would raise Cancelled if aclose had cancelled our scope
                steps.append("after aclose")
                with pytest.raises(TransportError):
                    await conn.call("echo")
            steps.append("after block")
            nursery.cancel_scope.cancel()
        return steps

    assert run(main) == ["after aclose", "after block"]


def test_a_bug_in_one_connection_does_not_stop_the_server(server_id: rpc.Identity, client_id: rpc.Identity, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = rpc._ServerConnection._handshake

    async def buggy(self: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("simulated bug")
        return await real(self)

    monkeypatch.setattr(rpc._ServerConnection, "_handshake", buggy)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            srv, stream = start_server(nursery, server_id)
            with pytest.raises(TransportError):
                async with rpc.open_connection(stream, identity=client_id):
                    pass
            _, stream = start_server(nursery, server_id, server=srv)
            async with rpc.open_connection(stream, identity=client_id) as conn:
                await conn.call("echo")
            nursery.cancel_scope.cancel()

    run(main)
    assert any(line.startswith("event=rpc.internal_error") for line in rpc_lines(caplog))


def test_unauthenticated_peer_cannot_make_us_buffer_a_large_frame(server_id: rpc.Identity, caplog: pytest.LogCaptureFixture) -> None:
    async def act(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"\xff\xff" + bytes(100))  # announces 65535 bytes, sends 100
        with trio.move_on_after(20):
            while await stream.receive_some(65536):
                pass

    async def main() -> float:
        start = trio.current_time()
        await raw_peer(server_id, rpc.ServerLimits(), act)
        return trio.current_time() - start

    assert run(main) < 1  # refused on the header, not after a timeout
    assert any("event=rpc.rejected" in line and "frame length 65535" in line for line in rpc_lines(caplog))


def test_log_fields_cannot_forge_lines() -> None:
    assert rpc._fmt("a\nevent=rpc.connected x") == '"a?event=rpc.connected x"'
    assert rpc._fmt('say "hi"') == '"say \\"hi\\""'
    assert rpc._fmt("plain") == "plain"


def test_log_event_writes_one_line_on_the_given_logger(caplog: pytest.LogCaptureFixture) -> None:
    other = logging.getLogger("lab.test-events")
    caplog.set_level(logging.INFO, logger="lab.test-events")
    rpc.log_event(other, logging.INFO, "thing.done", peer="a b", name=None, n=3)
    rpc.log_event(other, logging.DEBUG, "thing.hidden", n=1)  # below the level: not formatted at all
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("lab.test-events", 'event=thing.done peer="a b" n=3')]


@given(st.lists(st.binary(max_size=300), max_size=6), st.booleans())
def test_random_bytes_only_raise_protocol_errors(server_id: rpc.Identity, client_id: rpc.Identity, chunks: list[bytes], after_handshake: bool) -> None:
    """Whatever arrives, in any state, a session raises RemoteProtocolError/AuthError or waits."""
    now = time.time()
    server = SecureSession(server_id, initiator=False, now=now)
    if after_handshake:
        client = SecureSession(client_id, initiator=True, now=now)
        client.initiate()
        pump(client, server)
        assert server.state is SessionState.OPEN
    try:
        for chunk in chunks:
            server.receive_data(chunk or b"x")
            while server.next_event() is not NEED_DATA:
                pass
    except (RemoteProtocolError, AuthError):
        assert server.state is SessionState.FAILED
