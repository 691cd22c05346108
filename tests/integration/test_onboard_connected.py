"""`lab token create|list|revoke` from a home connected to a real `lab server run` daemon
(`lab server connect`: it holds only ca.pub, admin.key/admin.cert and `server:`), as real
processes: tokens minted, listed and revoked in the daemon's state, audited with the admin's
name, the token text only in the CLI's output; a certificate without the admin role refused by
every ``onboard.*`` / ``tokens.*`` method. SSH onboarding from a connected home is in
test_onboard_ssh.py, bare metal in test_pxe_connected.py.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import pytest
from test_enroll_daemon import AGENT, run
from test_lifecycle_daemon import audit, connect, coordinator, non_admin_identity  # noqa: F401  (fixture)

from lab.common.errors import NotEntitled
from lab.coordinator.onboard_api import METHODS


def test_tokens_through_the_daemon(coordinator: Any, tmp_path: pathlib.Path) -> None:  # noqa: F811
    env, coord, daemon = coordinator
    laptop = connect(env, coord, tmp_path / "laptop", daemon.endpoint)
    r = run(laptop, "token", "create", "web-7", "--ttl", "10m", "-o", "json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    text = made["token"]
    assert text.startswith("lab1.") and made["name"] == "web-7" and made["expires_at"] > time.time() + 500
    assert not (tmp_path / "laptop" / "state.db").exists()  # written on the coordinator, not here

    # listed alike from the laptop and on the coordinator host
    remote = json.loads(run(laptop, "token", "list", "-o", "json").stdout)
    local = json.loads(run(env, "token", "list", "-o", "json").stdout)
    assert [(t["name"], t["status"]) for t in remote] == [(t["name"], t["status"]) for t in local] == [("web-7", "valid")]
    r = run(laptop, "token", "list")
    assert r.returncode == 0 and "web-7" in r.stdout and "valid" in r.stdout and "lab1." not in r.stdout

    # the token works: an agent enrolls with it against the daemon
    tok = tmp_path / "join-token"
    tok.write_text(text + "\n")
    r = run(dict(env, LAB_HOME=str(tmp_path / "agent")), "enroll", "--server", daemon.endpoint, "--token-file", str(tok),
            "-o", "json", exe=AGENT)
    assert r.returncode == 0, r.stderr
    assert [(t["name"], t["status"]) for t in json.loads(run(laptop, "token", "list", "-o", "json").stdout)] == [("web-7", "used")]

    # revoke: the unused ones only
    assert run(laptop, "token", "create", "web-8", "-o", "json").returncode == 0
    r = run(laptop, "token", "revoke", "web-8")
    assert r.returncode == 0 and r.stdout.strip() == "✓ 1 token for web-8 revoked", r.stdout + r.stderr
    r = run(laptop, "token", "revoke", "web-8")
    assert r.returncode != 0 and "no unused token for 'web-8'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    statuses = {t["name"]: t["status"] for t in json.loads(run(env, "token", "list", "-o", "json").stdout)}
    assert statuses == {"web-7": "used", "web-8": "revoked"}

    rows = audit(coord)
    assert ("cert:admin", "token.create", "web-7") in rows and ("cert:admin", "token.create", "web-8") in rows
    assert ("cert:admin", "token.revoke", "web-8") in rows
    log = daemon.log.read_text()
    assert "method=tokens.create" in log and "name=admin" in log
    assert text.rsplit(".", 1)[1] not in log


def test_a_certificate_without_the_admin_role_is_refused_by_every_method(coordinator: Any, tmp_path: pathlib.Path) -> None:  # noqa: F811
    from lab.coordinator.client import RemoteEngine
    from lab.coordinator.engine import Paths

    env, coord, daemon = coordinator
    ops = non_admin_identity(coord, tmp_path / "ops-identity")
    intruder = connect(env, coord, tmp_path / "ops", daemon.endpoint, identity_from=ops)
    before = audit(coord)
    for argv in (("token", "create", "web-9"), ("token", "list"), ("token", "revoke", "web-9")):
        r = run(intruder, *argv)
        assert r.returncode == 4, (argv, r.stdout, r.stderr)
        assert r.stderr.startswith("lab: tokens.") and "needs the 'admin' role" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run(intruder, "onboard", "web-9", "--provider", "baremetal", "--mac", "52:54:00:00:00:09", "--image", "x",
            "--yes", "--no-wait")
    assert r.returncode == 4 and "onboard.status needs the 'admin' role" in r.stderr and "Traceback" not in r.stderr, r.stderr

    engine = RemoteEngine.open(Paths.resolve(home=str(tmp_path / "ops")))
    body = {"name": "web-9", "provider": "ssh", "labels": [], "mac": "52:54:00:00:00:09", "image": "x", "wait_s": 60,
            "ttl": 60, "stage": "waiting", "state": "running", "action": "onboard.start", "detail": {},
            "coordinator": "127.0.0.1:7443"}
    for method in sorted(METHODS):
        with pytest.raises(NotEntitled, match=f"{method} needs the 'admin' role"):
            engine.call_method(method, body)
    assert audit(coord) == before
    assert run(env, "token", "list", "-o", "json").stdout.strip() == "[]"
    assert daemon.log.read_text().count("event=api.denied") >= 3 + 1 + len(METHODS)
