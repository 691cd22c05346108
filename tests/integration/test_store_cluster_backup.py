"""`lab secret audit|backup|recover` against a real local cluster (`lab cluster up`: coordinator,
2 stores, agent db-1), and the total disaster: every store wiped, new stores, recovery from the
Git backup alone, agents served again.

Proves: audit reads which paths are set from the stores; the backup is made by a store (values
age-encrypted there) and written and committed by the CLI in the local layout, the stock `age`
binary decrypts it, an unchanged backup commits nothing and a changed value rewrites only its own
file; `store.backup` refuses agent and store certificates; after both stores lose their replicas
and a new dataset (new key) is started, `lab secret recover` brings every value back with its
metadata, the second store joins through the key handoff, both converge, and db-1 is served again —
including a secret it only becomes entitled to by a relabel after the disaster (republished
automatically). No command's output and no log holds a value.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyrage
import pytest
import trio
from cluster_cli import eventually, lab, ok, running_cluster
from test_store_backup_git import need

from lab.common import rpc
from lab.common.errors import AuthError
from lab.coordinator.enrollment import load_identity
from lab.store.dataset import Dataset
from lab.store.node import load_home_identity

pytestmark = pytest.mark.slow

PG = "postgres/master-password"
RELAY = "mail/relay-credentials"
CERT = "tls/node-cert"
VALUES = (b"pg-value-1", b"pg-value-2", b"relay-value-1", b"cert-value-db-1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("bkcluster") / "c", "--stores", "2", "--agent", "db-1=postgres") as d:
        yield d


def _call(port: int, identity: rpc.Identity, method: str, body: dict) -> dict:
    async def main() -> dict:
        async with rpc.connect("127.0.0.1", port, identity=identity, timeout=5) as conn:
            return dict(await conn.call(method, body, timeout=15))

    return trio.run(main)


def _port(d: Path, node: str) -> int:
    import yaml

    spec = yaml.safe_load((d / "cluster.yaml").read_text())
    return next(p["port"] for n in spec["nodes"] if n["name"] == node for p in n["processes"] if p["role"] == "store")


def test_audit_backup_and_total_disaster_recovery(cluster: Path, tmp_path: Path) -> None:
    age = need("age")
    git = need("git")
    d, coord = cluster, cluster / "coordinator"
    ident = pyrage.x25519.Identity.generate()
    idfile = tmp_path / "backup-identity.txt"
    idfile.write_text(f"# lab backup identity\n{ident}\n")
    os.chmod(idfile, 0o600)
    recipient = str(ident.to_public())
    bk = tmp_path / "backup"
    outputs: list[str] = []

    def run(*args: str, stdin: bytes = b"") -> str:
        r = lab(*args, home=coord, stdin=stdin)
        outputs.append(r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace"))
        return ok(r)

    def agent_value(path: str) -> bytes | None:
        r = lab("secret", "get", path, home=d / "db-1")
        return r.stdout if r.returncode == 0 else None

    def audit() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for f in json.loads(run("secret", "audit", "-o", "json"))["findings"]:
            found.setdefault(f["kind"], set()).add(f["path"])
        return found

    # audit reads the stores: PG is referenced (db-1 carries postgres) and never set ...
    assert PG in audit().get("never-set", set())
    run("secret", "set", PG, stdin=VALUES[0])
    run("secret", "set", RELAY, stdin=VALUES[2])  # nobody carries mailserver yet
    run("secret", "set", CERT, "--node", "db-1", stdin=VALUES[3])
    eventually(lambda: agent_value(PG) == VALUES[0], 20, "PG on db-1")
    # ... and once set it is no longer "never set"; RELAY has a value though no server uses it
    found = audit()
    assert PG not in found.get("never-set", set()) and not (coord / "store").exists()

    # backup from the cluster: files in the local layout, decrypted by the stock age binary
    out = run("secret", "backup", "--to", str(bk), "--recipient", recipient)
    assert "commit" in out and not (coord / "store").exists()
    files = subprocess.run([git, "-C", str(bk), "ls-files"], check=True, capture_output=True, text=True).stdout.split()
    assert {"index.yaml", "dataset-key.age", f"secrets/{PG}.age", f"secrets/{RELAY}.age", f"secrets/{CERT}@db-1.age"} <= set(files)
    for path, value in ((PG, VALUES[0]), (RELAY, VALUES[2]), (f"{CERT}@db-1", VALUES[3])):
        got = subprocess.run([age, "-d", "-i", str(idfile), str(bk / "secrets" / f"{path}.age")], check=True, capture_output=True)
        assert got.stdout == value
    assert len(pyrage.decrypt((bk / "dataset-key.age").read_bytes(), [ident])) == 32
    index = (bk / "index.yaml").read_text()
    assert "db-1" in index and PG in index and all(v.decode() not in index for v in VALUES)
    assert "nothing new to commit" in run("secret", "backup", "--to", str(bk), "--recipient", recipient)
    run("secret", "set", PG, stdin=VALUES[1])
    eventually(lambda: agent_value(PG) == VALUES[1], 20, "the new PG on db-1")
    run("secret", "backup", "--to", str(bk), "--recipient", recipient)
    changed = subprocess.run([git, "-C", str(bk), "show", "--name-only", "--format=", "HEAD"], check=True, capture_output=True,
                             text=True).stdout.split()
    assert sorted(changed) == ["index.yaml", f"secrets/{PG}.age"]
    before = {r["path"]: r for r in json.loads(run("get", "secrets", "-o", "json"))}

    # store.backup: admins only (an agent's and a store's certificates are refused, the admin's is not)
    port = _port(d, "store-1")
    body = {"recipients": [recipient], "have": {}, "key": True}
    for home in (d / "db-1", d / "store-2"):
        with pytest.raises(AuthError, match="admin role"):
            _call(port, load_home_identity(home), "store.backup", body)
    assert PG in _call(port, load_identity(coord, "admin"), "store.backup", body)["secrets"]

    # total disaster: both stores lose their replicas; a new dataset (a new key) for store-1 only
    for store in ("store-1", "store-2"):
        ok(lab("cluster", "stop", "--dir", str(d), store))
        shutil.rmtree(d / store / "store")
        assert not (d / store / "dataset.key.sealed").exists()
    Dataset.create(d / "store-1" / "store", "store-1").close()
    ok(lab("cluster", "start", "--dir", str(d), "store-1"))
    out = run("secret", "recover", "--from", str(bk), "--identity", str(idfile))
    assert "Recovered 3 secrets" in out and "policy" in out
    ok(lab("cluster", "start", "--dir", str(d), "store-2"))  # no replica, no sealed file: the key from store-1
    assert "event=store.key_received" in (d / "store-2" / "store.log").read_text()

    def status() -> dict:
        return dict(json.loads(run("secret", "status", "--store", "-o", "json")))

    eventually(lambda: (lambda s: s["in_sync"] and s["reachable"] == 2 and s["secrets"] == 3)(status()), 30, "both stores recovered")
    after = {r["path"]: r for r in json.loads(run("get", "secrets", "-o", "json"))}
    for path in (PG, RELAY):  # metadata kept: when and by whom it was last set
        assert (after[path]["last_rotated"], after[path]["set_by"]) == (before[path]["last_rotated"], before[path]["set_by"])
    # a second recover into stores that hold secrets needs --force
    r = lab("secret", "recover", "--from", str(bk), "--identity", str(idfile), home=coord)
    assert r.returncode != 0 and "--force" in r.stderr.decode()

    # agents served again: the recovered value, and one db-1 gets only through a relabel (republished)
    eventually(lambda: agent_value(PG) == VALUES[1], 30, "PG on db-1 from the recovered stores")
    assert agent_value(RELAY) is None
    r = lab("server", "relabel", "db-1", "--labels", "postgres,mailserver", home=coord)
    ok(r)
    assert "published to 2 store(s)" in r.stderr.decode()
    eventually(lambda: agent_value(RELAY) == VALUES[2], 30, "the relabelled entitlement on db-1")

    logs = "".join(p.read_text(errors="replace") for p in d.rglob("*.log"))
    for value in VALUES:
        assert value.decode() not in logs
        assert all(value.decode() not in o for o in outputs if "secret get" not in o)
