"""`lab identity renew|revoke|show` against a real local cluster (docs/ENROLLMENT.md, "Identity").

`lab cluster up` with 2 stores, web-1 (app) and db-1 (postgres), agents checking in every second.
Proves: renew gives web-1 a new serial that its agent picks up, confirms and keeps working with;
revoke of db-1 makes both stores and the coordinator refuse its identity, its secret leaves its
cache and secrets dir, `lab get servers` shows it revoked; without a terminal and without --yes
nothing happens; with the coordinator stopped, revoke says clearly that it cannot be done.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import cluster_cli
from cluster_cli import eventually, ok

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PG, MON = "postgres/master-password", "monitoring/api-key"


def lab(*args: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return cluster_cli.lab(*args, env={"LAB_CHECKIN_INTERVAL": "1"}, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("idcluster") / "c"
    r = lab("cluster", "up", "--dir", str(d), "--stores", "2", "--agent", "web-1=app,production",
            "--agent", "db-1=postgres,production")
    try:
        ok(r)
        yield d
    finally:
        if (d / "cluster.yaml").exists():
            ok(lab("cluster", "down", "--dir", str(d)))


def refusal(home: Path, endpoint: str, cert: bytes | None = None) -> str:
    """Connect to ``endpoint`` with the identity in ``home`` (or its key with ``cert``); the error
    text, or "" if accepted."""
    import trio

    from lab.common import rpc
    from lab.common.errors import LabError
    from lab.common.identity import Certificate, NodeKey
    from lab.store.node import load_home_identity

    identity = load_home_identity(home)
    if cert is not None:
        identity = rpc.Identity(NodeKey.load(home / "node.key"), Certificate.decode_untrusted(cert), identity.ca_public_key)
    host, port = rpc.parse_endpoint(endpoint, 7444)

    async def main() -> str:
        try:
            async with rpc.connect(host, port, identity=identity, timeout=5) as conn:
                await conn.call("ping", {}, timeout=5)
        except rpc.RemoteError:
            return ""  # the session was accepted; the method does not matter
        except (LabError, OSError) as exc:
            return str(exc)
        return ""

    return trio.run(main)


def cached_records(home: Path) -> int:
    import lmdb

    cache = home / "cache"
    if not (cache / "data.mdb").exists():
        return 0
    env = lmdb.open(str(cache), readonly=True, lock=False, max_dbs=2, subdir=True)
    try:
        try:
            db = env.open_db(b"secrets", create=False)
        except lmdb.NotFoundError:
            return 0
        with env.begin(db=db) as txn:
            return int(txn.stat(db)["entries"])
    finally:
        env.close()


def show(d: Path, node: str) -> dict:
    return dict(json.loads(ok(lab("identity", "show", node, "-o", "json", home=d / "coordinator"))))


def node_serial(d: Path, node: str) -> str:
    from lab.common.identity import Certificate

    return str(Certificate.decode_untrusted((d / node / "node.cert").read_bytes()).serial)


def test_renew_revoke_and_coordinator_down(cluster: Path) -> None:
    d = cluster
    coord = d / "coordinator"
    spec = json.loads(ok(lab("cluster", "status", "--dir", str(d), "-o", "json")))
    stores = [f"127.0.0.1:{r['port']}" for r in spec if r["role"] == "store"]
    cport = next(r["port"] for r in spec if r["role"] == "coordinator")
    assert len(stores) == 2

    ok(lab("secret", "set", PG, home=coord, stdin=b"pg-value-1"))
    ok(lab("secret", "set", MON, home=coord, stdin=b"mon-value-1"))
    eventually(lambda: lab("secret", "get", PG, home=d / "db-1").stdout == b"pg-value-1", 20, "PG on db-1")
    eventually(lambda: lab("secret", "get", MON, home=d / "web-1").stdout == b"mon-value-1", 20, "MON on web-1")
    assert any((d / "db-1" / "secrets").rglob("*"))

    # -- renew web-1: new serial, picked up at check-in, confirmed; the agent keeps working
    before = show(d, "web-1")
    old_serial = before["certificate"]["serial"]
    assert old_serial == node_serial(d, "web-1") and before["status"] == "enrolled"
    old_cert = (d / "web-1" / "node.cert").read_bytes()
    renewed = json.loads(ok(lab("identity", "renew", "web-1", "-o", "json", home=coord)))
    new_serial = renewed["serial"]
    assert new_serial != old_serial
    eventually(lambda: node_serial(d, "web-1") == new_serial, 15, "web-1's agent writing the renewed certificate")
    eventually(lambda: show(d, "web-1")["pending"] is None and show(d, "web-1")["certificate"]["serial"] == new_serial,
               15, "the coordinator confirming the renewal")
    after = show(d, "web-1")
    assert after["certificate"]["fingerprint"] == before["certificate"]["fingerprint"]  # same key
    assert after["certificate"]["not_after"] >= before["certificate"]["not_after"]
    ok(lab("secret", "set", MON, home=coord, stdin=b"mon-value-2"))
    eventually(lambda: lab("secret", "get", MON, home=d / "web-1").stdout == b"mon-value-2", 20, "rotated MON on web-1")
    assert all(refusal(d / "web-1", ep) == "" for ep in stores)
    for ep in stores:  # the old serial is revoked (serial only: the key, with the new certificate, is fine)
        eventually(lambda ep=ep: "revoked" in refusal(d / "web-1", ep, old_cert), 5, f"{ep} refusing web-1's old serial")

    # -- no terminal, no --yes: refused, nothing revoked
    r = lab("identity", "revoke", "db-1", home=coord)
    assert r.returncode != 0 and b"--yes" in r.stderr
    assert lab("secret", "get", PG, home=d / "db-1").stdout == b"pg-value-1"

    # -- revoke db-1
    out = ok(lab("identity", "revoke", "db-1", "--yes", home=coord))
    assert "revoked" in out
    for ep in stores:
        eventually(lambda ep=ep: "revoked" in refusal(d / "db-1", ep), 5, f"{ep} refusing db-1")
    assert "revoked" in refusal(d / "db-1", f"127.0.0.1:{cport}")  # the coordinator too
    eventually(lambda: lab("secret", "get", PG, home=d / "db-1").returncode != 0, 5, "db-1 no longer serving PG")
    eventually(lambda: not [p for p in (d / "db-1" / "secrets").rglob("*") if p.is_file() and p.name != ".lab-managed"], 5,
               "db-1's secrets dir without a secret file")
    eventually(lambda: cached_records(d / "db-1") == 0, 5, "db-1's cache empty")
    assert not (d / "db-1" / "cache.key").exists()
    servers = {s["name"]: s for s in json.loads(ok(lab("get", "servers", "-o", "json", home=coord)))}
    assert servers["db-1"]["identity"] == "revoked"
    assert servers["web-1"]["identity"] == "enrolled"
    assert show(d, "db-1")["certificate"]["revoked"] is True
    # web-1 is untouched
    assert all(refusal(d / "web-1", ep) == "" for ep in stores)
    assert lab("secret", "get", MON, home=d / "web-1").stdout == b"mon-value-2"

    # -- coordinator stopped: it is the CA, so revoke cannot happen, and says why
    ok(lab("cluster", "stop", "--dir", str(d), "coordinator"))
    r = lab("identity", "revoke", "web-1", "--yes", home=coord)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "coordinator daemon" in err and "nothing was changed" in err, err
    assert len(err.strip().splitlines()) == 1
    assert lab("secret", "get", MON, home=d / "web-1").stdout == b"mon-value-2"
    assert all(refusal(d / "web-1", ep) == "" for ep in stores)
