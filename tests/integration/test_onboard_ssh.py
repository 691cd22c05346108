"""`lab onboard --provider ssh` end to end against OpenSSH's real sshd on 127.0.0.1.

The "host" is this machine, reached through a test sshd (temp host key, key-only auth) on a
free port; every remote path is prefixed with a temp dir (``--target-root``) and the agent runs
as a supervised background process, so nothing is written to /opt/lab, /etc/lab, /var/lib/lab
or /etc/systemd. A coordinator (`lab server run`) runs with a temp LAB_HOME. The lab wheels are
built once per test session. Every process started here is stopped by its PID at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

BIN = pathlib.Path(sys.executable).parent
LAB = str(BIN / "lab")
SSHD = "/usr/sbin/sshd"

if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
    if os.environ.get("CI"):
        raise RuntimeError("CI: /usr/sbin/sshd (openssh-server) and ssh-keygen (openssh-client) are required")
    pytest.skip("openssh-server not installed (/usr/sbin/sshd)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the onboarding test logs in as root through a test sshd", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], log: pathlib.Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}: {log.read_text()}")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def keygen(path: pathlib.Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, stdin=subprocess.DEVNULL)


class Sshd:
    def __init__(self, root: pathlib.Path, client_pub: pathlib.Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        self.host_key = root / "ssh_host_ed25519_key"
        keygen(self.host_key)
        (root / "authorized_keys").write_text(client_pub.read_text())
        self.config = root / "sshd_config"
        self.config.write_text(
            f"HostKey {self.host_key}\nAuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {root / 'sshd.pid'}\nListenAddress 127.0.0.1\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        self.port = free_port()
        self.log = root / "sshd.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        wait_port(self.port, self.proc, self.log)

    def public_key(self) -> str:
        return " ".join(pathlib.Path(str(self.host_key) + ".pub").read_text().split()[:2])


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from lab.coordinator.cli.onboard_cmd import build_wheelhouse

    return build_wheelhouse(tmp_path_factory.mktemp("wheels"))


@pytest.fixture()
def world(tmp_path: pathlib.Path) -> Iterator[dict[str, Any]]:
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    key = tmp_path / "id_ed25519"
    keygen(key)
    env = dict(os.environ, LAB_HOME=str(tmp_path / "coord"), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    env.pop("LAB_ONBOARD_INJECT_FAILURE", None)
    r = subprocess.run([LAB, "init", "--local"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    target = tmp_path / "target"
    target.mkdir()
    procs: list[subprocess.Popen[Any]] = []
    sshd = Sshd(tmp_path / "sshd", pathlib.Path(str(key) + ".pub"))
    procs.append(sshd.proc)
    dport = free_port()
    dlog = tmp_path / "daemon.log"
    with dlog.open("w") as err:
        daemon = subprocess.Popen([LAB, "server", "run", "--listen", f"127.0.0.1:{dport}"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    procs.append(daemon)
    try:
        deadline = time.monotonic() + 30
        while "event=daemon.ready" not in dlog.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, dlog.read_text()
            time.sleep(0.05)
        yield {"env": env, "key": key, "sshd": sshd, "daemon": daemon, "dport": dport, "dlog": dlog, "target": target, "tmp": tmp_path}
    finally:
        pidfile = target / "run/lab/lab-agent.supervisor.pid"
        if pidfile.exists():  # the supervised agent: its own process group, led by the supervisor
            pid = int(pidfile.read_text())
            try:
                os.killpg(pid, signal.SIGTERM)
                for _ in range(100):
                    os.killpg(pid, 0)
                    time.sleep(0.1)
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in reversed(procs):
            stop(p)


def onboard(w: dict[str, Any], wheels: pathlib.Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = [
        LAB, "onboard", "web-1", "--provider", "ssh", "--host", "127.0.0.1", "--port", str(w["sshd"].port),
        "--identity", str(w["key"]), "--labels", "app", "--yes", "--server", f"127.0.0.1:{w['dport']}",
        "--target-root", str(w["target"]), "--service-mode", "process", "--wheelhouse", str(wheels), *extra,
    ]  # fmt: skip
    return subprocess.run(args, env=env or w["env"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240)


def servers(w: dict[str, Any]) -> list[dict[str, Any]]:
    r = subprocess.run([LAB, "get", "servers", "-o", "json"], env=w["env"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


@pytest.mark.slow
def test_onboard_fails_mid_install_then_rerun_enrolls(world: dict[str, Any], wheelhouse: pathlib.Path) -> None:
    w = world
    # an unknown host key without --accept-new-host-key: refused before anything happens
    r = onboard(w, wheelhouse)
    assert r.returncode != 0 and "unknown host key" in r.stderr and "--accept-new-host-key" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (w["target"] / "opt").exists()

    # first real run: the copied lab wheel is corrupted before pip installs it
    r = onboard(w, wheelhouse, "--accept-new-host-key", env=dict(w["env"], LAB_ONBOARD_INJECT_FAILURE="install"))
    assert r.returncode != 0, r.stdout
    assert "NEW HOST KEY" in r.stderr and "SHA256:" in r.stderr
    assert "onboard failed at step 'install'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "→ Install lab agent" in r.stdout and "Lab agent enrolls" not in r.stdout
    assert [s["identity"] for s in servers(w) if s["name"] == "web-1"] == ["not enrolled"]

    # rerun: the venv is reused, the wheel re-copied, a fresh token minted; the agent enrolls
    r = onboard(w, wheelhouse)  # the key is now in $LAB_HOME/known_hosts: no flag needed
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for text in ("Step 1: Render", "│ Provider │ ssh (existing machine)", "│ Host     │ 127.0.0.1", "Onboarding will:",
                 "+ Install lab agent", "+ Generate one-time enrollment token", "venv reused", "Identity established"):
        assert text in out, out
    assert "NEW HOST KEY" not in r.stderr
    [web] = [s for s in servers(w) if s["name"] == "web-1"]
    assert web["identity"] == "enrolled" and web["provider"] == "ssh" and "app" in web["labels"]

    t = w["target"]
    assert (t / "opt/lab/bin/lab-agent").exists() and (t / "var/lib/lab/node.key").exists()
    assert not (t / "etc/lab/join-token").exists()  # enroll removes the used token file
    pid = int((t / "run/lab/lab-agent.supervisor.pid").read_text())
    os.killpg(pid, 0)  # the supervisor runs
    agent_log = t / "var/log/lab-agent.log"
    deadline = time.monotonic() + 30
    while "event=ready" not in agent_log.read_text():  # the agent itself started with its new identity
        assert time.monotonic() < deadline, agent_log.read_text()
        time.sleep(0.1)

    # onboarding an onboarded host again: the old supervisor is stopped, exactly one new one runs
    r = onboard(w, wheelhouse)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 copied, " in r.stdout
    pid2 = int((t / "run/lab/lab-agent.supervisor.pid").read_text())
    assert pid2 != pid
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    # no token text in our output, the daemon's log or the agent's log
    log = w["dlog"].read_text()
    assert "event=enroll.accepted" in log
    for text in (out, r.stderr, log, (t / "var/log/lab-agent.log").read_text()):
        assert "lab1." not in text

    # audit entries: start, the failure with its step, the steps, done; never a token
    from lab.coordinator.state import StateDB

    state = StateDB.open(pathlib.Path(w["env"]["LAB_HOME"]))
    try:
        entries = [e for e in state.audit_log(500) if e.subject == "web-1"]
    finally:
        state.close()
    actions = [e.action for e in entries]
    assert {"onboard.start", "onboard.failed", "onboard.step", "onboard.done", "token.create", "server.add"} <= set(actions)
    [failed] = [e for e in entries if e.action == "onboard.failed"]
    assert failed.detail["step"] == "install"
    assert "lab1." not in json.dumps([e.detail for e in entries])


@pytest.mark.slow
def test_onboard_refuses_a_changed_host_key(world: dict[str, Any], wheelhouse: pathlib.Path) -> None:
    w = world
    other = w["tmp"] / "other_key"
    keygen(other)
    wrong = " ".join(pathlib.Path(str(other) + ".pub").read_text().split()[:2])
    home = pathlib.Path(w["env"]["LAB_HOME"])
    (home / "known_hosts").write_text(f"[127.0.0.1]:{w['sshd'].port} {wrong}\n")
    r = onboard(w, wheelhouse, "--accept-new-host-key")
    assert r.returncode != 0 and "HOST KEY MISMATCH" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (w["target"] / "opt").exists()
    assert [s for s in servers(w) if s["name"] == "web-1"] == []


@pytest.mark.slow
def test_onboard_from_a_home_connected_to_the_daemon(world: dict[str, Any], wheelhouse: pathlib.Path) -> None:
    """After `lab server connect` (or `lab server migrate`), the laptop onboards: it does the SSH
    work, the daemon registers the server and mints the token, the agent enrolls with the
    connected home's `server:` (no --server), the CLI waits through the daemon."""
    w = world
    coord = pathlib.Path(w["env"]["LAB_HOME"])
    laptop = w["tmp"] / "laptop"
    laptop.mkdir(mode=0o700)
    for f in ("ca.pub", "admin.key", "admin.cert"):
        shutil.copy2(coord / f, laptop / f)
    env = dict(w["env"], LAB_HOME=str(laptop))
    r = subprocess.run([LAB, "server", "connect", f"127.0.0.1:{w['dport']}"], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    args = [LAB, "onboard", "web-2", "--provider", "ssh", "--host", "127.0.0.1", "--port", str(w["sshd"].port),
            "--identity", str(w["key"]), "--labels", "app", "--yes", "--accept-new-host-key",
            "--target-root", str(w["target"]), "--service-mode", "process", "--wheelhouse", str(wheelhouse)]  # fmt: skip
    r = subprocess.run(args, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"it reaches 127.0.0.1:{w['dport']}" in r.stdout and "+ Generate one-time enrollment token" in r.stdout
    assert f"Identity established: web-2 enrolled with 127.0.0.1:{w['dport']} (labels: app)" in r.stdout, r.stdout
    assert "NEW HOST KEY" in r.stderr and (laptop / "known_hosts").exists()  # the laptop's, not the coordinator's
    assert not (laptop / "state.db").exists() and not (coord / "known_hosts").exists()

    # `lab get servers` through the daemon shows it enrolled; so does the coordinator's own state
    r = subprocess.run([LAB, "get", "servers", "-o", "json"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert [(s["name"], s["identity"], s["provider"]) for s in json.loads(r.stdout)] == [("web-2", "enrolled", "ssh")]
    assert [s["identity"] for s in servers(w) if s["name"] == "web-2"] == ["enrolled"]
    enrolled = yaml_doc(w["target"] / "var/lib/lab/enrollment.yaml")
    assert enrolled["node"] == "web-2" and enrolled["coordinator"] == f"127.0.0.1:{w['dport']}"

    # audited on the coordinator with the admin certificate's name; no token anywhere
    from lab.coordinator.state import StateDB

    state = StateDB.open(coord)
    try:
        entries = [e for e in state.audit_log(500) if e.subject == "web-2"]
    finally:
        state.close()
    mine = {(e.actor, e.action) for e in entries}
    assert {("cert:admin", a) for a in ("onboard.start", "server.add", "token.create", "onboard.step", "onboard.done")} <= mine
    assert "lab1." not in json.dumps([e.detail for e in entries])
    log = w["dlog"].read_text()
    assert "method=onboard.token" in log and "event=enroll.accepted" in log
    for text in (out, log, (w["target"] / "var/log/lab-agent.log").read_text()):
        assert "lab1." not in text


def yaml_doc(path: pathlib.Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))
