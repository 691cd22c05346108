"""`lab secret …`, `lab get secrets` and `lab show secret` from an operator home connected to the
coordinator daemon (`lab server connect`), against a real local cluster (`lab cluster up`:
coordinator, 2 stores, agent db-1).

The operator home holds only ca.pub and the admin identity: definitions, consumers, the audit and
the store list come from the daemon's admin-only ``secrets.*`` methods; values go from the CLI to a
store over Noise. Each command prints the same as in the coordinator's home; set, rotate, rm and
recover reach the agent; a certificate without the admin role is refused by every ``secrets.*``
method; no value appears in the coordinator's log or the operator's home.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pyrage
import pytest
import trio
from cluster_cli import eventually, lab, ok, running_cluster
from test_lifecycle_daemon import connect, non_admin_identity

from lab.common import rpc
from lab.coordinator import cluster as cluster_mod
from lab.coordinator.secrets_api import METHODS

pytestmark = pytest.mark.slow

PG = "postgres/master-password"
VALUES = (b"pg-from-coordinator", b"pg-from-laptop")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("secretconn") / "c", "--stores", "2", "--agent", "db-1=postgres") as d:
        yield d


def _base_env() -> dict[str, str]:
    env = dict(os.environ, NO_COLOR="1")
    for k in ("LAB_DEFINITIONS", "LAB_RUNTIME_DIR", "LAB_SECRETS_DIR", "LAB_PUPPET_MODULES"):
        env.pop(k, None)
    return env


def _said(r, *homes: Path) -> tuple[int, str, str]:
    out, err = r.stdout.decode(), r.stderr.decode()
    for h in homes:
        out, err = out.replace(str(h), "$HOME"), err.replace(str(h), "$HOME")
    assert "Traceback" not in err, err
    return r.returncode, out, err


def _calm(text: str) -> str:
    """What changes from one moment to the next in `lab secret status --store`."""
    return re.sub(r"last anti-entropy \S+( ago)?", "last anti-entropy …", text)


def test_secret_commands_from_a_connected_home(cluster: Path, tmp_path: Path) -> None:
    d, coord = cluster, cluster / "coordinator"
    spec = cluster_mod.load(d)
    endpoint = f"127.0.0.1:{spec.port('coordinator', 'coordinator')}"
    laptop = tmp_path / "laptop"
    connect(_base_env(), coord, laptop, endpoint)
    assert sorted(p.name for p in laptop.iterdir()) == ["admin.cert", "admin.key", "ca.pub", "config.yaml"]
    assert "stores" not in (laptop / "config.yaml").read_text()

    def both(*args: str, stdin: tuple[bytes, bytes] = (b"", b"")) -> tuple[int, str, str]:
        """The command in the coordinator's home, then in the laptop's: the same answer."""
        a = _said(lab(*args, home=coord, stdin=stdin[0]), coord)
        b = _said(lab(*args, home=laptop, stdin=stdin[1]), laptop, coord)
        assert b == a, args
        return a

    def agent_value() -> bytes | None:
        r = lab("secret", "get", PG, home=d / "db-1")
        return r.stdout if r.returncode == 0 else None

    # before any value: the same rows, LAST ROTATED "—" read from the stores
    both("get", "secrets")
    rows = {r["path"]: r for r in json.loads(both("get", "secrets", "-o", "json")[1])}
    assert rows[PG]["stored"] == 0 and rows[PG]["last_rotated"] is None

    # set: the definition and consumers from the daemon, the value straight to a store
    code, out, _ = both("secret", "set", PG, stdin=VALUES)
    assert code == 0 and out == "  ✓ Updated. Accessible by: postgres (1 server)\n", out
    eventually(lambda: agent_value() == VALUES[1], 20, "the laptop's value on db-1")
    a = both("secret", "set", "nothing/defined-here", stdin=(b"x", b"y"))
    assert "is not defined in the secrets definitions" in a[1]
    assert both("secret", "set", "tls/node-cert", stdin=(b"v", b"v"))[:2] == (2, "")  # per-machine: --node needed

    # LAST ROTATED / SET BY, show secret (json and table), per-machine view
    rows = {r["path"]: r for r in json.loads(both("get", "secrets", "-o", "json")[1])}
    assert rows[PG]["stored"] == 1 and rows[PG]["last_rotated"] and rows[PG]["set_by"]
    out = both("get", "secrets")[1]
    assert "LAST ROTATED" in out and rows[PG]["last_rotated"] in out
    shown = json.loads(both("show", "secret", PG, "-o", "json")[1])
    assert shown["last_set"] == rows[PG]["last_rotated"] and shown["store_known"] and "db-1" in shown["entitled"]
    both("show", "secret", PG)
    both("show", "secret", "tls/node-cert", "-o", "json")
    assert both("show", "secret", "no/such")[0] == 3

    # rotate: from the laptop, then from the coordinator; the agent follows
    before = agent_value()
    assert both("secret", "rotate", PG, "--generator", "random")[1] == f"  ✓ Rotated 1 value of {PG} (random)\n"
    eventually(lambda: agent_value() not in (None, before, VALUES[1]), 20, "the rotated value on db-1")
    assert len(agent_value() or b"") == 43
    assert both("secret", "rotate", "no/such")[0] == 3
    assert both("secret", "rotate", PG)[0] == 2  # static without --generator: refused alike

    # audit (table and JSON); --modules is the coordinator's business in a connected home
    out = both("secret", "audit")[1]
    assert "never set" in out and PG + '" referenced' not in out
    both("secret", "audit", "-o", "json")
    r = lab("secret", "audit", "--modules", str(tmp_path), home=laptop)
    assert r.returncode == 2 and "connected home" in r.stderr.decode()

    # status --store: both replicas, the consumers per label (from the daemon)
    def status(home: Path) -> tuple[dict, str]:
        st = json.loads(ok(lab("secret", "status", "--store", "-o", "json", home=home)))
        for rep in st["replicas"]:
            rep.pop("last_anti_entropy", None)
        return st, _calm(ok(lab("secret", "status", "--store", home=home)))

    eventually(lambda: status(coord)[0]["in_sync"] and status(coord) == status(laptop), 30, "the same store status")
    st, text = status(laptop)
    assert st["reachable"] == 2 and sorted(r["name"] for r in st["replicas"]) == ["store-1", "store-2"]
    assert {c["label"] for c in st["consumers"]} >= {"postgres"} and "Replicas:        2/2 healthy" in text

    # backup from the laptop (a store encrypts to the recipient), then rm, then recover
    ident = pyrage.x25519.Identity.generate()
    idfile = tmp_path / "backup-identity.txt"
    idfile.write_text(f"# lab backup identity\n{ident}\n")
    idfile.chmod(0o600)
    bk = tmp_path / "backup"
    out = ok(lab("secret", "backup", "--to", str(bk), "--recipient", str(ident.to_public()), home=laptop))
    assert re.match(r"  ✓ \d+ secrets in .*, commit [0-9a-f]{12}\n$", out), out
    assert {"index.yaml", "dataset-key.age", f"secrets/{PG}.age", "secrets/nothing/defined-here.age"} <= \
        {str(f.relative_to(bk)) for f in bk.rglob("*") if f.is_file() and ".git" not in f.parts}
    backed_up = pyrage.decrypt((bk / "secrets" / f"{PG}.age").read_bytes(), [ident])
    assert backed_up == agent_value()

    assert ok(lab("secret", "rm", PG, home=laptop)) == f"  ✓ Removed {PG}\n"
    eventually(lambda: agent_value() is None and not (d / "db-1" / "secrets" / PG).exists(), 20, "the removal on db-1")
    assert both("secret", "rm", PG)[0] == 3  # no value left: refused alike
    rows = {r["path"]: r for r in json.loads(both("get", "secrets", "-o", "json")[1])}
    assert rows[PG]["stored"] == 0 and rows[PG]["last_rotated"] is None

    out = ok(lab("secret", "recover", "--from", str(bk), "--identity", str(idfile), "--force", home=laptop))
    assert out.startswith("  ✓ Recovered 2 secrets into the cluster through 127.0.0.1:"), out
    assert re.search(r"\n  → policy version \d+ published to 2 store\(s\)\n$", out), out
    eventually(lambda: agent_value() == backed_up, 20, "the recovered value on db-1")

    # no value in the coordinator's log or anywhere in the laptop's home
    log = (coord / "coordinator.log").read_bytes()
    for v in (*VALUES, backed_up):
        assert v not in log
    for f in laptop.rglob("*"):
        if f.is_file():
            assert all(v not in f.read_bytes() for v in (*VALUES, backed_up)), f
    assert not (laptop / "store").exists() and not (laptop / "state.db").exists()


def test_non_admin_certificate_refused(cluster: Path, tmp_path: Path) -> None:
    from lab.coordinator.enrollment import load_identity

    d, coord = cluster, cluster / "coordinator"
    endpoint = f"127.0.0.1:{cluster_mod.load(d).port('coordinator', 'coordinator')}"
    ops = non_admin_identity(coord, tmp_path / "ops-identity")
    intruder = tmp_path / "ops"
    connect(_base_env(), coord, intruder, endpoint, identity_from=ops)
    for args, stdin in ((("secret", "set", PG), b"nope"), (("secret", "rotate", PG, "--generator", "random"), b""),
                        (("secret", "rm", PG), b""), (("secret", "audit"), b""), (("secret", "status", "--store"), b"")):
        r = lab(*args, home=intruder, stdin=stdin)
        err = r.stderr.decode()
        assert r.returncode == 4 and "needs the 'admin' role" in err and err.startswith("lab: secrets."), (args, err)

    identity = load_identity(intruder, "admin")
    port = cluster_mod.load(d).port("coordinator", "coordinator")

    async def refused(method: str) -> str:
        async with rpc.connect("127.0.0.1", port, identity=identity, timeout=5) as conn:
            try:
                await conn.call(method, {"path": PG, "stored": []}, timeout=10)
            except rpc.RemoteError as exc:
                return str(exc)
        return "answered"

    for method in sorted(METHODS):
        assert trio.run(refused, method) == f"{method} needs the 'admin' role"
    assert (coord / "coordinator.log").read_text().count("event=api.denied") >= len(METHODS) + 5
