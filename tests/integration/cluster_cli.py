"""Shared by the tests that drive `lab cluster up` and act as its nodes (`LAB_HOME=DIR/NODE lab …`).
A plain module, not a test file: the integration tests import it from their own folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

LAB = str(Path(sys.executable).parent / "lab")


def lab(*args: str, home: Path | None = None, stdin: bytes = b"", env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `lab` as a node of a cluster: its own LAB_HOME, none of the caller's lab variables."""
    full = dict(os.environ, NO_COLOR="1", **(env or {}))
    for k in ("LAB_DEFINITIONS", "LAB_RUNTIME_DIR", "LAB_SECRETS_DIR"):
        full.pop(k, None)
    if home is not None:
        full["LAB_HOME"] = str(home)
    return subprocess.run([LAB, *args], env=full, input=stdin, capture_output=True, timeout=120)


def ok(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode()


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running_cluster(d: Path, *up_args: str) -> Iterator[Path]:
    """`lab cluster up --dir d …` for the duration; `lab cluster down` afterwards, even on failure."""
    try:
        ok(lab("cluster", "up", "--dir", str(d), *up_args))
        yield d
    finally:
        if (d / "cluster.yaml").exists():
            lab("cluster", "down", "--dir", str(d))
