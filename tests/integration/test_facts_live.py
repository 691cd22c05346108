"""`lab-agent facts` as a real process on this machine: it must work on whatever host runs the tests."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

LAB_AGENT = str(pathlib.Path(sys.executable).with_name("lab-agent"))
ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


def lab_agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NO_COLOR="1")
    return subprocess.run([LAB_AGENT, *args], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def facts_json() -> dict:
    r = lab_agent("facts", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def test_facts_are_sane_on_this_host(facts_json: dict) -> None:
    f = facts_json["facts"]
    machine = platform.machine()
    assert f["cpu"]["arch"] == ARCH.get(machine.lower(), machine)
    assert f["cpu"]["cores"] >= 1 and f["cpu"]["threads"] >= f["cpu"]["cores"]
    assert f["memory_bytes"] > 0
    assert f["hostname"] == platform.node()
    assert isinstance(f["notes"], list)
    for s in facts_json["suggestions"]:
        assert set(s) == {"label", "rule", "evidence"} and s["evidence"]
    if sys.platform == "linux":
        assert f["disks"] is not None and f["nics"] is not None
        assert f["os"] is not None and f["os"]["id"]


def test_table_and_raw_output() -> None:
    r = lab_agent("facts")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("Detected hardware:\n")
    assert "Suggested labels: [" in r.stdout
    r = lab_agent("facts", "--raw", "-o", "json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    raw = json.loads(r.stdout)
    assert raw["schema"] == 1 and raw["psutil"]["memory_total"] > 0


def test_bad_output_format_is_a_usage_error() -> None:
    r = lab_agent("facts", "-o", "xml")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "xml" in r.stderr
