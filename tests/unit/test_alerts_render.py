"""Rendering alerts: scoping equals targeting, per-environment files, auto alerts, file_sd,
Naemon objects, deterministic bytes, atomic writes and diffs, and the CLI commands."""

from __future__ import annotations

import json
import pathlib
import random
import re
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.common.config import load_definitions, load_texts
from lab.common.errors import ConfigError
from lab.common.targeting import Fleet
from lab.coordinator.alerts import render_all, write_tree
from lab.coordinator.alerts.output import MANIFEST, diff_tree
from lab.coordinator.alerts.render import collect_rules, target_source
from lab.coordinator.cli.app import run
from lab.coordinator.engine import EXAMPLES
from lab.coordinator.state import Server

DEFS = load_definitions(EXAMPLES)
SERVERS = [
    Server("worker-5", "aws", ("k8s-worker", "production", "eu-west"), "prod", "eu-west"),
    Server("batch-worker-1", "baremetal", ("k8s-worker",), "prod", "eu-west"),
    Server("test-box-1", "ssh", ("k8s-worker",), "dev", "eu-west"),
    Server("worker-9", "aws", ("k8s-worker",), "staging", "eu-west"),
    Server("db-1", "baremetal", ("postgres", "production", "eu-west"), "prod", "eu-west", addresses={"primary": "10.0.0.5"}),
    Server("db-2", "baremetal", ("postgres",), "prod", "eu-west"),
    Server("mail-1", "xcpng", ("mailserver",), "prod", "us-east", "small"),
    Server("web-1", "ssh", ("app", "experimental"), None, "eu-west"),
]


def rendered(servers=SERVERS, defs=DEFS):
    return render_all(Fleet(defs, servers))


def rules_of(files: dict[str, bytes]) -> list[tuple[str, dict]]:
    out = []
    for path, data in files.items():
        if path.startswith("rules/"):
            doc = yaml.safe_load(data)
            assert [g["name"] for g in doc["groups"]] == [f"lab-{path[6:-5]}"]
            out += [(path, r) for r in doc["groups"][0]["rules"]]
    return out


def scoped_servers(expr: str, names: list[str]) -> set[str]:
    """Servers every lab_server matcher in ``expr`` admits (evaluated as Prometheus would)."""
    matchers = re.findall(r'lab_server(=~|=)"((?:[^"\\]|\\.)*)"', expr)
    assert matchers, expr
    admitted = set(names)
    for op, raw in matchers:
        value = raw.replace("\\\\", "\\")
        admitted &= {n for n in names if (re.fullmatch(value, n) if op == "=~" else value == n)}
    return admitted


def test_every_defined_alert_is_scoped_to_exactly_its_targeted_servers() -> None:
    r = rendered()
    fleet = Fleet(DEFS, SERVERS)
    names = [s.name for s in SERVERS]
    rules = rules_of(r.files)
    for alert in DEFS.alerts:
        expected, _excluded = fleet.alert_servers(alert)
        got: set[str] = set()
        for _path, rule in rules:
            if rule["labels"]["lab_alert"] == alert and rule["labels"]["lab_source"] == target_source(DEFS.alerts[alert]):
                got |= scoped_servers(rule["expr"], names)
        assert got == set(expected), alert


def test_exclusions_are_left_out_of_the_scope() -> None:
    rules = [rule for _p, rule in rules_of(rendered().files) if rule["alert"] == "memory_pressure"]
    admitted = set().union(*(scoped_servers(rule["expr"], [s.name for s in SERVERS]) for rule in rules))
    assert "batch-worker-1" not in admitted
    assert {"worker-5", "test-box-1", "worker-9"} <= admitted


