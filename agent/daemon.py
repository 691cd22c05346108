"""`lab-agent run`: the agent daemon. One trio root nursery.

Start order (offline first — nothing here waits for the network)::

    disable core dumps → load/create the cache key (mlock'd) → open the cache
    → listen on agent.sock (answers from the cache at once) → write /run/secrets from the cache
    → sd_notify READY=1 → [watchdog pings] [sync_loop: store sync, filled in by the sync component]

SIGTERM/SIGINT cancel the nursery; cleanups run in reverse order (socket removed, cache closed,
key zeroed). Logs are ``key=value`` lines on stderr and never carry secret values.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Final

import trio

from lab.agent.cache import DEFAULT_STALE_AFTER, SecretCache, load_or_create_key
from lab.agent.delivery import AgentService, FileDelivery, IdResolver, serve
from lab.common.errors import ConfigError
from lab.common.securemem import disable_core_dumps, is_dumpable

__all__ = ["AgentConfig", "Agent", "configure_logging", "main", "run_agent", "sd_notify", "sync_loop"]

log = logging.getLogger("lab.agent")

DEFAULT_HOME: Final = "/var/lib/lab"
DEFAULT_RUNTIME_DIR: Final = "/run/lab"
DEFAULT_SECRETS_DIR: Final = "/run/secrets"
SOCKET_NAME: Final = "agent.sock"
HOME_RUNTIME_SUBDIR: Final = "run"  # HOME/run/agent.sock, when it exists and no runtime dir is given (docs/CLUSTER.md)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    home: Path
    runtime_dir: Path
    secrets_dir: Path
    key_protection: str = "auto"
    stale_after: float = DEFAULT_STALE_AFTER

    @classmethod
    def resolve(
        cls, home: str | None = None, runtime_dir: str | None = None, secrets_dir: str | None = None,
        environ: dict[str, str] | None = None, **kw: Any,
    ) -> AgentConfig:
        """Flags first, then $LAB_HOME / $LAB_RUNTIME_DIR / $LAB_SECRETS_DIR, then the defaults (the
        runtime dir: HOME/run when HOME/run/agent.sock exists, else /run/lab)."""
        env = os.environ if environ is None else environ
        home_path = Path(home or env.get("LAB_HOME") or DEFAULT_HOME)
        runtime = runtime_dir or env.get("LAB_RUNTIME_DIR")
        if not runtime and (home_path / HOME_RUNTIME_SUBDIR / SOCKET_NAME).exists():
            runtime = str(home_path / HOME_RUNTIME_SUBDIR)  # [cluster] as agent/localclient.socket_path
        return cls(
            home=home_path,
            runtime_dir=Path(runtime or DEFAULT_RUNTIME_DIR),
            secrets_dir=Path(secrets_dir or env.get("LAB_SECRETS_DIR") or DEFAULT_SECRETS_DIR),
            **kw,
        )

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / SOCKET_NAME


class _KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if "=" not in msg.split(" ", 1)[0]:
            msg = f'msg="{msg}"'
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {msg}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info).splitlines()[-1])
        return line


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KVFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def sd_notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send a datagram to $NOTIFY_SOCKET (systemd Type=notify). False when not under systemd."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("event=sd_notify_failed error=%s", exc)
        return False


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of $WATCHDOG_USEC in seconds, if the watchdog is on for this process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2e6


async def sync_loop(agent: Agent, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Store sync (agent/sync.py): one Noise session to a reachable store from enrollment.yaml's
    ``stores``; records via ``agent.apply``, removals via ``agent.drop``; status in
    ``agent.sync_status``. Not enrolled: the agent serves its cache and says sync is not running."""
    from lab.agent.sync import run_for_agent

    await run_for_agent(agent, task_status=task_status)


