"""Puppet / OpenVox run reports: find the files (impure), parse them (pure).

Puppet writes two files at the end of every run:

* ``last_run_summary.yaml`` (``lastrunfile``): plain YAML — versions, resource counts, timings,
  ``time.last_run`` (epoch seconds);
* ``last_run_report.yaml`` (``lastrunreport``): the full ``Puppet::Transaction::Report``, tagged
  ``!ruby/object:...``; status, environment, every resource status and log line.

:func:`parse_puppet_run` turns their text into one frozen :class:`PuppetRun`. It never runs
``yaml.load``: :class:`RubyTagLoader` is a SafeLoader that reads any ``!ruby/...`` (or other
unknown) tag as the plain mapping, list or string underneath.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import yaml

from lab.common.errors import ConfigError

STATUSES = ("ok", "failed", "changed", "noop")
MAX_REPORT_BYTES = 64 * 1024 * 1024  # a huge catalog's report is a few MiB; refuse absurd files
MAX_FAILED_RESOURCES = 50
MAX_ERRORS = 20
MAX_MESSAGE = 2000
CONFIG_PRINT_TIMEOUT_S = 30.0
SUMMARY_FILE = "last_run_summary.yaml"
REPORT_FILE = "last_run_report.yaml"

# Where Puppet 7/8 and OpenVox 7/8 put the two files, most specific first. Each entry is a
# (summary directory, report directory) pair: Puppet ≥ 6 moved the summary to ``$publicdir``.
KNOWN_LOCATIONS: tuple[tuple[str, str], ...] = (
    # Puppet / OpenVox all-in-one packages (puppet-agent, openvox-agent), root
    ("/opt/puppetlabs/puppet/public", "/opt/puppetlabs/puppet/cache/state"),
    ("/opt/puppetlabs/puppet/cache/state", "/opt/puppetlabs/puppet/cache/state"),
    # Debian / Ubuntu `puppet` package (Puppet 7: vardir /var/cache/puppet)
    ("/var/cache/puppet/public", "/var/cache/puppet/state"),
    ("/var/cache/puppet/state", "/var/cache/puppet/state"),
    # older Debian, Fedora/EPEL puppet packages (vardir /var/lib/puppet)
    ("/var/lib/puppet/public", "/var/lib/puppet/state"),
    ("/var/lib/puppet/state", "/var/lib/puppet/state"),
    # FreeBSD ports / OpenVox on BSD
    ("/var/puppet/public", "/var/puppet/state"),
    ("/var/puppet/state", "/var/puppet/state"),
)


# -- model -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FailedResource:
    resource: str  # "File[/etc/motd]"
    message: str
    file: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"resource": self.resource, "message": self.message, "file": self.file, "line": self.line}


@dataclasses.dataclass(frozen=True, slots=True)
class PuppetRun:
    """One finished Puppet/OpenVox run, as far as the two files tell."""

    status: str  # ok | failed | changed | noop
    time: float | None  # when the run finished (epoch seconds)
    duration: float | None = None  # seconds
    environment: str | None = None
    config_version: str | None = None
    failed_resources: tuple[FailedResource, ...] = ()
    version: str | None = None  # puppet/openvox version
    errors: tuple[str, ...] = ()  # err-level log lines not tied to a resource (catalog failures)
    resources: Mapping[str, int] = dataclasses.field(default_factory=dict)  # summary counts
    source: str | None = None  # "summary" | "report" | "summary+report"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"PuppetRun.status must be one of {', '.join(STATUSES)}, not {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "time": self.time,
            "duration": self.duration,
            "environment": self.environment,
            "config_version": self.config_version,
            "failed_resources": [f.to_dict() for f in self.failed_resources],
            "version": self.version,
            "errors": list(self.errors),
            "resources": dict(self.resources),
            "source": self.source,
        }

    def key(self) -> tuple[Any, ...]:
        """What makes two reads the same run (the agent sends a report when this changes)."""
        return (self.time, self.status, self.config_version, len(self.failed_resources))


# -- safe YAML for Ruby-tagged documents -------------------------------------------------------


_SafeBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: reports can be MiBs


class RubyTagLoader(_SafeBase):  # type: ignore[misc,valid-type]
    """A safe loader (SafeConstructor: plain data only) that reads unknown tags (``!ruby/object:Puppet::Transaction::Report``,
    ``!ruby/sym``, ``!ruby/hash-with-ivars``, ...) as the plain node underneath. Nothing is ever
    instantiated; only str, int, float, bool, None, lists and dicts come out."""


def _untagged(loader: Any, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


RubyTagLoader.add_multi_constructor("!", _untagged)
RubyTagLoader.add_multi_constructor("tag:yaml.org,2002:ruby/", _untagged)
RubyTagLoader.add_constructor(None, lambda loader, node: _untagged(loader, "", node))  # type: ignore[arg-type]


def load_yaml(text: str | bytes, source: str = "<report>") -> Any:
    """Parse one YAML document safely; ConfigError (naming ``source``) on bad or oversized input."""
    if len(text) > MAX_REPORT_BYTES:
        raise ConfigError(f"puppet report is larger than {MAX_REPORT_BYTES} bytes", source)
    try:
        return yaml.load(text, Loader=RubyTagLoader)  # noqa: S506 — RubyTagLoader only builds plain data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"puppet report is not valid YAML: {getattr(exc, 'problem', None) or exc}", source,
                          mark.line + 1 if mark is not None else None) from exc  # fmt: skip


# -- pure parsers ----------------------------------------------------------------------------------


def _epoch(value: Any) -> float | None:
    """Seconds since the epoch from an int/float, a datetime, or Puppet's ISO time string."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"(.*?)(\.\d+)?([+-]\d\d:?\d\d|Z)?", text)  # Ruby gives nanoseconds; Python takes micro
        if m:
            frac = (m.group(2) or "")[:7]
            zone = m.group(3) or "+00:00"
            text = m.group(1).strip().replace(" ", "T", 1) + frac + ("+00:00" if zone == "Z" else zone)
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
        return _epoch(parsed)
    return None


