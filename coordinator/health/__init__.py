"""Health aggregation: ask Prometheus, Naemon/Nagios (and later cloud APIs) how servers are doing."""

from lab.coordinator.health.base import HealthResult, HealthSource, SourceDown, check_all, pillar, summary
from lab.coordinator.health.config import HealthConfig
from lab.coordinator.health.naemon import NaemonSource, parse_status_untrusted
from lab.coordinator.health.prometheus import PrometheusSource

__all__ = [
    "HealthConfig",
    "HealthResult",
    "HealthSource",
    "NaemonSource",
    "PrometheusSource",
    "SourceDown",
    "check_all",
    "parse_status_untrusted",
    "pillar",
    "summary",
]
