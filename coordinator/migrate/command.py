"""The CLI's side of the move, `lab server migrate --to NODE` (and `--target ssh --host H`, which
onboards NODE over SSH first): the plan text, driving the old and the new coordinator step by
step (aborting on any failure before the switch), and the config switch."""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lab.common.errors import LabError, StateError, UsageError
from lab.coordinator.migrate._base import ENDPOINT_FILE, SERVER_LABEL, MigrationFailed, host_port


def render_plan(plan: Mapping[str, Any], home: str) -> str:
    """The plan as the operator reads it before saying yes."""
    src = plan.get("from_node") or f"local ({home})"
    lines = [
        "Plan",
        f"  ~ migrate lab-server from {src} ({plan['from_endpoint']}) to {plan['to']}",
        f"  + {plan['to']} pulls the state over its Noise session: {plan['servers']} servers, {plan['tokens']} tokens, "
        f"{plan['audit']} audit entries, {plan['certificates']} certificates, CA {plan['ca'][:16]}…",
        f"  + start the coordinator role on {plan['to']}, listening on {plan['listen']}; it answers at {plan['endpoint']}",
        f"  + verify {plan['endpoint']} answers as coordinator with the same CA and inventory",
        f"  + label {plan['to']} {SERVER_LABEL}" + (f", unlabel {plan['from_node']}" if plan.get("from_node") else ""),
        f"  + CLI config ({home}/config.yaml): server: {plan['endpoint']}",
        f"  - stop the old coordinator once every agent learnt the new endpoint (at most {plan['grace']:g} s)",
    ]
    return "\n".join(lines)


