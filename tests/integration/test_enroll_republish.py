"""A node enrolled into a running cluster receives its secrets without `lab cluster publish`: the
coordinator daemon republishes the signed policy after each enrollment (coordinator/republish.py).

Real processes on 127.0.0.1: `lab cluster up` (coordinator, one store, db-1), then a token minted
in the coordinator's home, `lab-agent enroll` and `lab-agent run` for db-2, and `lab secret get`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_cli import eventually, lab, ok, running_cluster

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PG = "postgres/master-password"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Path]:
    with running_cluster(tmp_path / "c", "--stores", "1", "--agent", "db-1=postgres,production") as d:
        yield d


def test_a_node_enrolled_later_gets_its_secrets_without_a_manual_publish(cluster: Path) -> None:
    coord = cluster / "coordinator"
    ok(lab("secret", "set", PG, home=coord, stdin=b"pg-s3cret"))
    eventually(lambda: lab("secret", "get", PG, home=cluster / "db-1").stdout == b"pg-s3cret", 30, "db-1 has the secret")
    rows = json.loads(ok(lab("cluster", "status", "--dir", str(cluster), "-o", "json")))
    port = next(r["port"] for r in rows if r["node"] == "coordinator")

    token = json.loads(ok(lab("token", "create", "db-2", "--labels", "postgres,production", "--ttl", "10m", "-o", "json", home=coord)))["token"]
    home = cluster / "db-2"
    token_file = cluster / "db-2.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = dict(os.environ, LAB_HOME=str(home))
    r = subprocess.run([str(BIN / "lab-agent"), "enroll", "--server", f"127.0.0.1:{port}", "--token-file", str(token_file),
                        "--home", str(home), "--name", "db-2"], env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    with open(home / "agent.log", "wb") as log:
        agent = subprocess.Popen([str(BIN / "lab-agent"), "run", "--home", str(home), "--runtime-dir", str(home / "run"),
                                  "--secrets-dir", str(home / "secrets"), "--key-protection", "file"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # nobody ran `lab cluster publish`: the daemon's republish after the enrollment grants db-2
        eventually(lambda: lab("secret", "get", PG, home=home).stdout == b"pg-s3cret", 40, "db-2 receives its secret")
        log_text = (coord / "coordinator.log").read_text(errors="replace")
        assert "pg-s3cret" not in log_text
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(timeout=15)
