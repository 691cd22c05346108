"""A real Prometheus server loads the rules and file_sd targets `lab render alerts` wrote, scrapes
a tiny fake node_exporter served here (db-1's disk 90% full, web-1's 40%), and `lab` reads the
firing alert and the current values back through the health source.

Needs the `prometheus` binary (Debian package `prometheus`); skipped when it is missing, except
under CI=true, where that fails.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from _prometheus import need, prometheus, write_fast_config

LAB = str(pathlib.Path(sys.executable).with_name("lab"))

# (available, size) of / per server: db-1 is 90% used, web-1 40%.
DISKS = {"db-1": (10 * 2**30, 100 * 2**30), "web-1": (60 * 2**30, 100 * 2**30)}


class FakeNodeExporter(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.path.rsplit("/", 1)[-1]
        if server not in DISKS:
            self.send_error(404)
            return
        avail, size = DISKS[server]
        labels = 'device="/dev/sda1",fstype="ext4",mountpoint="/"'
        body = (
            f"# TYPE node_filesystem_avail_bytes gauge\nnode_filesystem_avail_bytes{{{labels}}} {avail}\n"
            f"# TYPE node_filesystem_size_bytes gauge\nnode_filesystem_size_bytes{{{labels}}} {size}\n"
            f'node_filesystem_avail_bytes{{device="tmpfs",fstype="tmpfs",mountpoint="/run"}} 1\n'
            f'node_filesystem_size_bytes{{device="tmpfs",fstype="tmpfs",mountpoint="/run"}} 100\n'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def exporter() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeNodeExporter)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def lab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_real_prometheus_fires_the_rendered_alert_and_lab_reads_it(tmp_path: pathlib.Path) -> None:
    binary = need("prometheus", hint="Debian package prometheus")
    home = tmp_path / "home"
    env = dict(os.environ, LAB_HOME=str(home), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    assert lab(env, "init", "--local").returncode == 0
    for args in (["db-1", "-p", "baremetal", "-l", "postgres,production", "-e", "prod"], ["web-1", "-p", "aws", "-l", "app", "-e", "prod"]):
        r = lab(env, "server", "add", *args)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "mon"
    r = lab(env, "render", "alerts", "--out", str(out))
    assert r.returncode == 0, r.stderr

    with exporter() as exporter_port:
        # Keep the rendered labels; point every target at the fake exporter, one path per server.
        entries = json.loads((out / "targets" / "node_exporter.json").read_text())
        for e in entries:
            e["targets"] = [f"127.0.0.1:{exporter_port}"]
            e["labels"]["__metrics_path__"] = f"/metrics/{e['labels']['lab_server']}"
        sd = tmp_path / "node_exporter.json"
        sd.write_text(json.dumps(entries))
        config = write_fast_config(tmp_path / "prometheus.yml", out / "rules", sd)
        with prometheus(binary, config, tmp_path / "tsdb", tmp_path / "prometheus.log") as (url, _proc):
            with (home / "config.yaml").open("a") as f:
                f.write(f"health: {{prometheus: '{url}', timeout: 2}}\n")
            deadline = time.monotonic() + 40
            while True:
                r = lab(env, "get", "servers", "-o", "json")
                assert r.returncode == 0, r.stderr
                health = {s["name"]: s["health"] for s in json.loads(r.stdout)}
                if health == {"db-1": "1 alert", "web-1": "ok"}:
                    break
                assert time.monotonic() < deadline, f"alert never fired: {health}\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}"
                time.sleep(0.5)

            r = lab(env, "show", "alert", "disk_space_low", "-o", "json")
            assert r.returncode == 0, r.stderr
            values = {s["name"]: (round(s["current"]), s["status"]) for s in json.loads(r.stdout)["servers"]}
            assert values == {"db-1": (90, "over"), "web-1": (40, "ok")}

            r = lab(env, "show", "server", "db-1", "-o", "json")
            assert json.loads(r.stdout)["health"]["alerts"] == ["disk_space_low"]
            r = lab(env, "show", "alert", "disk_space_low")
            assert "currently: 90%  ✗ over" in r.stdout and "currently: 40%  ✓" in r.stdout

    # Prometheus is gone now: lab says so, and does not fail.
    r = lab(env, "get", "servers", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert {s["health"] for s in json.loads(r.stdout)} == {"unknown (source down)"}
