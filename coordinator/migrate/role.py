"""The target agent's side of the move: the coordinator role it hosts (a supervised
``lab server run`` child), and what it does with a check-in reply (stores, the redirect, the
migrate instruction, an abort), keeping enrollment.yaml current."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from lab.common.errors import LabError, NotEntitled, RemoteProtocolError, StateError
from lab.coordinator.migrate._base import ENDPOINT_FILE, MOVED_FILE, ROLE_DIR, ROLE_FILE, event
from lab.coordinator.migrate.bundle import Bundle, decode_bundle_untrusted, install_bundle

_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>


def _lab_argv() -> list[str]:
    exe = Path(sys.executable).parent / "lab"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from lab.coordinator.cli import main; main()"]


class CoordinatorRole:
    """``AGENT_HOME/coordinator`` served by a supervised ``lab server run`` child while the role
    marker ``AGENT_HOME/coordinator-role.yaml`` exists: restarted when it dies (backoff), started
    again when the agent starts; stopped for good when it moved away (``moved.json``). The child
    is bound to the agent (PR_SET_PDEATHSIG): an agent killed outright takes it along, so no
    coordinator is left serving without its supervisor."""

    def __init__(self, home: Path) -> None:
        import trio

        self.home = Path(home)
        self.dir = self.home / ROLE_DIR
        self.marker = self.home / ROLE_FILE
        self._wake = trio.Event()
        self._scope: Any = None
        self.state = "off"
        self.pid: int | None = None

    def role(self) -> dict[str, Any] | None:
        try:
            doc = yaml.safe_load(self.marker.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("listen"), str) else None

    async def install(self, bundle: Bundle, listen: str, advertise: str) -> None:
        """Replace the served home with ``bundle`` (a running child is stopped first) and start it."""
        import trio

        self.marker.unlink(missing_ok=True)  # the supervisor must not restart the child meanwhile
        self.stop_child()
        while self.state in ("starting", "running"):
            await trio.sleep(0.05)
        await trio.to_thread.run_sync(self._install_files, bundle, listen, advertise)
        self.state = "installed"
        self._wake.set()

    def _install_files(self, bundle: Bundle, listen: str, advertise: str) -> None:
        from lab.common.identity import write_private_file

        install_bundle(bundle, self.dir)
        (self.dir / ENDPOINT_FILE).unlink(missing_ok=True)
        doc = {"id": bundle.id, "listen": listen, "advertise": advertise, "from": bundle.source}
        write_private_file(self.marker, yaml.safe_dump(doc, sort_keys=True).encode(), overwrite=True)

    def remove(self, id: str | None = None) -> bool:
        """Drop an (aborted) role: stop the child, remove the marker and the home it served."""
        role = self.role()
        if role is None or (id is not None and role.get("id") != id):
            return False
        self.marker.unlink(missing_ok=True)
        self.stop_child()
        if not (self.dir / MOVED_FILE).exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        event(logging.WARNING, "coordinator_role.removed", id=id)
        return True

    def stop_child(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def wait_ready(self, timeout: float) -> None:
        import trio

        with trio.move_on_after(timeout):
            while not (self.dir / ENDPOINT_FILE).exists():
                if self.state.startswith("exited"):
                    raise StateError(f"the coordinator child {self.state}; see {self.dir / 'coordinator.log'}")
                await trio.sleep(0.1)
            return
        raise StateError(f"the coordinator child was not ready after {timeout:g} s; see {self.dir / 'coordinator.log'}")

    async def run(self, task_status: Any = None) -> None:
        import trio

        if task_status is not None:
            task_status.started()
        delay = 0.5  # the first restart after 1 s, then doubling up to 30 s (reset after a minute up)
        while True:
            role = self.role()
            if role is None or (self.dir / MOVED_FILE).exists():
                if role is not None:  # moved away: the role ends here
                    self.marker.unlink(missing_ok=True)
                    event(logging.INFO, "coordinator_role.moved_away", home=self.dir)
                self.state = "off"
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            started = trio.current_time()
            try:
                code = await self._run_child(role)
            except (LabError, OSError) as exc:  # never take the agent down with its role
                self.state = f"exited: cannot start ({str(exc)[:200]})"
                event(logging.ERROR, "coordinator_role.start_failed", reason=str(exc)[:200])
                code = -1
            if self.role() is None or (self.dir / MOVED_FILE).exists():
                continue
            if code is None:  # stopped by us to (re)install
                continue
            delay = 1.0 if trio.current_time() - started > 60 else min(delay * 2, 30.0)
            event(logging.WARNING, "coordinator_role.exited", code=code, restart_in=delay)
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _run_child(self, role: Mapping[str, Any]) -> int | None:
        import trio

        argv = [*_lab_argv(), "server", "run", "--listen", str(role["listen"])]
        if isinstance(role.get("advertise"), str):
            argv += ["--advertise", role["advertise"]]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LAB_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env.update(LAB_HOME=str(self.dir), PYTHONUNBUFFERED="1")
        (self.dir / ENDPOINT_FILE).unlink(missing_ok=True)
        logf = os.open(self.dir / "coordinator.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

        async def terminate(proc: subprocess.Popen[bytes]) -> None:
            proc.terminate()
            with trio.move_on_after(10):
                await _exited(proc)
                return
            proc.kill()
            await _exited(proc)

        self._scope = trio.CancelScope()
        self.state = "starting"
        try:
            with self._scope:
                # Popen here, in the loop's thread, not in a worker thread (trio.lowlevel.open_process):
                # the death signal follows the *thread* that forked, and idle workers exit
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        preexec_fn=_dies_with(os.getpid()))
                self.pid, self.state = proc.pid, "running"
                event(logging.INFO, "coordinator_role.started", pid=proc.pid, listen=role["listen"], home=self.dir)
                try:
                    code = await _exited(proc)
                except trio.Cancelled:
                    with trio.CancelScope(shield=True):
                        await terminate(proc)
                    raise
                self.state = f"exited with status {code}"
                return int(code)
            return None
        finally:
            os.close(logf)
            self._scope, self.pid = None, None
            if self.state in ("starting", "running"):
                self.state = "stopped"


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its agent dies, however it dies (SIGKILL
    included), so that no coordinator is left running without its supervisor (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)  # cannot be bound to the agent, or it already died between fork and prctl

    return preexec


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for ``proc`` to exit without a thread: its pidfd becomes readable (else poll)."""
    import trio

    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel, or already reaped)
        while proc.poll() is None:
            await trio.sleep(0.2)
        return proc.returncode
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    return proc.wait()


