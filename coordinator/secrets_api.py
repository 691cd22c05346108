"""The coordinator daemon's ``secrets.*`` methods: what `lab secret …` needs from the coordinator
when it runs in a connected home (`lab server connect`, or a laptop after `lab server migrate`).

Certificates with the ``admin`` role only, checked first for every method (default deny). None of
them sees a value: the CLI writes values straight to a store over Noise with its admin identity
(coordinator/cluster.py ``store_call``), and the stores check that role again. Replies
``{"result": …, "warnings": [...]}`` like ``engine.*``; every result carries ``stores``, the
endpoints the daemon knows (its config.yaml ``stores:``, then the enrolled ``secret-store`` nodes'):

* ``secrets.stores`` → ``{stores}``;
* ``secrets.definition {path}`` → ``{definition, consumers, stores}``: the definition as
  :func:`secret_to_wire` (None when undefined) and ``[[label, [servers]]]`` granting it;
* ``secrets.consumers`` → ``{consumers, stores}``: per label, its machines and secrets
  (`lab secret status --store`);
* ``secrets.audit {stored}`` → ``{findings, warnings, stores}``: `lab secret audit` for the stored
  paths the CLI read from a store (``store.meta``: names, never values);
* ``secrets.publish`` → ``{version, stores, unreachable}``: compile, sign and publish the policy
  (`lab secret recover`, with the daemon's coordinator identity).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

from lab.common.config.model import Secret
from lab.common.errors import ConfigError, LabError, RemoteProtocolError, UsageError

__all__ = ["METHODS", "daemon_stores", "handle", "secret_from_wire", "secret_to_wire"]

METHODS: Final = frozenset({"secrets.stores", "secrets.definition", "secrets.consumers", "secrets.audit", "secrets.publish"})
MAX_STORED: Final = 1 << 18  # paths in one `secrets.audit` (the wire's own item cap)
_WIRE_FIELDS: Final = {  # Secret field → accepted types (None allowed where the definition allows it)
    "path": (str,), "type": (str,), "generator": (str, type(None)), "rotate_every": (int, type(None)),
    "per_machine": (bool,), "owner": (str,), "group": (str,), "mode": (int,), "set_by": (str, type(None)),
    "ttl": (int, type(None)),
}


def secret_to_wire(s: Secret) -> dict[str, Any]:
    """A secret's definition as wire data (no file location, no description)."""
    return {k: getattr(s, k) for k in _WIRE_FIELDS}


def secret_from_wire(data: Any) -> Secret:
    """The strict inverse of :func:`secret_to_wire`; RemoteProtocolError for anything else."""
    if not isinstance(data, dict) or set(data) != set(_WIRE_FIELDS):
        raise RemoteProtocolError("malformed secret definition from the coordinator")
    for k, types in _WIRE_FIELDS.items():
        v = data[k]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise RemoteProtocolError(f"malformed secret definition from the coordinator ({k})")
    return Secret(**data)


def daemon_stores(coordinator: Any) -> list[str]:
    """The stores the daemon knows: config.yaml ``stores:`` first, then the enrolled store nodes'
    reported endpoints (the list the daemon republishes to, :meth:`IdentityService.stores`)."""
    ops = getattr(coordinator, "identity_ops", None)
    if ops is not None:
        return list(ops.stores())
    from lab.coordinator.cluster import configured_stores

    try:
        configured = configured_stores(coordinator.engine.paths.home)
    except ConfigError:
        configured = []
    return list(dict.fromkeys([*configured, *coordinator.enrollment.store_endpoints()]))


def _stored(body: dict[str, Any]) -> dict[str, bool]:
    v = body.get("stored")
    if not isinstance(v, list) or len(v) > MAX_STORED or not all(isinstance(p, str) and len(p) <= 600 for p in v):
        raise UsageError("stored must be a list of secret paths")
    return dict.fromkeys(v, True)


async def handle(coordinator: Any, peer: Any, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One ``secrets.*`` request on the daemon's engine (``coordinator``: the daemon's Coordinator)."""
    from lab.coordinator.cli import secret_cmd
    from lab.coordinator.enrollment import log_event

    engine = coordinator.operator_engine(peer, method, METHODS)
    result: dict[str, Any] = {}
    if method == "secrets.definition":
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise UsageError("path must be a secret path")
        defined = engine.definitions.secrets.get(path)
        result["definition"] = secret_to_wire(defined) if defined is not None else None
        result["consumers"] = engine.fleet().secret_consumers(path) if defined is not None else []
    elif method == "secrets.consumers":
        result["consumers"] = secret_cmd.consumers_per_label(engine)
    elif method == "secrets.audit":
        result.update(secret_cmd.audit_result(engine, _stored(body)))
    elif method == "secrets.publish":
        result.update(await _publish(coordinator))
        log_event(logging.INFO, "api.write", name=peer.name, method=method, subject=result.get("version"))
    result["stores"] = daemon_stores(coordinator)
    return {"result": json.loads(json.dumps(result)), "warnings": list(engine.warnings)}


async def _publish(coordinator: Any) -> dict[str, Any]:
    """Compile, sign and publish the policy and the store directory to every store the daemon knows."""
    import time

    from lab.coordinator.cluster import store_directory
    from lab.coordinator.identity_ops import compile_policy_doc, publish_everywhere

    ops = getattr(coordinator, "identity_ops", None)
    stores = daemon_stores(coordinator)
    if ops is None or not stores:
        return {"version": None, "published": [], "unreachable": list(stores)}
    try:
        now = time.time()
        doc = compile_policy_doc(ops.engine, ops.ca, now)
        directory = store_directory(ops.engine, ops.ca, doc.version, now)
    except LabError as exc:
        raise LabError(f"secret policy not republished: {exc}") from exc
    outcome = await publish_everywhere(stores, ops.identity, [{"policy": doc.encode(), "stores": directory.encode()}])
    return {"version": doc.version, "published": [ep for ep in stores if outcome.get(ep) == "ok"],
            "unreachable": [ep for ep in stores if outcome.get(ep, "ok") != "ok"]}
