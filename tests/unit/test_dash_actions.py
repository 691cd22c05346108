"""`lab dash` apply (A) and identity renew (R), without a terminal: the y/N question, the run on the
action worker, its lines in the log pane, and errors as one line (log and status line)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import test_dash_widgets as dash_widgets

from lab.coordinator import identity_ops, lifecycle_api
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.tui import models, nav, source

Driver = dash_widgets.Driver
engine = dash_widgets.engine  # the fixture (five servers in a fresh home), used by name


def run_keys(d: Driver, *keys: str, until: str) -> list[str]:
    """Press keys with a real action worker (its own Engine, as `lab dash` opens it), feed its
    results to the dashboard until a log line holds ``until``; the log pane's lines."""
    d.dash.actions = source.Worker(lambda: Engine.open(Paths.resolve()))
    try:
        d.keys(*keys)
        deadline = time.monotonic() + 10
        while not any(until in x for x in d.dash.log.lines()) and time.monotonic() < deadline:
            time.sleep(0.01)
            d.dash._on_wake(b"!")
        return d.dash.log.lines()
    finally:
        d.dash.actions.close()


def test_apply_asks_then_applies_the_stored_plan(engine: Engine) -> None:
    lifecycle_api.Lifecycle(engine).plan("web-1", labels=["app", "production"])
    d = Driver(engine, (120, 40)).keys(":", "server web-1", "enter")
    d.keys("A")
    assert "Run apply on web-1?" in d.text() and "applies the plan stored by `lab plan server web-1`" in d.text()
    d.keys("n")
    assert "cancelled" in d.screen()[-2]
    assert (engine.paths.home / "plans" / "web-1.json").is_file()  # nothing ran
    log = run_keys(d, "A", "y", until="apply web-1: done")
    assert log[-4:] == ["$ apply web-1", "apply web-1: started", "✓ labels: app,production", "apply web-1: done"]
    assert "✓ labels: app,production" in d.text()  # the pane shows the newest lines
    engine.reload()
    assert engine.state.get_server("web-1").labels == ("app", "production")
    assert not (engine.paths.home / "plans" / "web-1.json").exists()


def test_apply_errors_are_one_line(engine: Engine) -> None:
    d = Driver(engine, (160, 40)).keys(":", "server web-1", "enter")
    log = run_keys(d, "A", "y", until="apply failed")
    assert log[-3:] == ["$ apply web-1", "apply web-1: started", "apply failed: no plan for 'web-1': run `lab plan server web-1 …` first"]
    assert d.screen()[-2] == "apply failed: no plan for 'web-1': run `lab plan server web-1 …` first"
    # a stale plan: the definitions changed since
    lifecycle_api.Lifecycle(engine).plan("web-1", labels=["app", "production"])
    with (engine.paths.definitions / "labels.yaml").open("a") as f:
        f.write("\n  extra-label: {}\n")
    log = run_keys(d, "A", "y", until="is stale")
    assert log[-1].startswith("apply failed: the plan for 'web-1' is stale") and "lab plan server web-1" in log[-1]
    assert not any("Traceback" in x for x in log)
    engine.reload()
    assert engine.state.get_server("web-1").labels == ("app",)


def test_apply_never_onboards_from_the_dashboard(engine: Engine) -> None:
    lifecycle_api.Lifecycle(engine).plan("web-7", labels=["app"], provider="ssh", hosts=["10.0.0.5"], ssh={"port": 22})
    lines: list[str] = []
    with pytest.raises(Exception, match="run `lab apply server web-7` on the command line .*nothing was changed"):
        source.run_action(engine, "apply", models.Target("server", "web-7"), lines.append)
    assert lines == ["apply web-7: started"]
    assert (engine.paths.home / "plans" / "web-7.json").is_file()
    assert "web-7" not in {s.name for s in engine.state.list_servers()}


def test_renew_without_a_daemon_says_it_needs_one(engine: Engine) -> None:
    d = Driver(engine, (200, 40)).keys(":", "server web-1", "enter")
    d.keys("R")
    assert "Run identity renew on web-1?" in d.text() and "next check-in" in d.text()
    log = run_keys(d, "y", until="identity renew failed")
    assert log[-1] == f"identity renew failed: {source.RENEW_NEEDS_DAEMON}"
    assert "`lab server run`" in source.RENEW_NEEDS_DAEMON
    assert d.screen()[-2].startswith("identity renew failed: identity renew needs the coordinator daemon")


def test_renew_asks_the_daemon_like_the_cli(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []

    def call_daemon(home: Any, method: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        asked.append((home, method, body))
        return {"name": body["name"], "serial": 42, "not_after": 1893456000, "old_serial": 7}

    monkeypatch.setattr(identity_ops, "call_daemon", call_daemon)
    (engine.paths.home / identity_ops.ENDPOINT_FILE).write_text("127.0.0.1:7443\n")  # a local daemon runs
    lines: list[str] = []
    source.run_action(engine, "renew", models.Target("server", "web-1"), lines.append)
    assert asked == [(engine.paths.home, "identity.renew", {"name": "web-1"})]
    assert lines == [
        "identity renew web-1: started",
        "✓ web-1: certificate 42 issued (valid until 2030-01-01T00:00:00Z); the agent picks it up at its next check-in, then serial 7 is revoked",
        "identity renew web-1: done",
    ]


def test_confirm_question_is_pure() -> None:
    assert nav.confirm_question("sync", "sync", "db-1") == " Run sync on db-1?\n\n [y] yes    [N] no "
    assert "(applies the plan stored by `lab plan server db-1`)" in nav.confirm_question("apply", "apply", "db-1")
    assert "next check-in" in nav.confirm_question("renew", "identity renew", "db-1")


def test_optional_method_tolerates_remote_engines() -> None:
    class Strict:
        def __getattr__(self, name: str) -> Any:
            from lab.common.errors import UsageError

            raise UsageError(f"not through the daemon ({name})")

        def get_servers(self) -> list[Any]:
            return []

    assert source.optional_method(Strict(), "server_status") is None
    assert source.optional_method(Strict(), "get_servers") is not None
    lines: list[str] = []
    source.run_action(Strict(), "apply", models.Target("server", "a"), lines.append)
    assert lines == ["not available from the dashboard: apply (use the lab command line)"]