def _text(value: Any, limit: int = 200) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    s = str(value).strip()
    return s[:limit] if s else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_summary(data: Any) -> dict[str, Any]:
    """The fields ``last_run_summary.yaml`` gives (already loaded)."""
    d = _map(data)
    version, res, times = _map(d.get("version")), _map(d.get("resources")), _map(d.get("time"))
    changes, events = _map(d.get("changes")), _map(d.get("events"))
    counts = {str(k): v for k, v in res.items() if _int(v) is not None}
    failed = (counts.get("failed") or 0) + (counts.get("failed_to_restart") or 0) + (_int(events.get("failure")) or 0)
    if failed:
        status = "failed"
    elif not res:  # a run that failed before applying (catalog error) writes no resource counts
        status = "failed"
    elif (_int(changes.get("total")) or 0) > 0:
        status = "changed"
    else:
        status = "ok"
    duration = times.get("total")
    return {
        "status": status,
        "time": _epoch(times.get("last_run")),
        "duration": float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else None,
        "environment": _text(_map(d.get("application")).get("converged_environment")),
        "config_version": _text(version.get("config")),
        "version": _text(version.get("puppet")),
        "resources": counts,
    }


def _message(text: Any) -> str:
    return (_text(text, MAX_MESSAGE) or "").splitlines()[0] if _text(text, MAX_MESSAGE) else ""


_RESOURCE_IN_SOURCE = re.compile(r"(?:^|/)([A-Z][\w:]*\[[^\[]*\])(?:/[a-z_]+)?$")