def test_one_rule_file_per_environment_each_scoped_to_its_own_servers() -> None:
    r = rendered()
    assert sorted(p for p in r.files if p.startswith("rules/")) == [
        "rules/dev.yaml", "rules/no-environment.yaml", "rules/prod.yaml", "rules/staging.yaml",
    ]
    env = {s.name: s.environment or "no-environment" for s in SERVERS}
    names = list(env)
    seen = set()
    for path, rule in rules_of(r.files):
        admitted = scoped_servers(rule["expr"], names)
        assert admitted and all(f"rules/{env[n]}.yaml" == path for n in admitted), (path, rule["alert"])
        seen.add((rule["alert"], path))
    assert {("memory_pressure", "rules/prod.yaml"), ("memory_pressure", "rules/dev.yaml"), ("memory_pressure", "rules/staging.yaml")} <= seen


def test_rule_shape_labels_and_annotations() -> None:
    rule = next(rule for _p, rule in rules_of(rendered().files) if rule["alert"] == "high_cpu")
    assert rule["for"] == "10m"
    assert rule["labels"] == {"severity": "warning", "lab_alert": "high_cpu", "lab_source": "environment:prod"}
    assert rule["annotations"]["lab_alert"] == "high_cpu"
    assert "environment prod" in rule["annotations"]["description"]
    assert "alerts.yaml:" in rule["annotations"]["description"]
    assert rule["expr"].endswith("> 90")


def test_auto_generated_alerts_are_rendered_with_their_sources() -> None:
    rules = {(rule["alert"], rule["labels"]["lab_source"]): rule for _p, rule in rules_of(rendered().files)}
    assert 'probe_success{lab_port="443",lab_server="web-1"} < 1' == rules[("https_check", "auto:port:443")]["expr"]
    assert rules[("smtp_check", "auto:port:25")]["labels"]["severity"] == "critical"
    assert "node_cpu_seconds_total" in rules[("cpu_threshold", "auto:size:large")]["expr"]
    assert "node_memory_MemAvailable_bytes" in rules[("memory_threshold", "auto:size:small")]["expr"]
    assert 'name="postgresql.service"' in rules[("postgres_process", "auto:class:postgresql::server")]["expr"]
    assert "pg_replication_lag_seconds" in rules[("postgres_replication_lag", "auto:class:postgresql::server")]["expr"]
    assert "lab_agent_cert_not_after_seconds" in rules[("cert_expiry", "auto:identity")]["expr"]
    assert "lab_puppet_last_run_success" in rules[("puppet_run_failed", "auto:enrollment")]["expr"]
    assert "lab_agent_last_checkin_timestamp_seconds" in rules[("agent_checkin_missed", "auto:enrollment")]["expr"]
    # label-named checks: known ones rendered, unknown ones reported rather than guessed
    assert ("smtp_connect", "label:mailserver") in rules
    assert "and on (lab_server) up{" in rules[("postgres_connections", "label:postgres")]["expr"]
    assert ("node_ready", "named by label:k8s-worker but has no condition (define it under alerts:)") in rendered().skipped


def test_auto_alert_scope_matches_the_server_views() -> None:
    fleet = Fleet(DEFS, SERVERS)
    names = [s.name for s in SERVERS]
    got: dict[str, set[str]] = {}
    for _p, rule in rules_of(rendered().files):
        if rule["labels"]["lab_source"] == "auto:identity":
            got.setdefault(rule["alert"], set()).update(scoped_servers(rule["expr"], names))
    assert got == {"cert_expiry": set(names)}
    https = {n for n in names if any(i.name == "https_check" for i in fleet.server(n).alerts)}
    assert https == {"web-1"}


def test_same_inputs_give_the_same_bytes_whatever_the_order() -> None:
    a = rendered().files
    shuffled = list(SERVERS)
    random.Random(7).shuffle(shuffled)
    b = rendered(shuffled).files
    assert a == b
    assert list(a) == sorted(a)


