"""agent/sync.py without sockets: failover order, the cache conversions, and the loop's schedule
(sessions faked, time on trio's MockClock)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from lab.agent import sync
from lab.agent.cache import CacheRecord
from lab.agent.sync import StoreRotation, SyncConfig, have_from_cache, sync_loop, to_cache_records
from lab.common.errors import ConfigError, TransportError
from lab.store.records import Meta
from lab.store.serve import AgentSecret, SyncUpdate, VersionRef

STORES = ["s1:7444", "s2:7444", "s3:7444"]


def test_each_pass_tries_every_store_once_in_a_random_order() -> None:
    rot = StoreRotation(STORES, random.Random(4))
    seen = [rot.next() for _ in range(9)]
    passes = [[e for e, _ in seen[i:i + 3]] for i in (0, 3, 6)]
    assert all(sorted(p) == sorted(STORES) for p in passes)
    assert [start for _, start in seen] == [True, False, False] * 3
    assert len({tuple(p) for p in passes}) > 1  # the order changes between passes


def test_the_store_just_lost_is_tried_last() -> None:
    for seed in range(20):
        rot = StoreRotation(STORES, random.Random(seed))
        first, _ = rot.next()
        rot.lost(first)
        order = [rot.next()[0] for _ in range(3)]
        assert order[-1] == first and sorted(order) == sorted(STORES)


def test_a_single_store_is_retried() -> None:
    rot = StoreRotation(["only:1"], random.Random(0))
    rot.lost("only:1")
    assert rot.next() == ("only:1", True)


def test_duplicates_are_ignored_and_an_empty_list_refused() -> None:
    assert StoreRotation(["a:1", "a:1", "b:1"], random.Random(0)).stores == ["a:1", "b:1"]
    with pytest.raises(ConfigError):
        StoreRotation([], random.Random(0))


def test_have_holds_store_versions_only() -> None:
    recs = [
        CacheRecord("db/pw", b"x", (5, 1, "store-1")),
        CacheRecord("imported/x", b"y", b"\x01opaque"),
    ]
    assert have_from_cache(recs) == {"db/pw": VersionRef(5, 1, "store-1")}


def test_update_records_become_cache_records() -> None:
    meta = Meta.simple("op", 1, type="static", ttl=60, owner="www-data", group="www-data", mode=0o4640)
    upd = SyncUpdate((AgentSecret("web/tls", VersionRef(9, 2, "s2"), b"PEM", meta),), ("gone/x",), False)
    [rec] = to_cache_records(upd, now=100.0)
    assert (rec.path, rec.value, rec.version, rec.ttl, rec.owner, rec.mode, rec.fetched_at) == (
        "web/tls", b"PEM", (9, 2, "s2"), 60, "www-data", 0o640, 100.0)


class FakeCache:
    def __init__(self) -> None:
        self.synced = 0

    def records(self) -> list[CacheRecord]:
        return []

    def mark_synced(self, now: float | None = None) -> None:
        self.synced += 1


def test_loop_backs_off_after_a_pass_of_failures_and_resets_on_success(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[tuple[float, str]] = []
    plan = iter(["fail"] * 6 + ["ok"] + ["fail"] * 100)

    async def fake_session(endpoint: str, cache: Any, sink: Any, identity: Any, status: Any, config: Any, on_connected: Any) -> None:
        attempts.append((trio.current_time(), endpoint))
        if next(plan) == "ok":
            status.update(state="connected", store=endpoint)
            on_connected()
            await trio.sleep(5)  # a session that lasts 5 s, then is lost
        raise TransportError(f"{endpoint} down")

    monkeypatch.setattr(sync, "_session", fake_session)
    status: dict[str, Any] = {}

    async def main() -> None:
        with trio.move_on_after(20):
            await sync_loop(FakeCache(), None, STORES, status, sink=object(),  # type: ignore[arg-type]
                            config=SyncConfig(backoff_base=1.0, backoff_cap=4.0), rng=random.Random(2))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    times = [t for t, _ in attempts]
    # pass 1 at t=0 without waiting; each later pass waits the backoff; inside a pass, no waits
    assert times[0] == times[1] == times[2] == 0
    assert times[3] == times[4] == times[5] > 0
    ok_at = times[6]
    lost = attempts[6][1]
    # after the 5 s session: a short pause (≤ base), then a pass with the lost store last
    after = attempts[7:10]
    assert after[0][0] - (ok_at + 5) <= 1.0
    assert after[-1][1] == lost
    assert status["running"] is True and "down" in status["last_error"]
    assert all(v.startswith("unreachable") or v in ("not tried", "disconnected") for v in status["stores"].values())


# ---------------------------------------------------------------------------------------------
# The agent's loop against a real StoreNode handler over an in-memory RPC link (no sockets)


def test_agent_syncs_with_a_store_node_over_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import contextlib
    import time as _time

    from lab.agent.cache import SecretCache
    from lab.common import rpc
    from lab.common.identity import CertificateAuthority, NodeKey
    from lab.store.dataset import Dataset
    from lab.store.node import NodeConfig, StoreNode
    from lab.store.policy import publish, sign_policy

    ca = CertificateAuthority.generate()

    def ident(name: str, roles: list[str]) -> rpc.Identity:
        key = NodeKey.generate()
        return rpc.Identity(key, ca.issue(name, f"{name}-id", key.public_key, roles, 3600, _time.time()), ca.public_key)

    store_id, agent_id = ident("s1", ["store"]), ident("web-1", ["agent"])
    ds = Dataset.create(tmp_path / "store", "s1", durable=False)
    node = StoreNode(ds, store_id.key, store_id.certificate, ca.public_key, [], NodeConfig(heartbeat=30))
    now = int(_time.time() * 1000)
    for p in ("db/pw", "mail/key", "other/x"):
        ds.write(p, b"value of " + p.encode(), Meta.simple("op", now), now)
    publish(ds, sign_policy(ca, {"web-1": ["db/pw", "mail/key"]}, ["s1"], [], version=1, now=_time.time()), now)
    cache = SecretCache.open(tmp_path / "agent", protection="file")
    status: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as servers:
            @contextlib.asynccontextmanager
            async def fake_connect(host: str, port: int, *, identity: Any, timeout: float) -> Any:
                client, server = trio.testing.memory_stream_pair()
                servers.start_soon(rpc.Server(node.identity, node.handle).handle_connection, server)
                async with rpc.open_connection(client, identity=identity) as conn:
                    yield conn

            monkeypatch.setattr(sync.rpc, "connect", fake_connect)
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: sync_loop(cache, agent_id, ["mem:1"], status, task_status=task_status))
                with trio.fail_after(120):
                    while sorted(cache.paths()) != ["db/pw", "mail/key"]:
                        await trio.sleep(0.01)
                    assert status["state"] == "connected" and status["store_name"] == "s1"
                    synced = cache.last_sync()
                    await trio.sleep(31)  # idle: the store's heartbeat refreshes the cache
                    assert cache.last_sync() is not None and cache.last_sync() > synced
                    assert status["state"] == "connected"
                    publish(ds, sign_policy(ca, {"web-1": ["db/pw"]}, ["s1"], [], version=2, now=_time.time()), now + 1)
                    node.changes.fire()
                    while cache.paths() != ["db/pw"]:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            servers.cancel_scope.cancel()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
        assert cache.get("db/pw")[0] == b"value of db/pw"
    finally:
        cache.close()
        ds.close()


def test_the_daemon_hook_reports_an_unenrolled_agent(tmp_path: Any) -> None:
    from types import SimpleNamespace

    from lab.agent.sync import run_for_agent

    agent = SimpleNamespace(config=SimpleNamespace(home=tmp_path), sync_status={"running": False}, cache=None)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_for_agent, agent)

    trio.run(main)
    assert agent.sync_status["state"] == "not configured" and agent.sync_status["running"] is False
    assert "ca.pub" in agent.sync_status["last_error"] or "CA public key" in agent.sync_status["last_error"]
