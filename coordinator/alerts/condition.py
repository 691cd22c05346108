"""The alert condition language, and its translation into PromQL.

Grammar (one line; whitespace between tokens is free)::

    condition  = comparison | raw
    comparison = metric [ "{" matcher { "," matcher } "}" ] op number
    matcher    = label ( "=" | "!=" | "=~" | "!~" ) '"' text '"'
    op         = ">" | ">=" | "<" | "<=" | "==" | "!="
    raw        = "promql:" any PromQL expression

``metric`` is a lab metric name from :data:`METRICS` (``disk_usage_percent``,
``cpu_usage_percent``, ...), which stands for a node_exporter (or blackbox/postgres exporter)
expression; any other name is taken as a raw Prometheus metric of that name. Matchers narrow every
series selector of the expression (``disk_usage_percent{mountpoint="/"} > 85``).

Scoping: every series selector also receives the matcher ``lab_server=~"^(a|b)$"`` naming exactly
the servers the alert applies to (``lab_server`` is a target label of every file_sd entry lab
renders). A ``promql:`` expression is lab's escape hatch: it is used as written, then scoped by
``(EXPR) and on (lab_server) up{lab_server=~"..."}``, so its result must keep the ``lab_server``
label.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping

from lab.common.errors import ConfigError

OPS = (">=", "<=", "==", "!=", ">", "<")
SCOPE_LABEL = "lab_server"
RAW_PREFIX = "promql:"

# `{S}` is where the scoping (and user) matchers go inside each series selector; `{S,}` is the
# same with a trailing comma when there are matchers, for selectors that already hold some.
_FS = 'fstype!~"tmpfs|overlay|squashfs",{S}'
METRICS: Mapping[str, tuple[str, str]] = {
    # name: (PromQL template, what it measures)
    "disk_usage_percent": (
        f"100 * (1 - node_filesystem_avail_bytes{{{_FS}}} / node_filesystem_size_bytes{{{_FS}}})",
        "used space of each real filesystem, %",
    ),
    "inode_usage_percent": (
        f"100 * (1 - node_filesystem_files_free{{{_FS}}} / node_filesystem_files{{{_FS}}})",
        "used inodes of each real filesystem, %",
    ),
    "cpu_usage_percent": (
        '100 * (1 - avg by (lab_server, instance) (rate(node_cpu_seconds_total{mode="idle",{S}}[5m])))',
        "CPU busy time over 5 minutes, all cores, %",
    ),
    "memory_usage_percent": (
        "100 * (1 - node_memory_MemAvailable_bytes{{S}} / node_memory_MemTotal_bytes{{S}})",
        "memory not available to new work, %",
    ),
    "swap_usage_percent": (
        "100 * (1 - node_memory_SwapFree_bytes{{S}} / (node_memory_SwapTotal_bytes{{S}} > 0))",
        "swap in use, %",
    ),
    "load": ("node_load1{{S}}", "1-minute load average"),
    "load1": ("node_load1{{S}}", "1-minute load average"),
    "load5": ("node_load5{{S}}", "5-minute load average"),
    "load15": ("node_load15{{S}}", "15-minute load average"),
    "load_per_core": (
        'node_load5{{S}} / on (lab_server, instance) count by (lab_server, instance) (node_cpu_seconds_total{mode="idle",{S}})',
        "5-minute load average per core",
    ),
    "disk_io_utilization_percent": (
        "100 * rate(node_disk_io_time_seconds_total{{S}}[5m])",
        "time each disk was busy over 5 minutes, %",
    ),
    "network_receive_errors": ("rate(node_network_receive_errs_total{{S}}[5m])", "receive errors per second"),
    "network_transmit_errors": ("rate(node_network_transmit_errs_total{{S}}[5m])", "transmit errors per second"),
    "network_latency_ms": ('1000 * probe_icmp_duration_seconds{phase="rtt",{S}}', "ICMP round trip (blackbox), ms"),
    "uptime_seconds": ("time() - node_boot_time_seconds{{S}}", "seconds since boot"),
    "clock_skew_seconds": ("abs(node_timex_offset_seconds{{S}})", "clock offset, seconds"),
    "target_up": ("up{{S}}", "1 when Prometheus can scrape the target"),
    "probe_success": ("probe_success{{S}}", "1 when the blackbox probe succeeds"),
    "unit_active": ('node_systemd_unit_state{state="active",{S}}', "1 when the systemd unit is active"),
    "replication_lag_seconds": ("pg_replication_lag_seconds{{S}}", "PostgreSQL replica lag (postgres_exporter), s"),
    "mail_queue_length": ("postfix_showq_message_size_bytes_count{{S}}", "messages in the Postfix queue (postfix_exporter)"),
    "gpu_temp_celsius": ("DCGM_FI_DEV_GPU_TEMP{{S}}", "GPU temperature (dcgm-exporter), °C"),
    "cert_expiry_days": (
        "(lab_agent_cert_not_after_seconds{{S}} - time()) / 86400",
        "days until the node's lab certificate expires (lab-agent textfile metric)",
    ),
    "agent_checkin_age_seconds": (
        "time() - lab_agent_last_checkin_timestamp_seconds{{S}}",
        "seconds since lab-agent last checked in (lab-agent textfile metric)",
    ),
    "puppet_last_run_success": (
        "lab_puppet_last_run_success{{S}}",
        "1 when the last Puppet/OpenVox run succeeded (lab-agent textfile metric)",
    ),
}

_RE_META = re.compile(r"[\\.+*?()|\[\]{}^$]")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_COMPARISON_RE = re.compile(
    r"^\s*(?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(?P<matchers>[^{}]*)\})?\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>\S+)\s*$"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """A parsed condition. ``raw`` is set for ``promql:`` conditions (then metric/op/threshold are not)."""

    text: str
    metric: str = ""
    matchers: tuple[tuple[str, str, str], ...] = ()
    op: str = ""
    threshold: float = 0.0
    threshold_text: str = ""
    raw: str = ""

    @property
    def known_metric(self) -> bool:
        return self.metric in METRICS

    def value_expr(self, servers: Iterable[str]) -> str:
        """PromQL for the current value per server (no comparison)."""
        if self.raw:
            return _scope_raw(self.raw, servers)
        template = METRICS[self.metric][0] if self.metric in METRICS else self.metric + "{{S}}"
        inner = ",".join([*(f'{k}{o}"{v}"' for k, o, v in self.matchers), scope_matcher(servers)])
        return template.replace("{S}", inner)

    def expr(self, servers: Iterable[str]) -> str:
        """The alerting expression, scoped to ``servers``."""
        if self.raw:
            return _scope_raw(self.raw, servers)
        value = self.value_expr(servers)
        if " " in value:
            value = f"({value})"
        return f"{value} {self.op} {self.threshold_text}"

    def status(self, value: float | None) -> str:
        """ok / approaching (within 10% of the threshold) / over / no data, for one current value."""
        if value is None:
            return "no data"
        if self.raw:
            return "over"  # a raw expression returns a series only where it holds
        t = self.threshold
        over = {
            ">": value > t, ">=": value >= t, "<": value < t, "<=": value <= t, "==": value == t, "!=": value != t,
        }[self.op]
        if over:
            return "over"
        margin = abs(t) * 0.1
        if self.op in (">", ">=") and value >= t - margin:
            return "approaching"
        if self.op in ("<", "<=") and value <= t + margin:
            return "approaching"
        return "ok"


def parse(text: str, file: str | None = None, line: int | None = None) -> Condition:
    """Parse one condition; mistakes raise :class:`ConfigError` at ``file:line``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("condition is empty (e.g. disk_usage_percent > 85)", file, line)
    stripped = text.strip()
    if stripped.startswith(RAW_PREFIX):
        raw = stripped[len(RAW_PREFIX):].strip()
        if not raw:
            raise ConfigError("condition 'promql:' has no expression after it", file, line)
        if raw.count("(") != raw.count(")") or raw.count("{") != raw.count("}") or raw.count("[") != raw.count("]"):
            raise ConfigError(f"condition {text!r}: unbalanced brackets in the PromQL expression", file, line)
        return Condition(text=text, raw=raw)
    m = _COMPARISON_RE.match(stripped)
    if m is None:
        raise ConfigError(
            f"condition {text!r} is not 'metric OP number' (OP one of {' '.join(OPS)}; "
            f"or 'promql: EXPR' for raw PromQL)",
            file,
            line,
        )
    number = m["number"]
    if not _NUMBER_RE.fullmatch(number):
        raise ConfigError(f"condition {text!r}: threshold {number!r} is not a number", file, line)
    matchers: list[tuple[str, str, str]] = []
    if m["matchers"] is not None and m["matchers"].strip():
        for part in _split_matchers(m["matchers"]):
            mm = _MATCHER_RE.fullmatch(part)
            if mm is None:
                raise ConfigError(f'condition {text!r}: bad label matcher {part.strip()!r} (want label="value")', file, line)
            if mm[1] == SCOPE_LABEL:
                raise ConfigError(f"condition {text!r}: {SCOPE_LABEL} is set by lab from the alert's target", file, line)
            matchers.append((mm[1], mm[2], mm[3]))
    threshold = float(number)
    return Condition(
        text=text,
        metric=m["metric"],
        matchers=tuple(matchers),
        op=m["op"],
        threshold=threshold,
        threshold_text=_number_text(threshold),
    )


