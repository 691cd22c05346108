"""`lab plan|apply|diff|sync|describe server` through a real `lab server run` daemon on 127.0.0.1,
from a separate CLI home connected to it (`lab server connect`), as real processes: the same
output as the same commands in local mode; plans stored on the coordinator; a stale plan refused;
a certificate without the admin role refused; writes audited with the admin's name;
`lab identity renew` and the dashboard's actions through the same daemon."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_enroll_daemon import AGENT, Daemon, free_port, run, token

STEPS: tuple[tuple[str, ...], ...] = (
    ("plan", "server", "web-1", "--label", "app", "--provider", "ssh"),
    ("apply", "server", "web-1"),
    ("plan", "server", "web-1", "--label", "app,production", "--size", "large", "-e", "staging"),
    ("apply", "server", "web-1"),
    ("diff", "server", "web-1"),
    ("diff", "server", "web-1", "-o", "json"),
    ("sync", "server", "web-1"),
    ("describe", "server", "web-1"),
    ("plan", "server", "web-1", "--region", "eu-1"),
    ("apply", "server", "web-1"),
    ("describe", "server", "web-1", "-o", "json"),
    ("apply", "server", "web-1"),  # the plan was consumed: refused alike
    ("diff", "server", "nope"),  # not found alike
    ("plan", "server", "web-2", "--label", "no-such-label", "--provider", "ssh"),  # a mistake alike
)


def home_env(base: dict[str, str], home: pathlib.Path) -> dict[str, str]:
    return dict(base, LAB_HOME=str(home))


def connect(env: dict[str, str], coord: pathlib.Path, home: pathlib.Path, endpoint: str, *, identity_from: pathlib.Path | None = None) -> dict[str, str]:
    """A CLI home holding only the CA's public key and an identity (the coordinator's admin one by
    default), connected to ``endpoint``."""
    home.mkdir(mode=0o700)
    shutil.copy2(coord / "ca.pub", home / "ca.pub")
    for f in ("admin.key", "admin.cert"):
        shutil.copy2((identity_from or coord) / f, home / f)
    cli = home_env(env, home)
    r = run(cli, "server", "connect", endpoint)
    assert r.returncode == 0, r.stderr
    return cli


def non_admin_identity(coord: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """``dest`` holding admin.key/admin.cert for "ops": signed by the cluster's CA, role ``node``
    only — what `connect(identity_from=…)` needs to play an operator without the admin role."""
    from lab.common.identity import CertificateAuthority
    from lab.coordinator.enrollment import _ensure_cert

    dest.mkdir(mode=0o700)
    ca = CertificateAuthority.load(coord / "ca.key")
    try:
        _ensure_cert(ca, dest, "admin", "ops", ("node",), time.time())
    finally:
        ca.close()
    return dest


def audit(coord: pathlib.Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(f"file:{coord / 'state.db'}?mode=ro", uri=True) as db:
        return [tuple(row) for row in db.execute("SELECT actor, action, subject FROM audit ORDER BY id")]


@pytest.fixture()
def coordinator(tmp_path: pathlib.Path) -> Iterator[tuple[dict[str, str], pathlib.Path, Daemon]]:
    coord = tmp_path / "coord"
    env = dict(os.environ, LAB_HOME=str(coord), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    assert run(env, "init", "--local").returncode == 0
    daemon = Daemon(env, free_port(), tmp_path / "daemon.log")
    try:
        yield env, coord, daemon
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()


def test_lifecycle_through_the_daemon_equals_local_mode(coordinator: Any, tmp_path: pathlib.Path) -> None:
    env, coord, daemon = coordinator
    remote = connect(env, coord, tmp_path / "cli", daemon.endpoint)
    local_home = tmp_path / "local"
    local = home_env(env, local_home)
    assert run(local, "init", "--local").returncode == 0

    for step in STEPS:
        a, b = run(local, *step), run(remote, *step)
        said_local = [x.replace(str(local_home), "$HOME") for x in (a.stdout, a.stderr)]
        said_remote = [x.replace(str(coord), "$HOME") for x in (b.stdout, b.stderr)]
        assert (b.returncode, *said_remote) == (a.returncode, *said_local), step
        assert "Traceback" not in a.stderr + b.stderr
    # the steps did what they say (so "equal" is not "equally broken")
    rows = json.loads(run(remote, "get", "servers", "-o", "json").stdout)
    assert [(r["name"], r["labels"], r["size"], r["environment"]) for r in rows] == [("web-1", ["app", "production"], "large", "staging")]
    assert json.loads(run(remote, "describe", "server", "web-1", "-o", "json").stdout)["name"] == "web-1"
    assert not (tmp_path / "cli" / "plans").exists()  # plans live on the coordinator
    assert "no plan for 'web-1'" in run(remote, "apply", "server", "web-1").stderr

    writes = [a for a in audit(coord) if a[1].startswith("server.")]
    assert writes == [
        ("cert:admin", "server.plan", "web-1"), ("cert:admin", "server.add", "web-1"),
        ("cert:admin", "server.plan", "web-1"), ("cert:admin", "server.labels", "web-1"),
        ("cert:admin", "server.update", "web-1"), ("cert:admin", "server.sync", "web-1"),
        ("cert:admin", "server.plan", "web-1"), ("cert:admin", "server.update", "web-1"),
    ]  # fmt: skip
    log = daemon.log.read_text()
    assert "method=lifecycle.apply" in log and "name=admin" in log


def test_stale_plan_and_non_admin_refused(coordinator: Any, tmp_path: pathlib.Path) -> None:
    env, coord, daemon = coordinator
    remote = connect(env, coord, tmp_path / "cli", daemon.endpoint)

    r = run(remote, "plan", "server", "web-2", "--label", "app", "--provider", "ssh")
    assert r.returncode == 0, r.stderr
    assert f"Plan saved to {coord / 'plans' / 'web-2.json'}" in r.stdout and (coord / "plans" / "web-2.json").is_file()
    with (coord / "definitions" / "labels.yaml").open("a") as f:  # the definitions change on the coordinator
        f.write("\n  extra-label: {}\n")
    r = run(remote, "apply", "server", "web-2")
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "stale" in r.stderr and "lab plan server web-2" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(run(remote, "get", "servers", "-o", "json").stdout) == []
    assert (coord / "plans" / "web-2.json").is_file()  # refused, so kept
    r = run(remote, "plan", "server", "web-2", "--label", "app", "--provider", "ssh")
    assert r.returncode == 0 and run(remote, "apply", "server", "web-2").returncode == 0

    # an identity signed by the same CA without the admin role
    ops = non_admin_identity(coord, tmp_path / "ops-identity")
    intruder = connect(env, coord, tmp_path / "ops", daemon.endpoint, identity_from=ops)
    before = audit(coord)
    for step in (("plan", "server", "web-3", "--label", "app", "--provider", "ssh"), ("apply", "server", "web-2"),
                 ("diff", "server", "web-2"), ("sync", "server", "web-2")):  # fmt: skip
        r = run(intruder, *step)
        assert r.returncode == 4, (step, r.stdout, r.stderr)
        assert r.stderr.startswith("lab: lifecycle.") and "needs the 'admin' role" in r.stderr and r.stderr.count("\n") == 1
    r = run(intruder, "identity", "renew", "web-2")
    assert r.returncode == 4 and "identity.renew needs the 'admin' role" in r.stderr, r.stderr
    assert audit(coord) == before and not (coord / "plans" / "web-3.json").exists()
    assert daemon.log.read_text().count("event=api.denied") >= 4


def test_identity_renew_and_dash_actions_through_the_daemon(coordinator: Any, tmp_path: pathlib.Path) -> None:
    """`lab identity renew` from a connected CLI home, and the dashboard's four actions on a
    RemoteEngine (the same objects `lab dash` uses, without a terminal)."""
    from lab.coordinator.engine import Paths
    from lab.coordinator.tui import models, source

    env, coord, daemon = coordinator
    remote = connect(env, coord, tmp_path / "cli", daemon.endpoint)
    f = tmp_path / "token"
    f.write_text(token(env, "web-5", "--labels", "app"))
    r = subprocess.run([AGENT, "enroll", "--server", daemon.endpoint, "--token-file", str(f), "--home", str(tmp_path / "agent")],
                       env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr

    r = run(remote, "identity", "renew", "web-5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("✓ web-5: certificate ") and "next check-in" in r.stdout
    assert (coord / "certs" / "web-5.next.cert").is_file()

    assert run(remote, "plan", "server", "web-5", "--label", "app,production").returncode == 0
    opener = source.engine_opener(Paths.resolve(None, str(tmp_path / "cli")))
    said: dict[str, list[str]] = {}
    engine = opener()
    assert type(engine).__name__ == "RemoteEngine"
    for action in ("plan", "apply", "sync", "renew"):
        lines: list[str] = []
        source.run_action(engine, action, models.Target("server", "web-5"), lines.append)
        said[action] = lines
    words = {"plan": "plan", "apply": "apply", "sync": "sync", "renew": "identity renew"}
    for action, lines in said.items():
        assert lines[0] == f"{words[action]} web-5: started" and lines[-1] == f"{words[action]} web-5: done", lines
    assert "  labels: app" in said["plan"]
    assert said["apply"][1:-1] == ["✓ labels: app,production"]
    assert "→ labels app,production are sent to the agent at its next check-in" in said["sync"]
    assert said["renew"][1].startswith("✓ web-5: certificate ")
    assert [x for x in audit(coord) if x[1] == "server.labels"] == [("cert:admin", "server.labels", "web-5")]
    # the dashboard's data screens work on the RemoteEngine too (detail without server_status)
    detail = source.load(engine, ("detail", "server", "web-5"))
    assert isinstance(detail, models.Detail)
    # revoke goes the same way as renew
    r = run(remote, "identity", "revoke", "web-5", "--yes")
    assert r.returncode == 0 and r.stdout.startswith("✓ web-5: serial "), r.stderr
    assert [s["identity"] for s in json.loads(run(remote, "get", "servers", "-o", "json").stdout)] == ["revoked"]
