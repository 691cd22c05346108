"""What auto-generated alerts and well-known named checks mean, in the condition language.

:mod:`lab.common.targeting` decides *which* servers get ``https_check`` or ``cert_expiry`` (and
from which source: ``auto:port:443``, ``auto:size:large``, ...); this module says what each one
checks. A name that is neither a defined alert, nor auto-generated, nor in :data:`NAMED_CHECKS` is
reported as "not rendered" instead of guessed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    condition: str
    severity: str = "warning"
    for_seconds: int | None = None
    summary: str = ""


# Blackbox exporter module per probed port (file_sd target label `lab_module`).
PROBE_MODULES: Mapping[int, str] = {
    443: "http_2xx",
    25: "smtp_starttls",
    587: "smtp_starttls",
    465: "tcp_tls",
    993: "tcp_tls",
    22: "ssh_banner",
    6443: "tcp_tls",
}
DEFAULT_PROBE_MODULE = "tcp_connect"

# Exporters that come with a Puppet class: class → (job name, port).
CLASS_EXPORTERS: Mapping[str, tuple[str, int]] = {
    "postgresql::server": ("postgres_exporter", 9187),
    "postfix": ("postfix_exporter", 9154),
}
NODE_EXPORTER = ("node_exporter", 9100)

_PORT_CHECK = {
    "https_check": ("critical", "HTTPS on port {port} does not answer"),
    "smtp_check": ("critical", "SMTP on port {port} does not answer"),
    "imap_check": ("critical", "IMAP on port {port} does not answer"),
    "ssh_check": ("warning", "SSH on port {port} does not answer"),
    "postgres_port_check": ("critical", "PostgreSQL on port {port} does not answer"),
    "kube_apiserver_check": ("critical", "Kubernetes API on port {port} does not answer"),
}
_UNITS = {
    "postgres_process": "postgresql.service",
    "kubelet_process": "kubelet.service",
    "postfix_process": "postfix.service",
    "dovecot_process": "dovecot.service",
    "nginx_process": "nginx.service",
}

AUTO_CHECKS: Mapping[str, Check] = {
    **{
        name: Check(f'unit_active{{name="{unit}"}} < 1', "critical", 120, f"{unit} is not running")
        for name, unit in _UNITS.items()
    },
    "postgres_replication_lag": Check("replication_lag_seconds > 300", "warning", 300, "PostgreSQL replica is over 5 minutes behind"),
    "cpu_threshold": Check("cpu_usage_percent > 90", "warning", 900, "CPU over 90% for 15 minutes"),
    "memory_threshold": Check("memory_usage_percent > 90", "warning", 600, "memory over 90% for 10 minutes"),
    "cert_expiry": Check("cert_expiry_days < 14", "warning", 3600, "lab node certificate expires within 14 days"),
    "puppet_run_failed": Check("puppet_last_run_success < 1", "warning", 0, "last Puppet/OpenVox run failed"),
    "agent_checkin_missed": Check("agent_checkin_age_seconds > 1800", "warning", 300, "lab-agent has not checked in for 30 minutes"),
}

# Checks that labels may name without defining them (the example definitions use these).
NAMED_CHECKS: Mapping[str, Check] = {
    "smtp_connect": Check('probe_success{lab_port=~"25|587|465"} < 1', "critical", 120, "SMTP does not answer"),
    "imap_connect": Check('probe_success{lab_port=~"993|143"} < 1', "critical", 120, "IMAP does not answer"),
    "mail_queue_length": Check("mail_queue_length > 500", "warning", 600, "Postfix queue holds over 500 messages"),
    "kubelet_healthy": Check('unit_active{name="kubelet.service"} < 1', "critical", 120, "kubelet is not running"),
    "kube_apiserver_up": Check('probe_success{lab_port="6443"} < 1', "critical", 120, "Kubernetes API does not answer"),
    "postgres_replication_lag": AUTO_CHECKS["postgres_replication_lag"],
    "postgres_connections": Check(
        "promql: 100 * sum by (lab_server) (pg_stat_activity_count) / max by (lab_server) (pg_settings_max_connections) > 80",
        "warning",
        300,
        "PostgreSQL uses over 80% of max_connections",
    ),
}


def check_for(name: str, source: str) -> Check | None:
    """The check behind an auto-generated alert (``auto:...`` source) or a named check."""
    if source.startswith("auto:port:"):
        port = int(source.rsplit(":", 1)[1])
        severity, summary = _PORT_CHECK.get(name, ("critical", "port {port} does not answer"))
        return Check(f'probe_success{{lab_port="{port}"}} < 1', severity, 120, summary.format(port=port))
    if source.startswith("auto:") and name in AUTO_CHECKS:
        return AUTO_CHECKS[name]
    return NAMED_CHECKS.get(name)


def probe_module(port: int) -> str:
    return PROBE_MODULES.get(port, DEFAULT_PROBE_MODULE)
