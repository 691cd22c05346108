"""coordinator/lifecycle.py, pure: declared spec vs reported facts/Puppet runs, the SYNC pillar, plans."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import pytest

from lab.agent.facts import parse_facts
from lab.agent.reporters import parse_puppet_run
from lab.common.config import load_definitions
from lab.coordinator import lifecycle as lc
from lab.coordinator.engine import EXAMPLES
from lab.coordinator.state import Server

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
NOW = 1_800_000_000.0
DEFS = load_definitions(EXAMPLES)


def facts(name: str) -> dict:
    return parse_facts(json.loads((FIXTURES / "facts" / f"{name}.json").read_text())).to_dict()


def run(kind: str, at: float = NOW - 60) -> dict:
    d = FIXTURES / "puppet_reports" / kind
    r = parse_puppet_run((d / "last_run_summary.yaml").read_text(), (d / "last_run_report.yaml").read_text())
    assert r is not None
    return dataclasses.replace(r, time=at).to_dict() | {"received_at": at}


def server(labels=("postgres",), *, f=None, p=None, environment="production", size=None) -> Server:
    return Server("db-1", "baremetal", tuple(labels), environment, "eu-west", size, facts=f, puppet=p)


def items(s: Server) -> dict[str, dict]:
    return {i["key"]: i for i in lc.compare(lc.declared(DEFS, s), s, NOW)}


def test_parse_disk() -> None:
    assert lc.parse_disk("500GB NVMe") == (500 * 10**9, "nvme")
    assert lc.parse_disk("1.92TB") == (1_920_000_000_000, None)
    assert lc.parse_disk("2TiB ssd") == (2 * 1024**4, "ssd")
    assert lc.parse_disk("a lot") == (None, None) and lc.parse_disk(None) == (None, None)


def test_declared_spec_from_labels() -> None:
    spec = lc.declared(DEFS, server(("postgres", "production")))
    assert spec["size"] == "large" and spec["size_source"] == "label:postgres"
    assert (spec["cores"], spec["memory_mb"], spec["disk"]) == (8, 32 * 1024, "500GB NVMe")
    assert "postgresql::server" in spec["classes"] and "postgres/master-password" in spec["secrets"]
    assert lc.declared(DEFS, server(("postgres",), size="small"))["size"] == "small"  # explicit wins
    assert lc.declared(DEFS, server(("nope",)))["undefined_labels"] == ["nope"]


def test_no_report_is_unknown() -> None:
    got = items(server())
    assert got["cores"]["status"] == got["memory"]["status"] == "unknown"
    assert got["class postgresql::server"]["status"] == "unknown"
    assert lc.summarise(list(got.values())) == "unknown"
    assert lc.sync_pillar(lc.SpecIndex(DEFS), server(), NOW) == "unknown"


def test_smaller_machine_drifts_larger_meets() -> None:
    small = items(server(f=facts("kvm-epyc-2vcpu-vm"), p=run("ok")))  # 2 vCPU, 24 GB, one 275GB disk
    assert small["cores"] == {"key": "cores", "declared": 8, "actual": 2, "status": "drift", "note": "smaller than declared"}
    assert small["memory"]["status"] == "drift" and small["memory"]["actual"] == "24GB"
    assert small["disk"]["status"] == "drift" and small["size"]["status"] == "drift"
    big = items(server(f=facts("epyc7763-a100-server"), p=run("ok")))  # 128 threads, 256 GB, NVMe 1.92TB
    assert big["cores"]["status"] == big["memory"]["status"] == big["disk"]["status"] == big["size"]["status"] == "ok"
    assert big["class postgresql::server"]["status"] == "ok" and big["environment"]["status"] == "ok"
    assert lc.summarise(list(big.values())) == "sync"


def test_memory_uses_the_nominal_size() -> None:
    nuc = items(server(("app",), f=facts("nuc12-homelab"), p=run("ok"), size="large"))  # 62.5 GiB MemTotal = 64 GB
    assert nuc["memory"]["actual"] == "64GB" and nuc["memory"]["status"] == "ok"
    assert nuc["disk"]["status"] == "ok"  # 1 TB NVMe; the USB stick (removable) never counts


def test_puppet_failed_run_and_environment() -> None:
    failed = run("failed")
    got = items(server(f=facts("epyc7763-a100-server"), p=failed))
    assert got["puppet_run"]["status"] == "drift" and "File[/tmp/pcap/fail/no/such/dir/file.txt]" in got["puppet_run"]["note"]
    # the failed resource is in a site manifest, not in a module: the classes themselves applied
    assert got["class postgresql::server"]["status"] == "ok"
    moduled = failed | {"failed_resources": [dict(failed["failed_resources"][0], file="/etc/puppetlabs/code/environments/production/modules/postgresql/manifests/server.pp")]}
    got = items(server(f=facts("epyc7763-a100-server"), p=moduled))
    assert got["class postgresql::server"]["status"] == "drift" and got["class node_exporter"]["status"] == "ok"
    catalog = failed | {"failed_resources": []}
    assert all(i["status"] == "drift" for k, i in items(server(p=catalog)).items() if k.startswith("class "))
    staging = items(server(f=facts("epyc7763-a100-server"), p=run("ok"), environment="prod"))
    assert staging["environment"] == {"key": "environment", "declared": "prod", "actual": "production", "status": "drift", "note": ""}
    stale = items(server(p=run("ok", at=NOW - 10 * 3600)))
    assert stale["class postgresql::server"]["status"] == "unknown"


def test_reported_class_list_is_compared_exactly() -> None:
    p = run("ok") | {"classes": ["postgresql::server", "node_exporter", "extra::thing"]}
    got = items(server(f=facts("epyc7763-a100-server"), p=p))
    assert got["class backup::pgbackrest"]["status"] == "drift"
    assert got["class postgresql::server"]["status"] == "ok"
    extra = [i for i in lc.compare(lc.declared(DEFS, server()), server(f=facts("epyc7763-a100-server"), p=p), NOW) if i["actual"] == "extra::thing"]
    assert extra and extra[0]["status"] == "drift" and extra[0]["declared"] is None


def test_sync_pillar_equals_the_full_comparison() -> None:
    index = lc.SpecIndex(DEFS)
    kinds = ["kvm-epyc-2vcpu-vm", "epyc7763-a100-server", "nuc12-homelab", "dgx-spark-gb10", "mac-mini-m2-asahi", None]
    runs = [run("ok"), run("failed"), run("changed"), run("ok", at=NOW - 10 * 3600), None, run("ok") | {"classes": ["nginx", "app::deploy"]}]
    labelsets = [("postgres",), ("app",), ("app", "production"), ("mailserver", "eu-west"), ("nope",), ()]
    seen = set()
    for f, p, labels, env in itertools.product(kinds, runs, labelsets, ("production", "prod", None)):
        s = server(labels, f=facts(f) if f else None, p=p, environment=env)
        want = lc.summarise(lc.compare(index.spec(s), s, NOW))
        if f is None and p is None:
            want = "unknown"
        assert lc.sync_pillar(index, s, NOW) == want, (f, p and p["status"], labels, env)
        seen.add(want)
    assert seen == {"sync", "drift", "unknown"}
    assert lc.sync_pillar(None, server(), NOW) == "unknown"


def test_diff_lines_render_like_the_spec() -> None:
    s = server(f=facts("kvm-epyc-2vcpu-vm"), p=run("ok"))
    result = {"items": lc.compare(lc.declared(DEFS, s), s, NOW)}
    lines = lc.diff_lines(result)
    assert lines[0] == "  labels: postgres"
    assert any(line.startswith("- cores: 8") and line.endswith("← declared, missing (smaller than declared)") for line in lines)
    assert any(line.startswith("+ cores: 2") and line.endswith("← not in spec") for line in lines)
    assert "  class: postgresql::server" in lines
    unknown = lc.diff_lines({"items": lc.compare(lc.declared(DEFS, server()), server(), NOW)})
    assert any(line.startswith("? cores: 8") and "unknown: no hardware facts" in line for line in unknown)


# -- plans ---------------------------------------------------------------------------------------


def test_plan_for_a_new_server() -> None:
    plan = lc.make_plan(DEFS, "new-1", None, labels=["app"], provider="ssh", dns_zone="lab.internal", now=NOW)
    assert plan["new"] and plan["action"] == "inventory" and plan["target"]["labels"] == ["app"]
    lines = lc.plan_lines(plan)
    assert lines[0] == "+ server: new-1 (provider ssh)"
    assert "+ label: app" in lines and "+ class: nginx" in lines and "+ size: medium (4 cores, 8GB)" in lines
    assert "+ DNS name: new-1.lab.internal" in lines
    assert any(x.startswith("+ secret granted: ") for x in lines)
    assert lc.make_plan(DEFS, "new-1", None, labels=["app"], provider="ssh", hosts=["10.0.0.5"])["action"] == "onboard"
    assert lc.make_plan(DEFS, "new-1", None, labels=["app"], provider="aws")["action"] == "not-implemented"
    with pytest.raises(lc.UsageError, match="not defined: nope"):
        lc.make_plan(DEFS, "new-1", None, labels=["nope"], provider="ssh")
    with pytest.raises(lc.UsageError, match="--provider"):
        lc.make_plan(DEFS, "new-1", None, labels=["app"], provider=None)


def test_plan_for_an_existing_server_shows_changes() -> None:
    cur = Server("web-1", "ssh", ("app",), "prod", None, None, enrolled_at=NOW)
    plan = lc.make_plan(DEFS, "web-1", cur, labels=["app", "production"], provider=None, size="large", environment="staging")
    lines = lc.plan_lines(plan)
    assert "+ label: production" in lines and "~ environment: staging (was prod)" in lines
    assert "~ size: large (8 cores, 32GB, 500GB NVMe) (was medium)" in lines
    assert plan["action"] == "inventory" and plan["enrolled"]
    same = lc.make_plan(DEFS, "web-1", cur, labels=None, provider=None)
    assert same["changes"] == [] and same["target"]["labels"] == ["app"]


def test_plan_round_trip_and_stale_plan_refused(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "defs"
    root.mkdir()
    (root / "labels.yaml").write_text("labels:\n  app: {puppet_classes: [nginx]}\n")
    defs = load_definitions(root)
    plan = lc.make_plan(defs, "new-1", None, labels=["app"], provider="ssh", now=NOW)
    path = lc.save_plan(tmp_path / "home", plan)
    assert path == tmp_path / "home" / "plans" / "new-1.json" and not list(path.parent.glob(".*.tmp"))
    loaded = lc.load_plan(tmp_path / "home", "new-1")
    assert loaded == json.loads(json.dumps(plan))
    lc.check_plan(loaded, load_definitions(root), None)  # unchanged: fine
    (root / "labels.yaml").write_text("labels:\n  app: {puppet_classes: [nginx, php]}\n")
    with pytest.raises(lc.StalePlan, match="stale"):
        lc.check_plan(loaded, load_definitions(root), None)
    # the inventory record changed (the server appeared meanwhile): stale too
    (root / "labels.yaml").write_text("labels:\n  app: {puppet_classes: [nginx]}\n")
    with pytest.raises(lc.StalePlan):
        lc.check_plan(loaded, load_definitions(root), Server("new-1", "ssh", ("app",)))
    with pytest.raises(lc.UsageError, match="no plan for 'other'"):
        lc.load_plan(tmp_path / "home", "other")
