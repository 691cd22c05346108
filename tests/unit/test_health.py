"""Health sources (Prometheus over httpx.MockTransport, Naemon status.dat) and their aggregation
into the HEALTH pillar, `show server` and `show alert`."""

from __future__ import annotations

import json
import pathlib
import textwrap

import httpx
import pytest

from lab.common.errors import ConfigError
from lab.coordinator.cli.app import run
from lab.coordinator.engine import Engine, Paths
from lab.coordinator.health import (
    HealthConfig,
    HealthResult,
    NaemonSource,
    PrometheusSource,
    SourceDown,
    check_all,
    parse_status_untrusted,
    pillar,
)

NOW = 1_800_000_000.0


def vector(*series: tuple[dict[str, str], float]) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": [{"metric": m, "value": [NOW, str(v)]} for m, v in series]}}


class FakePrometheus:
    """Answers /api/v1/alerts and /api/v1/query like Prometheus would."""

    def __init__(self, alerts=(), up=(), values=None) -> None:
        self.alerts = list(alerts)
        self.up = list(up)
        self.values = values or {}
        self.queries: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/alerts":
            return httpx.Response(200, json={"status": "success", "data": {"alerts": self.alerts}})
        if request.url.path == "/api/v1/query":
            q = request.url.params["query"]
            self.queries.append(q)
            if q == "up":
                return httpx.Response(200, json=vector(*self.up))
            return httpx.Response(200, json=vector(*[({"lab_server": s, "mountpoint": m}, v) for (s, m), v in self.values.items()]))
        return httpx.Response(404)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def firing(server: str, name: str, state: str = "firing") -> dict:
    return {"labels": {"alertname": name, "lab_alert": name, "lab_server": server}, "state": state, "value": "1"}


def up(server: str, value: float = 1, job: str = "node_exporter") -> tuple[dict[str, str], float]:
    return {"lab_server": server, "job": job}, value


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


# -- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_counts_firing_alerts_and_down_targets_per_server() -> None:
    fake = FakePrometheus(
        alerts=[firing("a", "disk_space_low"), firing("a", "high_cpu"), firing("b", "x", state="pending"), firing("zz", "other")],
        up=[up("a"), up("b"), up("c", 0, "postgres_exporter"), up("c")],
    )
    src = PrometheusSource("http://prom:9090", transport=fake.transport())
    res = src.check(["a", "b", "c", "d"])
    assert res["a"] == HealthResult("prometheus", "alerts", ("disk_space_low", "high_cpu"), "2 firing or down")
    assert res["b"].status == "ok" and res["b"].detail == "all targets up, no alerts firing"
    assert res["c"].alerts == ("postgres_exporter target down",)
    assert res["d"].status == "unknown"
    assert [pillar([res[s]]) for s in "abcd"] == ["2 alerts", "ok", "1 alert", "unknown"]


def test_prometheus_values_take_the_worst_series() -> None:
    fake = FakePrometheus(values={("a", "/"): 42.0, ("a", "/data"): 88.5, ("b", "/"): 10.0})
    src = PrometheusSource("http://prom:9090/", transport=fake.transport())
    assert src.values("x") == {"a": 88.5, "b": 10.0}
    assert src.values("x", worst="min") == {"a": 42.0, "b": 10.0}


@pytest.mark.parametrize(
    "handler",
    [
        refused,
        lambda r: httpx.Response(500, text="boom"),
        lambda r: httpx.Response(200, text="<html>"),
        lambda r: httpx.Response(200, json={"status": "error", "error": "bad query"}),
        lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)),
    ],
)
def test_any_prometheus_failure_is_source_down(handler) -> None:
    src = PrometheusSource("http://prom:9090", transport=httpx.MockTransport(handler))
    with pytest.raises(SourceDown):
        src.check(["a"])


def test_a_source_that_is_down_never_fails_the_aggregate() -> None:
    down = PrometheusSource("http://prom:9090", transport=httpx.MockTransport(refused))
    results = check_all([down], ["a", "b"])
    assert [pillar(results[s]) for s in ("a", "b")] == ["unknown (source down)"] * 2
    assert results["a"][0].detail.startswith("source down: http://prom:9090")


