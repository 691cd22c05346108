"""The health-source interface and the aggregation behind the HEALTH pillar.

A :class:`HealthSource` answers for many servers at once (one HTTP request per source per
command, not one per server): ``check(servers) -> {server: HealthResult}``. A server the source
knows nothing about is simply absent from the answer. A source that cannot answer raises
:class:`SourceDown`; the aggregator turns that into "unknown (source down)" for the servers it
would have answered for, and the command goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from lab.common.errors import TransportError

OK, ALERTS, UNKNOWN = "ok", "alerts", "unknown"


class SourceDown(TransportError):
    """A health source could not be asked (refused, timed out, bad answer, stale file)."""


@dataclasses.dataclass(frozen=True, slots=True)
class HealthResult:
    """What one source says of one server."""

    source: str
    status: str  # ok | alerts | unknown
    alerts: tuple[str, ...] = ()  # firing alerts / failing checks, by name
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "alerts": list(self.alerts), "detail": self.detail}


class HealthSource(Protocol):
    """One monitoring system lab reads health from (Prometheus, Naemon, ...)."""

    @property
    def name(self) -> str: ...

    def check(self, servers: Sequence[str]) -> Mapping[str, HealthResult]: ...


def check_all(sources: Iterable[HealthSource], servers: Sequence[str]) -> dict[str, list[HealthResult]]:
    """Ask every source about ``servers``; a source that is down answers "unknown (source down)"
    for each of them instead of failing the command."""
    out: dict[str, list[HealthResult]] = {s: [] for s in servers}
    for source in sources:
        try:
            answer = source.check(list(servers))
        except SourceDown as exc:
            down = HealthResult(source.name, UNKNOWN, (), f"source down: {exc}")
            for s in servers:
                out[s].append(down)
            continue
        for s in servers:
            if s in answer:
                out[s].append(answer[s])
    return out


def pillar(results: Sequence[HealthResult], configured: bool = True) -> str:
    """The HEALTH pillar cell: ``ok``, ``2 alerts``, ``unknown (source down)`` or ``unknown``."""
    alerts = sorted({a for r in results for a in r.alerts})
    if alerts:
        return f"{len(alerts)} alert{'s' if len(alerts) != 1 else ''}"
    if any(r.status == OK for r in results):
        return OK
    if configured and results and all(r.detail.startswith("source down") for r in results):
        return "unknown (source down)"
    return UNKNOWN


def summary(results: Sequence[HealthResult]) -> dict[str, Any]:
    """The health section of ``lab show server``."""
    return {
        "status": pillar(results),
        "alerts": sorted({a for r in results for a in r.alerts}),
        "sources": [r.to_dict() for r in results],
    }
