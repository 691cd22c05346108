"""`lab server migrate --target ssh`'s onboard-first step (coordinator/migrate/command.py) with a
stand-in onboarding, against this home's coordinator served in-process on loopback (local mode,
no daemon): a failed onboarding names its step and leaves everything as it was; a refusal or an
unreachable loopback coordinator stops before any change. The real SSH onboarding and move:
test_migrate_ssh.py."""

from __future__ import annotations

import pathlib
import threading
from typing import Any

import pytest
import trio
import yaml

from lab.common.errors import UsageError
from lab.coordinator.cli.app import run
from lab.coordinator.migrate import MigrationFailed
from lab.coordinator.migrate.command import Onboard, run_migration


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    assert run(["init", "--local"]) == 0
    return tmp_path / "home"


# -- run_migration with a stand-in onboarding: local mode, the coordinator served in-process -----------


def _migrate(home: pathlib.Path, onboard: Onboard, confirm: Any = lambda: True, serve: str | None = None,
             said: list[str] | None = None) -> list[str]:
    from lab.coordinator.cluster import free_ports
    from lab.coordinator.engine import Paths

    said = [] if said is None else said
    serve = serve or f"127.0.0.1:{free_ports(1)[0]}"
    try:
        trio.run(lambda: run_migration(Paths.resolve(), "node-x", "127.0.0.1:1", serve_at=serve, grace=1, timeout=5,
                                       confirm=confirm, say=said.append, onboard=onboard))
    except BaseExceptionGroup as group:  # the nursery's group around the one error, as the CLI unwraps it
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        raise exc from None
    return said


def _unchanged(home: pathlib.Path) -> None:
    config = home / "config.yaml"  # `lab init --local` writes none; nothing may add `server:`
    assert not config.exists() or "server" not in (yaml.safe_load(config.read_text()) or {})
    assert not (home / "coordinator.endpoint").exists() and not (home / "moved.json").exists()


def test_failed_onboarding_names_the_step_and_leaves_the_local_coordinator(home: pathlib.Path) -> None:
    from lab.coordinator.cluster import free_ports
    from lab.coordinator.providers.ssh import OnboardFailed

    serve = f"127.0.0.1:{free_ports(1)[0]}"
    seen: list[Any] = []

    def onboarding(endpoint: str, confirm: Any) -> None:
        seen.append(endpoint)
        confirm()
        seen.append((home / "coordinator.endpoint").read_text().strip())  # served in-process meanwhile
        seen.append(threading.current_thread() is threading.main_thread())
        raise OnboardFailed("install", "pip said no")

    with pytest.raises(MigrationFailed) as failed:
        _migrate(home, Onboard("ssh://root@127.0.0.1:2222", "127.0.0.1", onboarding), serve=serve)
    text = str(failed.value)
    assert text.startswith("onboarding node-x over ssh://root@127.0.0.1:2222 failed: onboard failed at step 'install': pip said no")
    assert "stays authoritative, nothing was moved" in text
    assert seen == [serve, serve, False]
    _unchanged(home)


def test_declined_and_unreachable_stop_before_any_change(home: pathlib.Path) -> None:
    after_yes: list[str] = []

    def onboarding(endpoint: str, confirm: Any) -> None:
        confirm()
        after_yes.append(endpoint)

    with pytest.raises(UsageError, match="not migrated; node-x was not onboarded, nothing changed"):
        _migrate(home, Onboard("ssh://root@127.0.0.1", "127.0.0.1", onboarding), confirm=lambda: False)
    assert after_yes == []
    _unchanged(home)

    # a coordinator on loopback cannot be reached from another host: refused before SSH
    with pytest.raises(UsageError, match=r"10\.0\.0\.5 cannot reach the coordinator at 127\.0\.0\.1:\d+ \(loopback\): pass --server"):
        _migrate(home, Onboard("ssh://root@10.0.0.5", "10.0.0.5", onboarding))
    assert after_yes == []
    _unchanged(home)

    # an explicit --server the target reaches: the agent is told that one
    with pytest.raises(MigrationFailed, match=r"plan failed: no server named 'node-x' .*the coordinator is unchanged "
                       r"\(node-x stays onboarded: rerun the same command\)"):  # the stand-in onboarded nothing
        _migrate(home, Onboard("ssh://root@10.0.0.5", "10.0.0.5", onboarding, server="10.0.0.1:7443"))
    assert after_yes == ["10.0.0.1:7443"]
    _unchanged(home)


def test_an_enrolled_node_is_not_onboarded_again(home: pathlib.Path) -> None:
    import time

    from lab.coordinator.state import StateDB

    state = StateDB.open(home)
    try:
        state.add_server("node-x", "ssh", [])
        state.update_server("node-x", enrolled_at=time.time(), cert_serial="7")
    finally:
        state.close()
    called: list[str] = []
    asked: list[bool] = []

    def confirm() -> bool:
        asked.append(True)
        return False

    said: list[str] = []
    with pytest.raises(UsageError, match="not migrated"):
        _migrate(home, Onboard("ssh://root@127.0.0.1", "127.0.0.1", lambda *a: called.append("onboard")), confirm, said=said)
    assert called == [] and asked == [True]  # the move's own plan and question only
    assert "→ node-x is already enrolled: no onboarding, only the move" in said
    assert any(line.startswith("Plan\n  ~ migrate lab-server from local") for line in said), said
    _unchanged(home)
