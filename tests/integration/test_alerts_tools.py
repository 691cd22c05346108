"""Rendered alerts checked by the real tools: `promtool check rules`, `promtool check config`
(rule files + file_sd), and Nagios 4's pre-flight check (`nagios4 -v`) on the Naemon objects.

Debian 12 packages: `prometheus` (promtool), `nagios4-core` (nagios4). Naemon itself is not
packaged in Debian 12; Nagios 4 reads the same object format. A missing binary skips the test,
except under CI=true, where it fails.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest

from lab.common.config import load_definitions
from lab.common.targeting import Fleet
from lab.coordinator.alerts import render_all, write_tree
from lab.coordinator.engine import EXAMPLES
from lab.coordinator.state import Server

from _prometheus import need


SERVERS = [
    Server("worker-5", "aws", ("k8s-worker", "production", "eu-west"), "prod", "eu-west"),
    Server("batch-worker-1", "baremetal", ("k8s-worker",), "prod", "eu-west"),
    Server("db-1", "baremetal", ("postgres", "production", "eu-west"), "prod", "eu-west"),
    Server("db-2", "baremetal", ("postgres",), "staging", "eu-west"),
    Server("mail-1", "baremetal", ("mailserver",), "prod", "us-east"),
    Server("web-1", "ssh", ("app",), None, None),
    Server("dgx-spark", "baremetal", ("k8s-worker",), "dev", None),
]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("rendered")
    write_tree(out, render_all(Fleet(load_definitions(EXAMPLES), SERVERS)).files)
    return out


def test_promtool_accepts_every_rule_file(out: pathlib.Path) -> None:
    promtool = need("promtool")
    files = sorted(str(p) for p in (out / "rules").glob("*.yaml"))
    assert len(files) == 4
    r = subprocess.run([promtool, "check", "rules", *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == 4


def test_promtool_accepts_a_config_using_rules_and_file_sd(out: pathlib.Path, tmp_path: pathlib.Path) -> None:
    promtool = need("promtool")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        f"""
global: {{scrape_interval: 15s, evaluation_interval: 15s}}
rule_files: ["{out}/rules/*.yaml"]
scrape_configs:
  - job_name: node_exporter
    file_sd_configs: [{{files: ["{out}/targets/node_exporter.json"]}}]
  - job_name: blackbox
    metrics_path: /probe
    file_sd_configs: [{{files: ["{out}/targets/probe-*.json"]}}]
    relabel_configs:
      - {{source_labels: [__address__], target_label: __param_target}}
      - {{source_labels: [lab_module], target_label: __param_module}}
      - {{target_label: __address__, replacement: "127.0.0.1:9115"}}
"""
    )
    r = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_nagios_accepts_the_naemon_objects(out: pathlib.Path, tmp_path: pathlib.Path) -> None:
    nagios = need("nagios4", "/usr/sbin/nagios4", "naemon", "nagios")
    spool = tmp_path / "spool"
    spool.mkdir()
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "resource.cfg").write_text("$USER1$=/usr/lib/nagios/plugins\n")
    cfg = tmp_path / "nagios.cfg"
    cfg.write_text(
        "\n".join(
            [
                f"cfg_file={out}/naemon/lab.cfg",
                f"resource_file={tmp_path}/resource.cfg",
                f"status_file={tmp_path}/status.dat",
                f"check_result_path={spool}",
                f"lock_file={tmp_path}/nagios.lock",
                f"temp_file={tmp_path}/nagios.tmp",
                f"log_file={tmp_path}/nagios.log",
                f"nagios_user={user}",
                f"nagios_group={group}",
                "illegal_object_name_chars=`~!$%^&*|'\"<>?,()=",
                "illegal_macro_output_chars=`~$&|'\"<>",
                "",
            ]
        )
    )
    r = subprocess.run([nagios, "-v", str(cfg)], capture_output=True, text=True, timeout=60)
    assert "Total Errors:   0" in r.stdout, r.stdout + r.stderr
    assert "Total Warnings: 0" in r.stdout, r.stdout
    assert r.returncode == 0
