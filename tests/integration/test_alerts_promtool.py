"""Prometheus's own rule unit tests (`promtool test rules`) prove the rendered rules fire exactly
where targeting says: for every example alert over a gauge-like metric, every server of the fleet
gets series over the threshold (one server, worker-6, under it), and the test expects the alert to
fire for exactly the targeted servers of that environment file — so an excluded server
(batch-worker-1 for memory_pressure, test-box-1 for the eu-infrastructure group), a server of
another environment or outside the target that does NOT fire is as much part of the proof as the
ones that do. Alerts with `for:` are checked pending (not firing yet) and firing. A negative
control shows promtool does fail on a wrong expectation.

Also: `promtool check rules` accepts every rule file rendered from randomised definitions
(hypothesis builds labels, nested groups with exclusions, alerts with exclusions and random
conditions from the condition language; all rule files of an example go to one promtool call).

Debian package `prometheus` (promtool). A missing binary skips, except under CI=true (fails).
"""

from __future__ import annotations

import math
import pathlib
import re
import subprocess
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.common.config import load_definitions, load_texts
from lab.common.targeting import Fleet
from lab.coordinator.alerts import render_all, write_tree
from lab.coordinator.alerts.condition import METRICS
from lab.coordinator.alerts.render import env_file, target_source
from lab.coordinator.engine import EXAMPLES
from lab.coordinator.state import Server

from _prometheus import need


PACKAGE = "Debian package prometheus"
DEFS = load_definitions(EXAMPLES)
SERVERS = [
    Server("worker-5", "aws", ("k8s-worker", "production", "eu-west"), "prod", "eu-west"),
    Server("worker-6", "aws", ("k8s-worker",), "prod", "eu-west"),  # under every threshold
    Server("batch-worker-1", "baremetal", ("k8s-worker",), "prod", "eu-west"),  # memory_pressure excludes it
    Server("db-1", "baremetal", ("postgres", "production", "eu-west"), "prod", "eu-west"),
    Server("mail-1", "baremetal", ("mailserver",), "prod", "us-east"),
    Server("worker-8", "aws", ("k8s-worker",), "dev", "eu-west"),
    Server("test-box-1", "ssh", ("k8s-worker",), "dev", "eu-west"),  # eu-infrastructure excludes it
    Server("lab-7", "ssh", ("app", "experimental"), "dev", "eu-west"),  # ... and servers labelled experimental
    Server("dgx-spark", "baremetal", ("k8s-worker",), "dev", None),
    Server("web-1", "ssh", ("app",), "staging", "eu-west"),
]
COOL = "worker-6"
FS = {"device": "/dev/sda1", "fstype": "ext4", "mountpoint": "/"}

# lab metric → (series of one server as [(metric, extra labels, hot value, cool value)], value(hot)).
# Values are exact in binary floating point, so the annotations' {{ $value }} is predictable.
GAUGES = {
    "memory_usage_percent": (
        [("node_memory_MemAvailable_bytes", {}, 4, 48), ("node_memory_MemTotal_bytes", {}, 64, 64)],
        lambda v: 100 * (1 - v[0] / v[1]),
    ),
    "disk_usage_percent": (
        [("node_filesystem_avail_bytes", FS, 8, 48), ("node_filesystem_size_bytes", FS, 64, 64),
         # a full tmpfs, which the metric leaves out: were it counted, the alert's labels would differ
         ("node_filesystem_avail_bytes", {"device": "tmpfs", "fstype": "tmpfs", "mountpoint": "/run"}, 0, 0),
         ("node_filesystem_size_bytes", {"device": "tmpfs", "fstype": "tmpfs", "mountpoint": "/run"}, 64, 64)],
        lambda v: 100 * (1 - v[0] / v[1]),
    ),
    "mail_queue_length": ([("postfix_showq_message_size_bytes_count", {}, 2000, 10)], lambda v: v[0]),
    "gpu_temp_celsius": ([("DCGM_FI_DEV_GPU_TEMP", {"gpu": "0"}, 90, 40)], lambda v: v[0]),
    "network_latency_ms": ([("probe_icmp_duration_seconds", {"phase": "rtt"}, 0.125, 0.0078125)], lambda v: 1000 * v[0]),
}


