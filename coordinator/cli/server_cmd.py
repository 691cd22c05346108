"""`lab server run` (the coordinator daemon) and `lab server connect|disconnect` (remote CLI).

Registers on ``server_app`` of :mod:`lab.coordinator.cli.app` when imported there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any

import typer
import yaml

from lab.common.errors import ConfigError, LabError
from lab.coordinator.cli.app import Definitions, server_app
from lab.coordinator.engine import SETTINGS_FILE, Paths, _read_settings

DEFAULT_LISTEN = "127.0.0.1:7443"  # = lab.coordinator.daemon.DEFAULT_LISTEN (imported only when used)


def parse_endpoint(text: str) -> tuple[str, int]:
    from lab.common.rpc import parse_endpoint as parse

    return parse(text, 7443)


def _raise_lab_error(group: BaseExceptionGroup[BaseException]) -> None:
    """Raise the LabError that ``group`` holds alone (through nested one-member groups), by itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, LabError):
        raise exc from None


@server_app.command("run")
def server_run(
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve the API on.")] = DEFAULT_LISTEN,
    advertise: Annotated[str | None, typer.Option("--advertise", help="HOST:PORT agents should use (default: the listen address).")] = None,
    definitions: Definitions = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the coordinator daemon: enrollment, check-ins and the API for `lab` (Type=notify)."""
    import logging

    import trio

    from lab.coordinator import daemon

    parse_endpoint(listen)
    if advertise:
        parse_endpoint(advertise)
    daemon.configure_logging(logging.DEBUG if verbose else logging.INFO)
    try:
        trio.run(daemon.run, Paths.resolve(definitions), listen, advertise)
    except BaseExceptionGroup as group:  # a start-up LabError is one line, not a traceback
        _raise_lab_error(group)
        raise


def _write_settings(home, settings: dict) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = home / (SETTINGS_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(settings, sort_keys=True))
    os.replace(tmp, home / SETTINGS_FILE)


@server_app.command("connect")
def server_connect(endpoint: Annotated[str, typer.Argument(help="HOST:PORT of a running `lab server run`.")]) -> None:
    """Make `lab get/show/targets/server add` talk to a coordinator daemon (admin identity in $LAB_HOME)."""
    host, port = parse_endpoint(endpoint)
    paths = Paths.resolve()
    for f in ("admin.key", "admin.cert", "ca.pub"):
        if not (paths.home / f).exists():
            raise ConfigError(f"no {f} here: copy the admin identity from the coordinator's LAB_HOME", str(paths.home / f))
    settings = _read_settings(paths.home)
    settings["server"] = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    _write_settings(paths.home, settings)
    print(f"✓ lab now talks to {settings['server']}")


@server_app.command("disconnect")
def server_disconnect() -> None:
    """Go back to running the engine in-process (local mode)."""
    paths = Paths.resolve()
    settings = _read_settings(paths.home)
    if settings.pop("server", None) is None:
        print("lab already runs locally")
        return
    _write_settings(paths.home, settings)
    print("✓ lab runs the engine locally again")


TARGETS = "ssh"  # `lab server migrate --target`: what exists (kubernetes: not implemented)


def migrate_node_name(to: str | None, target: str | None, host: str | None, name: str | None) -> str:
    """NODE for `lab server migrate`, from ``--to`` or (``--target ssh``) ``--name``, else the first
    DNS label of ``--host``; UsageError (one line) for anything inconsistent."""
    import ipaddress

    from lab.common.errors import UsageError
    from lab.coordinator.state import validate_server_name

    if target is None:
        if host is not None or name is not None:
            raise UsageError("--host and --name are for --target ssh (onboard the node first); --to NODE moves to an enrolled one")
        if not to:
            raise UsageError("where to? pass --to NODE (an enrolled agent) or --target ssh --host H (onboard it first)")
        return to
    if target == "kubernetes":
        raise UsageError(f"--target kubernetes: not implemented (targets: {TARGETS}; or --to NODE, an enrolled agent)")
    if target != "ssh":
        raise UsageError(f"--target {target!r}: unknown (targets: {TARGETS}; kubernetes: not implemented)")
    if not host or host.startswith("-") or not host.isprintable() or any(c.isspace() for c in host):
        raise UsageError("--target ssh needs --host H (the machine's address or DNS name)")
    if to and name and to != name:
        raise UsageError(f"--to {to} and --name {name} disagree: the node is one name (give one of them)")
    node = name or to
    if not node:
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            node = host.split(".", 1)[0].lower()
            try:
                validate_server_name(node)
            except UsageError:
                raise UsageError(f"{node!r} (the first label of --host {host}) is not a server name: pass --name NAME") from None
        else:
            raise UsageError(f"--host {host} is an address: pass --name NAME for the node")
    validate_server_name(node)
    return node


@server_app.command("migrate")
def server_migrate(
    to: Annotated[str | None, typer.Option("--to", help="The enrolled node that becomes the coordinator (its agent pulls the state).")] = None,
    target: Annotated[str | None, typer.Option("--target", help=(
        "ssh: onboard the node over SSH first (--host …) unless it is enrolled, then move to it. "
        "(kubernetes: not implemented.)"))] = None,
    host: Annotated[str | None, typer.Option("--host", help="ssh: address of the machine.")] = None,
    port: Annotated[int, typer.Option("--port", help="SSH port.", min=1, max=65535)] = 22,
    user: Annotated[str, typer.Option("--user", "-u", help="SSH user (root, or one that can write the agent's paths).")] = "root",
    identity: Annotated[str | None, typer.Option("--identity", "-i", help="Private key file (default: ~/.ssh/id_* and ssh-agent).")] = None,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="Trust an unknown host key (printed loudly; recorded in $LAB_HOME/known_hosts).")] = False,
    known_hosts: Annotated[str | None, typer.Option("--known-hosts", hidden=True)] = None,
    name: Annotated[str | None, typer.Option("--name", help=(
        "ssh: the node's server name (default: --to, else the first DNS label of --host)."))] = None,
    server: Annotated[str | None, typer.Option("--server", help=(
        "ssh: coordinator endpoint the node's agent should reach while onboarding (default: the coordinator's own)."))] = None,
    target_root: Annotated[str, typer.Option("--target-root", hidden=True, help="Prefix for every remote path (tests).")] = "",
    service_mode: Annotated[str, typer.Option("--service-mode", hidden=True, help="auto, systemd or process.")] = "auto",
    wheels: Annotated[str | None, typer.Option("--wheelhouse", hidden=True, help="Prebuilt wheels (lab + dependencies).")] = None,
    listen: Annotated[str, typer.Option(
        "--listen", help="HOST:PORT the new coordinator listens on (0.0.0.0: reachable at the node's address).")] = "0.0.0.0:7443",
    serve: Annotated[str, typer.Option("--serve", help=(
        "Local mode with no daemon running: HOST:PORT to serve this home's coordinator on while the move runs "
        "(where the agents check in)."))] = DEFAULT_LISTEN,
    grace: Annotated[float, typer.Option("--grace", help=(
        "Seconds the old coordinator keeps redirecting agents before it stops (sooner once all were redirected)."))] = 120.0,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for NODE to take the state.")] = 180.0,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Move the coordinator to NODE: plan, copy the state over NODE's Noise session, start it
    there, verify it, switch this CLI to it, stop the old one. Agents follow without re-enrolling.
    With --target ssh --host H, NODE is onboarded over SSH first (unless enrolled): one plan, one confirmation."""
    import sys

    import trio

    from lab.common.errors import UsageError
    from lab.coordinator import migrate
    from lab.coordinator.identity_ops import confirm_decision

    node = migrate_node_name(to, target, host, name)
    if target is None and (identity or server or accept_new_host_key or known_hosts or target_root or wheels or port != 22
                           or user != "root" or service_mode != "auto"):
        raise UsageError("--port/--user/--identity/--accept-new-host-key/--server are for --target ssh (onboard the node first)")
    parse_endpoint(listen)
    parse_endpoint(serve)
    if server is not None:
        parse_endpoint(server)
    if grace < 0 or timeout <= 0:
        raise UsageError("--grace must be 0 or more and --timeout more than 0")
    paths = Paths.resolve()
    onboard = None
    onboarding: list[str] = []  # NODE once the onboarding runs (the question then covers both)
    if target is not None:
        from lab.coordinator.migrate.command import Onboard
        from lab.coordinator.providers import ssh

        if service_mode not in ssh.SERVICE_MODES:
            raise UsageError(f"--service-mode must be one of {', '.join(ssh.SERVICE_MODES)}")
        if confirm_decision(yes, sys.stdin.isatty()) == "refuse":  # before anything, the SSH connection included
            raise UsageError("onboarding and moving the coordinator need confirmation: no terminal to ask on, pass --yes "
                             "(nothing changed)")
        assert host is not None
        ssh_host = host

        def run_onboard(endpoint: str, confirm_hook: Callable[[], None]) -> dict[str, Any]:
            from lab.coordinator.cli.onboard_ssh import onboard_ssh

            onboarding.append(node)
            return onboard_ssh(paths, node, ssh_host, port, user, identity, (), server=endpoint,
                               accept_new_host_key=accept_new_host_key, known_hosts=known_hosts, target_root=target_root,
                               service_mode=service_mode, wheels=wheels, yes=yes, confirm=confirm_hook)

        shown = f"[{host}]" if ":" in host else host
        onboard = Onboard(where=f"ssh://{user}@{shown}" + (f":{port}" if port != 22 else ""), host=host, run=run_onboard,
                          server=server)

    def confirm() -> bool:
        decision = confirm_decision(yes, sys.stdin.isatty())
        if decision == "refuse":
            raise UsageError("moving the coordinator needs confirmation: no terminal to ask on, pass --yes (nothing changed)")
        question = f"Onboard {node} and move the coordinator to it?" if onboarding else f"Move the coordinator to {node}?"
        return decision == "go" or typer.confirm(question, default=False)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        result = trio.run(lambda: migrate.run_migration(paths, node, listen, serve_at=serve, grace=grace, timeout=timeout,
                                                         confirm=confirm, say=say, onboard=onboard))
    except BaseExceptionGroup as group:  # one line, not a traceback
        _raise_lab_error(group)
        raise
    print(f"✓ the coordinator now runs on {result['to']}: lab talks to {result['endpoint']}")