async def on_checkin_reply(agent: Any, home: Path, coordinator: str, reply: Mapping[str, Any]) -> str | None:
    """The agent's side of a check-in reply: keep ``stores`` current in enrollment.yaml, follow a
    ``moved_to`` redirect (after a successful check-in there), carry out a ``migrate`` instruction,
    drop an aborted role. Returns the coordinator endpoint to use from now on when it changed."""
    from lab.agent.sync import ENROLLMENT_FILE

    stores = reply.get("stores")
    if isinstance(stores, list) and stores and all(isinstance(s, str) for s in stores):
        try:
            _update_enrollment(home / ENROLLMENT_FILE, stores=list(stores))
        except OSError as exc:
            event(logging.WARNING, "checkin.enrollment_not_updated", reason=exc.strerror or str(exc))
    role: CoordinatorRole | None = getattr(agent, "coordinator_role", None)
    abort = reply.get("migrate_abort")
    if isinstance(abort, str) and role is not None:
        role.remove(abort)
    instr = reply.get("migrate")
    if isinstance(instr, dict) and role is not None:
        await _carry_out(agent, role, home, coordinator, instr)
    moved = reply.get("moved_to")
    if isinstance(moved, str) and moved and moved != coordinator:
        return moved if await switch_coordinator(home, coordinator, moved, via="redirect") else None
    return None


async def switch_coordinator(home: Path, old: str, new: str, *, via: str, **record: Any) -> bool:
    """Follow the coordinator from ``old`` to ``new`` (a check-in redirect, or the stores'
    announcement): check in there first — it must answer as coordinator of our CA — then point
    enrollment.yaml at it (atomically), with ``record`` (e.g. the announcement's version)."""
    from lab.agent.sync import ENROLLMENT_FILE, checkin_once
    from lab.common.rpc import parse_endpoint

    try:
        parse_endpoint(new, 7443)
        await checkin_once(home, new)
    except (LabError, OSError) as exc:
        event(logging.WARNING, "checkin.redirect_unreachable", coordinator=new, via=via, reason=str(exc)[:200])
        return False
    try:
        _update_enrollment(home / ENROLLMENT_FILE, coordinator=new, **record)
    except OSError as exc:  # followed for this run; the next start finds it again the same way
        event(logging.WARNING, "checkin.enrollment_not_updated", reason=exc.strerror or str(exc))
    event(logging.INFO, "checkin.coordinator_moved", old=old, new=new, via=via)
    return True


def _update_enrollment(path: Path, **changes: Any) -> None:
    from lab.common.identity import write_private_file

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(doc, dict) or all(doc.get(k) == v for k, v in changes.items()):
        return
    doc.update(changes)
    mode = path.stat().st_mode & 0o777
    write_private_file(path, yaml.safe_dump(doc, sort_keys=False).encode(), overwrite=True)
    os.chmod(path, mode)


async def _carry_out(agent: Any, role: CoordinatorRole, home: Path, coordinator: str, instr: Mapping[str, Any]) -> None:
    """Fetch the bundle, install it, start the role, report ready (or why not)."""
    from lab.common import rpc
    from lab.store.node import load_home_identity

    id, listen, advertise = instr.get("id"), instr.get("listen"), instr.get("advertise")
    if not all(isinstance(x, str) and x for x in (id, listen, advertise)):
        event(logging.WARNING, "migrate.bad_instruction")
        return
    identity = load_home_identity(home)
    host, port = rpc.parse_endpoint(coordinator, 7443)

    async def call(method: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        async with rpc.connect(host, port, identity=identity, timeout=10) as conn:
            if "coordinator" not in conn.peer.roles:
                raise NotEntitled(f"{coordinator} is not the coordinator")
            out: dict[str, Any] = await conn.call(method, body, timeout=timeout)
            return out

    current = role.role()
    try:
        if current is None or current.get("id") != id or role.state.startswith("exited"):
            reply = await call("migrate.fetch", {"id": id})
            bundle = decode_bundle_untrusted(reply.get("bundle"), identity.ca_public_key)
            if bundle.id != id or bundle.node != identity.certificate.name:
                raise RemoteProtocolError("bundle: for another migration or node")
            await role.install(bundle, listen, advertise)
            event(logging.INFO, "migrate.installed", id=id, home=role.dir, files=len(bundle.files))
        await role.wait_ready(60)
        await call("migrate.ready", {"id": id, "endpoint": advertise})
        event(logging.INFO, "migrate.reported_ready", id=id, endpoint=advertise)
    except (LabError, OSError) as exc:
        reason = f"{type(exc).__name__}: {str(exc)[:250]}"
        event(logging.WARNING, "migrate.node_failed", id=id, reason=reason)
        role.remove(id)
        try:
            await call("migrate.failed", {"id": id, "reason": reason}, timeout=10)
        except (LabError, OSError):
            pass

