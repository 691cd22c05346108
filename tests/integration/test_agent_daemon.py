"""`lab-agent run` as a real process: socket API, SO_PEERCRED, files, restart from cache, memory hygiene.

Needs root (files are chowned to their declared owners, an unprivileged caller is simulated with
`setpriv`). Skips only when that is impossible and CI is unset; under CI=true it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agent import localclient

BIN = Path(sys.executable).parent
LAB, LAB_AGENT = str(BIN / "lab"), str(BIN / "lab-agent")
VALUE = "hunter2-d41d8cd98f00-root-only"
NOBODY_VALUE = "tok-for-nobody-93b1c"
SEED = f"""
secrets:
  - path: db/main-password
    value: "{VALUE}"
    ttl: 90d
  - path: app/token
    value: "{NOBODY_VALUE}"
    owner: nobody
    group: nogroup
    mode: "0440"
  - path: mail/tls/key
    value: "tls-key-material"
    mode: "0400"
"""


def need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {why}", pytrace=False)
    pytest.skip(why)


class Agent:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home, self.run_dir, self.secrets = root / "home", root / "run", root / "secrets"
        self.log = root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ, LAB_HOME=str(self.home), LAB_RUNTIME_DIR=str(self.run_dir), LAB_SECRETS_DIR=str(self.secrets))
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.pop("WATCHDOG_USEC", None)
        # As installed: byte-compiled modules (dev shells often set PYTHONDONTWRITEBYTECODE).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        os.makedirs(root / "pycache", mode=0o755, exist_ok=True)

    @property
    def sock(self) -> str:
        return str(self.run_dir / "agent.sock")

    def start(self, *extra: str, env: dict[str, str] | None = None, wait: bool = True) -> float:
        """Start; return seconds from spawn to the first successful answer."""
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [LAB_AGENT, "run", "--home", str(self.home), "--runtime-dir", str(self.run_dir), "--secrets-dir", str(self.secrets), *extra],
                stdout=subprocess.DEVNULL, stderr=log, env=env or self.env,
            )
        if not wait:
            return 0.0
        deadline = t0 + 20
        while time.monotonic() < deadline:
            try:
                if localclient.request({"t": "agent.get", "path": "db/main-password"}, self.sock, timeout=2)["ok"]:
                    return time.monotonic() - t0
            except localclient.AgentError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.001)
        raise AssertionError("agent did not answer: " + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=15)
        self.proc = None
        return rc

    def lab(self, *args: str, user: int | None = None) -> subprocess.CompletedProcess[bytes]:
        cmd = [LAB, *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    need(os.geteuid() == 0, "needs root (chown of secret files, setpriv)")
    # Not under pytest's tmp_path: that is 0700, and an unprivileged caller must reach the socket.
    root = Path(tempfile.mkdtemp(prefix="lab-agent-it-"))
    os.chmod(root, 0o755)
    a = Agent(root)
    (root / "seed.yaml").write_text(SEED)
    r = subprocess.run([LAB_AGENT, "cache", "import", "--from", str(root / "seed.yaml"), "--home", str(a.home), "--runtime-dir", str(a.run_dir)],
                       env=a.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (root / "seed.yaml").unlink()
    a.start()
    yield a
    if a.proc is not None:
        a.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_get_returns_exact_value(agent: Agent) -> None:
    r = agent.lab("secret", "get", "db/main-password")
    assert (r.returncode, r.stdout, r.stderr) == (0, VALUE.encode(), b"")


def test_missing_path_for_root(agent: Agent) -> None:
    r = agent.lab("secret", "get", "db/none")
    assert r.returncode != 0 and r.stdout == b"" and r.stderr == b"lab: db/none is not in the local cache\n"


def test_unprivileged_caller_is_refused_unless_owner(agent: Agent) -> None:
    need(shutil.which("setpriv") is not None, "setpriv missing (util-linux)")
    r = agent.lab("secret", "get", "db/main-password", user=65534)
    assert (r.returncode, r.stdout, r.stderr) == (4, b"", b"lab: not entitled to db/main-password\n")
    r = agent.lab("secret", "get", "does/not-exist", user=65534)  # same reply: no probing
    assert (r.returncode, r.stderr) == (4, b"lab: not entitled to does/not-exist\n")
    r = agent.lab("secret", "get", "app/token", user=65534)
    assert (r.returncode, r.stdout) == (0, NOBODY_VALUE.encode())
    r = agent.lab("secret", "exec", "--", "env", user=65534)
    assert r.returncode == 0 and f"LAB_SECRET_APP_TOKEN={NOBODY_VALUE}".encode() in r.stdout
    assert b"LAB_SECRET_DB_MAIN_PASSWORD" not in r.stdout and VALUE.encode() not in r.stdout


def test_exec_as_root(agent: Agent) -> None:
    r = agent.lab("secret", "exec", "--", "sh", "-c", 'printf %s "$LAB_SECRET_DB_MAIN_PASSWORD"')
    assert (r.returncode, r.stdout) == (0, VALUE.encode())


def test_agent_not_running_message(agent: Agent, tmp_path: Path) -> None:
    env = dict(agent.env, LAB_RUNTIME_DIR=str(tmp_path))
    r = subprocess.run([LAB, "secret", "get", "db/main-password"], env=env, capture_output=True, timeout=30)
    assert r.returncode == localclient.EXIT_NO_AGENT
    assert r.stderr.decode() == f"lab: agent not running (no socket at {tmp_path}/agent.sock)\n"


def test_fast_path_imports_nothing_heavy(agent: Agent) -> None:
    code = (
        "import sys, atexit\n"
        "atexit.register(lambda: sys.stderr.write(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('typer','click','trio','yaml','nacl','lmdb','rich') or m.startswith('lab.coordinator.cli.app')))))\n"
        "sys.argv = ['lab', 'secret', 'get', 'db/main-password']\n"
        "from lab.coordinator.cli import main\nmain()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=agent.env, capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stdout == VALUE.encode()
    assert r.stderr == b"", f"heavy modules on the hot path: {r.stderr.decode()}"


def test_files_delivered_with_modes(agent: Agent) -> None:
    f = agent.secrets / "app/token"
    st = f.stat()
    assert f.read_bytes() == NOBODY_VALUE.encode()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o440)
    k = agent.secrets / "mail/tls/key"
    assert (k.stat().st_uid, stat.S_IMODE(k.stat().st_mode)) == (0, 0o400)
    assert stat.S_IMODE((agent.secrets / "mail").stat().st_mode) == 0o755


def test_cache_and_status_commands(agent: Agent) -> None:
    r = agent.lab("secret", "cache")
    out = r.stdout.decode()
    assert r.returncode == 0 and out.startswith("LOCAL CACHE:\nSECRET")
    assert "db/main-password" in out and "89d left" in out and "no expiry" in out and VALUE not in out
    r = agent.lab("secret", "status")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "SECRET DISTRIBUTION STATUS:" in out and "3 secrets cached" in out and "not connected (sync not running)" in out
    data = json.loads(agent.lab("secret", "status", "-o", "json").stdout)
    assert data["key_protection"] in ("file", "tpm") and data["cached"] == 3
    assert data["dumpable"] is False
    # an unprivileged caller sees only its own entries
    entries = json.loads(agent.lab("secret", "cache", "-o", "json", user=65534).stdout)
    assert [e["path"] for e in entries] == ["app/token"]


def test_memory_is_locked_and_not_dumpable(agent: Agent) -> None:
    assert agent.proc is not None
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    vmlck = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmLck:")))
    assert vmlck > 0, status
    limits = Path(f"/proc/{agent.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    # PR_GET_DUMPABLE as the agent itself reported it (checked right after prctl)
    data = json.loads(agent.lab("secret", "status", "-o", "json").stdout)
    assert data["dumpable"] is False and data["key_locked"] is True


def test_no_plaintext_in_cache_files_or_logs(agent: Agent) -> None:
    agent.lab("secret", "get", "db/main-password")
    for f in (agent.home / "cache").iterdir():
        data = f.read_bytes()
        assert VALUE.encode() not in data and NOBODY_VALUE.encode() not in data, f
    log = agent.log.read_bytes()
    assert VALUE.encode() not in log and NOBODY_VALUE.encode() not in log
    assert b"event=served path=db/main-password" in log  # the log does speak, just not values
    mode = stat.S_IMODE((agent.home / "cache").stat().st_mode)
    assert mode == 0o700


def test_second_agent_on_same_home_is_refused(agent: Agent) -> None:
    r = subprocess.run([LAB_AGENT, "run", "--home", str(agent.home), "--runtime-dir", str(agent.root / "run2"), "--secrets-dir", str(agent.root / "s2")],
                       env=agent.env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "another lab-agent" in r.stderr and "is running with this home" in r.stderr
    assert agent.lab("secret", "get", "db/main-password").stdout == VALUE.encode()


def test_bad_client_does_not_hurt_others(agent: Agent) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(agent.sock)
        s.sendall(b"\xff\xff\xff\xff garbage")
        reply = s.recv(4096)
        assert b"protocol" in reply
    assert agent.lab("secret", "get", "db/main-password").stdout == VALUE.encode()


def test_restart_answers_from_cache_fast(agent: Agent) -> None:
    """Offline-first: no store exists at all; the restarted agent answers from its cache."""
    assert agent.stop() == 0
    assert not Path(agent.sock).exists()
    times = []
    for _ in range(3):
        times.append(agent.start())
        if _ < 2:
            agent.stop()
    print(f"\nstart-to-first-answer: {', '.join(f'{t * 1000:.0f} ms' for t in times)}")
    # 300 ms is the target (docs/AGENT.md); on a loaded 2-core CI box allow slack, report the figure.
    assert min(times) < float(os.environ.get("LAB_AGENT_START_BUDGET_S", "1.0"))


def test_sigterm_is_clean_and_sd_notify(agent: Agent, tmp_path: Path) -> None:
    agent.stop()
    ns = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.bind(str(ns))
        n.settimeout(10)
        env = dict(agent.env, NOTIFY_SOCKET=str(ns), WATCHDOG_USEC="200000")
        agent.start(env=env, wait=False)
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (any(b"READY=1" in g for g in got) and sum(b"WATCHDOG=1" in g for g in got) >= 2):
            got.append(n.recv(4096))
        assert any(b"READY=1" in g for g in got) and sum(b"WATCHDOG=1" in g for g in got) >= 2, got
        assert agent.stop(signal.SIGTERM) == 0
        got.append(n.recv(4096))
        assert any(b"STOPPING=1" in g for g in got)
    assert not Path(agent.sock).exists()
    assert b"event=stopped" in agent.log.read_bytes()
    agent.start()  # leave it running for the fixture's teardown


def test_reload_after_import_delivers_new_files(agent: Agent) -> None:
    seed = agent.root / "more.yaml"
    seed.write_text("secrets:\n  - path: late/one\n    value: late-value-1\n")
    r = subprocess.run([LAB_AGENT, "cache", "import", "--from", str(seed), "--home", str(agent.home), "--runtime-dir", str(agent.run_dir)],
                       env=agent.env, capture_output=True, text=True, timeout=60)
    seed.unlink()
    assert r.returncode == 0 and "agent reloaded" in r.stdout, r.stderr
    assert (agent.secrets / "late/one").read_bytes() == b"late-value-1"
    assert agent.lab("secret", "get", "late/one").stdout == b"late-value-1"


def test_import_needs_root(agent: Agent) -> None:
    need(shutil.which("setpriv") is not None, "setpriv missing (util-linux)")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", LAB_AGENT, "cache", "import", "--from", "/dev/null",
                        "--home", str(agent.home)], env=agent.env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip() == "lab-agent: cache import needs root"
