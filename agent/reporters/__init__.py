"""Agent reporters: Puppet/OpenVox runs and address changes, sent to the coordinator on change.

::

    paths = locate()                              # configured path, `puppet config print`, known places
    run = read_puppet_run(paths)                  # PuppetRun | None   (parse_puppet_run is pure)
    tracker = AddressTracker(stable_for=10)       # pure debounce, explicit `now`
    reporter = Reporter(PuppetWatcher(paths), tracker)
    report = reporter.poll(time.monotonic())      # {"type": "report", "v": 1, "puppet"?, "addresses"?} | None

The coordinator side is ``lab.coordinator.reports.record_report``. See docs/REPORTS.md.
"""

from __future__ import annotations

from lab.agent.reporters._addresses import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_STABLE_FOR_S,
    AddressTracker,
    collect_raw_addresses,
    current_addresses,
    parse_addresses,
)
from lab.agent.reporters._puppet import (
    KNOWN_LOCATIONS,
    REPORT_FILE,
    STATUSES,
    SUMMARY_FILE,
    FailedResource,
    PuppetPaths,
    PuppetRun,
    RubyTagLoader,
    load_yaml,
    locate,
    parse_config_print,
    parse_interval,
    parse_puppet_run,
    parse_report,
    parse_summary,
    read_puppet_run,
)
from lab.agent.reporters._report import REPORT_TYPE, REPORT_VERSION, PuppetWatcher, Reporter, build_report

__all__ = [
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_STABLE_FOR_S",
    "KNOWN_LOCATIONS",
    "REPORT_FILE",
    "REPORT_TYPE",
    "REPORT_VERSION",
    "STATUSES",
    "SUMMARY_FILE",
    "AddressTracker",
    "FailedResource",
    "PuppetPaths",
    "PuppetRun",
    "PuppetWatcher",
    "Reporter",
    "RubyTagLoader",
    "build_report",
    "collect_raw_addresses",
    "current_addresses",
    "load_yaml",
    "locate",
    "parse_addresses",
    "parse_config_print",
    "parse_interval",
    "parse_puppet_run",
    "parse_report",
    "parse_summary",
    "read_puppet_run",
]
