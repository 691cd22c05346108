"""The coordinator daemon (`lab server run`): the RPC API on 7443/tcp.

One root nursery; :func:`serve` follows the ``task_status`` convention. Methods:

* ``enroll`` — sessions without a certificate only (:class:`~lab.coordinator.enrollment.EnrollmentService`);
* ``checkin`` — any enrolled node (its certificate names it);
* ``engine.<method>`` — certificates with the ``admin`` role: the read methods of
  :class:`~lab.coordinator.engine.Engine` in :data:`ENGINE_READ` and the inventory writes in
  :data:`ENGINE_WRITE`, nothing else. Replies ``{"result": …, "warnings": [...]}``;
* ``lifecycle.diff|plan|apply|sync`` — ``admin`` role too: `lab diff|plan|apply|sync server` on the
  daemon's engine and home (coordinator/lifecycle_api.py);
* ``secrets.*`` — ``admin`` role too: definitions, consumers, audit and store list for `lab secret …`
  in a connected home (coordinator/secrets_api.py; values go from the CLI to a store, never here).
* ``onboard.*``, ``tokens.*`` — ``admin`` role too: what `lab onboard` and `lab token` need from the
  coordinator in a connected home (coordinator/onboard_api.py; the SSH work stays in the CLI).

State is SQLite used from the trio thread: each call is short, and the daemon serialises them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from lab.common import rpc, wire
from lab.common.errors import NotFound, UsageError
from lab.common.identity import CertificateAuthority
from lab.coordinator.engine import Engine, Paths, ServerFilter
from lab.coordinator.enrollment import EnrollmentService, ensure_cluster_identity, load_identity, log_event, require_admin

__all__ = ["DEFAULT_LISTEN", "DEFAULT_PORT", "ENGINE_READ", "ENGINE_WRITE", "Coordinator", "parse_endpoint", "sd_notify", "serve"]

DEFAULT_PORT: Final = 7443
DEFAULT_LISTEN: Final = f"127.0.0.1:{DEFAULT_PORT}"
ENGINE_READ: Final = frozenset({
    "get_servers", "get_labels", "get_groups", "get_alerts", "get_secrets",
    "show_server", "show_label", "show_group", "show_alert", "show_secret", "targets_server", "describe_server",
})  # fmt: skip
ENGINE_WRITE: Final = frozenset({"add_server", "set_labels", "remove_server"})
_FILTER_KEYS: Final = ("labels", "groups", "environments", "regions", "exclude")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` → (host, port), default port 7443."""
    return rpc.parse_endpoint(text, DEFAULT_PORT)