def test_aggregate_over_two_sources() -> None:
    ok = HealthResult("prometheus", "ok")
    bad = HealthResult("naemon", "alerts", ("disk", "host DOWN"))
    down = HealthResult("naemon", "unknown", (), "source down: gone")
    assert pillar([ok, bad]) == "2 alerts"
    assert pillar([ok, down]) == "ok"
    assert pillar([]) == "unknown"
    assert pillar([HealthResult("p", "alerts", ("x",)), HealthResult("n", "alerts", ("x",))]) == "1 alert"


# -- Naemon status.dat ----------------------------------------------------------------------------

STATUS = textwrap.dedent(f"""\
    ########################################
    #          NAGIOS STATUS FILE
    ########################################

    info {{
    \tcreated={int(NOW) - 30}
    \tversion=4.4.6
    \t}}

    programstatus {{
    \tnagios_pid=1234
    \t}}

    hoststatus {{
    \thost_name=db-1
    \tcurrent_state=0
    \tplugin_output=PING OK - Packet loss = 0%, RTA = 0.05 ms
    \t}}

    hoststatus {{
    \thost_name=db-2
    \tcurrent_state=1
    \tplugin_output=CRITICAL - Host Unreachable (10.0.0.6)
    \t}}

    servicestatus {{
    \thost_name=db-1
    \tservice_description=postgres_process
    \tcurrent_state=2
    \tplugin_output=postgresql.service is not running
    \tproblem_has_been_acknowledged=1
    \t}}

    servicestatus {{
    \thost_name=db-1
    \tservice_description=smtp_check auto:port:25
    \tcurrent_state=0
    \tplugin_output=SMTP OK
    \t}}

    servicestatus {{
    \thost_name=db-2
    \tservice_description=disk_space_low
    \tcurrent_state=0
    \tplugin_output=ok=with=equals
    \t}}
    """)


def test_status_dat_parses_hosts_and_services() -> None:
    status = parse_status_untrusted(STATUS)
    assert status.created == NOW - 30
    assert status.hosts() == {"db-1", "db-2"}
    pg = next(c for c in status.checks if c.service == "postgres_process")
    assert (pg.host, pg.state, pg.acknowledged) == ("db-1", 2, True)
    assert next(c for c in status.checks if c.service == "disk_space_low").output == "ok=with=equals"