def render_onboard_plan(to: str, where: str, agent_endpoint: str, listen: str, old: str, status: Mapping[str, Any],
                        home: str, grace: float, servers: int | None = None) -> str:
    """The migration half of the plan for `--target ssh`, shown (after the onboarding's render)
    before the one confirmation: NODE is not enrolled yet, so the counts come after onboarding."""
    from lab.common.rpc import parse_endpoint

    src = status.get("node") or f"local ({home})"
    host, port = parse_endpoint(listen, 7443)
    endpoint = f"{to}'s first non-loopback address, port {port}" if host in ("0.0.0.0", "::", "") else host_port(host, port)
    ca = str(status.get("ca") or "")
    lines = [
        "Plan (onboard, then move the coordinator)",
        f"  + onboard {to} over {where}: install the lab agent, enroll it with {agent_endpoint} (above)",
        f"  ~ migrate lab-server from {src} ({old}) to {to}",
        f"  + {to} pulls the state over its Noise session: {'?' if servers is None else servers} servers (with {to}), tokens, "
        f"audit entries, certificates, CA {ca[:16]}…",
        f"  + start the coordinator role on {to}, listening on {listen}; it answers at {endpoint}",
        "  + verify it answers as coordinator with the same CA and inventory",
        f"  + label {to} {SERVER_LABEL}" + (f", unlabel {status['node']}" if status.get("node") else ""),
        f"  + CLI config ({home}/config.yaml): server: the new endpoint",
        f"  - stop the old coordinator once every agent learnt the new endpoint (at most {grace:g} s)",
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Onboard:
    """`--target ssh`: onboard NODE before the move unless it is enrolled already.

    ``run(endpoint, confirm)`` onboards it (sync, run in a worker thread; the agent is told to
    reach ``endpoint``) and calls ``confirm()`` once its render is shown, before it changes
    anything (coordinator/cli/onboard_ssh.py ``onboard_ssh``). ``where``: "ssh://user@host:port"
    for the plan; ``host``: the address, to tell a loopback coordinator it cannot reach;
    ``server``: the coordinator endpoint the agent should reach when given (--server)."""

    where: str
    host: str
    run: Callable[[str, Callable[[], None]], Any]
    server: str | None = None


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def switch_config(home: Path, endpoint: str) -> None:
    """``server: ENDPOINT`` in ``home/config.yaml`` (atomic: temp, fsync, rename)."""
    from lab.common.identity import write_private_file
    from lab.coordinator.engine import _read_settings

    settings = _read_settings(Path(home))
    settings["server"] = endpoint
    write_private_file(Path(home) / "config.yaml", yaml.safe_dump(settings, sort_keys=True).encode(), overwrite=True)



async def _call(endpoint: str, identity: Any, method: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    from lab.common import rpc
    from lab.common.errors import AuthError

    host, port = rpc.parse_endpoint(endpoint, 7443)
    async with rpc.connect(host, port, identity=identity, timeout=5) as conn:
        if "coordinator" not in conn.peer.roles:
            raise AuthError(f"{endpoint} is {conn.peer.name!r}, not a coordinator")
        out: dict[str, Any] = await conn.call(method, body, timeout=timeout)
        return out


async def _answers(endpoint: str, identity: Any) -> bool:
    try:
        await _call(endpoint, identity, "ping", {}, timeout=5)
    except (LabError, OSError):
        return False
    return True


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


async def run_migration(
    paths: Any, to: str, listen: str, *, serve_at: str, grace: float, timeout: float,
    confirm: Callable[[], bool], say: Callable[[str], None], onboard: Onboard | None = None,
) -> dict[str, Any]:
    """`lab server migrate --to NODE`: against the daemon this home talks to (config.yaml
    ``server:``, or a running local `lab server run`), else a daemon served in-process at
    ``serve_at`` for the duration (local mode). With ``onboard`` (`--target ssh`) NODE is
    onboarded first unless it is enrolled, against the same coordinator (one plan, one
    confirmation). MigrationFailed names the step that failed."""
    import trio

    from lab.coordinator.engine import _read_settings
    from lab.coordinator.enrollment import load_identity

    home = Path(paths.home)
    identity = load_identity(home, "admin")
    server = _read_settings(home).get("server")
    old: str | None = server if isinstance(server, str) and server else None
    if old is None:
        try:
            local = (home / ENDPOINT_FILE).read_text().strip()
        except OSError:
            local = ""
        if local and await _answers(local, identity):
            old = local
    async with trio.open_nursery() as nursery:
        served = trio.Event()
        if old is None:  # local mode, no daemon: serve one in-process while the move runs
            from lab.coordinator import daemon

            async def serve_task(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await daemon.serve(paths, serve_at, task_status=task_status)
                finally:
                    served.set()

            try:
                port = await nursery.start(serve_task)
            except (LabError, OSError) as exc:
                raise MigrationFailed(f"serving the local coordinator at {serve_at} failed: {_why(exc)}; nothing changed") from None
            host = serve_at.rsplit(":", 1)[0].strip("[]")
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            old = host_port(host, port)
            say(f"→ local mode: serving this home's coordinator at {serve_at} until the move is done")
        else:
            served.set()
        try:
            confirmed = False
            if onboard is not None:
                confirmed = await _onboard_first(home, old, server is not None and old == server, identity, to, listen,
                                                 grace, onboard, confirm, say)
            result = await _drive(home, old, identity, to, listen, grace, timeout, confirm, say, confirmed=confirmed)
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        if not served.is_set():
            say(f"→ waiting for the agents to learn the new endpoint (at most {grace:g} s)")
            await served.wait()
            result["old_stopped"] = True
        else:
            deadline = trio.current_time() + grace + 15
            while trio.current_time() < deadline and await _answers(old, identity):
                await trio.sleep(0.5)
            result["old_stopped"] = not await _answers(old, identity)
        say("✓ the old coordinator stopped" if result["old_stopped"]
            else f"⚠ the old coordinator at {old} still answers; it stops by itself once its agents moved")
    return result


class _Declined(Exception):
    """The confirmation inside the onboarding said no (or could not ask): carries what to raise."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


async def _onboard_first(home: Path, old: str, connected: bool, identity: Any, to: str, listen: str, grace: float,
                         onboard: Onboard, confirm: Callable[[], bool], say: Callable[[str], None]) -> bool:
    """Onboard ``to`` over SSH with the coordinator at ``old`` unless it is enrolled there.
    True when the one confirmation (covering the move as well) was given here."""
    import trio

    from lab.common.rpc import parse_endpoint

    try:
        reply = await _call(old, identity, "onboard.status", {"name": to})  # {"result": {server, endpoint, …}, "warnings"}
        status = reply.get("result") if isinstance(reply.get("result"), dict) else {}
        moving = await _call(old, identity, "migrate.status", {})
    except (LabError, OSError) as exc:
        raise MigrationFailed(f"asking the coordinator {old} about {to} failed: {_why(exc)}; nothing changed") from None
    if moving.get("moved_to"):
        raise MigrationFailed(f"the coordinator {old} already moved to {moving['moved_to']}; nothing changed")
    server = status.get("server") if isinstance(status.get("server"), dict) else None
    if server is not None and server.get("enrolled_at"):
        say(f"→ {to} is already enrolled: no onboarding, only the move")
        return False
    agent_endpoint = onboard.server or (old if connected else str(status.get("endpoint") or old))
    ep_host = parse_endpoint(agent_endpoint, 7443)[0]
    if _loopback(ep_host) and not _loopback(onboard.host):
        raise UsageError(f"{onboard.host} cannot reach the coordinator at {agent_endpoint} (loopback): pass --server HOST:PORT "
                         f"that {onboard.host} reaches (local mode with no daemon: and --serve ADDR:PORT to listen there, "
                         "or start `lab server run --listen ADDR` first); nothing changed")
    say(f"→ onboarding {to} over {onboard.where} first (its agent will reach the coordinator at {agent_endpoint})")

    def confirm_both() -> None:  # in the onboarding's thread, after its render, before it changes anything
        count = moving.get("servers")
        count = count + (server is None) if isinstance(count, int) else None
        say(render_onboard_plan(to, onboard.where, agent_endpoint, listen, old, moving, str(home), grace, count))
        try:
            ok = confirm()
        except BaseException as exc:  # noqa: BLE001 - handed back as is
            raise _Declined(exc) from None
        if not ok:
            raise _Declined(UsageError(f"not migrated; {to} was not onboarded, nothing changed"))

    try:
        await trio.to_thread.run_sync(onboard.run, agent_endpoint, confirm_both)
    except _Declined as declined:
        raise declined.error from None
    except (LabError, OSError) as exc:
        raise MigrationFailed(f"onboarding {to} over {onboard.where} failed: {_why(exc)}; the coordinator at {old} "
                              "stays authoritative, nothing was moved (rerun the same command when fixed)") from None
    say(f"→ {to} is onboarded; moving the coordinator to it")
    return True


async def _drive(home: Path, old: str, identity: Any, to: str, listen: str, grace: float, timeout: float,
                 confirm: Callable[[], bool], say: Callable[[str], None], *, confirmed: bool = False) -> dict[str, Any]:
    import trio

    try:
        plan = await _call(old, identity, "migrate.plan", {"to": to, "listen": listen, "grace": grace})
    except (LabError, OSError) as exc:
        done = f"the coordinator is unchanged ({to} stays onboarded: rerun the same command)" if confirmed else "nothing changed"
        raise MigrationFailed(f"plan failed: {_why(exc)} (coordinator {old}); {done}") from None
    if confirmed:  # the plan was shown and confirmed before the onboarding: the counts, now known
        say(f"→ plan: {plan['to']} pulls {plan['servers']} servers, {plan['tokens']} tokens, {plan['audit']} audit entries, "
            f"{plan['certificates']} certificates, CA {plan['ca'][:16]}…; it will answer at {plan['endpoint']}")
    else:
        say(render_plan(plan, str(home)))
        if not await trio.to_thread.run_sync(confirm):
            raise UsageError("not migrated")
    try:
        started = await _call(old, identity, "migrate.start", {"to": to, "listen": listen})
    except (LabError, OSError) as exc:
        raise MigrationFailed(f"start failed: {_why(exc)}; nothing changed") from None
    id, endpoint = started["id"], started["endpoint"]
    step = f"waiting for {to}"
    try:
        say(f"→ waiting for {to} to check in and take the state (at most {timeout:g} s)")
        deadline = trio.current_time() + timeout
        while True:
            p = (await _call(old, identity, "migrate.status", {})).get("pending") or {}
            if p.get("id") != id:
                raise StateError("another migration replaced this one")
            if p.get("stage") == "ready":
                break
            if p.get("stage") == "failed":
                raise StateError(str(p.get("error")))
            if trio.current_time() > deadline:
                raise StateError(f"{to} did not take the state within {timeout:g} s (is its agent running and "
                                 f"checking in? stage: {p.get('stage')})")
            await trio.sleep(0.3)
        say(f"→ {to} took the state and serves the coordinator at {endpoint}")
        step = f"verifying {endpoint}"
        deadline = trio.current_time() + 30
        while True:
            try:
                new = await _call(endpoint, identity, "migrate.status", {})
                break
            except (LabError, OSError):
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.3)
        if not hmac.compare_digest(str(new.get("ca")), str(plan["ca"])):
            raise StateError(f"it holds CA {str(new.get('ca'))[:16]}…, not {plan['ca'][:16]}…")
        if new.get("servers") != plan["servers"] or new.get("node") != to:
            raise StateError(f"it has {new.get('servers')} servers on {new.get('node')}, expected {plan['servers']} on {to}")
        say(f"→ verified: {endpoint} answers as coordinator, CA {plan['ca'][:16]}…, {plan['servers']} servers")
        step = f"labelling {to} {SERVER_LABEL}"
        await _call(endpoint, identity, "migrate.adopt", {"node": to, "previous": plan.get("from_node")})
        step = "switching the CLI config"
        switch_config(home, endpoint)
    except (LabError, OSError) as exc:
        try:
            await _call(old, identity, "migrate.abort", {"id": id, "reason": f"{step}: {_why(exc)}"[:300]}, timeout=10)
        except (LabError, OSError):
            pass
        raise MigrationFailed(f"{step} failed: {_why(exc)}; the old coordinator at {old} stays authoritative "
                              "(migration aborted; rerun it when fixed)") from None
    except BaseException:  # interrupted (Ctrl-C): do not leave the old coordinator frozen
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await _call(old, identity, "migrate.abort", {"id": id, "reason": f"{step}: interrupted"}, timeout=5)
            except (LabError, OSError):
                pass
        raise
    say(f"→ CLI config: server: {endpoint}")
    try:
        await _call(old, identity, "migrate.finish", {"id": id, "endpoint": endpoint, "grace": grace}, timeout=10)
    except (LabError, OSError) as exc:
        say(f"⚠ the old coordinator did not take the stop ({_why(exc)}): stop it yourself; {endpoint} is authoritative")
    return {"from": old, "from_node": plan.get("from_node"), "to": to, "endpoint": endpoint, "id": id,
            "servers": plan["servers"], "ca": plan["ca"]}
