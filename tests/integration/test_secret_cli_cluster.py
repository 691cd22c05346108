"""The secret CLI against a real local cluster (`lab cluster up`: coordinator, 2 stores, one agent).

Proves, from the coordinator's home (config.yaml `stores:`): `lab get secrets` shows LAST ROTATED
and SET BY read from the stores (`store.meta`) after a `lab secret set`; `lab secret rotate` and
`lab secret rm` go to the stores and reach the agent (new value, then the file gone);
`lab secret status --store` lists both replicas, and after `lab cluster stop store-2` shows it
unreachable while still exiting 0 (and `lab get secrets` still answers from store-1).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_cli import eventually, lab, ok, running_cluster

pytestmark = pytest.mark.slow

LAB = str(Path(sys.executable).parent / "lab")
PG = "postgres/master-password"




@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("secretcli") / "c", "--stores", "2", "--agent", "db-1=postgres") as d:
        yield d


def test_secret_cli_against_the_cluster(cluster: Path) -> None:
    d, coord = cluster, cluster / "coordinator"

    def agent_value() -> bytes | None:
        r = lab("secret", "get", PG, home=d / "db-1")
        return r.stdout if r.returncode == 0 else None

    def rows() -> dict[str, dict]:
        return {r["path"]: r for r in json.loads(ok(lab("get", "secrets", "-o", "json", home=coord)))}

    # before any value: the stores answer, nothing set
    assert rows()[PG]["last_rotated"] is None and rows()[PG]["stored"] == 0

    # set → LAST ROTATED / SET BY from the stores
    ok(lab("secret", "set", PG, home=coord, stdin=b"pg-value-1"))
    eventually(lambda: agent_value() == b"pg-value-1", 20, "the value on db-1")
    row = rows()[PG]
    assert row["last_rotated"] and row["set_by"] and row["stored"] == 1
    table = lab("get", "secrets", home=coord)
    out = ok(table)
    assert "LAST ROTATED" in out and row["last_rotated"] in out and "pg-value" not in out
    assert "unreachable" not in table.stderr.decode()
    assert not (coord / "store").exists()  # the coordinator's home has no local store
    shown = json.loads(ok(lab("show", "secret", PG, "-o", "json", home=coord)))
    assert shown["last_set"] == row["last_rotated"] and "db-1" in shown["entitled"]

    # rotate → the stores → the agent
    ok(lab("secret", "rotate", PG, "--generator", "random", home=coord))
    eventually(lambda: agent_value() not in (None, b"pg-value-1"), 20, "the rotated value on db-1")
    assert len(agent_value() or b"") == 43 and rows()[PG]["stored"] == 1

    # rm → tombstone at the stores → the agent drops it (file gone, get refused)
    ok(lab("secret", "rm", PG, home=coord))
    eventually(lambda: agent_value() is None and not (d / "db-1" / "secrets" / PG).exists(), 20, "the removal on db-1")
    assert rows()[PG]["last_rotated"] is None

    # status --store: both replicas, converged
    def status() -> dict:
        return dict(json.loads(ok(lab("secret", "status", "--store", "-o", "json", home=coord))))

    eventually(lambda: status()["in_sync"], 20, "both stores in sync")
    st = status()
    assert st["mode"] == "cluster" and st["reachable"] == 2 and st["total"] == 2
    assert sorted(r["name"] for r in st["replicas"]) == ["store-1", "store-2"]
    assert {c["label"] for c in st["consumers"]} >= {"postgres"}

    # one store down: listed as unreachable, exit 0; get secrets still answers from the other
    ok(lab("cluster", "stop", "--dir", str(d), "store-2"))
    r = lab("secret", "status", "--store", home=coord)
    text = ok(r)
    assert "Replicas:        1/2 healthy" in text and "✗ unreachable" in text and "store-1" in text, text
    assert PG in rows()

    ok(lab("cluster", "down", "--dir", str(d)))
