"""`lab server run` (the coordinator daemon) and `lab server connect|disconnect` (remote CLI).

Registers on ``server_app`` of :mod:`lab.coordinator.cli.app` when imported there.
"""

from __future__ import annotations

import os
from typing import Annotated

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


@server_app.command("migrate")
def server_migrate(
    to: Annotated[str, typer.Option("--to", help="The enrolled node that becomes the coordinator (its agent pulls the state).")],
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
    there, verify it, switch this CLI to it, stop the old one. Agents follow without re-enrolling."""
    import sys

    import trio

    from lab.common.errors import UsageError
    from lab.coordinator import migrate
    from lab.coordinator.identity_ops import confirm_decision

    parse_endpoint(listen)
    parse_endpoint(serve)
    if grace < 0 or timeout <= 0:
        raise UsageError("--grace must be 0 or more and --timeout more than 0")
    paths = Paths.resolve()

    def confirm() -> bool:
        decision = confirm_decision(yes, sys.stdin.isatty())
        if decision == "refuse":
            raise UsageError("moving the coordinator needs confirmation: no terminal to ask on, pass --yes (nothing changed)")
        return decision == "go" or typer.confirm(f"Move the coordinator to {to}?", default=False)

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        result = trio.run(lambda: migrate.run_migration(paths, to, listen, serve_at=serve, grace=grace, timeout=timeout,
                                                         confirm=confirm, say=say))
    except BaseExceptionGroup as group:  # one line, not a traceback
        _raise_lab_error(group)
        raise
    print(f"✓ the coordinator now runs on {result['to']}: lab talks to {result['endpoint']}")