class Agent:
    """What the running daemon holds; sync code talks to it."""

    def __init__(self, config: AgentConfig, cache: SecretCache, files: FileDelivery) -> None:
        self.config = config
        self.cache = cache
        self.files = files
        self.sync_status: dict[str, Any] = {"running": False, "stores": {}, "coordinator": None}
        self.info: dict[str, Any] = {}
        self.service = AgentService(cache, IdResolver(), self.status_view, on_reload=self.redeliver)
        self.sync_control: dict[str, Any] = {}  # [identity] the store session's cancel scope (agent/sync.py)
        self.coordinator_role: Any = None  # [migrate] lab.coordinator.migrate.CoordinatorRole, set by run_agent
        self.wiped = False

    def status_view(self) -> dict[str, Any]:
        """What `lab secret status` shows beyond the cache counts."""
        return {**self.info, "sync": dict(self.sync_status)}

    def apply(self, record: Any) -> None:
        """A new or rotated secret: cache it, then replace its file atomically."""
        self.cache.put(record)
        self.files.write(record)
        log.info("event=secret_updated path=%s", record.path)

    def drop(self, path: str) -> None:
        """A removed secret (or lost entitlement): out of the cache and /run/secrets at once."""
        self.cache.remove(path)
        self.files.remove(path)
        log.info("event=secret_removed path=%s", path)

    def restart_sync(self) -> None:
        """[identity] Reconnect the store session now (a renewed certificate is on disk)."""
        scope = self.sync_control.get("session")
        if scope is not None:
            scope.cancel()

    def revoked(self, reason: str) -> None:
        """[identity] Refused as revoked (`lab identity revoke`): every secret out of /run/secrets,
        the cache and its key destroyed (cache.wipe); an empty cache under a throwaway in-memory
        key answers from then on ("not in the local cache")."""
        if self.wiped:
            return
        self.wiped = True
        import secrets as _random

        from lab.agent.cache import CacheKey
        from lab.common.securemem import SecretBuffer

        log.warning("event=revoked action=wipe reason=%s", reason[:200].replace(" ", "_"))
        try:
            removed = sum(1 for path in self.cache.paths() if self.files.remove(path))  # written one by one
            removed += self.files.sync([])[1]  # and whatever the manifest still lists
        except OSError as exc:
            removed = -1
            log.error("event=revoked_files_failed error=%s", exc)
        old = self.cache
        old.wipe()
        self.cache = SecretCache(old.home, CacheKey(SecretBuffer.from_bytes(_random.token_bytes(32)), "file"), stale_after=old.stale_after)
        self.service.cache = self.cache
        self.sync_status.update(state="revoked", running=False)
        log.warning("event=wiped files_removed=%d home=%s", removed, old.home)

    def redeliver(self) -> None:
        written, removed = self.files.sync(self.cache.records())
        log.info("event=files_synced written=%d removed=%d dir=%s", written, removed, self.files.root)


async def _watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


async def _signals(cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            if sig == signal.SIGHUP:
                continue
            log.info("event=stopping signal=%s", signal.Signals(sig).name)
            sd_notify("STOPPING=1")
            cancel.cancel()
            return


def _lock_home(home: Path) -> int:
    """One agent per home: an exclusive flock on HOME/agent.lock, held until the process exits."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(home / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"another lab-agent (pid {other}) is running with this home", file=str(home)) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def run_agent(config: AgentConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    started = time.monotonic()
    dumps = disable_core_dumps()
    lock_fd = _lock_home(config.home)
    try:
        await _run_locked(config, started, dumps, task_status)
    finally:
        os.close(lock_fd)


async def _run_locked(config: AgentConfig, started: float, dumps: Any, task_status: Any) -> None:
    key = load_or_create_key(config.home, protection=config.key_protection)
    try:
        cache = SecretCache(config.home, key, stale_after=config.stale_after)
    except BaseException:
        key.close()
        raise
    try:
        files = FileDelivery(config.secrets_dir)
        agent = Agent(config, cache, files)
        agent.info.update(
            pid=os.getpid(), key_protection=key.protection, key_locked=key.buffer.locked, dumpable=is_dumpable(),
            home=str(config.home), socket=str(config.socket_path), secrets_dir=str(config.secrets_dir), started_at=time.time(),
        )
        log.info(
            "event=starting home=%s key_protection=%s key_locked=%s not_dumpable=%s core_limit_zero=%s",
            config.home, key.protection, key.buffer.locked, dumps.not_dumpable, dumps.core_limit_zero,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, nursery.cancel_scope)
            await nursery.start(serve, config.socket_path, agent.service)
            log.info("event=listening socket=%s cached=%d after_ms=%.0f", config.socket_path, len(cache.paths()), (time.monotonic() - started) * 1000)
            # The sync code (Noise, the store client: 0.1-0.3 s of imports) loads in a worker thread
            # so that the socket answers from the cache meanwhile instead of waiting for the import.
            await trio.to_thread.run_sync(importlib.import_module, "lab.agent.sync")
            try:
                # In a worker thread: one fsync per file must not hold up answers on the socket.
                agent.info["secrets_fs"] = await trio.to_thread.run_sync(files.prepare)
                await trio.to_thread.run_sync(agent.redeliver)
            except OSError as exc:
                log.error("event=files_failed dir=%s error=%s", config.secrets_dir, exc)
            await nursery.start(sync_loop, agent)
            from lab.agent.sync import checkin_loop  # [identity] renewals and revocation via the coordinator

            from lab.coordinator.migrate import CoordinatorRole  # [migrate] the lab-server role, when this node hosts it

            agent.coordinator_role = CoordinatorRole(config.home)
            await nursery.start(agent.coordinator_role.run)
            await nursery.start(checkin_loop, agent)
            interval = watchdog_interval()
            if interval:
                nursery.start_soon(_watchdog, interval)
            sd_notify("READY=1\nSTATUS=serving from local cache")
            log.info("event=ready after_ms=%.0f", (time.monotonic() - started) * 1000)
            task_status.started(agent)
    finally:
        cache.close()
        if "agent" in locals() and agent.cache is not cache:  # [identity] replaced after a wipe
            agent.cache.close()
        log.info("event=stopped")


def main(config: AgentConfig) -> None:
    configure_logging()
    trio.run(run_agent, config)
