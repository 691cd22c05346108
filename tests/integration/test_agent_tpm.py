"""The cache key sealed by a real TPM 2.0 implementation: Debian's `swtpm`, driven by `tpm2-tools`.

Skips only when swtpm/tpm2-tools are missing and CI is unset; under CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agent import _tpm
from lab.agent.cache import KEY_FILE, TPM_KEY_FILE, CacheRecord, Freshness, SecretCache, load_or_create_key

TOOLS = ("swtpm", "tpm2_createprimary", "tpm2_create", "tpm2_load", "tpm2_unseal", "tpm2_flushcontext")
missing = [t for t in TOOLS if shutil.which(t) is None]
if missing and not os.environ.get("CI"):
    pytest.skip(f"missing {', '.join(missing)} (apt-get install swtpm swtpm-tools tpm2-tools)", allow_module_level=True)


def _free_port() -> int:
    """A port P with P+1 also free: the swtpm TCTI talks to the control channel on P+1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no pair of free ports")


def _start_swtpm(state: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server", f"type=tcp,port={port}",
         "--ctrl", f"type=tcp,port={port + 1}", "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port + 1), timeout=0.2).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "swtpm did not start"
            time.sleep(0.05)


@pytest.fixture
def swtpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    assert not missing, f"CI: missing {missing} (apt-get install swtpm swtpm-tools tpm2-tools)"
    state = tmp_path / "tpmstate"
    state.mkdir()
    port = _free_port()
    proc = _start_swtpm(state, port)
    tcti = f"swtpm:port={port}"
    monkeypatch.setenv("TPM2TOOLS_TCTI", tcti)
    yield tcti
    proc.terminate()
    proc.wait(timeout=10)


def test_sealed_key_round_trip(swtpm: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert _tpm.available()
    with SecretCache.open(home) as cache:  # auto: a TPM is there, so it is used
        assert cache.key_protection == "tpm"
        key = cache.key.buffer.bytes()
        cache.put(CacheRecord("db/pw", b"tpm-protected-value", (1, 0, "s"), fetched_at=time.time()))
    assert (home / TPM_KEY_FILE).exists() and not (home / KEY_FILE).exists()
    assert key not in (home / TPM_KEY_FILE).read_bytes()
    for _ in range(3):  # repeated unseals must not exhaust the TPM's object slots
        with SecretCache.open(home) as cache:
            assert cache.key_protection == "tpm" and cache.key.buffer.bytes() == key
            assert cache.get("db/pw") == (b"tpm-protected-value", Freshness.FRESH)


def test_blob_is_bound_to_its_tpm(swtpm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_or_create_key(tmp_path / "a", protection="tpm").close()
    blob = (tmp_path / "a" / TPM_KEY_FILE).read_bytes()
    # the same blob on "another machine": a second swtpm with its own seeds
    state = tmp_path / "other"
    state.mkdir()
    port = _free_port()
    proc = _start_swtpm(state, port)
    try:
        monkeypatch.setenv("TPM2TOOLS_TCTI", f"swtpm:port={port}")
        with pytest.raises(_tpm.TpmError):
            _tpm.unseal(blob, tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_agent_reports_tpm(swtpm: str, tmp_path: Path) -> None:
    import json
    import sys

    bindir = Path(sys.executable).parent
    env = dict(os.environ, LAB_RUNTIME_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen([str(bindir / "lab-agent"), "run", "--home", str(tmp_path / "home"), "--secrets-dir", str(tmp_path / "s")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "run" / "agent.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        r = subprocess.run([str(bindir / "lab"), "secret", "status", "-o", "json"], env=env, capture_output=True, text=True, timeout=60)
        assert json.loads(r.stdout)["key_protection"] == "tpm", r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert "key_protection=tpm" in err
