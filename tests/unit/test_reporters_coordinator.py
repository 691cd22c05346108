"""Coordinator side of agent reports: strict decoding, record_report, the PUPPET pillar."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.agent.reporters import build_report, parse_puppet_run
from lab.common.errors import NotFound, UsageError
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.reports import DEFAULT_RUN_INTERVAL_S, decode_report, puppet_pillar, record_report
from lab.coordinator.state import StateDB

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "puppet_reports"
NOW = 1_800_000_000.0


def run_of(kind: str, at: float = NOW - 60):
    d = FIXTURES / kind
    run = parse_puppet_run((d / "last_run_summary.yaml").read_text(), (d / "last_run_report.yaml").read_text())
    assert run is not None
    return dataclasses.replace(run, time=at)


@pytest.fixture()
def state(tmp_path: pathlib.Path):
    db = StateDB.open(tmp_path)
    db.add_server("web-1", "ssh", ["app"])
    yield db
    db.close()


def pillar_of(state: StateDB, name: str = "web-1", now: float = NOW) -> str:
    return puppet_pillar(state.get_server(name).puppet, now)


@pytest.mark.parametrize(("kind", "pillar"), [("ok", "ok"), ("changed", "changed"), ("failed", "failed")])
def test_recorded_run_sets_the_pillar(state: StateDB, kind: str, pillar: str) -> None:
    assert pillar_of(state) == "unknown"
    changes = record_report(state, "web-1", build_report(run_of(kind)), NOW)
    assert changes == {"name": "web-1", "puppet": {"before": "unknown", "after": pillar}, "addresses": None}
    s = state.get_server("web-1")
    assert pillar_of(state) == pillar
    assert s.puppet["received_at"] == NOW and s.last_checkin == NOW
    assert s.puppet["status"] == run_of(kind).status


def test_ok_then_failed_then_ok_audits_each_change_only(state: StateDB) -> None:
    record_report(state, "web-1", build_report(run_of("ok")), NOW)
    assert record_report(state, "web-1", build_report(run_of("ok", NOW - 10)), NOW)["puppet"] is None  # same result
    failed = record_report(state, "web-1", build_report(run_of("failed")), NOW)
    assert failed["puppet"] == {"before": "ok", "after": "failed"}
    assert state.get_server("web-1").puppet["failed_resources"][0]["resource"].startswith("File[")
    assert record_report(state, "web-1", build_report(run_of("ok")), NOW)["puppet"] == {"before": "failed", "after": "ok"}
    actions = [(e.action, e.detail["after"]) for e in reversed(state.audit_log()) if e.action == "node.puppet"]
    assert actions == [("node.puppet", "ok"), ("node.puppet", "failed"), ("node.puppet", "ok")]


def test_stale_after_twice_the_run_interval(state: StateDB) -> None:
    record_report(state, "web-1", build_report(run_of("ok", NOW)), NOW)
    assert pillar_of(state, now=NOW + 2 * DEFAULT_RUN_INTERVAL_S) == "ok"
    assert pillar_of(state, now=NOW + 2 * DEFAULT_RUN_INTERVAL_S + 1) == "stale"
    record_report(state, "web-1", build_report(run_of("failed", NOW), run_interval=300), NOW)  # agent's runinterval
    assert pillar_of(state, now=NOW + 600) == "failed"
    assert pillar_of(state, now=NOW + 601) == "stale"


def test_noop_counts_as_ok_and_no_time_is_never_stale() -> None:
    assert puppet_pillar({"status": "noop", "time": NOW}, NOW) == "ok"
    assert puppet_pillar({"status": "changed", "time": None}, NOW + 10**9) == "changed"
    assert puppet_pillar(None, NOW) == "unknown"
    assert puppet_pillar({"status": "weird"}, NOW) == "unknown"


def test_address_change_is_returned_for_dns_and_audited(state: StateDB) -> None:
    first = record_report(state, "web-1", build_report(addresses=["10.0.1.45"]), NOW)
    assert first["addresses"] == {"before": [], "after": ["10.0.1.45"]} and first["puppet"] is None
    assert record_report(state, "web-1", build_report(addresses=["10.0.1.45"]), NOW + 1)["addresses"] is None
    moved = record_report(state, "web-1", build_report(addresses=["10.0.1.46", "2001:db8::46"]), NOW + 2)
    assert moved["addresses"] == {"before": ["10.0.1.45"], "after": ["10.0.1.46", "2001:db8::46"]}
    assert state.get_server("web-1").addresses == ["10.0.1.46", "2001:db8::46"]
    assert state.get_server("web-1").last_checkin == NOW + 2
    assert [e.action for e in state.audit_log()].count("node.addresses") == 2


def test_unknown_server_is_not_found(state: StateDB) -> None:
    with pytest.raises(NotFound):
        record_report(state, "nope", build_report(addresses=[]), NOW)


GOOD_PUPPET = build_report(run_of("failed"))["puppet"]


@pytest.mark.parametrize(
    "report",
    [
        None,
        [],
        {"type": "report"},
        {"type": "report", "v": 2},
        {"type": "facts", "v": 1},
        {"type": "report", "v": 1, "extra": 1},
        {"type": "report", "v": 1, "addresses": "10.0.0.1"},
        {"type": "report", "v": 1, "addresses": ["10.0.0.999"]},
        {"type": "report", "v": 1, "addresses": ["10.0.0.1"] * 65},
        {"type": "report", "v": 1, "puppet": "ok"},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"status": "success"}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"time": "yesterday"}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"time": float("nan")}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"evil": True}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"environment": "x" * 500}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"failed_resources": [{"resource": 1}]}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"failed_resources": [{"resource": "A[b]", "line": -1}]}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"failed_resources": [{"resource": "A[b]"}] * 51}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"errors": [1]}},
        {"type": "report", "v": 1, "puppet": GOOD_PUPPET | {"resources": {"failed": "1"}}},
    ],
)
def test_malformed_reports_are_refused_and_nothing_is_written(state: StateDB, report: object) -> None:
    with pytest.raises(UsageError, match="report"):
        record_report(state, "web-1", report, NOW)
    s = state.get_server("web-1")
    assert s.puppet is None and s.addresses is None and s.last_checkin is None


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12))  # fmt: skip
def test_random_data_only_ever_raises_usage_error(data: object) -> None:
    for candidate in (data, {"type": "report", "v": 1, "puppet": data}, {"type": "report", "v": 1, "addresses": data}):
        try:
            decode_report(candidate)
        except UsageError:
            pass


def test_get_servers_shows_the_pillar(tmp_path: pathlib.Path) -> None:
    import time

    paths = Paths.resolve(tmp_path / "defs", str(tmp_path / "home"))
    Engine.init_local(paths)
    with Engine.open(paths) as engine:
        engine.add_server("web-1", "ssh", ["app"])
        engine.add_server("web-2", "ssh", ["app"])
        record_report(engine.state, "web-1", build_report(run_of("failed", time.time() - 30)), time.time())
        rows = {r["name"]: r["puppet"] for r in engine.get_servers()}
    assert rows == {"web-1": "failed", "web-2": "unknown"}
