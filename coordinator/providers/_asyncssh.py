"""The one place asyncssh (asyncio) meets lab (trio/sync): a worker thread with its own event loop.

::

    with SshClient.connect(target, pinned_key_line) as ssh:
        result = ssh.run("uname -m")                # RemoteResult(rc, stdout, stderr)
        ssh.put_file(local, "/opt/lab/wheels/x.whl")
        ssh.write_secret("/etc/lab/join-token", data) # 0600 from the first byte

Every coroutine is submitted with :func:`asyncio.run_coroutine_threadsafe` to the private loop
and waited on from the calling thread; asyncssh and OSError exceptions are translated here into
:class:`~lab.common.errors.TransportError` / :class:`~lab.common.errors.AuthError`. Nothing else in
lab imports asyncssh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from lab.common.errors import AuthError, TransportError

T = TypeVar("T")

CONNECT_TIMEOUT_S = 15.0
DEFAULT_RUN_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: str = "root"
    identity: str | None = None  # private key file; None: asyncssh's defaults (~/.ssh/id_*, agent)


@dataclasses.dataclass(frozen=True)
class RemoteResult:
    rc: int
    stdout: str
    stderr: str


class _Loop:
    """An asyncio loop running forever in a daemon thread; stopped and joined by :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lab-asyncssh", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TransportError(f"timed out after {timeout:.0f}s") from None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def _translate(exc: BaseException, what: str) -> Exception:
    import asyncssh

    if isinstance(exc, asyncssh.PermissionDenied):
        return AuthError(f"{what}: permission denied (check --user and --identity)")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return AuthError(f"{what}: host key not verifiable: {exc.reason}")
    if isinstance(exc, asyncssh.KeyImportError):
        return AuthError(f"{what}: cannot read the identity key: {exc}")
    if isinstance(exc, (asyncssh.Error, asyncssh.DisconnectError)):
        return TransportError(f"{what}: {getattr(exc, 'reason', '') or exc}")
    if isinstance(exc, OSError):
        return TransportError(f"{what}: {exc.strerror or exc}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportError(f"{what}: timed out")
    return TransportError(f"{what}: {type(exc).__name__}: {exc}")


def fetch_host_key(target: SshTarget) -> tuple[str, str]:
    """The host key ``target`` presents, as ``(algorithm, base64 blob)``; no authentication."""
    import asyncssh

    runner = _Loop()
    try:
        async def get() -> Any:
            return await asyncio.wait_for(asyncssh.get_server_host_key(target.host, target.port), CONNECT_TIMEOUT_S)

        try:
            key = runner.call(get())
        except Exception as exc:
            raise _translate(exc, f"ssh {target.host}:{target.port}") from exc
        if key is None:
            raise TransportError(f"ssh {target.host}:{target.port}: no host key offered")
        line = key.export_public_key("openssh").decode().split()
        return line[0], line[1]
    finally:
        runner.close()


class SshClient:
    """One authenticated SSH connection, pinned to exactly one host key."""

    def __init__(self, runner: _Loop, conn: Any, target: SshTarget) -> None:
        self._runner = runner
        self._conn = conn
        self.target = target

    @classmethod
    def connect(cls, target: SshTarget, pinned_key: str) -> SshClient:
        """Connect and authenticate, accepting only ``pinned_key`` ("ALG BASE64") as the host key."""
        import asyncssh

        runner = _Loop()
        where = f"ssh {target.user}@{target.host}:{target.port}"
        try:
            known = asyncssh.import_known_hosts(f"{_known_host_pattern(target)} {pinned_key}\n")

            async def open_conn() -> Any:
                return await asyncssh.connect(
                    target.host, target.port, username=target.user, known_hosts=known,
                    client_keys=[target.identity] if target.identity else (), agent_path=None if target.identity else (),
                    # with --identity only that key; otherwise asyncssh's defaults (~/.ssh/id_*, ssh-agent)
                    connect_timeout=CONNECT_TIMEOUT_S, config=(),
                )  # fmt: skip

            conn = runner.call(open_conn())
        except BaseException as exc:
            runner.close()
            if isinstance(exc, Exception):
                raise _translate(exc, where) from exc
            raise
        return cls(runner, conn, target)

    def run(self, command: str, *, timeout: float = DEFAULT_RUN_TIMEOUT_S) -> RemoteResult:
        """Run ``command`` through the remote shell; never raises for a non-zero exit status."""

        async def go() -> Any:
            return await self._conn.run(command, check=False, timeout=timeout)

        try:
            r = self._runner.call(go(), timeout + 10)
        except Exception as exc:
            raise _translate(exc, f"ssh {self.target.host}: running a command") from exc
        rc = r.exit_status if r.exit_status is not None else 255
        return RemoteResult(rc, _text(r.stdout), _text(r.stderr))

    def put_file(self, local: str | os.PathLike[str], remote: str, mode: int = 0o644) -> None:
        """Copy ``local`` to ``remote`` over SFTP (written to ``remote.part``, then renamed)."""

        async def go() -> None:
            async with self._conn.start_sftp_client() as sftp:
                part = remote + ".part"
                await sftp.put(os.fspath(local), part)
                await sftp.chmod(part, mode)
                await sftp.posix_rename(part, remote)

        try:
            self._runner.call(go(), DEFAULT_RUN_TIMEOUT_S)
        except Exception as exc:
            raise _translate(exc, f"sftp {remote}") from exc

    def write_secret(self, remote: str, data: bytes) -> None:
        """Write ``data`` to ``remote`` with mode 0600 set at creation, before any byte is written
        (a stale file is removed first, so its old mode never applies)."""
        import asyncssh

        async def go() -> None:
            async with self._conn.start_sftp_client() as sftp:
                try:
                    await sftp.remove(remote)
                except asyncssh.SFTPNoSuchFile:
                    pass
                attrs = asyncssh.SFTPAttrs(permissions=0o600)
                async with sftp.open(remote, "wb", attrs) as f:
                    await f.chmod(0o600)
                    await f.write(data)

        try:
            self._runner.call(go(), 60)
        except Exception as exc:
            raise _translate(exc, f"sftp {remote}") from exc

    def close(self) -> None:
        async def go() -> None:
            self._conn.close()
            await self._conn.wait_closed()

        try:
            self._runner.call(go(), 10)
        except Exception:  # closing is best effort
            pass
        finally:
            self._runner.close()

    def __enter__(self) -> SshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _known_host_pattern(target: SshTarget) -> str:
    return target.host if target.port == 22 else f"[{target.host}]:{target.port}"


def _text(v: Any) -> str:
    if v is None:
        return ""
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
