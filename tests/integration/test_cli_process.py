"""The installed `lab` console script as a real process: exit codes, stderr, no tracebacks."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

LAB = str(pathlib.Path(sys.executable).with_name("lab"))


@pytest.fixture()
def env(tmp_path: pathlib.Path) -> dict[str, str]:
    e = dict(os.environ, LAB_HOME=str(tmp_path / "home"), NO_COLOR="1")
    e.pop("LAB_DEFINITIONS", None)
    return e


def lab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_round_trip_through_the_console_script(env) -> None:
    assert lab(env, "init", "--local").returncode == 0
    r = lab(env, "server", "add", "web-1", "--provider", "ssh", "--labels", "app,production", "--environment", "prod")
    assert r.returncode == 0, r.stderr
    r = lab(env, "get", "servers", "-o", "json")
    assert r.returncode == 0
    assert json.loads(r.stdout) == [
        {
            "name": "web-1",
            "provider": "ssh",
            "labels": ["app", "production"],
            "environment": "prod",
            "region": None,
            "size": "medium",
            "sync": "unknown",
            "puppet": "unknown",
            "health": "unknown",
            "identity": "not enrolled",
        }
    ]
    shown = json.loads(lab(env, "show", "server", "web-1", "-o", "json").stdout)
    assert {"name": "https_check", "source": "auto:port:443"} in shown["alerts"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["show", "server", "ghost"], 3),
        (["server", "add", "x", "--provider", "ssh", "--labels", "nope"], 2),
        (["get", "servers", "-o", "xml"], 2),
        (["frobnicate"], 2),
    ],
)
def test_mistakes_exit_non_zero_without_traceback(env, args, code) -> None:
    assert lab(env, "init", "--local").returncode == 0
    r = lab(env, *args)
    assert r.returncode == code
    assert "Traceback" not in r.stderr and r.stderr.strip()
    assert r.stdout == ""


def test_help_lists_the_commands(env) -> None:
    r = lab(env, "--help")
    assert r.returncode == 0
    for word in ("init", "get", "show", "targets", "server", "validate"):
        assert word in r.stdout


def test_truncated_state_db_is_recovered_in_a_new_process(env, tmp_path) -> None:
    assert lab(env, "init", "--local").returncode == 0
    assert lab(env, "server", "add", "a-1", "--provider", "ssh").returncode == 0
    home = tmp_path / "home"
    # Force a snapshot that includes a-1, then damage the database file.
    code = "import pathlib,sys; from lab.coordinator.state import StateDB; db=StateDB.open(pathlib.Path(sys.argv[1])); db.snapshot(); db.close()"
    subprocess.run([sys.executable, "-c", code, str(home)], check=True, timeout=60)
    db = home / "state.db"
    db.write_bytes(db.read_bytes()[:1000])
    for suffix in ("-wal", "-shm"):
        (home / f"state.db{suffix}").unlink(missing_ok=True)
    r = lab(env, "get", "servers", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert "restored snapshot" in r.stderr
    assert [s["name"] for s in json.loads(r.stdout)] == ["a-1"]
