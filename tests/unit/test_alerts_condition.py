"""The alert condition language: parsing, PromQL translation, scoping matchers, value status."""

from __future__ import annotations

import re
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common.config import load_texts
from lab.common.errors import ConfigError
from lab.coordinator.alerts.condition import METRICS, parse, parse_alert, scope_matcher


@pytest.mark.parametrize("op", [">", ">=", "<", "<=", "==", "!="])
def test_every_operator_parses(op: str) -> None:
    c = parse(f"disk_usage_percent {op} 85")
    assert (c.metric, c.op, c.threshold, c.threshold_text) == ("disk_usage_percent", op, 85.0, "85")


def test_numbers_and_spacing() -> None:
    assert parse("load>=1.5").threshold == 1.5
    assert parse("  cert_expiry_days <  -0.5 ").threshold_text == "-0.5"
    assert parse("x > 1e3").threshold_text == "1000"


def test_known_metric_maps_to_node_exporter_promql() -> None:
    expr = parse("disk_usage_percent > 85").expr(["db-1"])
    assert expr == (
        '(100 * (1 - node_filesystem_avail_bytes{fstype!~"tmpfs|overlay|squashfs",lab_server="db-1"}'
        ' / node_filesystem_size_bytes{fstype!~"tmpfs|overlay|squashfs",lab_server="db-1"})) > 85'
    )
    cpu = parse("cpu_usage_percent > 90").expr(["a", "b"])
    assert 'rate(node_cpu_seconds_total{mode="idle",lab_server=~"^(a|b)$"}[5m])' in cpu
    assert "avg by (lab_server, instance)" in cpu
    assert "node_memory_MemAvailable_bytes" in parse("memory_usage_percent > 90").expr(["a"])
    assert parse("load > 4").expr(["a"]) == 'node_load1{lab_server="a"} > 4'


def test_unknown_metric_is_a_raw_metric() -> None:
    c = parse("gpu_fan_rpm < 100")
    assert not c.known_metric
    assert c.expr(["dgx"]) == 'gpu_fan_rpm{lab_server="dgx"} < 100'


def test_matchers_narrow_every_selector() -> None:
    expr = parse('disk_usage_percent{mountpoint="/", device!~"loop.*"} > 85').expr(["a"])
    assert expr.count('mountpoint="/",device!~"loop.*",lab_server="a"') == 2


def test_raw_promql_escape_hatch_is_scoped_by_lab_server() -> None:
    c = parse("promql: sum by (lab_server) (rate(http_errors_total[5m])) > 1")
    assert c.raw and not c.metric
    assert c.expr(["a", "b"]) == (
        '(sum by (lab_server) (rate(http_errors_total[5m])) > 1) and on (lab_server) up{lab_server=~"^(a|b)$"}'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("disk_usage_percent", "not 'metric OP number'"),
        ("disk_usage_percent > lots", "not a number"),
        ("disk_usage_percent => 5", "not 'metric OP number'"),
        ("85 < disk_usage_percent", "not 'metric OP number'"),
        ('x{mount=/} > 1', "bad label matcher"),
        ('x{lab_server="a"} > 1', "set by lab"),
        ("promql:", "no expression"),
        ("promql: sum(rate(x[5m]) > 1", "unbalanced"),
    ],
)
def test_mistakes_are_config_errors_at_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        parse(text, "alerts.yaml", 7)
    assert str(err.value).startswith("alerts.yaml:7: ")


def test_parse_alert_reports_the_alerts_location() -> None:
    d = load_texts([("defs/alerts.yaml", textwrap.dedent("""\
        alerts:
          - name: fine
            target: {environment: prod}
            condition: load > 1
          - name: broken
            target: {environment: prod}
            condition: load is high
        """))])
    assert parse_alert(d.alerts["fine"]).metric == "load"
    with pytest.raises(ConfigError) as err:
        parse_alert(d.alerts["broken"])
    assert str(err.value).startswith("defs/alerts.yaml:5: ")


@pytest.mark.parametrize(
    ("cond", "value", "status"),
    [
        ("disk_usage_percent > 85", 42, "ok"),
        ("disk_usage_percent > 85", 83, "approaching"),
        ("disk_usage_percent > 85", 76.5, "approaching"),
        ("disk_usage_percent > 85", 76.4, "ok"),
        ("disk_usage_percent > 85", 90, "over"),
        ("disk_usage_percent > 85", 85, "approaching"),
        ("disk_usage_percent >= 85", 85, "over"),
        ("cert_expiry_days < 14", 15, "approaching"),
        ("cert_expiry_days < 14", 300, "ok"),
        ("cert_expiry_days < 14", 3, "over"),
        ("up == 0", 1, "ok"),
        ("up == 0", 0, "over"),
        ("load > 4", None, "no data"),
    ],
)
def test_status_of_a_current_value(cond: str, value: float | None, status: str) -> None:
    assert parse(cond).status(value) == status


def test_scope_matcher_escapes_and_sorts() -> None:
    assert scope_matcher(["b", "a", "a"]) == 'lab_server=~"^(a|b)$"'
    assert scope_matcher(["db-1.example.org"]) == 'lab_server="db-1.example.org"'
    assert scope_matcher(["x.y", "z"]) == 'lab_server=~"^(x\\\\.y|z)$"'
    with pytest.raises(ValueError):
        scope_matcher([])


def _matches(matcher: str, name: str) -> bool:
    """Evaluate a lab_server matcher the way Prometheus does (RE2 is a subset of `re` here)."""
    m = re.fullmatch(r'lab_server(=~|=)"(.*)"', matcher)
    assert m is not None
    value = m[2].replace("\\\\", "\\")
    return re.fullmatch(value, name) is not None if m[1] == "=~" else value == name


names = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.sets(names, min_size=1, max_size=8), st.sets(names, max_size=8))
def test_scope_matches_exactly_the_given_servers(chosen: set[str], others: set[str]) -> None:
    matcher = scope_matcher(chosen)
    for n in chosen | others:
        assert _matches(matcher, n) == (n in chosen)


def test_every_metric_template_has_a_scope_slot() -> None:
    for name, (template, what) in METRICS.items():
        assert "{S}" in template and what, name
        assert "lab_server" in parse(f"{name} > 1").expr(["a"])