def test_naemon_source_reports_failing_checks(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "status.dat"
    path.write_text(STATUS)
    res = NaemonSource(path, now=NOW).check(["db-1", "db-2", "web-1"])
    assert res["db-1"].alerts == ("postgres_process",)
    assert res["db-2"].alerts == ("host DOWN",)
    assert "web-1" not in res


def test_naemon_stale_or_missing_file_is_source_down(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "status.dat"
    path.write_text(STATUS)
    with pytest.raises(SourceDown, match="old"):
        NaemonSource(path, max_age=10, now=NOW).check(["db-1"])
    with pytest.raises(SourceDown):
        NaemonSource(tmp_path / "missing.dat", now=NOW).check(["db-1"])


@pytest.mark.parametrize(
    "text",
    [
        "hoststatus {\n\thost_name=a\n",  # unterminated
        "garbage\n",
        "hoststatus {\n\tno equals here\n\t}\n",
        "hoststatus {\n\tcurrent_state=0\n\t}\n",
        "hoststatus {\n\thost_name=a\n\tcurrent_state=x\n\t}\n",
        "servicestatus {\n\thost_name=a\n\t}\n",
        "info {\n\tcreated=yesterday\n\t}\n",
    ],
)
def test_malformed_status_dat_is_source_down(text: str) -> None:
    with pytest.raises(SourceDown):
        parse_status_untrusted(text)


# -- configuration ------------------------------------------------------------------------------


def test_health_config_forms() -> None:
    assert not HealthConfig.from_settings({}).configured
    c = HealthConfig.from_settings({"health": {"prometheus": "http://p:9090", "naemon": "/x/status.dat", "timeout": 1}})
    assert (c.prometheus_url, c.prometheus_timeout, c.status_file) == ("http://p:9090", 1.0, "/x/status.dat")
    c = HealthConfig.from_settings({"health": {"prometheus": {"url": "https://p", "timeout": 0.5}, "nagios": {"status_file": "/s", "max_age": 60}}})
    assert (c.prometheus_timeout, c.status_file, c.status_max_age) == (0.5, "/s", 60.0)
    assert [s.name for s in c.sources()] == ["prometheus", "naemon"]


@pytest.mark.parametrize(
    "health",
    ["http://p", {"prometheus": "p:9090"}, {"prometheus": 5}, {"promethues": "http://p"}, {"timeout": -1}, {"naemon": {"path": "/x"}}],
)
def test_bad_health_config_is_a_config_error(health) -> None:
    with pytest.raises(ConfigError, match="config.yaml: health"):
        HealthConfig.from_settings({"health": health})


# -- through the engine and the CLI -----------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys) -> pathlib.Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LAB_HOME", str(home))
    monkeypatch.delenv("LAB_DEFINITIONS", raising=False)
    assert run(["init", "--local"]) == 0
    for args in (
        ["db-1", "-p", "baremetal", "-l", "postgres,production", "-e", "prod"],
        ["api-1", "-p", "aws", "-l", "app", "-e", "prod"],
        ["api-2", "-p", "aws", "-l", "app", "-e", "prod"],
        ["mail-1", "-p", "xcpng", "-l", "mailserver", "-e", "prod"],
    ):
        assert run(["server", "add", *args]) == 0
    with open(home / "config.yaml", "a") as f:
        f.write("health: {prometheus: 'http://prom.test:9090', timeout: 0.5}\n")
    capsys.readouterr()
    return home


def test_engine_health_pillar_show_server_and_alert_values(home: pathlib.Path) -> None:
    fake = FakePrometheus(
        alerts=[firing("db-1", "disk_space_low"), firing("db-1", "postgres_process")],
        up=[up("db-1"), up("api-1"), up("api-2"), up("mail-1")],
        values={("db-1", "/"): 90.0, ("api-1", "/"): 42.0, ("api-2", "/"): 80.0},
    )
    with Engine.open(Paths.resolve()) as engine:
        engine.health_transport = fake.transport()
        health = {r["name"]: r["health"] for r in engine.get_servers()}
        assert health == {"api-1": "ok", "api-2": "ok", "db-1": "2 alerts", "mail-1": "ok"}
        shown = engine.show_server("db-1")["health"]
        assert shown["status"] == "2 alerts" and shown["alerts"] == ["disk_space_low", "postgres_process"]
        view = engine.show_alert("disk_space_low")
    by = {s["name"]: (s["current"], s["status"]) for s in view["servers"]}
    assert by == {"api-1": (42.0, "ok"), "api-2": (80.0, "approaching"), "db-1": (90.0, "over"), "mail-1": (None, "no data")}
    assert any("node_filesystem_avail_bytes" in q and 'lab_server=~"^(api-1|api-2|db-1|mail-1)$"' in q for q in fake.queries)


def test_cli_with_prometheus_down_says_unknown(home: pathlib.Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(Engine, "health_transport", httpx.MockTransport(refused))
    assert run(["get", "servers", "-o", "json"]) == 0
    assert {r["health"] for r in json.loads(capsys.readouterr().out)} == {"unknown (source down)"}
    assert run(["get", "servers"]) == 0
    assert "unknown (source down)" in capsys.readouterr().out
    assert run(["show", "alert", "disk_space_low"]) == 0
    text = capsys.readouterr().out
    assert "db-1 (baremetal)" in text and "? unknown (source down)" in text
    assert run(["show", "server", "db-1"]) == 0
    assert "Prometheus:   ? source down" in capsys.readouterr().out


def test_cli_show_alert_values_for_people(home: pathlib.Path, capsys, monkeypatch) -> None:
    fake = FakePrometheus(values={("db-1", "/"): 83.0, ("api-1", "/"): 42.0, ("api-2", "/"): 99.0})
    monkeypatch.setattr(Engine, "health_transport", fake.transport())
    assert run(["show", "alert", "disk_space_low"]) == 0
    text = capsys.readouterr().out
    assert "Applies to 4 servers:" in text
    assert "api-1 (aws)" in text and "currently: 42%  ✓" in text
    assert "currently: 83%  ⚠ approaching" in text
    assert "currently: 99%  ✗ over" in text
    assert "? no data" in text
