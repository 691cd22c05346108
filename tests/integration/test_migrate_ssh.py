"""`lab server migrate --target ssh --host H` end to end: onboard a machine over SSH, then move
the coordinator onto its agent (docs/LIFECYCLE.md, "Moving the coordinator").

Reuses test_onboard_ssh.py's world: OpenSSH's real sshd on 127.0.0.1 (key-only, temp host key),
every remote path under a temp ``--target-root``, the agent as a supervised background process,
and a coordinator daemon (`lab server run`) on loopback for a local-mode home. The test sshd is
restarted with ``SetEnv LAB_CHECKIN_INTERVAL=1`` so the onboarded agent checks in every second.
Every process started here is stopped by its PID at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time
from typing import Any

import pytest
import yaml

from test_onboard_ssh import LAB, SSHD, stop, wait_port, wheelhouse, world  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def restart_sshd_with_checkin_interval(w: dict[str, Any]) -> subprocess.Popen[Any]:
    sshd = w["sshd"]
    stop(sshd.proc)
    with sshd.config.open("a") as f:
        f.write("SetEnv LAB_CHECKIN_INTERVAL=1\n")
    with sshd.log.open("w") as err:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(sshd.config), "-p", str(sshd.port)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    sshd.proc = proc
    wait_port(sshd.port, proc, sshd.log)
    return proc


def _pids_under(root: pathlib.Path) -> list[int]:
    """Processes whose command line names ``root`` (the agent, its supervisor, the coordinator child)."""
    out = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(root).encode() in cmdline:
            out.append(int(proc.name))
    return out


def _stop_target(target: pathlib.Path) -> None:
    pidfile = target / "run/lab/lab-agent.supervisor.pid"
    if pidfile.exists():
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 15
    while _pids_under(target) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _pids_under(target):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _answers(endpoint: str, home: pathlib.Path) -> dict[str, Any]:
    import trio

    from lab.coordinator.enrollment import load_identity
    from lab.coordinator.migrate.command import _call

    return trio.run(_call, endpoint, load_identity(home, "admin"), "migrate.status", {})


@pytest.mark.parametrize("coordinator", ["daemon", "in-process"])
def test_migrate_target_ssh_onboards_then_moves(world: dict[str, Any], wheelhouse: pathlib.Path, coordinator: str) -> None:  # noqa: F811
    """daemon: `lab server run` serves the local-mode home on loopback. in-process: no daemon runs;
    the command serves the home itself (--serve) for the onboarding and the move alike."""
    w = world
    home = pathlib.Path(w["env"]["LAB_HOME"])
    target = w["target"]
    sshd = restart_sshd_with_checkin_interval(w)
    from lab.coordinator.cluster import free_ports

    new_port, serve_port = free_ports(2)
    new = f"127.0.0.1:{new_port}"
    old = f"127.0.0.1:{w['dport']}"
    serve: list[str] = []
    if coordinator == "in-process":
        stop(w["daemon"])
        assert not (home / "coordinator.endpoint").exists()
        old = f"127.0.0.1:{serve_port}"
        serve = ["--serve", old]
    try:
        args = [
            LAB, "server", "migrate", "--target", "ssh", "--host", "127.0.0.1", "--port", str(w["sshd"].port),
            "--name", "node-x", "--identity", str(w["key"]), "--accept-new-host-key", "--target-root", str(target),
            "--service-mode", "process", "--wheelhouse", str(wheelhouse), "--listen", new, "--grace", "5",
            "--timeout", "90", "--yes", *serve,
        ]  # fmt: skip
        r = subprocess.run(args, env=w["env"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        out = r.stdout
        assert r.returncode == 0, out + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        for text in (
            f"→ onboarding node-x over ssh://root@127.0.0.1:{w['sshd'].port} first (its agent will reach the coordinator at {old})",
            "Step 1: Render", "│ Host     │ 127.0.0.1", "Plan (onboard, then move the coordinator)",
            f"  + onboard node-x over ssh://root@127.0.0.1:{w['sshd'].port}",
            f"  ~ migrate lab-server from local ({home}) ({old}) to node-x",
            f"start the coordinator role on node-x, listening on {new}; it answers at {new}",
            f"Identity established: node-x enrolled with {old}", "→ node-x is onboarded; moving the coordinator to it",
            "→ plan: node-x pulls 1 servers, 1 tokens,",
            f"→ node-x took the state and serves the coordinator at {new}", f"→ verified: {new} answers as coordinator",
            f"✓ the coordinator now runs on node-x: lab talks to {new}",
        ):  # fmt: skip
            assert text in out, out
        assert out.index("Plan (onboard") < out.index("Step 3: Apply") < out.index("moving the coordinator to it")  # one plan, before any change
        assert "NEW HOST KEY" in r.stderr
        assert ("→ local mode: serving this home's coordinator" in out) == (coordinator == "in-process")
        assert "✓ the old coordinator stopped" in out

        # the home's config points at node-x's coordinator, which answers with the inventory
        assert yaml.safe_load((home / "config.yaml").read_text())["server"] == new
        role_home = target / "var/lib/lab/coordinator"
        assert (role_home / "coordinator.endpoint").read_text().strip() == new
        status = _answers(new, home)
        assert status["node"] == "node-x" and status["servers"] == 1
        r = subprocess.run([LAB, "get", "servers", "-o", "json"], env=w["env"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 0, r.stderr
        [row] = json.loads(r.stdout)
        assert row["name"] == "node-x" and row["identity"] == "enrolled" and "lab-server" in row["labels"], row
        assert yaml.safe_load((target / "var/lib/lab/enrollment.yaml").read_text())["coordinator"] == new

        # the old coordinator moved away and stopped
        assert (home / "moved.json").exists()
        w["daemon"].wait(timeout=30)  # in-process: it stopped with the command
        assert not (home / "coordinator.endpoint").exists()
    finally:
        _stop_target(target)
        stop(sshd)
    assert not _pids_under(target)