def parse_report(data: Any) -> dict[str, Any]:
    """The fields ``last_run_report.yaml`` gives (already loaded with :class:`RubyTagLoader`)."""
    d = _map(data)
    raw_status = _text(d.get("status"))
    noop = d.get("noop") is True
    failed: list[FailedResource] = []
    statuses = d.get("resource_statuses")
    if isinstance(statuses, Mapping):
        for key, st in statuses.items():
            st = _map(st)
            if st.get("failed") is not True and st.get("failed_to_restart") is not True:
                continue
            events = [e for e in st.get("events") or [] if isinstance(e, Mapping)]
            msg = next((_message(e.get("message")) for e in events if e.get("status") == "failure"), "")
            failed.append(FailedResource(
                resource=_text(st.get("resource")) or str(key),
                message=msg or ("failed to restart" if st.get("failed_to_restart") is True else "failed"),
                file=_text(st.get("file"), 1000),
                line=_int(st.get("line")),
            ))  # fmt: skip
    named = {f.resource for f in failed}
    errors: list[str] = []
    for log in d.get("logs") or []:
        log = _map(log)
        if log.get("level") not in ("err", "crit", "alert", "emerg"):
            continue
        m = _RESOURCE_IN_SOURCE.search(_text(log.get("source"), 1000) or "")
        if m and m.group(1) in named:
            continue  # already told through its resource
        msg = _message(log.get("message"))
        if any(msg in f.message for f in failed):
            continue  # Puppet logs a resource's failure again with source "Puppet"
        if msg and msg not in errors:
            errors.append(msg)
    if raw_status == "failed" or failed:
        status = "failed"
    elif noop:
        status = "noop"
    elif raw_status == "changed":
        status = "changed"
    else:
        status = "ok"
    metrics = _map(_map(d.get("metrics")).get("time")).get("values")
    duration = None
    for row in metrics if isinstance(metrics, list) else []:
        if isinstance(row, list) and len(row) == 3 and row[0] == "total" and isinstance(row[2], (int, float)):
            duration = float(row[2])
    return {
        "status": status,
        "time": _epoch(d.get("time")),  # the run's start
        "duration": duration,
        "environment": _text(d.get("environment")),
        "config_version": _text(d.get("configuration_version")),
        "version": _text(d.get("puppet_version")),
        "failed_resources": tuple(failed[:MAX_FAILED_RESOURCES]),
        "errors": tuple(errors[:MAX_ERRORS]),
    }


def parse_puppet_run(summary: str | bytes | None, report: str | bytes | None,
                     summary_source: str = SUMMARY_FILE, report_source: str = REPORT_FILE) -> PuppetRun | None:  # fmt: skip
    """A :class:`PuppetRun` from the two files' text (either may be None); None if both are.
    The summary gives time and counts, the report status detail, environment and failed resources.
    A report from another run than the summary (an older file left behind) is ignored."""
    s = parse_summary(load_yaml(summary, summary_source)) if summary is not None else None
    r = parse_report(load_yaml(report, report_source)) if report is not None else None
    if s is None and r is None:
        return None
    if s is not None and r is not None and s["config_version"] and r["config_version"] and s["config_version"] != r["config_version"]:
        r = None  # the two files describe different runs; trust the summary (written last)
    if r is None:
        assert s is not None
        return PuppetRun(s["status"], s["time"], s["duration"], s["environment"], s["config_version"], (), s["version"],
                         (), s["resources"], "summary")  # fmt: skip
    if s is None:
        end = r["time"] + r["duration"] if r["time"] is not None and r["duration"] is not None else r["time"]
        return PuppetRun(r["status"], end, r["duration"], r["environment"], r["config_version"], r["failed_resources"],
                         r["version"], r["errors"], {}, "report")  # fmt: skip
    status = "failed" if "failed" in (s["status"], r["status"]) else r["status"]
    return PuppetRun(
        status,
        s["time"] if s["time"] is not None else r["time"],
        s["duration"] if s["duration"] is not None else r["duration"],
        r["environment"] or s["environment"],
        s["config_version"] or r["config_version"],
        r["failed_resources"],
        s["version"] or r["version"],
        r["errors"],
        s["resources"],
        "summary+report",
    )


# -- locating and reading (impure) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PuppetPaths:
    """Where to read one host's run files; :func:`locate` finds them."""

    summary: pathlib.Path | None
    report: pathlib.Path | None
    origin: str  # "configured" | "puppet config print" | "known location" | "none"
    run_interval: float | None = None  # seconds, from `puppet config print runinterval` when known


def parse_config_print(text: str) -> dict[str, str]:
    """``puppet config print statedir lastrunfile lastrunreport`` → {name: value} (pure)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip()
    return out


def parse_interval(value: str | None) -> float | None:
    """Puppet durations: "1800", "30m", "1h", "2d" → seconds (pure); None if unreadable or 0."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdy]?)\s*", value or "")
    if not m:
        return None
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "y": 31536000}[m.group(2)]
    return float(seconds) or None


