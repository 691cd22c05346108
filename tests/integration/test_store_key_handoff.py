"""A store added to a running cluster gets the dataset key over the store RPC (`store.key`), not
from a sealed file: real `lab-agent store run` processes on 127.0.0.1 (tests/integration/
test_store_cluster.py's :class:`Cluster`), store-3 started with no replica and no sealed key.

Proves: store-3 waits, asks its peers, receives the key sealed to its own node key, joins, converges
and serves an entitled agent a value written before it existed; a non-store certificate and a
store certificate the policy does not name are refused; a store certificate that was accepted is
refused once revoked (at the handshake and by the method); the key never appears in any log.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from test_store_cluster import GRANTS, STORES, Cluster, eventually

from lab.common import rpc
from lab.common.errors import AuthError, TransportError
from lab.store import keys
from lab.store.dataset import Dataset
from lab.store.node import SEALED_KEY_FILE

pytestmark = pytest.mark.slow


def test_a_new_store_gets_the_key_from_a_peer_and_serves(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    (tmp_path / "store-3" / SEALED_KEY_FILE).unlink()  # store-3 has nothing: no replica, no sealed key
    try:
        async def main() -> None:
            for name in STORES[:2]:
                c.start(name)
                await c.wait_ready(name)
            await c.publish_policy("store-1", GRANTS)  # names store-1..3 as the stores
            await c.set("store-1", "db/password", b"written-before-store-3")
            await c.converged()

            # refused: a non-store certificate, and a store certificate the policy does not name
            with pytest.raises(AuthError, match="not a store"):
                await c.call("store-1", "store.key", {}, c.identity("agent-a"))
            with pytest.raises(AuthError, match="not a store"):
                await c.call("store-1", "store.key", {}, c.admin)
            with pytest.raises(AuthError, match="current signed policy"):
                await c.call("store-2", "store.key", {}, c.identity("store-9", ["store"]))

            # a second certificate named store-3 is answered (sealed to *its* key) ... until revoked
            other = c.identity("store-3", ["store"])
            sealed = (await c.call("store-2", "store.key", {}, other))["sealed"]
            keys.open_sealed(sealed, other.key).close()
            with pytest.raises(Exception):
                keys.open_sealed(sealed, c.keys["store-3"])
            await c.revoke("store-1", other.certificate)
            await c.converged()
            for store in STORES[:2]:
                with pytest.raises((AuthError, TransportError)):
                    await c.call(store, "store.key", {}, other)

            # the real store-3 process, started as an enrolled host would be (no --peer: the store
            # list of its enrollment, itself included): waits for the key, asks a peer, joins,
            # converges, serves
            c.start("store-3", peers_from_enrollment=True)
            await c.wait_ready("store-3", timeout=40)
            st = await c.converged(20)
            assert len(st) == 3 and st["store-3"]["records"] == st["store-1"]["records"]
            reader = c.identity("agent-a")
            got = await c.call("store-3", "store.fetch", {"path": "db/password"}, reader)
            assert got["value"] == b"written-before-store-3"
            # and it takes part: a write at store-3 reaches the others
            await c.set("store-3", "db/password", b"written-at-store-3")

            async def at_store_1() -> bool:
                return (await c.call("store-1", "store.fetch", {"path": "db/password"}, reader))["value"] == b"written-at-store-3"

            await eventually(at_store_1, 10, "store-3's write at store-1")

        trio.run(main)
    finally:
        c.close()
    log3 = c.log("store-3")
    assert "event=store.waiting_for_key" in log3 and "event=store.key_received" in log3, log3[-2000:]
    assert "event=store.peer_is_self" in log3 and "event=store.peer_up" in log3, log3[-2000:]
    assert not (tmp_path / "store-3" / SEALED_KEY_FILE).exists()
    handed = c.log("store-1") + c.log("store-2")
    assert "event=store.key_handed name=store-3" in handed
    assert "event=store.key_refused name=agent-a" in handed and "event=store.key_refused name=store-9" in handed
    # the dataset key never appears in a log, in any encoding
    with Dataset.open(tmp_path / "store-1" / "store", "store-1") as ds, ds.export_key() as key:
        raw = key.bytes()
    import base64

    logs = "".join(c.log(n) for n in STORES)
    for form in (raw.hex(), base64.b64encode(raw).decode(), repr(raw)):
        assert form not in logs
    assert time.time() > 0
