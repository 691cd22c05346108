"""health-naemon: host and service states from a Naemon/Nagios ``status.dat``.

``status.dat`` is a series of blocks::

    hoststatus {
        host_name=db-1
        current_state=0
        plugin_output=PING OK - Packet loss = 0%
        }

The parser is strict about shape and lenient about content: unknown block types and keys are
skipped, sizes are capped, and the one error it raises is :class:`SourceDown`. A file older than
``max_age`` seconds (its ``info { created= }``) means Naemon has stopped writing it: source down.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

from lab.coordinator.health.base import ALERTS, OK, HealthResult, SourceDown

DEFAULT_MAX_AGE = 600.0
MAX_STATUS_BYTES = 256 * 1024 * 1024
_BLOCKS = ("info", "programstatus", "hoststatus", "servicestatus")
HOST_STATES = {0: "UP", 1: "DOWN", 2: "UNREACHABLE"}
SERVICE_STATES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    host: str
    service: str | None  # None for the host check itself
    state: int
    output: str
    acknowledged: bool = False
    in_downtime: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    created: float | None
    checks: tuple[Check, ...]

    def hosts(self) -> set[str]:
        return {c.host for c in self.checks}


def parse_status_untrusted(text: str) -> Status:
    """Parse the text of a status.dat; malformed input raises :class:`SourceDown`."""
    if len(text) > MAX_STATUS_BYTES:
        raise SourceDown("status.dat is too large")
    created: float | None = None
    checks: list[Check] = []
    block: str | None = None
    fields: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if block is None:
            if not line.endswith("{"):
                raise SourceDown(f"status.dat line {number}: expected 'NAME {{'")
            block, fields = line[:-1].strip(), {}
            continue
        if line == "}":
            if block == "info" and "created" in fields:
                try:
                    created = float(fields["created"])
                except ValueError:
                    raise SourceDown(f"status.dat line {number}: bad created time") from None
            elif block in ("hoststatus", "servicestatus"):
                checks.append(_check(block, fields, number))
            block = None
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SourceDown(f"status.dat line {number}: expected key=value inside {block}")
        if block in _BLOCKS:
            fields[key] = value
    if block is not None:
        raise SourceDown(f"status.dat ends inside a {block} block")
    return Status(created, tuple(checks))


def _check(block: str, f: dict[str, str], number: int) -> Check:
    host = f.get("host_name")
    if not host:
        raise SourceDown(f"status.dat line {number}: {block} without host_name")
    try:
        state = int(f.get("current_state", "0"))
    except ValueError:
        raise SourceDown(f"status.dat line {number}: bad current_state") from None
    service = f.get("service_description") if block == "servicestatus" else None
    if block == "servicestatus" and not service:
        raise SourceDown(f"status.dat line {number}: servicestatus without service_description")
    return Check(
        host,
        service,
        state,
        f.get("plugin_output", ""),
        f.get("problem_has_been_acknowledged", "0") == "1",
        f.get("scheduled_downtime_depth", "0") not in ("0", ""),
    )


def evaluate(status: Status, servers: Sequence[str], name: str = "naemon") -> dict[str, HealthResult]:
    """Per server: every host or service check not in state 0 is a problem."""
    known = status.hosts()
    out = {}
    for s in servers:
        if s not in known:
            continue
        problems = []
        for c in status.checks:
            if c.host != s or c.state == 0:
                continue
            if c.service is None:
                problems.append(f"host {HOST_STATES.get(c.state, str(c.state))}")
            else:
                problems.append(c.service)
        if problems:
            out[s] = HealthResult(name, ALERTS, tuple(problems), f"{len(problems)} check{'s' if len(problems) != 1 else ''} failing")
        else:
            out[s] = HealthResult(name, OK, (), "all checks passing")
    return out


class NaemonSource:
    name = "naemon"

    def __init__(self, status_file: str | os.PathLike[str], max_age: float = DEFAULT_MAX_AGE, now: float | None = None) -> None:
        self.status_file = os.fspath(status_file)
        self.max_age = max_age
        self._now = now

    def read(self) -> Status:
        try:
            with open(self.status_file, encoding="utf-8", errors="replace") as f:
                text = f.read(MAX_STATUS_BYTES + 1)
        except OSError as exc:
            raise SourceDown(f"{self.status_file}: {exc.strerror}") from exc
        status = parse_status_untrusted(text)
        now = self._now if self._now is not None else time.time()
        if status.created is not None and now - status.created > self.max_age:
            raise SourceDown(f"{self.status_file} is {int(now - status.created)} s old (Naemon not running?)")
        return status

    def check(self, servers: Sequence[str]) -> dict[str, HealthResult]:
        return evaluate(self.read(), servers, self.name)
