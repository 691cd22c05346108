"""A real node_exporter, scraped by a real Prometheus through lab's rendered file_sd, shows REAL
values in `lab show alert`, and forcing a threshold makes an alert fire and HEALTH change.

The test starts `prometheus-node-exporter` on 127.0.0.1 (a free port, its textfile collector
reading a temporary directory) and `prometheus` with lab's rendered rule files and
`targets/node_exporter.json` as written (each entry labelled `lab_server`; a relabel rule sends
the rendered `HOST:9100` addresses to the test's exporter). Then:

1. `lab show alert memory_pressure` shows node-1's memory use as node_exporter measured it (checked
   against /proc/meminfo), with batch-worker-1 excluded; HEALTH reads ok for both servers.
2. A condition below the real value (`memory_usage_percent > 0.5`, a new alert for node-1 only)
   is rendered, Prometheus reloads (SIGHUP): it fires, node-1 reads "1 alert", batch-worker-1 "ok".
3. The textfile collector says the last Puppet run failed (`lab_puppet_last_run_success 0`, the
   lab-agent contract metric): the auto-generated `puppet_run_failed` fires for both servers.

Needs Debian packages `prometheus` and `prometheus-node-exporter`; skipped when one is missing,
except under CI=true, where that fails. Every process started here is stopped here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
from _prometheus import free_port, need, process, prometheus, write_fast_config

LAB = str(pathlib.Path(sys.executable).with_name("lab"))
PACKAGES = "Debian packages prometheus, prometheus-node-exporter"


def lab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"lab {' '.join(args)}: {r.stderr}"
    return r


def meminfo_usage_percent() -> float:
    fields = {}
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields[key] = float(rest.split()[0])
    return 100 * (1 - fields["MemAvailable"] / fields["MemTotal"])


def write_textfile(directory: pathlib.Path, success: int) -> None:
    tmp = directory / ".lab.prom.tmp"
    tmp.write_text(f"# HELP lab_puppet_last_run_success 1 when the last Puppet run succeeded\n# TYPE lab_puppet_last_run_success gauge\nlab_puppet_last_run_success {success}\n")
    tmp.rename(directory / "lab.prom")  # node_exporter reads *.prom only: never half a file


def wait_for(what: str, probe: Callable[[], object], want: Callable[[object], bool], log: pathlib.Path, timeout: float = 45) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if want(got):
            return got
        assert time.monotonic() < deadline, f"{what}: last saw {got}\n{log.read_text()[-2000:]}"
        time.sleep(0.5)


def test_real_node_exporter_values_and_forced_alerts_reach_health(tmp_path: pathlib.Path) -> None:
    prometheus_bin = need("prometheus", hint=PACKAGES)
    exporter_bin = need("prometheus-node-exporter", "node_exporter", hint=PACKAGES)
    home = tmp_path / "home"
    env = dict(os.environ, LAB_HOME=str(home), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    lab(env, "init", "--local")
    lab(env, "server", "add", "node-1", "-p", "baremetal", "-l", "k8s-worker,production", "-e", "prod")
    lab(env, "server", "add", "batch-worker-1", "-p", "baremetal", "-l", "k8s-worker", "-e", "prod")  # memory_pressure excludes it
    out = tmp_path / "mon"
    lab(env, "render", "alerts", "--out", str(out))
    sd = json.loads((out / "targets" / "node_exporter.json").read_text())
    assert {e["labels"]["lab_server"] for e in sd} == {"node-1", "batch-worker-1"}

    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    write_textfile(textfiles, 1)
    exporter_port = free_port()
    exporter_args = [
        exporter_bin,
        f"--web.listen-address=127.0.0.1:{exporter_port}",
        f"--collector.textfile.directory={textfiles}",
    ]
    config = write_fast_config(
        tmp_path / "prometheus.yml", out / "rules", out / "targets" / "node_exporter.json",
        "    relabel_configs:   # the rendered HOST:9100 addresses all lead to the test's exporter\n"
        f'      - {{target_label: __address__, replacement: "127.0.0.1:{exporter_port}"}}\n',
    )
    prom_log, exporter_log = tmp_path / "prometheus.log", tmp_path / "node_exporter.log"

    def health() -> dict[str, str]:
        return {s["name"]: s["health"] for s in json.loads(lab(env, "get", "servers", "-o", "json").stdout)}

    def alert_view(name: str) -> dict[str, tuple[object, object]]:
        view = json.loads(lab(env, "show", "alert", name, "-o", "json").stdout)
        return {s["name"]: (s.get("current"), s.get("status")) for s in view["servers"]}

    with process(exporter_args, exporter_log, f"http://127.0.0.1:{exporter_port}/metrics"):
        metrics = httpx.get(f"http://127.0.0.1:{exporter_port}/metrics", timeout=5).text
        assert "node_memory_MemAvailable_bytes" in metrics and "lab_puppet_last_run_success 1" in metrics
        with prometheus(prometheus_bin, config, tmp_path / "tsdb", prom_log) as (url, prom):
            with (home / "config.yaml").open("a") as f:
                f.write(f"health: {{prometheus: '{url}', timeout: 2}}\n")

            # 1. real values, nothing firing
            wait_for("both targets up, nothing firing", health, lambda h: h == {"node-1": "ok", "batch-worker-1": "ok"}, prom_log)
            values = wait_for("memory value", lambda: alert_view("memory_pressure"), lambda v: v.get("node-1", (None,))[0] is not None, prom_log)
            current, status = values["node-1"]
            assert abs(current - meminfo_usage_percent()) < 10, (current, meminfo_usage_percent())
            assert 0 < current < 100
            assert status == ("over" if current > 90 else "approaching" if current >= 81 else "ok")
            assert "batch-worker-1" not in values  # excluded: no value asked, none shown
            text = lab(env, "show", "alert", "memory_pressure").stdout
            assert re.search(r"node-1.*\n?.*currently: \d+(\.\d+)?%", text), text

            # 2. a threshold below the real value: the alert fires for node-1 only
            (home / "definitions" / "forced.yaml").write_text(
                "alerts:\n"
                "  - name: memory_in_use\n"
                "    target: {servers: [node-1]}\n"
                "    condition: memory_usage_percent > 0.5\n"
                "    severity: warning\n"
            )
            lab(env, "render", "alerts", "--out", str(out))
            prom.send_signal(signal.SIGHUP)  # reload the rule files
            wait_for("memory_in_use fires", health, lambda h: h == {"node-1": "1 alert", "batch-worker-1": "ok"}, prom_log)
            values = alert_view("memory_in_use")
            assert values["node-1"][1] == "over" and values["node-1"][0] > 0.5
            shown = json.loads(lab(env, "show", "server", "node-1", "-o", "json").stdout)["health"]
            assert shown["alerts"] == ["memory_in_use"]

            # 3. the textfile collector reports a failed Puppet run: puppet_run_failed fires everywhere
            write_textfile(textfiles, 0)
            wait_for("puppet_run_failed fires", health, lambda h: h == {"node-1": "2 alerts", "batch-worker-1": "1 alert"}, prom_log)
            shown = json.loads(lab(env, "show", "server", "batch-worker-1", "-o", "json").stdout)["health"]
            assert shown["alerts"] == ["puppet_run_failed"]
            assert alert_view("memory_pressure")["node-1"][0] is not None

    # both processes are gone: lab says the source is down and does not fail
    assert set(health().values()) == {"unknown (source down)"}