def parse_alert(alert: object) -> Condition:
    """Parse a defined alert's condition, errors located at the alert's file:line."""
    loc = getattr(alert, "location", None)
    return parse(getattr(alert, "condition"), loc.file if loc else None, loc.line if loc else None)


def scope_matcher(servers: Iterable[str]) -> str:
    """``lab_server="a"`` for one server, ``lab_server=~"^(a|b)$"`` for several (sorted, escaped)."""
    names = sorted(set(servers))
    if not names:
        raise ValueError("an alert scoped to no servers is not rendered")
    if len(names) == 1:
        return f'{SCOPE_LABEL}="{_promql_string(names[0])}"'
    alternatives = "|".join(map(_alternative, names))
    return f'{SCOPE_LABEL}=~"^({alternatives})$"'


@functools.lru_cache(maxsize=1 << 17)
def _alternative(name: str) -> str:
    """One server name as a regex alternative inside a PromQL string (cached: rendering for a
    big fleet escapes each name once per alert otherwise)."""
    return _promql_string(_RE_META.sub(r"\\\g<0>", name))


def _scope_raw(raw: str, servers: Iterable[str]) -> str:
    return f"({raw}) and on ({SCOPE_LABEL}) up{{{scope_matcher(servers)}}}"


def _promql_string(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _number_text(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _split_matchers(text: str) -> list[str]:
    """Split on commas outside quoted values."""
    parts, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts
