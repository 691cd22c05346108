"""Agent reporters (pure parts): Puppet run files captured from real `puppet apply` runs
(tests/fixtures/puppet_reports/README.md), the Ruby-tag-safe YAML loader, locating the files,
address filtering and the debounce, and the report the agent sends."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lab.agent.reporters import (
    AddressTracker,
    PuppetPaths,
    PuppetRun,
    PuppetWatcher,
    Reporter,
    RubyTagLoader,
    build_report,
    load_yaml,
    locate,
    parse_addresses,
    parse_config_print,
    parse_interval,
    parse_puppet_run,
    parse_report,
    parse_summary,
    read_puppet_run,
)
from lab.common.errors import ConfigError
from lab.coordinator.reports import decode_report

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "puppet_reports"


def files(kind: str) -> tuple[str, str]:
    d = FIXTURES / kind
    return (d / "last_run_summary.yaml").read_text(), (d / "last_run_report.yaml").read_text()


# -- parsing the real files ----------------------------------------------------------------------


def test_successful_unchanged_run_is_ok() -> None:
    run = parse_puppet_run(*files("ok"))
    assert run is not None
    assert run.status == "ok" and run.source == "summary+report"
    assert run.environment == "production" and run.version == "7.23.0"
    assert run.config_version is not None and run.config_version.isdigit()
    assert run.time is not None and run.time > 1.7e9 and 0 < (run.duration or 0) < 60
    assert run.failed_resources == () and run.errors == ()
    assert run.resources["failed"] == 0 and run.resources["total"] > 0


def test_run_that_applied_changes_is_changed() -> None:
    run = parse_puppet_run(*files("changed"))
    assert run is not None and run.status == "changed"
    assert run.resources["changed"] == 2 and not run.failed_resources


def test_failed_run_names_the_failed_resource_with_file_and_line() -> None:
    run = parse_puppet_run(*files("failed"))
    assert run is not None and run.status == "failed"
    assert len(run.failed_resources) == 1
    f = run.failed_resources[0]
    assert f.resource == "File[/tmp/pcap/fail/no/such/dir/file.txt]"
    assert "does not exist" in f.message and f.message.startswith("change from 'absent' to 'file' failed")
    assert f.file == "/tmp/pcap/fail.pp" and f.line == 1
    assert run.errors == ()  # Puppet's repeats of the same failure (source "Puppet") are not listed twice


def test_report_file_carries_a_ruby_object_tag_and_loads_safely() -> None:
    _, report = files("failed")
    assert report.startswith("--- !ruby/object:Puppet::Transaction::Report")
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(report)  # why the custom loader exists
    data = load_yaml(report)
    assert isinstance(data, dict) and data["status"] == "failed" and data["host"]


@pytest.mark.parametrize("kind", ["ok", "changed", "failed"])
def test_summary_alone_and_report_alone_agree_on_status(kind: str) -> None:
    summary, report = files(kind)
    from_summary = parse_puppet_run(summary, None)
    from_report = parse_puppet_run(None, report)
    assert from_summary is not None and from_report is not None
    assert from_summary.status == from_report.status
    assert from_summary.source == "summary" and from_report.source == "report"
    assert from_report.environment == "production"
    assert abs((from_summary.time or 0) - (from_report.time or 0)) < 5


def test_no_files_is_no_run() -> None:
    assert parse_puppet_run(None, None) is None


def test_report_from_an_older_run_is_ignored() -> None:
    summary, _ = files("ok")
    _, old_failed = files("failed")  # different configuration_version
    run = parse_puppet_run(summary, old_failed)
    assert run is not None and run.status == "ok" and run.source == "summary"


def test_summary_without_resource_counts_is_a_failed_run() -> None:
    # Synthetic (apply writes no report when compilation fails; `puppet agent` writes this shape).
    text = "---\nversion:\n  config: \n  puppet: 8.10.0\ntime:\n  last_run: 1795754090\n"
    assert parse_summary(yaml.safe_load(text))["status"] == "failed"


# -- the loader on other shapes (older report formats tag nested objects) ------------------------

OLD_FORMAT = """--- !ruby/object:Puppet::Transaction::Report
host: db-1
time: 2026-03-15 14:22:03.123456789 +01:00
configuration_version: "abc123"
status: changed
noop: true
environment: !ruby/sym production
logs:
  - !ruby/object:Puppet::Util::Log
    level: !ruby/sym err
    message: Could not evaluate
    source: /Stage[main]/Pg/Service[postgresql]