def _puppet_config(binary: str | None, run: Callable[..., Any]) -> dict[str, str]:
    if binary is None:
        return {}
    try:
        done = run(
            [binary, "config", "print", "statedir", "publicdir", "lastrunfile", "lastrunreport", "runinterval"],
            capture_output=True, text=True, timeout=CONFIG_PRINT_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_config_print(done.stdout or "") if done.returncode == 0 else {}


def find_puppet_binary() -> str | None:
    for name in ("puppet", "/opt/puppetlabs/bin/puppet", "/opt/puppetlabs/puppet/bin/puppet"):
        found = shutil.which(name)
        if found:
            return found
    return None


def locate(
    configured: str | os.PathLike[str] | None = None,
    *,
    binary: str | None | bool = True,
    run: Callable[..., Any] = subprocess.run,
    candidates: Sequence[tuple[str, str]] = KNOWN_LOCATIONS,
) -> PuppetPaths:
    """Where this host's last run files are.

    1. ``configured``: a directory holding both files, or the path of either file;
    2. what ``puppet config print`` says (``binary=True``: look for puppet on PATH and in
       /opt/puppetlabs; a string: that binary; False/None: skip);
    3. the first of ``candidates`` (:data:`KNOWN_LOCATIONS`) where a summary or report exists.
    """
    if configured is not None:
        p = pathlib.Path(configured).expanduser()
        if p.is_dir():
            return PuppetPaths(_first(p / SUMMARY_FILE, p.parent / "public" / SUMMARY_FILE), _first(p / REPORT_FILE), "configured")
        if p.name == REPORT_FILE:
            return PuppetPaths(_first(p.with_name(SUMMARY_FILE), p.parent.parent / "public" / SUMMARY_FILE), p, "configured")
        return PuppetPaths(p, _first(p.with_name(REPORT_FILE), p.parent.parent / "state" / REPORT_FILE), "configured")
    exe = find_puppet_binary() if binary is True else (binary or None)
    printed = _puppet_config(exe, run) if isinstance(exe, str) else {}
    if printed.get("lastrunfile") or printed.get("lastrunreport"):
        summary = pathlib.Path(printed["lastrunfile"]) if printed.get("lastrunfile") else None
        report = pathlib.Path(printed["lastrunreport"]) if printed.get("lastrunreport") else None
        if (summary and summary.exists()) or (report and report.exists()):
            return PuppetPaths(summary, report, "puppet config print", parse_interval(printed.get("runinterval")))
    for summary_dir, report_dir in candidates:
        summary, report = pathlib.Path(summary_dir) / SUMMARY_FILE, pathlib.Path(report_dir) / REPORT_FILE
        if summary.exists() or report.exists():
            return PuppetPaths(summary if summary.exists() else None, report if report.exists() else None, "known location")
    return PuppetPaths(None, None, "none")


def _first(*paths: pathlib.Path) -> pathlib.Path | None:
    return next((p for p in paths if p.exists()), paths[0] if paths else None)


def _read(path: pathlib.Path | None) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            data = f.read(MAX_REPORT_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read puppet report: {exc.strerror or exc}", str(path)) from exc
    return data.decode("utf-8", errors="replace")


def read_puppet_run(paths: PuppetPaths) -> PuppetRun | None:
    """Read and parse the files ``paths`` names; None when neither exists (Puppet never ran)."""
    return parse_puppet_run(_read(paths.summary), _read(paths.report), str(paths.summary), str(paths.report))


def mtimes(paths: PuppetPaths) -> tuple[float | None, float | None]:
    """The two files' modification times, to skip re-parsing an unchanged multi-MiB report."""

    def one(p: pathlib.Path | None) -> float | None:
        try:
            return p.stat().st_mtime if p is not None else None
        except OSError:
            return None

    return one(paths.summary), one(paths.report)


def all_candidates(extra: Iterable[str] = ()) -> list[str]:
    """Every directory :func:`locate` may look in (for docs and ``lab-agent`` diagnostics)."""
    seen: list[str] = []
    for pair in KNOWN_LOCATIONS:
        for d in pair:
            if d not in seen:
                seen.append(d)
    return [*extra, *seen]
