"""Store peers learnt from the CA-signed store directory (``_lab/stores``, published with the
policy): three `lab-agent store run` processes on 127.0.0.1 (test_store_cluster.py's
:class:`Cluster`) whose `--peer` flags do *not* name each other fully.

store-1 and store-2 know only each other; store-3 is added later with `--peer` store-1 only (and no
sealed key: it gets the key from store-1). Once the directory naming all three is published at
store-1, store-2 — never restarted — links to store-3 and pushes to it directly, and store-3 links
to store-2.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import test_store_cluster
from test_store_cluster import GRANTS, Cluster, eventually

from lab.store.node import SEALED_KEY_FILE
from lab.store.policy import sign_directory

pytestmark = pytest.mark.slow


def _start(c: Cluster, monkeypatch: pytest.MonkeyPatch, name: str, *peers: str) -> None:
    """Cluster.start with `--peer` only for ``peers`` (it names every store of STORES but itself)."""
    with monkeypatch.context() as m:
        m.setattr(test_store_cluster, "STORES", (name, *peers))
        c.start(name)


async def _linked(c: Cluster, store: str, other: str) -> bool:
    peers = (await c.call(store, "store.status"))["peers"]
    return any(p["name"] == other and p["connected"] for p in peers)


def test_a_store_added_later_is_linked_without_restarting_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(tmp_path)
    (tmp_path / "store-3" / SEALED_KEY_FILE).unlink()
    try:
        async def main() -> None:
            _start(c, monkeypatch, "store-1", "store-2")
            _start(c, monkeypatch, "store-2", "store-1")
            for name in ("store-1", "store-2"):
                await c.wait_ready(name)
            await c.publish_policy("store-1", GRANTS)  # stores: store-1..3
            pid2 = c.procs["store-2"].pid

            _start(c, monkeypatch, "store-3", "store-1")
            await c.wait_ready("store-3", timeout=40)
            assert not await _linked(c, "store-2", "store-3")  # nobody told store-2 where store-3 is
            directory = sign_directory(c.ca, {n: c.endpoint(n) for n in ("store-1", "store-2", "store-3")},
                                       version=int(time.time() * 1000), now=time.time())
            await c.call("store-1", "store.publish", {"stores": directory.encode()})
            # gossip carries the directory to store-2 and store-3; each links to the one it lacked
            await eventually(lambda: _linked(c, "store-2", "store-3"), 20, "store-2 linked to store-3")
            await eventually(lambda: _linked(c, "store-3", "store-2"), 20, "store-3 linked to store-2")
            assert c.procs["store-2"].pid == pid2  # never restarted
            st = await c.converged(20)
            assert len(st) == 3
            # a write at store-2 is pushed to store-3 directly (stop store-1: no other path)
            c.stop("store-1")
            await c.set("store-2", "db/password", b"pushed-2-to-3")
            reader = c.identity("agent-a")

            async def at_store_3() -> bool:
                try:
                    return (await c.call("store-3", "store.fetch", {"path": "db/password"}, reader))["value"] == b"pushed-2-to-3"
                except Exception:  # noqa: BLE001 - not there yet
                    return False

            await eventually(at_store_3, 10, "store-2's write at store-3")

        trio.run(main)
    finally:
        c.close()
    assert "event=store.peer_learnt name=store-3" in c.log("store-2")
    assert "event=store.peer_learnt name=store-2" in c.log("store-3")
