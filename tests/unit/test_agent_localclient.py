"""agent/localclient.py (the `lab secret get` hot path), the CLI renderings, daemon helpers, the unit file."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from lab.agent import daemon, localclient
from lab.coordinator.cli import agent_secret_cmd as cmd

NOW = 1_800_000_000.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def replies(monkeypatch: pytest.MonkeyPatch):
    queue: list[object] = []
    sent: list[dict] = []

    def fake(message: dict, path: str | None = None, timeout: float = 10.0) -> dict:
        sent.append(message)
        r = queue.pop(0)
        if isinstance(r, Exception):
            raise r
        return r  # type: ignore[return-value]

    monkeypatch.setattr(localclient, "request", fake)
    return queue, sent


def test_get_prints_value_without_newline(replies, capfdbinary) -> None:
    queue, sent = replies
    queue.append({"ok": True, "value": b"s3cret", "status": "fresh", "since": NOW, "expiry": None})
    assert localclient.fast_main(["get", "db/pw"]) == 0
    out, err = capfdbinary.readouterr()
    assert out == b"s3cret" and err == b"" and sent == [{"t": "agent.get", "path": "db/pw"}]


def test_stale_warns_on_stderr_only(replies, capfdbinary) -> None:
    queue, _ = replies
    queue.append({"ok": True, "value": b"v", "status": "stale", "since": NOW, "expiry": None})
    assert localclient.fast_main(["get", "db/pw"]) == 0
    out, err = capfdbinary.readouterr()
    assert out == b"v"
    assert re.fullmatch(rb"lab: db/pw is stale \(store unreachable since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\), served from cache\n", err)


def test_not_entitled(replies, capfd) -> None:
    queue, _ = replies
    queue.append({"ok": False, "error": "not_entitled", "message": "not entitled to db/pw"})
    assert localclient.fast_main(["get", "db/pw"]) == localclient.EXIT_NOT_ENTITLED
    assert capfd.readouterr() == ("", "lab: not entitled to db/pw\n")


def test_no_agent(replies, capfd) -> None:
    queue, _ = replies
    queue.append(localclient.AgentError("agent not running (no socket at /run/lab/agent.sock)", localclient.EXIT_NO_AGENT))
    assert localclient.fast_main(["get", "db/pw"]) == localclient.EXIT_NO_AGENT
    assert capfd.readouterr().err == "lab: agent not running (no socket at /run/lab/agent.sock)\n"


@pytest.mark.parametrize("argv", [["get"], ["get", "--help"], ["get", "a", "b"], ["exec", "--help"], [], ["other"]])
def test_falls_back_to_typer(argv: list[str]) -> None:
    assert localclient.fast_main(argv) is None


def test_exec_needs_command(capfd) -> None:
    assert localclient.fast_main(["exec", "--"]) == 2


def test_exec_sets_variables(replies, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, _ = replies
    queue.append({"ok": True, "env": {"LAB_SECRET_DB_PW": b"v1"}, "stale": [], "skipped": []})
    seen = {}

    def fake_exec(file, args, env):
        seen.update(file=file, args=args, env=env)
        raise SystemExit(0)

    monkeypatch.setattr(localclient.os, "execvpe", fake_exec)
    with pytest.raises(SystemExit):
        localclient.fast_main(["exec", "--", "printenv", "LAB_SECRET_DB_PW"])
    assert seen["args"] == ["printenv", "LAB_SECRET_DB_PW"] and seen["env"][b"LAB_SECRET_DB_PW"] == b"v1"


def test_socket_path() -> None:
    assert localclient.socket_path({}) == "/run/lab/agent.sock"
    assert localclient.socket_path({"LAB_RUNTIME_DIR": "/tmp/x"}) == "/tmp/x/agent.sock"


def test_localclient_is_lean() -> None:
    text = (ROOT / "agent/localclient.py").read_text()
    imports = set(re.findall(r"^(?:import|from) ([\w.]+)", text, re.M))
    assert imports <= {"__future__", "os", "_socket", "sys", "time", "msgpack"}, imports


# -- CLI renderings ----------------------------------------------------------------------------


def test_cache_rows() -> None:
    rows = cmd.cache_rows(
        [
            {"path": "mail/tls-cert", "expires_at": NOW + 89 * 86400 + 5, "status": "fresh"},
            {"path": "mail/dkim-key", "expires_at": None, "status": "stale"},
            {"path": "k8s/join-token", "expires_at": NOW + 23 * 3600 + 9, "status": "fresh"},
            {"path": "old", "expires_at": NOW - 1, "status": "expired"},
        ],
        NOW,
    )
    assert rows == [
        ["mail/tls-cert", "✓", "89d left", "fresh"],
        ["mail/dkim-key", "✓", "no expiry", "stale"],
        ["k8s/join-token", "✓", "23h left", "fresh"],
        ["old", "✓", "expired", "expired"],
    ]


def test_status_lines_without_sync() -> None:
    lines = dict(cmd.status_lines({"cached": 8, "by_status": {"fresh": 8}, "key_protection": "tpm", "stale_after": 300, "sync": {"running": False}}, NOW))
    assert lines["Local cache:"] == "✓ 8 secrets cached, encrypted (key: tpm), fresh (< 5m old)"
    assert lines["Secret store:"] == "✗ not connected (sync not running)"
    assert lines["Lab-server:"] == "✗ not connected (sync not running)"


def test_status_lines_with_sync_and_stale() -> None:
    s = {
        "cached": 3, "entitled": 3, "by_status": {"fresh": 1, "stale": 2}, "key_protection": "file", "oldest_confirmed": NOW - 7200,
        "sync": {"running": True, "stores": {"store-1": "connected", "store-2": "unreachable"}, "coordinator": "connected"},
    }
    lines = dict(cmd.status_lines(s, NOW))
    assert lines["Local cache:"].startswith("⚠ 3 secrets cached (of 3 entitled)") and "2h ago" in lines["Local cache:"]
    assert lines["Secret store:"] == "✓ connected (2 replicas: store-1, store-2; via store-1)"
    assert lines["Lab-server:"] == "✓ connected"
    assert dict(cmd.status_lines({"cached": 0, "sync": {}}, NOW))["Local cache:"].startswith("⚠ empty")


# -- daemon helpers ----------------------------------------------------------------------------


def test_config_resolution() -> None:
    c = daemon.AgentConfig.resolve(environ={})
    assert (c.home, c.runtime_dir, c.secrets_dir) == (Path("/var/lib/lab"), Path("/run/lab"), Path("/run/secrets"))
    c = daemon.AgentConfig.resolve(None, "/r", None, environ={"LAB_HOME": "/h", "LAB_RUNTIME_DIR": "/x", "LAB_SECRETS_DIR": "/s"})
    assert (c.home, c.runtime_dir, c.secrets_dir, c.socket_path) == (Path("/h"), Path("/r"), Path("/s"), Path("/r/agent.sock"))


def test_watchdog_interval() -> None:
    assert daemon.watchdog_interval({}) is None
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert daemon.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None


def test_sd_notify_without_systemd() -> None:
    assert daemon.sd_notify("READY=1", {}) is False


def test_log_format_is_key_value() -> None:
    rec = logging.LogRecord("lab.agent", logging.INFO, __file__, 1, "event=served path=%s", ("db/pw",), None)
    line = daemon._KVFormatter().format(rec)
    assert re.fullmatch(r"ts=\S+Z level=info logger=lab\.agent event=served path=db/pw", line)
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain words", (), None)
    assert daemon._KVFormatter().format(rec).endswith('msg="plain words"')


# -- the systemd unit --------------------------------------------------------------------------


def test_unit_file() -> None:
    text = (ROOT / "packaging/systemd/lab-agent.service").read_text()
    keys = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["Type"] == "notify" and keys["WatchdogSec"] and keys["LimitMEMLOCK"]
    assert keys["RuntimeDirectory"] == "lab" and keys["StateDirectory"] == "lab"
    assert keys["ProtectSystem"] == "strict" and keys["NoNewPrivileges"] == "yes" and keys["PrivateTmp"] == "yes"
    assert "/var/lib/lab" in keys["ReadWritePaths"] and "/run/secrets" in keys["ReadWritePaths"]
    assert set(keys["CapabilityBoundingSet"].split()) <= {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_IPC_LOCK"}


def test_one_agent_per_home(tmp_path: Path) -> None:
    from lab.common.errors import ConfigError

    fd = daemon._lock_home(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"another lab-agent \(pid {os.getpid()}\) is running"):
            daemon._lock_home(tmp_path)
    finally:
        os.close(fd)
    os.close(daemon._lock_home(tmp_path))  # free again once released


def test_sync_hook_placeholder_reports_not_running() -> None:
    import trio

    class FakeAgent:
        sync_status: dict = {"running": True}

    agent = FakeAgent()

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(daemon.sync_loop, agent)

    trio.run(main)
    assert agent.sync_status["running"] is False