def test_file_sd_targets_carry_lab_server() -> None:
    files = rendered().files
    node = json.loads(files["targets/node_exporter.json"])
    assert [e["labels"]["lab_server"] for e in node] == sorted(s.name for s in SERVERS)
    db1 = next(e for e in node if e["labels"]["lab_server"] == "db-1")
    assert db1 == {"targets": ["10.0.0.5:9100"], "labels": {"lab_server": "db-1", "lab_environment": "prod", "lab_provider": "baremetal"}}
    web = next(e for e in node if e["labels"]["lab_server"] == "web-1")
    assert web["targets"] == ["web-1:9100"] and "lab_environment" not in web["labels"]
    probe = json.loads(files["targets/probe-443.json"])
    assert probe == [{"targets": ["web-1:443"], "labels": {"lab_server": "web-1", "lab_provider": "ssh", "lab_port": "443", "lab_module": "http_2xx"}}]
    assert {e["labels"]["lab_server"] for e in json.loads(files["targets/probe-993.json"])} == {"mail-1"}
    assert {e["targets"][0] for e in json.loads(files["targets/postgres_exporter.json"])} == {"10.0.0.5:9187", "db-2:9187"}


def test_naemon_objects_cover_only_baremetal_servers() -> None:
    text = rendered().files["naemon/lab.cfg"].decode()
    hosts = re.findall(r"^\s+host_name\s+(\S+)$", text, re.M)
    assert set(",".join(hosts).split(",")) == {"batch-worker-1", "db-1", "db-2"}
    assert re.search(r"define host \{\n    use +lab-host\n    host_name +db-1\n.*\n    address +10.0.0.5\n", text)
    assert re.search(r"hostgroup_name +production\n.*\n    members +batch-worker-1,db-1,db-2\n", text)
    assert re.search(r"hostgroup_name +replica-set-eu\n.*\n    members +db-2\n", text)
    assert "service_description     postgres_process\n" in text
    # memory_pressure excludes batch-worker-1, the only bare-metal k8s-worker: no service at all
    assert "memory_pressure" not in text
    assert "check_command           lab_check_tcp!5432" in text
    assert text.count("define contactgroup") == 1


def test_a_bad_condition_fails_the_render_with_file_and_line() -> None:
    defs = load_texts([("defs/a.yaml", textwrap.dedent("""\
        alerts:
          - name: oops
            target: {environment: prod}
            condition: disk_usage_percent is over 85
        """))])
    with pytest.raises(ConfigError, match=r"^defs/a.yaml:2: condition"):
        rendered(defs=defs)


def test_an_alert_that_applies_nowhere_is_not_rendered() -> None:
    rules, _ = collect_rules(Fleet(DEFS, []))
    assert rules == []


@settings(max_examples=25)
@given(st.lists(st.tuples(st.sets(st.sampled_from(sorted(DEFS.labels)), max_size=3), st.sampled_from(["prod", "dev", None])), min_size=1, max_size=8))
def test_scoping_equals_targeting_for_random_fleets(spec) -> None:
    servers = [Server(f"s{i}", "baremetal" if i % 2 else "aws", tuple(sorted(labels)), env, "eu-west") for i, (labels, env) in enumerate(spec)]
    fleet = Fleet(DEFS, servers)
    names = [s.name for s in servers]
    r = render_all(fleet)
    got: dict[str, set[str]] = {}
    for _p, rule in rules_of(r.files):
        if rule["alert"] in DEFS.alerts and rule["labels"]["lab_source"] == target_source(DEFS.alerts[rule["alert"]]):
            got.setdefault(rule["alert"], set()).update(scoped_servers(rule["expr"], names))
    expected = {a: set(fleet.alert_servers(a)[0]) for a in DEFS.alerts if fleet.alert_servers(a)[0]}
    assert got == expected


# -- writing and diffing -----------------------------------------------------------------------------


