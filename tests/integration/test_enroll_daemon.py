"""Enrollment against a real `lab server run` process on 127.0.0.1: one token, 50 concurrent
attempts, exactly one winner; expired, reused, malformed and wrong-fingerprint tokens refused;
`lab get servers` (local and through the daemon) shows the node enrolled. The daemon is stopped
at the end, leaving no process behind."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import yaml

from lab.agent.enroll import EnrollmentFailed, enroll
from lab.common.identity import CertificateAuthority, mint_token

BIN = pathlib.Path(sys.executable).parent
LAB, AGENT = str(BIN / "lab"), str(BIN / "lab-agent")
REJECTED = "(token expired, used, unknown or for another server)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(env: dict[str, str], *args: str, exe: str = LAB) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)


class Daemon:
    def __init__(self, env: dict[str, str], port: int, log: pathlib.Path) -> None:
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.log = log
        with log.open("w") as err:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [LAB, "server", "run", "--listen", self.endpoint], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            if "event=daemon.ready" in log.read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon did not start: {log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


@pytest.fixture()
def cluster(tmp_path: pathlib.Path) -> Iterator[tuple[dict[str, str], Daemon]]:
    env = dict(os.environ, LAB_HOME=str(tmp_path / "coord"), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    assert run(env, "init", "--local").returncode == 0
    daemon = Daemon(env, free_port(), tmp_path / "daemon.log")
    try:
        yield env, daemon
    finally:
        code = daemon.stop()
        assert code == 0, daemon.log.read_text()
        assert "event=daemon.stopping" in daemon.log.read_text()


def token(env: dict[str, str], name: str, *args: str) -> str:
    r = run(env, "token", "create", name, *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["token"])


def test_fifty_concurrent_enrollments_one_token(cluster: Any, tmp_path: pathlib.Path) -> None:
    env, daemon = cluster
    text = token(env, "web-1", "--labels", "secret-store")
    outcomes: list[Any] = []

    async def attempt(i: int) -> None:
        try:
            done = await enroll("127.0.0.1", daemon.port, text, tmp_path / f"agent-{i}", collect=False, facts={"hostname": f"h{i}"})
            outcomes.append(done)
        except EnrollmentFailed as exc:
            outcomes.append(str(exc))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(attempt, i)

    trio.run(main)
    winners = [o for o in outcomes if not isinstance(o, str)]
    losers = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and len(losers) == 49
    assert set(losers) == {f"enrollment rejected by {daemon.endpoint} {REJECTED}"}
    home = winners[0].home
    doc = yaml.safe_load((home / "enrollment.yaml").read_text())
    assert doc["node"] == "web-1" and doc["coordinator"] == daemon.endpoint and doc["labels"] == ["secret-store"]
    assert (home / "node.key").stat().st_mode & 0o777 == 0o600
    log = daemon.log.read_text()
    assert log.count("event=enroll.accepted") == 1 and log.count("reason=used") == 49
    assert text.rsplit(".", 1)[1] not in log

    servers = json.loads(run(env, "get", "servers", "-o", "json").stdout)
    assert [(s["name"], s["identity"]) for s in servers] == [("web-1", "enrolled")]
    # the same through the daemon, as an admin
    assert run(env, "server", "connect", daemon.endpoint).returncode == 0
    r = run(env, "get", "servers", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert [(s["name"], s["identity"]) for s in json.loads(r.stdout)] == [("web-1", "enrolled")]
    assert "name=admin" in daemon.log.read_text()


def test_agent_cli_refusals(cluster: Any, tmp_path: pathlib.Path) -> None:
    env, daemon = cluster
    agent_env = dict(env, LAB_HOME=str(tmp_path / "agent"))
    tok_file = tmp_path / "join-token"

    # success with a token file, which is then removed
    tok_file.write_text(token(env, "web-2", "--labels", "app") + "\n")
    r = run(agent_env, "enroll", "--server", daemon.endpoint, "--token-file", str(tok_file), "-o", "json", exe=AGENT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["node"] == "web-2" and not tok_file.exists()

    def refused(text: str, *extra: str) -> subprocess.CompletedProcess[str]:
        r = run(dict(env, LAB_HOME=str(tmp_path / "other")), "enroll", "--server", daemon.endpoint, "--token", text, *extra, exe=AGENT)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert text.rsplit(".", 1)[-1] not in r.stderr or len(text) < 20
        return r

    reused = token(env, "web-3")
    assert run(dict(env, LAB_HOME=str(tmp_path / "a3")), "enroll", "--server", daemon.endpoint, "--token", reused, exe=AGENT).returncode == 0
    assert f"enrollment rejected by {daemon.endpoint} {REJECTED}" in refused(reused).stderr

    expired = token(env, "web-4", "--ttl", "1s")
    time.sleep(1.2)
    assert f"enrollment rejected by {daemon.endpoint} {REJECTED}" in refused(expired).stderr

    unknown, _ = mint_token(json.loads(run(env, "init", "--local", "-o", "json").stdout)["ca_fingerprint"])
    assert REJECTED in refused(unknown).stderr

    r = refused("lab1.not-a-token")
    assert "the join token is malformed" in r.stderr and r.returncode == 2

    foreign, _ = mint_token(CertificateAuthority.generate().fingerprint)
    r = refused(foreign)
    assert f"{daemon.endpoint} is not the coordinator this token was minted by (fingerprint mismatch)" in r.stderr
    assert "--token is visible to other users" in r.stderr

    log = daemon.log.read_text()
    for reason in ("used", "expired", "unknown"):
        assert f"reason={reason}" in log
    for secret in (reused, expired, unknown, foreign):
        assert secret.rsplit(".", 1)[1] not in log
    servers = {s["name"]: s["identity"] for s in json.loads(run(env, "get", "servers", "-o", "json").stdout)}
    assert servers == {"web-2": "enrolled", "web-3": "enrolled"}


def test_daemon_notifies_systemd_when_ready(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, LAB_HOME=str(tmp_path / "coord"), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        daemon = Daemon(dict(env, NOTIFY_SOCKET=str(sock_path)), free_port(), tmp_path / "daemon.log")
        try:
            assert sock.recv(256) == b"READY=1"  # lab server run made its own CA and identities
            assert (tmp_path / "coord" / "ca.key").stat().st_mode & 0o777 == 0o600
        finally:
            assert daemon.stop() == 0
        assert sock.recv(256) == b"STOPPING=1"


def test_concurrent_agent_processes_one_token(cluster: Any, tmp_path: pathlib.Path) -> None:
    """The same race with real `lab-agent enroll` processes, each with its own copy of the token file."""
    env, daemon = cluster
    text = token(env, "web-5", "--labels", "app")
    procs = []
    for i in range(8):
        f = tmp_path / f"token-{i}"
        f.write_text(text)
        procs.append(subprocess.Popen(
            [AGENT, "enroll", "--server", daemon.endpoint, "--token-file", str(f), "--home", str(tmp_path / f"a{i}")],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(ok) == 1 and len(refused) == 7
    for code, _, err in refused:
        assert code == 4 and err.strip() == f"lab-agent: enrollment rejected by {daemon.endpoint} {REJECTED}"
    assert sum(not (tmp_path / f"token-{i}").exists() for i in range(8)) == 1  # only the winner's file is consumed
