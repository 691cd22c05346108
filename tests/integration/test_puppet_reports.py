"""Real Puppet 7 (Debian `puppet`): `puppet apply` a manifest that succeeds and one that fails,
with every Puppet directory inside a temp dir; the agent reporter reads the run files, the
coordinator records them, and the `lab` console script shows PUPPET ok → failed and the failed
resource in `describe`.

Skips only when `puppet` is missing and CI is unset; under CI=true a missing puppet fails.
Nothing outside the temp dir is touched: the manifests manage files under it only.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from lab.agent.reporters import build_report, locate, read_puppet_run
from lab.coordinator.reports import record_report
from lab.coordinator.state import StateDB

LAB = str(pathlib.Path(sys.executable).with_name("lab"))
PUPPET = shutil.which("puppet")


@pytest.fixture(scope="module")
def puppet() -> str:
    if PUPPET is None:
        if os.environ.get("CI"):
            pytest.fail("CI: puppet is not installed (Debian package `puppet`)", pytrace=False)
        pytest.skip("puppet is not installed (apt-get install puppet)")
    return PUPPET


def apply(puppet: str, root: pathlib.Path, manifest: str) -> subprocess.CompletedProcess[str]:
    pp = root / "manifest.pp"
    pp.write_text(manifest)
    var = root / "var"
    argv = [
        puppet, "apply", "--detailed-exitcodes", "--color=false",
        f"--confdir={root / 'conf'}", f"--codedir={root / 'code'}", f"--vardir={var}",
        f"--statedir={var / 'state'}", f"--publicdir={var / 'public'}", f"--logdir={root / 'log'}",
        f"--rundir={root / 'run'}", str(pp),
    ]  # fmt: skip
    env = dict(os.environ, HOME=str(root), LANG="C.UTF-8")
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def lab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_puppet_apply_ok_then_failed_reaches_get_servers_and_describe(puppet: str, tmp_path: pathlib.Path) -> None:
    root = tmp_path / "puppet"
    root.mkdir()
    env = dict(os.environ, LAB_HOME=str(tmp_path / "home"), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    assert lab(env, "init", "--local").returncode == 0
    r = lab(env, "server", "add", "web-1", "--provider", "ssh", "--labels", "app", "--environment", "prod")
    assert r.returncode == 0, r.stderr
    assert json.loads(lab(env, "get", "servers", "-o", "json").stdout)[0]["puppet"] == "unknown"

    good = f"file {{ '{root}/managed.txt': ensure => file, content => \"hello\\n\" }}\n"
    done = apply(puppet, root, good)
    assert done.returncode in (0, 2), done.stdout + done.stderr  # 2: changes applied
    assert (root / "managed.txt").read_text() == "hello\n"
    paths = locate(root / "var" / "state")
    assert paths.summary == root / "var" / "public" / "last_run_summary.yaml" and paths.report is not None and paths.report.exists()
    ok_run = read_puppet_run(paths)
    assert ok_run is not None and ok_run.status in ("ok", "changed") and ok_run.source == "summary+report"
    assert abs((ok_run.time or 0) - time.time()) < 600 and ok_run.version and ok_run.version.startswith("7.")
    done = apply(puppet, root, good)  # the second run has nothing left to do
    assert done.returncode == 0, done.stdout + done.stderr
    ok_run = read_puppet_run(paths)
    assert ok_run is not None and ok_run.status == "ok"

    with StateDB.open(tmp_path / "home") as state:
        changes = record_report(state, "web-1", build_report(ok_run, ["10.0.1.45"]), time.time())
    assert changes["puppet"] == {"before": "unknown", "after": "ok"}
    assert changes["addresses"] == {"before": [], "after": ["10.0.1.45"]}
    assert json.loads(lab(env, "get", "servers", "-o", "json").stdout)[0]["puppet"] == "ok"

    bad = good + f"file {{ '{root}/no/such/dir/file.txt': ensure => file, content => \"x\\n\" }}\n"
    done = apply(puppet, root, bad)
    assert done.returncode in (4, 6), done.stdout + done.stderr  # 4/6: failures
    failed_run = read_puppet_run(paths)
    assert failed_run is not None and failed_run.status == "failed"
    with StateDB.open(tmp_path / "home") as state:
        changes = record_report(state, "web-1", build_report(failed_run), time.time())
    assert changes["puppet"] == {"before": "ok", "after": "failed"} and changes["addresses"] is None

    r = lab(env, "get", "servers", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["puppet"] == "failed"
    r = lab(env, "describe", "server", "web-1", "-o", "json")
    assert r.returncode == 0, r.stderr
    described = json.loads(r.stdout)
    assert described["puppet"]["pillar"] == "failed" and described["puppet"]["last_run"]["status"] == "failed"
    [failed] = described["puppet"]["failed_resources"]
    assert failed["resource"] == f"File[{root}/no/such/dir/file.txt]"
    assert failed["file"] == str(root / "manifest.pp") and failed["line"] == 2 and "failed" in failed["message"]
    assert described["identity"]["addresses"] == ["10.0.1.45"]
    r = lab(env, "describe", "server", "web-1")
    assert r.returncode == 0 and "Failed resources (1):" in r.stdout and f"File[{root}/no/such/dir/file.txt]" in r.stdout