resource_statuses:
  Service[postgresql]: !ruby/object:Puppet::Resource::Status
    resource: Service[postgresql]
    file: /etc/puppet/code/pg.pp
    line: 7
    failed: true
    events:
      - !ruby/object:Puppet::Transaction::Event
        status: failure
        message: "Could not start Service[postgresql]: Execution of '/bin/systemctl start postgresql' returned 1"
weird: !!python/object/apply:os.system ["echo pwned"]
"""


def test_nested_ruby_tags_and_symbols_become_plain_data() -> None:
    data = load_yaml(OLD_FORMAT)
    assert data["environment"] == "production"
    assert data["logs"][0]["level"] == "err"
    assert data["weird"] == ["echo pwned"]  # never constructed, just a list
    r = parse_report(data)
    assert r["status"] == "failed"  # a failed resource beats the report's own "changed"
    assert r["failed_resources"][0].resource == "Service[postgresql]" and r["failed_resources"][0].line == 7
    assert r["errors"] == ()  # the err log names the failed resource
    assert r["time"] == pytest.approx(1773580923.123456)


def test_noop_run_is_noop() -> None:
    text = OLD_FORMAT.replace("    failed: true", "    failed: false")
    assert parse_report(load_yaml(text))["status"] == "noop"


def test_catalog_failure_report_keeps_the_error_lines() -> None:
    text = "--- !ruby/object:Puppet::Transaction::Report\nstatus: failed\nlogs:\n- level: err\n  message: 'Evaluation Error: Unknown function'\n  source: Puppet\n"
    r = parse_report(load_yaml(text))
    assert r["status"] == "failed" and r["errors"] == ("Evaluation Error: Unknown function",)


@pytest.mark.parametrize("text", ["status: [unclosed", "a: b: c", "\t- x"])
def test_broken_yaml_is_a_config_error_naming_the_file(text: str) -> None:
    with pytest.raises(ConfigError, match="state/last_run_report.yaml"):
        load_yaml(text, "state/last_run_report.yaml")


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    try:
        parse_puppet_run(text, text)
    except ConfigError:
        pass


def test_loader_is_a_safe_loader() -> None:
    assert issubclass(RubyTagLoader, yaml.constructor.SafeConstructor)
    assert not issubclass(RubyTagLoader, yaml.constructor.FullConstructor)


def test_puppet_run_rejects_unknown_status() -> None:
    with pytest.raises(ValueError, match="status"):
        PuppetRun("success", None)


# -- locating the files --------------------------------------------------------------------------


def _copy(kind: str, summary_dir: pathlib.Path, report_dir: pathlib.Path) -> None:
    summary, report = files(kind)
    summary_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    (summary_dir / "last_run_summary.yaml").write_text(summary)
    (report_dir / "last_run_report.yaml").write_text(report)


def test_configured_statedir_finds_the_public_summary_beside_it(tmp_path: pathlib.Path) -> None:
    _copy("failed", tmp_path / "public", tmp_path / "state")
    paths = locate(tmp_path / "state")
    assert paths.origin == "configured"
    assert paths.summary == tmp_path / "public" / "last_run_summary.yaml"
    assert paths.report == tmp_path / "state" / "last_run_report.yaml"
    run = read_puppet_run(paths)
    assert run is not None and run.status == "failed" and run.source == "summary+report"


def test_configured_file_path(tmp_path: pathlib.Path) -> None:
    _copy("ok", tmp_path / "state", tmp_path / "state")
    paths = locate(tmp_path / "state" / "last_run_report.yaml")
    assert paths.summary == tmp_path / "state" / "last_run_summary.yaml"


def test_puppet_config_print_is_asked_first(tmp_path: pathlib.Path) -> None:
    _copy("changed", tmp_path / "pub", tmp_path / "st")
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        out = f"lastrunfile = {tmp_path}/pub/last_run_summary.yaml\nlastrunreport = {tmp_path}/st/last_run_report.yaml\nruninterval = 15m\n"
        return subprocess.CompletedProcess(argv, 0, out, "")

    paths = locate(binary="/usr/bin/puppet", run=fake_run, candidates=())
    assert calls[0][:3] == ["/usr/bin/puppet", "config", "print"] and "lastrunreport" in calls[0]
    assert paths.origin == "puppet config print" and paths.run_interval == 900.0
    assert read_puppet_run(paths).status == "changed"  # type: ignore[union-attr]


def test_known_locations_in_order(tmp_path: pathlib.Path) -> None:
    debian = (str(tmp_path / "var/cache/puppet/public"), str(tmp_path / "var/cache/puppet/state"))
    aio = (str(tmp_path / "opt/public"), str(tmp_path / "opt/cache/state"))
    assert locate(binary=False, candidates=[aio, debian]).origin == "none"
    _copy("ok", pathlib.Path(debian[0]), pathlib.Path(debian[1]))
    paths = locate(binary=False, candidates=[aio, debian])
    assert paths.origin == "known location" and str(paths.report).startswith(debian[1])


def test_failing_puppet_binary_falls_back_to_known_locations(tmp_path: pathlib.Path) -> None:
    def broken(argv, **kwargs):
        raise OSError("no such file")

    assert locate(binary="/nope/puppet", run=broken, candidates=()).origin == "none"


def test_parse_config_print_and_interval() -> None:
    text = "statedir = /var/cache/puppet/state\nlastrunfile = /var/cache/puppet/public/last_run_summary.yaml\nWarning: x\n"
    assert parse_config_print(text) == {
        "statedir": "/var/cache/puppet/state",
        "lastrunfile": "/var/cache/puppet/public/last_run_summary.yaml",
    }
    assert [parse_interval(v) for v in ("1800", "30m", "1h", "2d", "0", "soon", None)] == [1800.0, 1800.0, 3600.0, 172800.0, None, None, None]


# -- watching for new runs -------------------------------------------------------------------------


def test_watcher_reports_each_run_once(tmp_path: pathlib.Path) -> None:
    _copy("ok", tmp_path / "public", tmp_path / "state")
    watcher = PuppetWatcher(locate(tmp_path / "state"))
    first = watcher.poll()
    assert first is not None and first.status == "ok"
    assert watcher.poll() is None  # unchanged files are not even re-read
    _copy("failed", tmp_path / "public", tmp_path / "state")
    os.utime(tmp_path / "state" / "last_run_report.yaml", (1, 1))  # a new mtime, whatever the clock did
    second = watcher.poll()
    assert second is not None and second.status == "failed"


def test_watcher_survives_a_half_written_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "last_run_summary.yaml").write_text("version: [")
    watcher = PuppetWatcher(PuppetPaths(tmp_path / "state" / "last_run_summary.yaml", None, "configured"))
    assert watcher.poll() is None and watcher.last_error is not None


# -- addresses ------------------------------------------------------------------------------------

RAW = {
    "lo": [("inet", "127.0.0.1"), ("inet6", "::1")],
    "eth0": [("inet", "10.0.1.45"), ("inet6", "fe80::1%eth0"), ("inet6", "2001:db8::45"), ("link", "52:54:00:12:34:56")],
    "wlan0": [("inet", "192.168.1.20"), ("inet", "10.0.1.45")],
    "docker0": [("inet", "172.17.0.1")],
    "tun0": [("inet", "0.0.0.0"), ("inet", "224.0.0.1"), ("inet", "not-an-ip")],
}


def test_parse_addresses_keeps_unicast_host_addresses_only() -> None:
    assert parse_addresses(RAW) == ("10.0.1.45", "192.168.1.20", "2001:db8::45")


def test_address_tracker_reports_only_a_stable_change() -> None:
    t = AddressTracker(stable_for=10.0, reported=("10.0.1.45",))
    assert t.observe(["10.0.1.45"], now=0.0) is None  # nothing new
    assert t.observe(["10.0.1.99"], now=1.0) is None  # new, not yet stable
    assert t.pending(now=5.0) == pytest.approx(6.0)
    assert t.observe(["10.0.1.99"], now=10.9) is None
    assert t.observe(["10.0.1.99"], now=11.0) == ("10.0.1.99",)
    assert t.observe(["10.0.1.99"], now=30.0) is None  # reported once
    assert t.pending(now=30.0) is None


def test_address_tracker_flapping_resets_the_clock_and_flapping_back_reports_nothing() -> None:
    t = AddressTracker(stable_for=10.0, reported=("10.0.1.45",))
    for now, addrs in ((0, ["10.0.1.99"]), (5, ["10.0.1.98"]), (9, ["10.0.1.99"]), (15, ["10.0.1.99"])):
        assert t.observe(addrs, now=now) is None
    assert t.observe(["10.0.1.45"], now=18) is None  # back to what the coordinator has
    assert t.observe(["10.0.1.45"], now=100) is None
    assert t.observe(["10.0.1.99", "2001:db8::1"], now=101) is None
    assert t.observe(["2001:db8::1", "10.0.1.99"], now=111) == ("10.0.1.99", "2001:db8::1")  # order does not matter


def test_address_tracker_first_set_waits_too() -> None:
    t = AddressTracker(stable_for=3.0)
    assert t.observe([], now=0.0) is None
    assert t.observe([], now=3.0) == ()  # "no addresses" is news too
    with pytest.raises(TypeError):
        t.observe("10.0.0.1", now=4.0)
    with pytest.raises(ValueError):
        AddressTracker(stable_for=-1)


# -- the report -------------------------------------------------------------------------------------


def test_reporter_sends_new_runs_and_stable_address_changes(tmp_path: pathlib.Path) -> None:
    _copy("failed", tmp_path / "public", tmp_path / "state")
    addrs = {"now": ("10.0.1.45",)}
    reporter = Reporter(PuppetWatcher(locate(tmp_path / "state")), AddressTracker(5.0, ("10.0.1.45",)), lambda: addrs["now"])
    first = reporter.poll(0.0)
    assert first is not None and set(first) == {"type", "v", "puppet"}
    assert first["puppet"]["status"] == "failed" and first["puppet"]["failed_resources"][0]["line"] == 1
    assert reporter.poll(1.0) is None
    addrs["now"] = ("10.0.1.46",)
    assert reporter.poll(2.0) is None
    report = reporter.poll(7.0)
    assert report == {"type": "report", "v": 1, "addresses": ["10.0.1.46"]}


@pytest.mark.parametrize("kind", ["ok", "changed", "failed"])
def test_report_round_trips_through_the_coordinators_strict_decoder(kind: str) -> None:
    run = parse_puppet_run(*files(kind))
    assert run is not None
    report = build_report(run, ["10.0.1.45", "2001:db8::45"], 1800.0)
    decoded = decode_report(report)
    assert decoded["puppet"] == run.to_dict() | {"run_interval": 1800.0}
    assert decoded["addresses"] == ["10.0.1.45", "2001:db8::45"]
    assert decode_report(build_report(dataclasses.replace(run, time=None)))["puppet"]["time"] is None