def go_float(x: float) -> str:
    """How Go's text/template prints a float64 ({{ $value }}): %v, shortest repr, no '.0'."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e21:
        return str(int(x))
    return repr(x)


def series(metric: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{metric}{{{inner}}}"


def base_labels(server: str) -> dict[str, str]:
    return {"lab_server": server, "instance": f"{server}:9100", "job": "node_exporter"}


def input_series() -> list[dict[str, str]]:
    out = []
    for s in SERVERS:
        for parts, _value in GAUGES.values():
            for metric, extra, hot, cool in parts:
                out.append({"series": series(metric, {**base_labels(s.name), **extra}), "values": f"{cool if s.name == COOL else hot}x30"})
    return out


def expected_alert(rule: dict, server: str, metric: str) -> dict:
    parts, value_of = GAUGES[metric]
    hot = [hot for _m, extra, hot, _c in parts if extra.get("fstype") != "tmpfs"]
    value = value_of(hot)
    labels = {**base_labels(server), **parts[0][1], **rule["labels"]}
    annotations = {}
    for k, v in rule["annotations"].items():
        text = v.replace("{{ $labels.lab_server }}", server).replace("{{ $value }}", go_float(value))
        assert "{{" not in text, text
        annotations[k] = text
    return {"exp_labels": labels, "exp_annotations": annotations}


def generated_tests(out: pathlib.Path) -> dict[str, dict]:
    """One promtool test file per rule file: every example alert over a GAUGES metric, expected to
    fire for exactly the servers targeting gives it in that environment, less the cool one."""
    fleet = Fleet(DEFS, SERVERS)
    env = {s.name: env_file(s.environment) for s in SERVERS}
    tests: dict[str, dict] = {}
    for path in sorted((out / "rules").glob("*.yaml")):
        rel = f"rules/{path.name}"
        rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
        cases = []
        for name, alert in sorted(DEFS.alerts.items()):
            metric = alert.condition.split()[0].split("{")[0]
            mine = [r for r in rules if r["alert"] == name]
            if metric not in GAUGES or not mine:
                continue
            assert [r["labels"]["lab_source"] for r in mine] == [target_source(alert)], name
            rule = mine[0]
            firing = sorted(s for s in fleet.alert_servers(name)[0] if env[s] == rel and s != COOL)
            exp = [expected_alert(rule, s, metric) for s in firing]
            if rule.get("for"):
                cases.append({"eval_time": "4m", "alertname": name, "exp_alerts": []})  # pending, not firing
            cases.append({"eval_time": "10m", "alertname": name, "exp_alerts": exp})
        if cases:
            tests[rel] = {
                "rule_files": [str(path)],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": input_series(), "alert_rule_test": cases}],
            }
    return tests


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("rendered")
    write_tree(out, render_all(Fleet(DEFS, SERVERS)).files)
    return out


def promtool_test(promtool: str, files: list[pathlib.Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, "test", "rules", *map(str, files)], capture_output=True, text=True, timeout=120)


def case(tests: dict[str, dict], rel: str, alert: str, eval_time: str = "10m") -> dict:
    return next(c for c in tests[rel]["tests"][0]["alert_rule_test"] if c["alertname"] == alert and c["eval_time"] == eval_time)


def servers_of(c: dict) -> set[str]:
    return {a["exp_labels"]["lab_server"] for a in c["exp_alerts"]}


def test_rendered_rules_fire_for_selected_servers_and_not_for_excluded_ones(out: pathlib.Path, tmp_path: pathlib.Path) -> None:
    promtool = need("promtool", hint=PACKAGE)
    tests = generated_tests(out)
    # The proof covers what the issue names: selected servers fire, excluded ones do not.
    assert servers_of(case(tests, "rules/prod.yaml", "memory_pressure")) == {"worker-5"}  # not batch-worker-1, not worker-6 (cool)
    assert servers_of(case(tests, "rules/prod.yaml", "disk_space_low")) == {"batch-worker-1", "db-1", "mail-1", "worker-5"}
    assert servers_of(case(tests, "rules/dev.yaml", "memory_pressure")) == {"dgx-spark", "test-box-1", "worker-8"}
    assert servers_of(case(tests, "rules/dev.yaml", "gpu_temperature")) == {"dgx-spark"}
    assert servers_of(case(tests, "rules/dev.yaml", "network_latency_high")) == {"worker-8"}  # not test-box-1, not lab-7
    assert case(tests, "rules/prod.yaml", "mail_queue_critical", "4m")["exp_alerts"] == []
    assert servers_of(case(tests, "rules/prod.yaml", "mail_queue_critical")) == {"mail-1"}
    files = []
    for rel, doc in tests.items():
        f = tmp_path / f"test-{rel[6:]}"
        f.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(f)
    assert len(files) == 3  # prod, dev, staging
    r = promtool_test(promtool, files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == len(files), r.stdout


@pytest.mark.parametrize("wrong", ["excluded server expected to fire", "selected server expected silent", "fires before for: has passed"])
def test_promtool_fails_on_a_wrong_expectation(out: pathlib.Path, tmp_path: pathlib.Path, wrong: str) -> None:
    """Negative control: the same generated test with one wrong expectation fails."""
    promtool = need("promtool", hint=PACKAGE)
    tests = generated_tests(out)
    rule = next(r for g in yaml.safe_load((out / "rules" / "prod.yaml").read_text())["groups"] for r in g["rules"] if r["alert"] == "memory_pressure")
    if wrong == "excluded server expected to fire":
        case(tests, "rules/prod.yaml", "memory_pressure")["exp_alerts"].append(expected_alert(rule, "batch-worker-1", "memory_usage_percent"))
        alert = "memory_pressure"
    elif wrong == "selected server expected silent":
        case(tests, "rules/prod.yaml", "memory_pressure")["exp_alerts"] = []
        alert = "memory_pressure"
    else:
        pending = case(tests, "rules/prod.yaml", "mail_queue_critical", "4m")
        pending["exp_alerts"] = case(tests, "rules/prod.yaml", "mail_queue_critical")["exp_alerts"]
        alert = "mail_queue_critical"
    f = tmp_path / "wrong.yaml"
    f.write_text(yaml.safe_dump(tests["rules/prod.yaml"], sort_keys=False))
    r = promtool_test(promtool, [f])
    assert r.returncode != 0, r.stdout
    assert "FAILED" in r.stdout + r.stderr and alert in r.stdout + r.stderr, r.stdout + r.stderr


# -- property: promtool check rules accepts whatever lab renders ------------------------------------

NAME = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,12}", fullmatch=True)
SERVER_NAME = st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}(\.[a-z0-9][a-z0-9-]{0,6})?", fullmatch=True)
ENVIRONMENTS = ["prod", "dev", "staging", "qa-1", "eu.west"]
REGIONS = ["eu-west", "us-east", "ap-south"]
# Label values in matchers: quotes, backslashes, regex and template characters, non-ASCII.
VALUE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="{}\n\r\x00"), max_size=12).map(
    lambda s: s.replace("\\", "\\\\").replace('"', '\\"')
)
NUMBER = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["0.5", ".5", "1e3", "2.5E-2", "+7", "-0"]),
)
OPS = [">", ">=", "<", "<=", "==", "!="]


@st.composite
def conditions(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["lab", "lab", "raw", "promql"]))
    if kind == "promql":
        return draw(st.sampled_from([
            "promql: sum by (lab_server) (rate(http_errors_total[5m])) > 1",
            'promql: max by (lab_server, instance) (node_hwmon_temp_celsius{chip=~"platform.*"}) > 80',
            "promql: absent_over_time(up[10m]) == 1 or up == 0",
            'promql: up{job="{{x}}"} == 0',
        ]))
    metric = draw(st.sampled_from(sorted(METRICS))) if kind == "lab" else draw(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True))
    matchers = draw(st.lists(st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda x: x != "lab_server"),
                                       st.sampled_from(["=", "!=", "=~", "!~"]), VALUE), max_size=2))
    # =~ values must be valid RE2; keep regex matchers to safe text
    body = ",".join(f'{k}{op}"{re.sub(r"[^a-z0-9 .]", "", v) if "~" in op else v}"' for k, op, v in matchers)
    return f"{metric}{{{body}}} {draw(st.sampled_from(OPS))} {draw(NUMBER)}" if matchers else f"{metric} {draw(st.sampled_from(OPS))} {draw(NUMBER)}"


@st.composite
def worlds(draw: st.DrawFn) -> tuple[str, list[Server]]:
    labels = draw(st.lists(NAME, min_size=1, max_size=6, unique=True))
    servers = draw(st.lists(SERVER_NAME, min_size=1, max_size=10, unique=True))
    text_labels = {}
    for name in labels:
        body: dict = {}
        if draw(st.booleans()):
            body["ports"] = draw(st.lists(st.sampled_from([22, 25, 443, 587, 993, 5432, 6443, 8080]), max_size=3, unique=True))
        if draw(st.booleans()):
            body["puppet_classes"] = draw(st.lists(st.sampled_from(["postgresql::server", "postfix", "nginx", "kubernetes::worker", "base"]), max_size=2, unique=True))
        if draw(st.booleans()):
            body["size"] = draw(st.sampled_from(["small", "medium", "large"]))
        if draw(st.booleans()):
            body["alerts"] = draw(st.lists(st.sampled_from(["smtp_connect", "mail_queue_length", "postgres_connections", "kubelet_healthy", "no_such_check", "a0"]), max_size=3, unique=True))
        text_labels[name] = body
    groups: dict = {}
    for i in range(draw(st.integers(0, 4))):
        g: dict = {}
        if draw(st.booleans()):
            g["match"] = {"labels": draw(st.lists(st.sampled_from(labels), min_size=1, max_size=2, unique=True))}
            if draw(st.booleans()):
                g["match"]["environment"] = draw(st.sampled_from(ENVIRONMENTS))
        if groups and draw(st.booleans()):
            g["groups"] = draw(st.lists(st.sampled_from(sorted(groups)), min_size=1, max_size=2, unique=True))
        if not g or draw(st.booleans()):
            g["servers"] = draw(st.lists(st.sampled_from(servers), min_size=1, max_size=3, unique=True))
        if draw(st.booleans()):
            g["exclude"] = {"servers": draw(st.lists(st.sampled_from(servers), min_size=1, max_size=2, unique=True))}
        groups[f"grp-{i}"] = g
    alerts = []
    for i in range(draw(st.integers(1, 6))):
        target: dict = {}
        key = draw(st.sampled_from(["labels", "groups", "environment", "servers"] if groups else ["labels", "environment", "servers"]))
        target[key] = {
            "labels": lambda: draw(st.lists(st.sampled_from(labels), min_size=1, max_size=2, unique=True)),
            "groups": lambda: draw(st.lists(st.sampled_from(sorted(groups)), min_size=1, max_size=2, unique=True)),
            "environment": lambda: draw(st.sampled_from(ENVIRONMENTS)),
            "servers": lambda: draw(st.lists(st.sampled_from(servers), min_size=1, max_size=3, unique=True)),
        }[key]()
        if draw(st.booleans()):
            target["exclude"] = draw(st.sampled_from([
                {"servers": draw(st.lists(st.sampled_from(servers), min_size=1, max_size=2, unique=True))},
                {"labels": [draw(st.sampled_from(labels))]},
                {"environment": draw(st.sampled_from(ENVIRONMENTS))},
            ]))
        alert = {"name": f"a{i}", "target": target, "condition": draw(conditions()), "severity": draw(st.sampled_from(["warning", "critical", "info"]))}
        if draw(st.booleans()):
            alert["for"] = draw(st.sampled_from(["30s", "5m", "1h", "2d"]))
        if draw(st.booleans()):
            alert["description"] = draw(st.one_of(
                st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(str.strip),
                st.sampled_from(["see {{ $labels.instance }}", "{{ broken", "}} {{{x}}} '\"", "100% ${value} #x: y"]),
            ))
        alerts.append(alert)
    sizes = {n: {"abstract": {"cores": c, "memory": "4GB"}} for n, c in (("small", 2), ("medium", 4), ("large", 8))}
    docs = {"sizes": sizes, "labels": text_labels, "alerts": alerts}
    if groups:
        docs["groups"] = groups
    fleet = [
        Server(name, draw(st.sampled_from(["aws", "baremetal", "ssh"])), tuple(draw(st.lists(st.sampled_from(labels), max_size=3, unique=True))),
               draw(st.sampled_from([*ENVIRONMENTS, None])), draw(st.sampled_from([*REGIONS, None])), draw(st.sampled_from([None, "small", "large"])))
        for name in servers
    ]
    return yaml.safe_dump(docs, allow_unicode=True, sort_keys=False), fleet


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(worlds(), min_size=2, max_size=5))
def test_promtool_accepts_rules_rendered_from_random_definitions(batch: list[tuple[str, list[Server]]]) -> None:
    promtool = need("promtool", hint=PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        files: list[str] = []
        for i, (text, servers) in enumerate(batch):
            defs = load_texts([("defs/random.yaml", text)])
            rendered = render_all(Fleet(defs, servers))
            write_tree(pathlib.Path(tmp) / str(i), rendered.files)
            files += [str(pathlib.Path(tmp) / str(i) / p) for p in rendered.files if p.startswith("rules/")]
            # whatever the text, each rule file reads back as what lab meant (its own YAML emitter)
            by_key = {(x.alert, x.source): x for x in rendered.rules}
            file_of = {v.name: env_file(v.environment) for v in servers}
            for p, data in rendered.files.items():
                if p.startswith("rules/"):
                    for g in yaml.safe_load(data)["groups"]:
                        for r in g["rules"]:
                            rule = by_key[(r["alert"], r["labels"]["lab_source"])]
                            assert r["expr"] == rule.condition.expr([s for s in rule.servers if file_of[s] == p])
        if not files:
            return
        r = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:] + "\n" + "\n---\n".join(t for t, _s in batch)
        assert r.stdout.count("SUCCESS") == len(files)


def test_go_float_matches_prometheus_formatting() -> None:
    assert [go_float(x) for x in (93.75, 87.5, 2000.0, 125.0, 90.0)] == ["93.75", "87.5", "2000", "125", "90"]
    assert not math.isnan(GAUGES["memory_usage_percent"][1]([4, 64]))
