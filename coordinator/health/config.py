"""Which health sources to ask, from the ``health:`` section of ``$LAB_HOME/config.yaml``::

    health:
      prometheus: http://127.0.0.1:9090          # or {url: ..., timeout: 2}
      naemon: /var/cache/naemon/status.dat       # or {status_file: ..., max_age: 600}
      timeout: 2                                  # seconds, for every source without its own

``nagios`` is accepted as another name for ``naemon`` (same status.dat format). No ``health:``
section means no sources: the HEALTH pillar reads "unknown".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import httpx

from lab.common.errors import ConfigError
from lab.coordinator.health.base import HealthSource
from lab.coordinator.health.naemon import DEFAULT_MAX_AGE, NaemonSource
from lab.coordinator.health.prometheus import DEFAULT_TIMEOUT, PrometheusSource


@dataclasses.dataclass(frozen=True, slots=True)
class HealthConfig:
    prometheus_url: str | None = None
    prometheus_timeout: float = DEFAULT_TIMEOUT
    status_file: str | None = None
    status_max_age: float = DEFAULT_MAX_AGE

    @property
    def configured(self) -> bool:
        return bool(self.prometheus_url or self.status_file)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str = "config.yaml") -> HealthConfig:
        section = settings.get("health")
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ConfigError("health: expected a mapping (prometheus: URL, naemon: STATUS_FILE)", where)
        unknown = sorted(set(section) - {"prometheus", "naemon", "nagios", "timeout"})
        if unknown:
            raise ConfigError(f"health: unknown key(s) {', '.join(unknown)} (known: prometheus, naemon, nagios, timeout)", where)
        timeout = _number(section.get("timeout", DEFAULT_TIMEOUT), "health.timeout", where)
        url, p_timeout = _entry(section.get("prometheus"), "url", "timeout", timeout, "health.prometheus", where)
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"health.prometheus: {url!r} is not an http(s) URL", where)
        naemon = section.get("naemon", section.get("nagios"))
        status, max_age = _entry(naemon, "status_file", "max_age", DEFAULT_MAX_AGE, "health.naemon", where)
        return cls(url, p_timeout, status, max_age)

    def sources(self, transport: httpx.BaseTransport | None = None) -> list[HealthSource]:
        out: list[HealthSource] = []
        if self.prometheus_url:
            out.append(PrometheusSource(self.prometheus_url, self.prometheus_timeout, transport))
        if self.status_file:
            out.append(NaemonSource(self.status_file, self.status_max_age))
        return out


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{what}: expected a positive number of seconds, got {value!r}", where)
    return float(value)


def _entry(value: Any, key: str, number_key: str, default: float, what: str, where: str) -> tuple[str | None, float]:
    if value is None:
        return None, default
    if isinstance(value, str):
        return value, default
    if isinstance(value, dict) and isinstance(value.get(key), str):
        extra = sorted(set(value) - {key, number_key})
        if extra:
            raise ConfigError(f"{what}: unknown key(s) {', '.join(extra)}", where)
        return value[key], _number(value.get(number_key, default), f"{what}.{number_key}", where)
    raise ConfigError(f"{what}: expected a string or {{{key}: ..., {number_key}: ...}}", where)
