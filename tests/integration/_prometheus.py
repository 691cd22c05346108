"""Shared by the tests that run the real Prometheus tools (prometheus, promtool, node_exporter) and
other monitoring binaries: finding a binary (skip when missing, fail under CI=true), a free
loopback port, and a started process that is ready over HTTP and always stopped afterwards.
A plain module, not a test file: the integration tests import it from their own folder."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest


def need(*candidates: str, hint: str = "install the Debian package") -> str:
    """The first of ``candidates`` found on PATH (or an executable absolute path); skip without
    one, except under CI=true, where the test fails with ``hint`` (which package to install)."""
    for c in candidates:
        found = shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail(f"{candidates[0]} is required under CI ({hint})")
    pytest.skip(f"{candidates[0]} not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(args: list[str], log: pathlib.Path, ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args``, wait until ``ready_url`` answers 200, and always stop it afterwards."""
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"{args[0]} exited: {log.read_text()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{args[0]} not ready: {log.read_text()[-2000:]}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.contextmanager
def prometheus(binary: str, config: pathlib.Path, storage: pathlib.Path, log: pathlib.Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Prometheus server on a free loopback port with ``config``: its URL and its process, once ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}", f"--web.listen-address=127.0.0.1:{port}"]
    with process(args, log, f"{url}/-/ready") as proc:
        yield url, proc


def write_fast_config(path: pathlib.Path, rules: pathlib.Path, node_exporter_sd: pathlib.Path, job_extra: str = "") -> pathlib.Path:
    """A Prometheus configuration at ``path`` that scrapes and evaluates every second: the rule
    files ``rules/*.yaml``, and one job ``node_exporter`` with its targets in the file_sd file
    ``node_exporter_sd``; ``job_extra`` is more of that job's YAML (indented 4 spaces)."""
    path.write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{rules}/*.yaml"]
scrape_configs:
  - job_name: node_exporter
    file_sd_configs: [{{files: ["{node_exporter_sd}"], refresh_interval: 1s}}]
{job_extra}"""
    )
    return path