def test_write_tree_is_idempotent_and_removes_only_what_it_wrote(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    first = write_tree(out, {"rules/prod.yaml": b"a\n", "rules/dev.yaml": b"b\n"})
    assert {f["status"] for f in first} == {"written"}
    (out / "rules" / "mine.yaml").write_text("user file")
    again = write_tree(out, {"rules/prod.yaml": b"a\n", "rules/dev.yaml": b"b\n"})
    assert {f["status"] for f in again} == {"unchanged"}
    third = write_tree(out, {"rules/prod.yaml": b"a2\n"})
    assert [(f["path"], f["status"]) for f in third] == [("rules/prod.yaml", "written"), ("rules/dev.yaml", "removed")]
    assert not (out / "rules" / "dev.yaml").exists()
    assert (out / "rules" / "mine.yaml").read_text() == "user file"
    assert json.loads((out / MANIFEST).read_text()) == {"files": ["rules/prod.yaml"]}
    assert not [p for p in out.rglob("*.tmp")]


def test_diff_tree_shows_plus_and_minus_lines(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    assert [c["status"] for c in diff_tree(out, {"x.yaml": b"one\n"})] == ["added"]
    write_tree(out, {"x.yaml": b"one\ntwo\n", "gone.yaml": b"bye\n"})
    assert diff_tree(out, {"x.yaml": b"one\ntwo\n", "gone.yaml": b"bye\n"}) == []
    changes = diff_tree(out, {"x.yaml": b"one\nthree\n"})
    assert changes[0]["path"] == "x.yaml" and "-two" in changes[0]["lines"] and "+three" in changes[0]["lines"]
    assert changes[1] == {"path": "gone.yaml", "status": "removed", "lines": ["-bye"]}


# -- CLI ------------------------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys) -> pathlib.Path:
    monkeypatch.setenv("LAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    assert run(["init", "--local"]) == 0
    assert run(["server", "add", "db-1", "-p", "baremetal", "-l", "postgres,production", "-e", "prod"]) == 0
    assert run(["server", "add", "web-1", "-p", "aws", "-l", "app", "-e", "staging"]) == 0
    capsys.readouterr()
    return tmp_path / "home"


def test_cli_render_and_diff(home: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "mon"
    assert run(["diff", "alerts", "--out", str(out), "-o", "json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["changed"] > 0 and all(c["status"] == "added" for c in before["changes"])
    assert run(["render", "alerts", "--out", str(out), "-o", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {f["path"] for f in result["files"]} >= {"rules/prod.yaml", "rules/staging.yaml", "targets/node_exporter.json", "naemon/lab.cfg"}
    assert (out / "rules" / "prod.yaml").is_file()
    assert run(["diff", "alerts", "--out", str(out)]) == 0
    assert "No changes" in capsys.readouterr().out
    assert run(["server", "add", "db-2", "-p", "aws", "-l", "postgres", "-e", "prod"]) == 0
    capsys.readouterr()
    assert run(["diff", "alerts", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "changed: rules/prod.yaml" in text and re.search(r"^  \+.*db-2", text, re.M) and re.search(r"^  -.*lab_server=\"db-1\"", text, re.M)
    assert run(["render", "alerts", "--out", str(out)]) == 0
    assert "rules rendered into" in capsys.readouterr().out


def test_cli_show_alert_says_where_it_is_rendered(home: pathlib.Path, capsys) -> None:
    assert run(["show", "alert", "disk_space_low"]) == 0
    text = capsys.readouterr().out
    assert "Applies to 1 server:" in text
    assert 'Prometheus: rule "disk_space_low" in rules/prod.yaml' in text
    assert "Naemon: service check on 1 bare-metal host" in text
    assert run(["show", "alert", "disk_space_low", "-o", "json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["rendered_to"]["prometheus"] == ["rules/prod.yaml"]
    assert "status" not in view["servers"][0]  # no health source configured: no values


def test_a_label_naming_an_alert_it_also_targets_with_an_exclusion_gives_one_rule() -> None:
    """Found by the promtool property test: `target: {labels: [x]}` + an exclude, and label x
    naming the same alert, used to give two rules with one (alert, lab_source) identity."""
    text = textwrap.dedent("""\
        labels:
          x: {alerts: [a0]}
        alerts:
          - name: a0
            target: {labels: [x], exclude: {servers: [s2]}}
            condition: "up == 0"
        """)
    defs = load_texts([("defs.yaml", text)])
    fleet = Fleet(defs, [Server("s1", "aws", ("x",), "prod", None), Server("s2", "aws", ("x",), "prod", None)])
    rules, _ = collect_rules(fleet)
    keys = [(r.alert, r.source) for r in rules if r.alert == "a0"]
    assert keys == [("a0", "label:x")]
    assert [r.servers for r in rules if r.alert == "a0"] == [("s1", "s2")]