def sd_notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Tell systemd (``Type=notify``) e.g. ``READY=1``; False when not under systemd."""
    path = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)
            sock.sendall(message.encode())
        except OSError as exc:
            log_event(logging.WARNING, "daemon.notify_failed", reason=exc.strerror or str(exc))
            return False
    return True


def _plain(value: Any) -> Any:
    """Engine results as wire data (tuples → lists)."""
    return json.loads(json.dumps(value))


def _str_list(body: dict[str, Any], key: str) -> list[str]:
    v = body.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UsageError(f"{key} must be a list of strings")
    return v


class Coordinator:
    """Dispatches requests to the enrollment service and (for admins) the engine."""

    def __init__(self, engine: Engine, enrollment: EnrollmentService) -> None:
        self.engine = engine
        self.enrollment = enrollment

    async def handle(self, peer: rpc.PeerInfo, req: wire.Request) -> dict[str, Any]:
        method = req.method
        if method == "checkin":
            return await self.enrollment.checkin(peer, req)
        migration = getattr(self, "migration", None)  # [migrate] lab.coordinator.migrate.MigrationService
        if migration is not None:
            if method.startswith("migrate."):
                return await migration.handle(peer, method, req.body)
            migration.check_writable(method)  # frozen while the state moves to another node
        if method.startswith("engine."):
            name = method[len("engine."):]
            if name not in ENGINE_READ and name not in ENGINE_WRITE:
                raise NotFound(f"no engine method {name!r}")
            result = self._engine_call(peer, name, req.body)
            if name in ENGINE_WRITE and getattr(self, "identity_ops", None) is not None:  # [secrets] the policy follows the inventory
                from lab.coordinator.cluster import republish_from_daemon

                result["warnings"] += await republish_from_daemon(self.identity_ops)
            return result
        if method == "ping":
            return {"name": self.enrollment.endpoint}
        if method.startswith("identity.") and getattr(self, "identity_ops", None) is not None:  # [identity] issue 6
            return await self.identity_ops.handle(peer, method, req.body)
        if method.startswith("lifecycle."):  # [lifecycle] admin only, checked there: coordinator/lifecycle_api.py
            from lab.coordinator.lifecycle_api import LifecycleService

            return await LifecycleService(self.engine).handle(peer, method, req.body)
        if method.startswith("secrets."):  # [secrets] `lab secret …` from a connected home; admin only, checked there
            from lab.coordinator.secrets_api import handle as secrets_handle

            return await secrets_handle(self, peer, method, req.body)
        if method.startswith(("onboard.", "tokens.")):  # [onboard] `lab onboard|token` from a connected home; admin only, checked there
            from lab.coordinator.onboard_api import handle as onboard_handle

            return await onboard_handle(self, peer, method, req.body)
        raise NotFound(f"no method {method!r}")

    def operator_engine(self, peer: Any, method: str, methods: Any = None) -> Engine:
        """The engine for one operator request: admin role checked, ``method`` one of ``methods``,
        state and definitions reloaded (other `lab` processes may have written them)."""
        require_admin(peer, method)
        if methods is not None and method not in methods:
            raise NotFound(f"no method {method!r}")
        self.engine.reload()
        self.engine.state.warnings.clear()
        return self.engine

    def _engine_call(self, peer: rpc.PeerInfo, name: str, body: dict[str, Any]) -> dict[str, Any]:
        engine = self.operator_engine(peer, f"engine.{name}")
        if name.startswith("get_"):
            flt = ServerFilter(*(tuple(_str_list(body, k)) for k in _FILTER_KEYS))
            result: Any = getattr(engine, name)(flt)
        elif name in ENGINE_READ:
            target = body.get("name")
            if not isinstance(target, str):
                raise UsageError("name must be a string")
            result = getattr(engine, name)(target)
        elif name == "add_server":
            result = engine.add_server(
                body.get("name"), body.get("provider"), _str_list(body, "labels"),
                body.get("environment"), body.get("region"), body.get("size"),
            )  # fmt: skip
        elif name == "set_labels":
            result = engine.set_labels(body.get("name"), _str_list(body, "labels"))
        else:
            result = engine.remove_server(body.get("name"))
        if name in ENGINE_WRITE:
            log_event(logging.INFO, "api.write", name=peer.name, method=name, subject=body.get("name"))
        return {"result": _plain(result), "warnings": list(engine.warnings)}


async def serve(
    paths: Paths,
    listen: str = DEFAULT_LISTEN,
    *,
    advertise: str | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the coordinator API until cancelled; ``started(port)`` once it listens."""
    host, port = parse_endpoint(listen)
    from lab.coordinator.migrate import check_not_moved  # [migrate] a coordinator that moved away stays stopped

    check_not_moved(paths.home)
    ensure_cluster_identity(paths.home)
    ca = CertificateAuthority.load(paths.home / "ca.key")
    from lab.coordinator.identity_ops import ENDPOINT_FILE, RevocationBook  # [identity] the daemon refuses revoked nodes

    book = RevocationBook(paths.home, ca.public_key)
    identity = load_identity(paths.home, "coordinator", book.current)
    engine = Engine.open(paths)
    dns = None
    try:
        for w in engine.warnings:
            log_event(logging.WARNING, "daemon.state_warning", detail=w)
        from lab.coordinator.dns import DnsManager

        dns = DnsManager.from_home(paths.home, audit=engine.state.audit)
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(
                _serve_rpc, host, port, identity, engine, ca, dns, advertise, clock
            )
            from lab.coordinator.pxe.service import serve_configured  # [pxe] DHCP/TFTP/HTTP boot when config.yaml has pxe:

            await nursery.start(serve_configured, paths.home, engine.state)
            log_event(logging.INFO, "daemon.ready", listen=f"{host}:{actual}", ca=ca.fingerprint, dns="on" if dns.enabled else "off")
            _write_endpoint(paths.home / ENDPOINT_FILE, host, actual)  # [identity] where `lab identity …` finds us
            sd_notify("READY=1")
            task_status.started(actual)
    finally:
        (paths.home / "coordinator.endpoint").unlink(missing_ok=True)  # [identity]
        # reverse order of setup; each failure is logged and the rest still runs
        for what, close in (("dns", getattr(dns, "close", None)), ("engine", engine.close), ("ca", ca.close)):
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - shutdown carries on
                log_event(logging.WARNING, "daemon.close_failed", what=what, reason=str(exc))


