"""health-prometheus: firing alerts and target state per ``lab_server``, and current metric values.

Uses the HTTP API: ``/api/v1/alerts`` (firing alerts; pending ones are not counted),
``/api/v1/query`` (``up`` per target, and the value of an alert's expression per server).
Every request has a short timeout; any failure is :class:`SourceDown`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from lab.coordinator.alerts.condition import SCOPE_LABEL
from lab.coordinator.health.base import ALERTS, OK, UNKNOWN, HealthResult, SourceDown

DEFAULT_TIMEOUT = 2.0
MAX_RESPONSE = 32 * 1024 * 1024


class PrometheusSource:
    name = "prometheus"

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout), transport=transport)

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        try:
            response = self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise SourceDown(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise SourceDown(f"{self.url}{path}: HTTP {response.status_code}")
        if len(response.content) > MAX_RESPONSE:
            raise SourceDown(f"{self.url}{path}: answer too large")
        try:
            body = response.json()
        except ValueError as exc:
            raise SourceDown(f"{self.url}{path}: answer is not JSON") from exc
        if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(body.get("data"), dict):
            raise SourceDown(f"{self.url}{path}: {body.get('error', 'unexpected answer') if isinstance(body, dict) else 'unexpected answer'}")
        return body["data"]

    def firing(self) -> dict[str, list[str]]:
        """lab_server → names of alerts firing for it."""
        alerts = self._get("/api/v1/alerts").get("alerts")
        out: dict[str, list[str]] = {}
        for a in alerts if isinstance(alerts, list) else ():
            if not isinstance(a, dict) or a.get("state") != "firing":
                continue
            labels = a.get("labels") if isinstance(a.get("labels"), dict) else {}
            server, name = labels.get(SCOPE_LABEL), labels.get("lab_alert") or labels.get("alertname")
            if isinstance(server, str) and isinstance(name, str) and name not in out.setdefault(server, []):
                out[server].append(name)
        return out

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: [(labels, value)] for a vector result."""
        data = self._get("/api/v1/query", {"query": expr})
        if data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            raise SourceDown(f"{self.url}: query did not return a vector")
        out = []
        for item in data["result"]:
            try:
                labels, value = item["metric"], float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if isinstance(labels, dict) and not math.isnan(value):
                out.append(({str(k): str(v) for k, v in labels.items()}, value))
        return out

    def values(self, expr: str, worst: str = "max") -> dict[str, float]:
        """lab_server → value of ``expr`` (the worst of several series: max, or min)."""
        pick = max if worst == "max" else min
        out: dict[str, float] = {}
        for labels, value in self.query(expr):
            server = labels.get(SCOPE_LABEL)
            if server is not None:
                out[server] = pick(out[server], value) if server in out else value
        return out

    def check(self, servers: Sequence[str]) -> dict[str, HealthResult]:
        firing = self.firing()
        up: dict[str, list[tuple[str, float]]] = {}
        for labels, value in self.query("up"):
            if SCOPE_LABEL in labels:
                up.setdefault(labels[SCOPE_LABEL], []).append((labels.get("job", "?"), value))
        out = {}
        for s in servers:
            alerts = list(firing.get(s, []))
            down = sorted({job for job, v in up.get(s, []) if v < 1})
            alerts += [f"{job} target down" for job in down]
            if alerts:
                out[s] = HealthResult(self.name, ALERTS, tuple(alerts), f"{len(alerts)} firing or down")
            elif s in up:
                out[s] = HealthResult(self.name, OK, (), "all targets up, no alerts firing")
            else:
                out[s] = HealthResult(self.name, UNKNOWN, (), "no targets for this server")
        return out
