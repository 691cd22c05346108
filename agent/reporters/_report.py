"""Put the reporters together: poll, notice a change, build the report the coordinator records.

The report is a plain msgpack/JSON-able map (``coordinator/reports.py`` decodes it strictly)::

    {"type": "report", "v": 1,
     "puppet": {status, time, duration, environment, config_version, failed_resources,
                version, errors, resources, source, run_interval},      # only when a new run
     "addresses": ["10.0.1.45", "2001:db8::45"]}                       # only when they changed

Nothing here talks to the network: the agent's check-in loop calls :meth:`Reporter.poll` and
sends what it returns (the ``report`` field of the ``checkin`` request).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from lab.agent.reporters._addresses import AddressTracker, current_addresses
from lab.agent.reporters._puppet import PuppetPaths, PuppetRun, locate, mtimes, read_puppet_run
from lab.common.errors import ConfigError

REPORT_TYPE = "report"
REPORT_VERSION = 1

log = logging.getLogger("lab.agent.reporters")


def build_report(puppet: PuppetRun | None = None, addresses: tuple[str, ...] | list[str] | None = None,
                 run_interval: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The report map; a section is present only when it has news."""
    out: dict[str, Any] = {"type": REPORT_TYPE, "v": REPORT_VERSION}
    if puppet is not None:
        out["puppet"] = puppet.to_dict() | {"run_interval": run_interval}
    if addresses is not None:
        out["addresses"] = list(addresses)
    return out


class PuppetWatcher:
    """Notices a new Puppet run: re-reads the files only when their mtimes change and reports a
    run only when it differs from the last one reported."""

    def __init__(self, paths: PuppetPaths | None = None, *, configured: str | None = None,
                 reader: Callable[[PuppetPaths], PuppetRun | None] = read_puppet_run) -> None:  # fmt: skip
        self._configured = configured
        self.paths = paths
        self._reader = reader
        self._mtimes: tuple[float | None, float | None] | None = None
        self._last_key: tuple[Any, ...] | None = None
        self.last_error: str | None = None

    def poll(self) -> PuppetRun | None:
        if self.paths is None or self.paths.origin == "none":
            self.paths = locate(self._configured)  # Puppet may be installed after the agent started
            if self.paths.origin == "none":
                return None
        stamp = mtimes(self.paths)
        if stamp == self._mtimes:
            return None
        try:
            run = self._reader(self.paths)
        except ConfigError as exc:  # half-written or foreign file: try again when it changes
            if str(exc) != self.last_error:
                log.warning("event=puppet_report_unreadable reason=%s", exc)
            self.last_error = str(exc)
            self._mtimes = stamp
            return None
        self._mtimes, self.last_error = stamp, None
        if run is None or run.key() == self._last_key:
            return None
        self._last_key = run.key()
        return run


@dataclasses.dataclass
class Reporter:
    """Both reporters behind one ``poll(now)``; ``now`` is monotonic seconds."""

    puppet: PuppetWatcher | None
    tracker: AddressTracker
    addresses: Callable[[], tuple[str, ...]] = current_addresses

    def poll(self, now: float) -> dict[str, Any] | None:
        run = self.puppet.poll() if self.puppet is not None else None
        try:
            current = self.addresses()
        except (OSError, ImportError) as exc:
            log.warning("event=addresses_unreadable reason=%s", exc)
            current = None
        changed = self.tracker.observe(current, now) if current is not None else None
        if run is None and changed is None:
            return None
        interval = self.puppet.paths.run_interval if self.puppet is not None and self.puppet.paths is not None else None
        return build_report(run, changed, interval)