async def _serve_rpc(
    host: str, port: int, identity: rpc.Identity, engine: Engine, ca: CertificateAuthority, dns: Any,
    advertise: str | None, clock: Callable[[], float], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    holder: dict[str, Coordinator] = {}

    async def handler(peer: rpc.PeerInfo, req: wire.Request) -> dict[str, Any]:
        return await holder["c"].handle(peer, req)

    async def enroll(peer: rpc.EnrollingPeer, req: wire.Request) -> dict[str, Any]:
        if getattr(holder["c"], "migration", None) is not None:  # [migrate] no enrollment while the state moves
            holder["c"].migration.check_writable("enroll")
        return await holder["c"].enrollment.enroll(peer, req)

    async with trio.open_nursery() as nursery:
        actual = await nursery.start(lambda task_status: rpc.serve(
            host, port, identity=identity, handler=handler, enroll_handler=enroll, task_status=task_status
        ))  # fmt: skip
        if advertise:
            endpoint = advertise
        else:
            shown = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
            endpoint = f"[{shown}]:{actual}" if ":" in shown else f"{shown}:{actual}"
        service = EnrollmentService(engine.state, ca, endpoint=endpoint, dns=dns if dns.enabled else None, clock=clock)
        holder["c"] = Coordinator(engine, service)
        # [identity] issue 6: revoke/renew/show, certificates kept per node, renewals at check-in
        from lab.coordinator.identity_ops import IdentityService, RevocationBook, keep_issued

        book = getattr(identity.revocations, "__self__", None)  # serve() passed RevocationBook.current
        if isinstance(book, RevocationBook):
            ops = IdentityService(engine, ca, identity, book, dns=dns if dns.enabled else None,
                                  store_endpoints=service.store_endpoints, clock=clock)
            holder["c"].identity_ops = ops
            service.identity_ops = ops
            service.on_issued = lambda cert: keep_issued(engine.paths.home, cert)
            from lab.coordinator.cluster import republish_from_daemon
            from lab.coordinator.republish import Republisher

            republisher = Republisher(lambda: republish_from_daemon(ops))  # [secrets] a new node reaches the policy
            nursery.start_soon(republisher.run)
            service.after_enroll = republisher.request
        from lab.coordinator.migrate import MigrationService  # [migrate] issue 6: `lab server migrate`

        me = trio.lowlevel.current_task()  # once started, a child of serve()'s nursery: stopping that stops PXE too
        migration = MigrationService(engine, ca, endpoint, stop=lambda: me.parent_nursery.cancel_scope.cancel(),
                                     spawn=nursery.start_soon, clock=clock)
        holder["c"].migration = migration
        service.migration = migration
        from lab.coordinator.migrate.announce import Announcer  # [migrate] where agents that missed a move find us

        announcer = Announcer(engine, ca, identity, service.store_endpoints, clock)
        migration.announce = announcer.publish
        nursery.start_soon(announcer.at_start, endpoint)
        task_status.started(actual)


async def run(paths: Paths, listen: str = DEFAULT_LISTEN, advertise: str | None = None) -> None:
    """`lab server run`: serve until SIGTERM/SIGINT, then shut down cleanly."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def serve_then_stop(task_status: trio.TaskStatus[int]) -> None:
                await serve(paths, listen, advertise=advertise, task_status=task_status)
                log_event(logging.INFO, "daemon.stopping", reason="moved")  # [migrate] serve returns after a move
                nursery.cancel_scope.cancel()

            await nursery.start(serve_then_stop)
            async for signum in signals:
                log_event(logging.INFO, "daemon.stopping", signal=signal.Signals(signum).name)
                sd_notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break


def _write_endpoint(path: Any, host: str, port: int) -> None:
    """[identity] ``HOST:PORT`` a local `lab` connects to (a wildcard listen → loopback)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        path.write_text((f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}") + "\n")
    except OSError as exc:
        log_event(logging.WARNING, "daemon.endpoint_file_failed", reason=exc.strerror or str(exc))


def configure_logging(level: int = logging.INFO) -> None:
    """Structured lines on stderr (journald adds the time when run by systemd)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)

