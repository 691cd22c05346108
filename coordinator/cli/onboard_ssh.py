"""`lab onboard NAME --provider ssh --host H` (spec "Scenario A"; docs/ONBOARDING.md).

:func:`onboard_ssh` does the SSH work from this machine (it has the keys and the wheelhouse); the
coordinator's part — register the server, mint the token, audit, tell when the agent enrolled —
goes through :mod:`lab.coordinator.onboarding`: this home's state in local mode, the daemon's
``onboard.*`` methods in a connected home. The token goes from the coordinator to this process and
from here to the target over SSH (a 0600 file), never through argv or a log.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from lab.common.errors import LabError, UsageError

__all__ = ["onboard_ssh"]


def onboard_ssh(
    paths: Any, name: str, host: str, port: int = 22, user: str = "root", identity: str | None = None,
    labels: Sequence[str] = (), *, environment: str | None = None, region: str | None = None,
    server: str | None = None, accept_new_host_key: bool = False, known_hosts: str | None = None,
    target_root: str = "", service_mode: str = "auto", wheels: str | None = None, yes: bool = False,
    confirm: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Onboard ``name`` at ``host`` over SSH: probe, render, ask (unless ``yes``), install the
    agent, enroll it with the coordinator (``server``, default the home's `server:`), wait for the
    enrollment. ``paths``: this home (:class:`~lab.coordinator.engine.Paths`). ``confirm``: called
    instead of the question (after the render, before any change; it raises to stop), for a
    caller that asks once for more than the onboarding (`lab server migrate --target ssh`). Returns
    ``{"endpoint", "mode", "supervisor_pid", "labels"}``; raises OnboardFailed naming the step."""
    from lab.coordinator.cli import app as base
    from lab.coordinator.cli import onboard_cmd as common
    from lab.coordinator.onboarding import SSH_TOKEN_TTL, open_onboarding
    from lab.coordinator.providers import _asyncssh, ssh
    from lab.coordinator.state import validate_server_name

    say = common._say
    if service_mode not in ssh.SERVICE_MODES:
        raise UsageError(f"--service-mode must be one of {', '.join(ssh.SERVICE_MODES)}")
    validate_server_name(name)
    label_list = list(labels)
    home = paths.home
    endpoint = common._server_endpoint(home, server)
    target = _asyncssh.SshTarget(host, port, user, identity)
    remote_paths = ssh.RemotePaths(target_root)

    with open_onboarding(paths) as backend:
        backend.ready(label_list)

        def audit(action: str, detail: dict[str, Any]) -> None:
            backend.audit(action, name, detail)

        # Step 1: render
        say("Step 1: Render")
        try:
            pinned = common._check_host_key(target, home, accept_new_host_key, known_hosts)
            client = _asyncssh.SshClient.connect(target, pinned)
        except LabError as exc:
            failed = ssh.OnboardFailed("connect", str(exc))
            failed.exit_code = exc.exit_code  # a refused host key or login stays an AuthError's status
            raise failed from exc
        with client:
            r = client.run(ssh.probe_command(), timeout=60)
            if r.rc != 0:
                raise ssh.OnboardFailed("connect", (r.stderr.strip().splitlines() or ["the facts probe failed (is python3 installed?)"])[-1])
            try:
                facts, target_info = ssh.parse_probe(r.stdout)
            except ValueError as exc:
                raise ssh.OnboardFailed("connect", str(exc)) from exc
            mode = service_mode
            if mode == "auto":
                mode = "systemd" if client.run(ssh.commands_for(ssh.Remote(remote_paths, endpoint, name, "x"))["systemd"]).stdout.strip() == "yes" else "process"
            rows = ssh.table_rows(name, host, facts)
            for line in ssh.render_table(rows).splitlines():
                say("  " + line)
            say("\n  Onboarding will:")
            zone = (base._read_settings(home).get("dns") or {}).get("zone")
            for line in ssh.plan_lines(name, dns_zone=zone, labels=label_list):
                say("  " + line)
            say(f"  + Start the agent as a {'systemd unit' if mode == 'systemd' else 'supervised background process'}; it reaches {endpoint}")
            suggestions = ssh.suggest(facts)
            if suggestions:
                say("\n  Detected hardware:")
                for line in ssh.suggestion_lines(suggestions):
                    say("    " + line)
            if not label_list and suggestions:
                say(f"  (suggested: --labels {','.join(s.label for s in suggestions)})")
            local_py = f"{sys.version_info.major}.{sys.version_info.minor}"
            if target_info.get("python", "").rsplit(".", 1)[0] != local_py or target_info.get("machine") != os.uname().machine:
                say(f"  ! the target runs Python {target_info.get('python')} on {target_info.get('machine')}; the shipped dependency wheels are for Python {local_py} on {os.uname().machine}")
            say("")
            if confirm is not None:
                confirm()
            else:
                common._ask("Proceed?", yes)

            # Step 3: apply
            say("Step 3: Apply")
            audit("onboard.start", {"provider": "ssh", "host": host, "port": port, "user": user, "labels": label_list, "mode": mode})
            try:
                say(f"  → SSH into {host} (connected; host key {pinned.split()[0]})")
                house = common.wheelhouse(home, wheels)
                wheel_files = {p.name: p for p in sorted(house.glob("*.whl"))}
                lab_wheel = next(n for n in wheel_files if n.startswith("lab-"))
                backend.register(name, "ssh", label_list, environment, region)

                def mint() -> str:
                    return backend.mint(name, label_list, environment, region, SSH_TOKEN_TTL)

                def wait_enrolled() -> bool:
                    deadline = time.monotonic() + common.WAIT_ENROLLED_S
                    while time.monotonic() < deadline:
                        if (backend.server(name) or {}).get("enrolled_at"):
                            return True
                        time.sleep(0.5)
                    return False

                unit = common._repo_root() / "packaging" / "systemd" / "lab-agent.service" if mode == "systemd" else None
                run = ssh.Onboarding(
                    client, ssh.Remote(remote_paths, endpoint, name, lab_wheel, mode), wheel_files, mint, wait_enrolled, audit, say,
                    unit_template=unit.read_text() if unit is not None else None, inject_failure=os.environ.get(common.INJECT_ENV) or None,
                )  # fmt: skip
                result = run.apply()
            except LabError as exc:
                step = getattr(exc, "step", "apply")
                audit("onboard.failed", {"step": step, "why": getattr(exc, "why", str(exc))})
                raise
        audit("onboard.done", {"mode": mode, "supervisor_pid": result["supervisor_pid"]})
        s = backend.server(name) or {}
    enrolled_labels = list(s.get("labels") or [])
    say(f"  → Identity established: {name} enrolled with {endpoint} (labels: {','.join(enrolled_labels) or 'none'})")
    if result["supervisor_pid"]:
        say(f"  → Agent supervisor pid {result['supervisor_pid']} (pidfile {remote_paths.pidfile}, log {remote_paths.log})")
    say("  → Machine managed: `lab get servers` shows it")
    return {"endpoint": endpoint, "mode": mode, "supervisor_pid": result["supervisor_pid"], "labels": enrolled_labels}
