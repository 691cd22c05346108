"""What every side of the move shares: file names, the `lab-server` label, the one error, the
structured log line, and where a listen address will be reachable."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final

from lab.common.errors import LabError, UsageError

log = logging.getLogger("lab.migrate")

MOVED_FILE: Final = "moved.json"  # in a coordinator home: it moved away; `lab server run` refuses to start there
ORIGIN_FILE: Final = "migrated.json"  # in a coordinator home a migration installed: node, from, at
ROLE_DIR: Final = "coordinator"  # AGENT_HOME/coordinator: the coordinator home an agent hosts
ROLE_FILE: Final = "coordinator-role.yaml"  # AGENT_HOME/coordinator-role.yaml: the role marker (id, listen, advertise)
SERVER_LABEL: Final = "lab-server"
ENDPOINT_FILE: Final = "coordinator.endpoint"  # = identity_ops.ENDPOINT_FILE
DEFAULT_GRACE: Final = 120.0


class MigrationFailed(LabError):
    """One step of the migration failed; the old coordinator stays authoritative."""


def event(level: int, name: str, /, **fields: object) -> None:
    from lab.common.rpc import log_event

    log_event(log, level, name, **fields)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def choose_endpoint(listen: str, addresses: Iterable[str]) -> str:
    """Where agents and the CLI reach the new coordinator: the listen address, or for a wildcard
    listen (0.0.0.0 / ::) the node's first reported non-loopback address (else its first)."""
    from lab.common.rpc import parse_endpoint

    host, port = parse_endpoint(listen, 7443)
    if host not in ("0.0.0.0", "::", ""):
        return host_port(host, port)
    addrs = [a.split("/")[0] for a in addresses if isinstance(a, str) and a]
    if not addrs:
        raise UsageError(f"cannot tell where {listen} will be reachable: the node reported no address; pass --listen HOST:PORT")
    public = [a for a in addrs if not a.startswith("127.") and a != "::1"]
    return host_port((public or addrs)[0], port)

