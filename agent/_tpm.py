"""Sealing the agent's cache key with a TPM 2.0, through `tpm2-tools` in subprocesses.

The key never appears on a command line: it goes to ``tpm2_create`` on stdin and comes back from
``tpm2_unseal`` on stdout. The sealed blob (public + private parts of a TPM sealing object under
the owner hierarchy's primary key) is useless without the same TPM: the primary key is derived
from the TPM's owner seed, so the blob can only be loaded there.

The TCTI is chosen the usual tpm2-tools way (``TPM2TOOLS_TCTI``, else the kernel's
``/dev/tpmrm0``); tests point it at ``swtpm`` (``swtpm:port=N``).

Blob file format (``cache.key.tpm``, 0600): ``b"LABTPM1\\0"`` + u32 len(pub) + pub + u32 len(priv) + priv.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from lab.common.errors import ConfigError

__all__ = ["MAGIC", "TpmError", "available", "pack_blob", "seal", "unpack_blob", "unseal"]

MAGIC: Final = b"LABTPM1\x00"
_U32 = struct.Struct(">I")
MAX_PART: Final = 4096
TIMEOUT_S: Final = 30.0
_PRIMARY: Final = ("tpm2_createprimary", "-Q", "-C", "o", "-g", "sha256", "-G", "ecc", "-c")
# Without a kernel resource manager (swtpm, /dev/tpm0) each tool leaves its transient objects
# loaded; flush them after every step so that the TPM's few object slots never run out.
_FLUSH: Final = ("tpm2_flushcontext", "-t")

Runner = Callable[[Sequence[str], bytes | None], bytes]


class TpmError(ConfigError):
    """The TPM could not seal or unseal the cache key."""


def available(env: dict[str, str] | None = None) -> bool:
    """tpm2-tools are installed and a TPM is reachable (a TCTI is configured or a device exists)."""
    env = os.environ if env is None else env
    if shutil.which("tpm2_unseal") is None or shutil.which("tpm2_createprimary") is None:
        return False
    if env.get("TPM2TOOLS_TCTI") or env.get("TCTI"):
        return True
    return os.path.exists("/dev/tpmrm0") or os.path.exists("/dev/tpm0")


def _run(argv: Sequence[str], stdin: bytes | None) -> bytes:
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TpmError(f"{argv[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise TpmError(f"{argv[0]} exited {proc.returncode}: {err[-1] if err else 'no message'}"[:300])
    return proc.stdout


def pack_blob(pub: bytes, priv: bytes) -> bytes:
    return MAGIC + _U32.pack(len(pub)) + pub + _U32.pack(len(priv)) + priv


def unpack_blob(data: bytes) -> tuple[bytes, bytes]:
    """Split a blob file; TpmError for anything malformed."""
    if not data.startswith(MAGIC):
        raise TpmError("not a lab TPM-sealed key blob")
    off = len(MAGIC)
    parts: list[bytes] = []
    for _ in range(2):
        if len(data) < off + _U32.size:
            raise TpmError("truncated TPM key blob")
        (n,) = _U32.unpack_from(data, off)
        off += _U32.size
        if n == 0 or n > MAX_PART or len(data) < off + n:
            raise TpmError("malformed TPM key blob")
        parts.append(data[off : off + n])
        off += n
    if off != len(data):
        raise TpmError("trailing bytes in TPM key blob")
    return parts[0], parts[1]


def seal(key: bytes, workdir: Path, run: Runner = _run) -> bytes:
    """Seal ``key`` (passed on stdin) and return the blob to store."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".tpm-") as tmp:
        t = Path(tmp)
        try:
            run([*_PRIMARY, str(t / "primary.ctx")], None)
            run(_FLUSH, None)
            run(
                ["tpm2_create", "-Q", "-C", str(t / "primary.ctx"), "-i", "-", "-u", str(t / "seal.pub"), "-r", str(t / "seal.priv")],
                key,
            )
        finally:
            _flush_quietly(run)
        return pack_blob((t / "seal.pub").read_bytes(), (t / "seal.priv").read_bytes())


def unseal(blob: bytes, workdir: Path, run: Runner = _run) -> bytearray:
    """Unseal a blob made by :func:`seal` on this TPM; the key comes back on stdout."""
    pub, priv = unpack_blob(blob)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".tpm-") as tmp:
        t = Path(tmp)
        (t / "seal.pub").write_bytes(pub)
        (t / "seal.priv").write_bytes(priv)
        try:
            run([*_PRIMARY, str(t / "primary.ctx")], None)
            run(_FLUSH, None)
            run(["tpm2_load", "-Q", "-C", str(t / "primary.ctx"), "-u", str(t / "seal.pub"), "-r", str(t / "seal.priv"), "-c", str(t / "seal.ctx")], None)
            run(_FLUSH, None)
            out = run(["tpm2_unseal", "-Q", "-c", str(t / "seal.ctx")], None)
        finally:
            _flush_quietly(run)
        return bytearray(out)


def _flush_quietly(run: Runner) -> None:
    try:
        run(_FLUSH, None)
    except TpmError:
        pass
