"""Agent reports on the coordinator: record them, derive the PUPPET pillar, build `describe server`.

* :func:`record_report` — decode an agent's report strictly (it comes off the network), store the
  Puppet run in ``servers.puppet`` and the addresses in ``servers.addresses``, audit changes, and
  return what changed so the caller (the daemon's ``checkin``) can tell DNS::

      changes = record_report(state, name, body["report"], now)
      if changes["addresses"]:
          await dns.address_changed(name, changes["addresses"]["before"], changes["addresses"]["after"])

* :func:`puppet_pillar` — "ok" | "failed" | "changed" | "stale" | "unknown" from the stored run.
* :func:`describe_server` — the data of ``lab describe server NAME`` (Engine.describe_server).

The agent side is ``lab.agent.reporters``; docs/REPORTS.md describes both.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
from collections.abc import Mapping
from typing import Any

from lab.common.errors import ConfigError, LabError, UsageError
from lab.coordinator.state import StateDB

REPORT_TYPE = "report"
REPORT_VERSION = 1
DEFAULT_RUN_INTERVAL_S = 1800.0  # Puppet's default runinterval (30 min)
STALE_FACTOR = 2  # a run older than 2 × run interval is stale
PUPPET_PILLARS = ("ok", "failed", "changed", "stale", "unknown")
RUN_STATUSES = frozenset({"ok", "failed", "changed", "noop"})
MAX_ADDRESSES = 64
MAX_FAILED = 50
MAX_ERRORS = 20
MAX_TEXT = 2000
MAX_SHORT = 200

_REPORT_KEYS = frozenset({"type", "v", "puppet", "addresses"})
_PUPPET_KEYS = frozenset(
    {"status", "time", "duration", "environment", "config_version", "failed_resources", "version", "errors",
     "resources", "source", "run_interval"}
)  # fmt: skip
_FAILED_KEYS = frozenset({"resource", "message", "file", "line"})


# -- strict decoding -------------------------------------------------------------------------------


def _bad(message: str) -> UsageError:
    return UsageError(f"report: {message}")


def _opt_text(d: Mapping[str, Any], key: str, limit: int = MAX_SHORT) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise _bad(f"{key} must be text of at most {limit} characters")
    return v


def _opt_number(d: Mapping[str, Any], key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _bad(f"{key} must be a non-negative number")
    return float(v)


def decode_puppet(p: Any) -> dict[str, Any]:
    """Validate the ``puppet`` section of a report; returns a clean copy."""
    if not isinstance(p, Mapping):
        raise _bad("puppet must be a map")
    unknown = set(p) - _PUPPET_KEYS
    if unknown:
        raise _bad(f"unknown puppet field(s): {', '.join(sorted(map(str, unknown)))}")
    status = p.get("status")
    if status not in RUN_STATUSES:
        raise _bad(f"puppet.status must be one of {', '.join(sorted(RUN_STATUSES))}")
    failed_in = p.get("failed_resources") or []
    if not isinstance(failed_in, list) or len(failed_in) > MAX_FAILED:
        raise _bad(f"puppet.failed_resources must be a list of at most {MAX_FAILED}")
    failed = []
    for f in failed_in:
        if not isinstance(f, Mapping) or set(f) - _FAILED_KEYS or not isinstance(f.get("resource"), str):
            raise _bad("each failed resource must be a map with resource, message, file, line")
        line = f.get("line")
        if line is not None and (isinstance(line, bool) or not isinstance(line, int) or line < 0):
            raise _bad("failed resource line must be a non-negative whole number")
        failed.append({
            "resource": _opt_text(f, "resource", MAX_TEXT),
            "message": _opt_text(f, "message", MAX_TEXT) or "",
            "file": _opt_text(f, "file", MAX_TEXT),
            "line": line,
        })  # fmt: skip
    errors = p.get("errors") or []
    if not isinstance(errors, list) or len(errors) > MAX_ERRORS or not all(isinstance(e, str) and len(e) <= MAX_TEXT for e in errors):
        raise _bad(f"puppet.errors must be a list of at most {MAX_ERRORS} texts")
    resources = p.get("resources") or {}
    if not isinstance(resources, Mapping) or len(resources) > 32 or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, int) and not isinstance(v, bool) for k, v in resources.items()
    ):
        raise _bad("puppet.resources must map counter names to whole numbers")
    config_version = p.get("config_version")
    if isinstance(config_version, int) and not isinstance(config_version, bool):
        config_version = str(config_version)
    return {
        "status": status,
        "time": _opt_number(p, "time"),
        "duration": _opt_number(p, "duration"),
        "environment": _opt_text(p, "environment"),
        "config_version": _opt_text({"config_version": config_version}, "config_version"),
        "failed_resources": failed,
        "version": _opt_text(p, "version"),
        "errors": list(errors),
        "resources": dict(resources),
        "source": _opt_text(p, "source"),
        "run_interval": _opt_number(p, "run_interval"),
    }


def decode_addresses(a: Any) -> list[str]:
    if not isinstance(a, list) or len(a) > MAX_ADDRESSES:
        raise _bad(f"addresses must be a list of at most {MAX_ADDRESSES} IP addresses")
    out: list[str] = []
    for x in a:
        if not isinstance(x, str) or len(x) > 64:
            raise _bad("each address must be an IP address string")
        try:
            ip = ipaddress.ip_address(x)
        except ValueError:
            raise _bad(f"{x!r} is not an IP address") from None
        if str(ip) not in out:
            out.append(str(ip))
    return out


def decode_report(report: Any) -> dict[str, Any]:
    """Strictly decode an agent report (see lab.agent.reporters.build_report); UsageError if bad."""
    if not isinstance(report, Mapping):
        raise _bad("must be a map")
    unknown = set(report) - _REPORT_KEYS
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    if report.get("type") != REPORT_TYPE or report.get("v") != REPORT_VERSION:
        raise _bad(f"expected type {REPORT_TYPE!r} version {REPORT_VERSION}")
    out: dict[str, Any] = {}
    if report.get("puppet") is not None:
        out["puppet"] = decode_puppet(report["puppet"])
    if report.get("addresses") is not None:
        out["addresses"] = decode_addresses(report["addresses"])
    return out


# -- recording -------------------------------------------------------------------------------------


def record_report(state: StateDB, name: str, report: Any, now: float) -> dict[str, Any]:
    """Store one agent report for server ``name`` (it must exist) and return what changed::

        {"name": ..., "puppet": {"before": pillar, "after": pillar} | None,
         "addresses": {"before": [...], "after": [...]} | None}

    Also sets ``last_checkin`` (a report is a check-in). Audit entries only on change
    (``node.puppet`` when the pillar moves, ``node.addresses``), never per run."""
    decoded = decode_report(report)
    before = state.get_server(name)
    fields: dict[str, Any] = {"last_checkin": now}
    changes: dict[str, Any] = {"name": name, "puppet": None, "addresses": None}
    puppet_before = puppet_pillar(before.puppet, now)
    if "puppet" in decoded:
        fields["puppet"] = decoded["puppet"] | {"received_at": now}
        after = puppet_pillar(fields["puppet"], now)
        if after != puppet_before or _status(before.puppet) != decoded["puppet"]["status"]:
            changes["puppet"] = {"before": puppet_before, "after": after}
    if "addresses" in decoded:
        old = list(before.addresses) if isinstance(before.addresses, list) else []
        if sorted(old) != sorted(decoded["addresses"]):
            fields["addresses"] = decoded["addresses"]
            changes["addresses"] = {"before": old, "after": decoded["addresses"]}
    with state.transaction():
        state.update_server(name, **fields)
        if changes["puppet"]:
            run = fields["puppet"]
            state.audit("node.puppet", name, {**changes["puppet"], "status": run["status"],
                        "failed_resources": [f["resource"] for f in run["failed_resources"]][:10]},
                        actor=f"node:{name}")  # fmt: skip
        if changes["addresses"]:
            state.audit("node.addresses", name, changes["addresses"], actor=f"node:{name}")
    return changes


def _status(puppet: Any) -> str | None:
    return puppet.get("status") if isinstance(puppet, Mapping) else None


def puppet_pillar(puppet: Any, now: float, run_interval: float | None = None) -> str:
    """The PUPPET pillar from a stored run: "unknown" without a report, "stale" when the last run
    is older than 2 × the run interval (the agent's ``runinterval``, else 30 min), otherwise the
    run's result: "failed", "changed", or "ok" (a noop run counts as ok)."""
    if not isinstance(puppet, Mapping) or puppet.get("status") not in RUN_STATUSES:
        return "unknown"
    interval = run_interval or puppet.get("run_interval") or DEFAULT_RUN_INTERVAL_S
    when = puppet.get("time")
    if isinstance(when, (int, float)) and not isinstance(when, bool) and now - when > STALE_FACTOR * interval:
        return "stale"
    return {"failed": "failed", "changed": "changed"}.get(puppet["status"], "ok")


# -- lab describe server ------------------------------------------------------------------------------


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cert_expiry(state: StateDB, name: str, serial: str | None) -> float | None:
    """``not_after`` of the current certificate, when an enroll/renew audit entry recorded it."""
    if serial is None:
        return None
    for entry in state.audit_log(1000):
        d = entry.detail if isinstance(entry.detail, Mapping) else {}
        if entry.subject == name and str(d.get("serial")) == serial and isinstance(d.get("not_after"), (int, float)):
            return float(d["not_after"])
    return None


def _dns(engine: Any, name: str, addresses: Any) -> dict[str, Any] | None:
    from lab.coordinator.dns.config import load_dns_config

    try:
        config = load_dns_config(engine.paths.home)
    except ConfigError as exc:
        engine.state.warnings.append(f"DNS not shown: {exc}")
        return None
    if config is None:
        return None
    from lab.coordinator.dns._names import node_fqdn

    try:
        fqdn = node_fqdn(name, config.zone).to_text(omit_final_dot=True)
    except LabError as exc:
        engine.state.warnings.append(f"DNS not shown: {exc}")
        return None
    return {"name": fqdn, "addresses": list(addresses) if isinstance(addresses, list) else []}


def describe_server(engine: Any, name: str, now: float) -> dict[str, Any]:
    """Everything ``lab describe server NAME`` shows, as plain data (also ``-o json``)."""
    record = engine.state.get_server(name)
    row = engine.server_status(name)
    view: dict[str, Any] | None
    try:
        view = engine.show_server(name)  # definitions: classes, size detail, health
    except ConfigError as exc:  # broken definitions cost only their part
        engine.state.warnings.append(f"definitions not read: {exc}")
        view = None
    health = view["health"] if view and "health" in view else engine.server_health(name)
    classes = [c["name"] for c in view["puppet_classes"]] if view else []
    role = sorted({c["source"].partition(":")[2] for c in (view["puppet_classes"] if view else []) if c["source"].startswith("label:")})
    run = record.puppet if isinstance(record.puppet, Mapping) else None
    interval = (run or {}).get("run_interval") or DEFAULT_RUN_INTERVAL_S
    last_run = None
    if run is not None:
        last_run = {
            "time": iso(run.get("time")),
            "status": run.get("status"),
            "duration": run.get("duration"),
            "config_version": run.get("config_version"),
            "version": run.get("version"),
            "received": iso(run.get("received_at")),
        }
    next_run = iso(run["time"] + interval) if run is not None and isinstance(run.get("time"), (int, float)) else None
    checkin = record.last_checkin
    return {
        "name": record.name,
        "provider": record.provider,
        "labels": list(record.labels),
        "environment": record.environment,
        "region": record.region,
        "size": {
            "name": view["size"] if view else row["size"],
            "detail": view["size_detail"] if view else None,
            "source": view["size_source"] if view else None,
        },
        "status": {"sync": row["sync"]},
        "puppet": {
            "pillar": puppet_pillar(run, now),
            "environment": (run or {}).get("environment") or record.environment,
            "role": role or list(record.labels),
            "classes": classes,
            "last_run": last_run,
            "next_run": next_run,
            "run_interval": interval,
            "failed_resources": list((run or {}).get("failed_resources") or []),
            "errors": list((run or {}).get("errors") or []),
        },
        "health": health,
        "identity": {
            "status": row["identity"],
            "dns": _dns(engine, record.name, record.addresses),
            "addresses": list(record.addresses) if isinstance(record.addresses, list) else [],
            "certificate": {"serial": record.cert_serial, "expires": iso(_cert_expiry(engine.state, record.name, record.cert_serial))}
            if record.cert_serial
            else None,
            "enrolled_at": iso(record.enrolled_at),
            "last_checkin": iso(checkin),
            "last_checkin_seconds_ago": max(0, int(now - checkin)) if checkin is not None else None,
        },
    }
