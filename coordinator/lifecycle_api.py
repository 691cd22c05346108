"""`lab diff|plan|apply|sync server` as operations, the same in-process and through the daemon.

* :class:`Lifecycle` — the operations on an in-process :class:`~lab.coordinator.engine.Engine` and
  its home (plans are files under ``$LAB_HOME/plans``): local mode, `lab dash`, and the daemon;
* :class:`LifecycleService` — the coordinator daemon's admin-only ``lifecycle.diff``,
  ``lifecycle.plan``, ``lifecycle.apply`` and ``lifecycle.sync`` methods: a :class:`Lifecycle` on
  the daemon's engine and home (a plan is stored on the coordinator, where apply reads it), every
  write audited with the admin certificate's name (``cert:NAME``);
* :func:`ops` — what a command uses: the daemon's operations for a
  :class:`~lab.coordinator.client.RemoteEngine` (``RemoteEngine.lifecycle``), else a
  :class:`Lifecycle`. The CLI (coordinator/cli/lifecycle_cmd.py) and the dashboard
  (coordinator/tui/source.py) do not care which.

Results are plain data (the same dictionaries in both modes), so the commands print the same
thing either way. The pure parts (spec, comparison, plan) are in :mod:`lab.coordinator.lifecycle`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Final

from lab.common.errors import LabError, NotFound, UsageError
from lab.coordinator import lifecycle

__all__ = ["METHODS", "PLAN_OPTIONS", "Lifecycle", "LifecycleService", "ops"]

METHODS: Final = frozenset({"lifecycle.diff", "lifecycle.plan", "lifecycle.apply", "lifecycle.sync"})
WRITES: Final = frozenset({"lifecycle.plan", "lifecycle.apply", "lifecycle.sync"})
PLAN_OPTIONS: Final = ("labels", "provider", "environment", "region", "size", "hosts", "ssh")
ONBOARD_REMOTE: Final = ("onboarding over SSH runs `lab onboard` from the host that applies the plan, so it is not "
                         "done through the coordinator daemon: run `lab apply server {name}` on the coordinator host")  # fmt: skip


def ops(engine: Any, *, onboard_refusal: str | None = None) -> Any:
    """The lifecycle operations for ``engine``: through the daemon for a RemoteEngine (which never
    onboards over SSH), else in-process (``onboard_refusal``: see :class:`Lifecycle`)."""
    from lab.coordinator.engine import Engine

    if not isinstance(engine, Engine):  # local mode need not import the RPC client
        from lab.coordinator.client import RemoteEngine

        if isinstance(engine, RemoteEngine):
            return engine.lifecycle
    return Lifecycle(engine, onboard_refusal=onboard_refusal)


def _record(engine: Any, name: str) -> Any | None:
    try:
        return engine.state.get_server(name)
    except NotFound:
        return None


class Lifecycle:
    """diff / plan / apply / sync of one server on an in-process engine and its home.

    ``actor`` goes into every audit entry; ``publish=False`` leaves republishing the signed policy
    to the caller (the result then says ``publish_due``; see :meth:`published`);
    ``onboard_refusal``, when given, refuses a plan that would onboard over SSH (before anything
    is changed) with that text."""

    def __init__(self, engine: Any, *, actor: str = "local", publish: bool = True, onboard_refusal: str | None = None) -> None:
        self.engine = engine
        self.actor = actor
        self.publish = publish
        self.onboard_refusal = onboard_refusal

    @property
    def home(self) -> Any:
        return self.engine.paths.home

    def diff(self, name: str) -> dict[str, Any]:
        """`lab diff server NAME` as data (:func:`lifecycle.diff`)."""
        return lifecycle.diff(self.engine, name)

    def plan(
        self, name: str, *, labels: Sequence[str] | None = None, provider: str | None = None, environment: str | None = None,
        region: str | None = None, size: str | None = None, hosts: Sequence[str] = (), ssh: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Make the plan and store it under the home; the plan with ``path`` (where it is stored)."""
        from lab.coordinator.engine import _read_settings
        from lab.coordinator.state import validate_server_name

        validate_server_name(name)
        engine = self.engine
        current = _record(engine, name)
        zone = (_read_settings(self.home).get("dns") or {}).get("zone")
        plan = lifecycle.make_plan(
            engine.definitions, name, current, labels=labels, provider=provider, environment=environment,
            region=region, size=size, hosts=hosts, ssh=ssh or {}, dns_zone=zone,
        )  # fmt: skip
        path = lifecycle.save_plan(self.home, plan)
        if self.actor != "local":  # through the daemon: someone elsewhere wrote on the coordinator
            with engine.state.transaction():
                engine.state.audit("server.plan", name, {"action": plan["action"], "changes": len(plan["changes"])}, actor=self.actor)
        return {**plan, "path": str(path)}

    def apply(self, name: str) -> dict[str, Any]:
        """Apply the stored plan; refuse a stale one. ``{server, action, lines, plan}``: ``lines``
        are what `lab apply server` prints; ``action == "onboard"`` leaves the SSH onboarding of
        ``plan`` to the caller (the plan file is already consumed)."""
        plan = lifecycle.load_plan(self.home, name)
        if plan["action"] == "not-implemented":
            raise LabError(lifecycle.not_implemented(plan["provider"]) + "; nothing was changed")
        if plan["action"] == "onboard" and self.onboard_refusal:
            raise UsageError(self.onboard_refusal.format(name=name) + " (the plan is kept; nothing was changed)")
        engine = self.engine
        current = _record(engine, name)
        lifecycle.check_plan(plan, engine.definitions, current)
        done = self._write_inventory(plan, current)
        lines = [f"✓ {line}" for line in done] or [f"✓ {name}: inventory already as planned"]
        result: dict[str, Any] = {"server": name, "action": plan["action"], "lines": lines, "plan": plan, "publish_due": False}
        if plan["action"] == "onboard":
            lines.append(f"→ onboarding {name} over SSH at {plan['hosts'][0]}")
        elif plan["provider"] == "ssh" and plan["new"]:
            lines.append(f"  no host given: nothing was installed. Onboard it with `lab plan server {name} --host H` + "
                         f"`lab apply server {name}`, or `lab onboard {name} --provider ssh --host H`")  # fmt: skip
        lifecycle.drop_plan(self.home, name)  # onboarding, if any, is rerunnable on its own
        if done and not plan["new"] and plan["action"] != "onboard":
            if self.publish:
                self.published(result, lifecycle.republish(self.home))
            else:
                result["publish_due"] = True
        return result

    def sync(self, name: str) -> dict[str, Any]:
        """`lab sync server NAME` as data (:func:`lifecycle.sync`), audited as this actor."""
        result = lifecycle.sync(self.engine, name, actor=self.actor, publish=self.publish)
        result["publish_due"] = not self.publish
        return result

    @staticmethod
    def published(result: dict[str, Any], line: str | None) -> dict[str, Any]:
        """Put :func:`lifecycle.republish`'s line where the local operation prints it."""
        result["publish_due"] = False
        if line:
            if "lines" in result:
                result["lines"].append(f"  {line}")
            else:
                result["done"].insert(0, line)
        return result

    def _write_inventory(self, plan: dict[str, Any], current: Any | None) -> list[str]:
        """Create or update the inventory record as planned, each change audited as this actor."""
        t = plan["target"]
        name = plan["server"]
        state = self.engine.state
        done: list[str] = []
        if current is None:
            with state.transaction():  # the record and its audit entry land together or not at all
                state.add_server(name, plan["provider"], t["labels"], environment=t["environment"], region=t["region"], size=t["size"])
                detail = {"provider": plan["provider"], "labels": t["labels"], "environment": t["environment"], "region": t["region"], "size": t["size"]}
                state.audit("server.add", name, detail, actor=self.actor)
            done.append(f"registered {name} in the inventory (provider {plan['provider']}; labels: {','.join(t['labels']) or 'none'})")
        else:
            fields = {k: t[k] for k in ("environment", "region", "size") if getattr(current, k) != t[k]}
            with state.transaction():
                if list(current.labels) != t["labels"]:
                    state.set_labels(name, t["labels"])
                    state.audit("server.labels", name, {"before": list(current.labels), "after": t["labels"]}, actor=self.actor)
                    done.append(f"labels: {','.join(t['labels']) or 'none'}")
                if fields:
                    state.update_server(name, **fields)
                    state.audit("server.update", name, {k: {"before": getattr(current, k), "after": v} for k, v in fields.items()}, actor=self.actor)
                    done += [f"{k}: {v}" for k, v in fields.items()]
        if done:
            state.maybe_snapshot()
            self.engine.reload()
        return done


# -- the daemon's side ----------------------------------------------------------------------------


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise UsageError(f"{key} must be a string")
    return v


def _str_list(body: dict[str, Any], key: str, *, none_ok: bool = False) -> list[str] | None:
    v = body.get(key)
    if v is None and none_ok:
        return None
    v = [] if v is None else v
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UsageError(f"{key} must be a list of strings")
    return v


def plan_options(body: dict[str, Any]) -> dict[str, Any]:
    """The options of ``lifecycle.plan`` from a request body, checked (wire data is untrusted)."""
    unknown = set(body) - {"name", *PLAN_OPTIONS}
    if unknown:
        raise UsageError(f"unknown plan option(s): {', '.join(sorted(unknown))}")
    ssh = body.get("ssh") or {}
    if not isinstance(ssh, dict) or set(ssh) - {"port", "user", "identity", "server"}:
        raise UsageError("ssh must be a mapping of port, user, identity, server")
    port = ssh.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise UsageError("ssh.port must be a port number")
    for k in ("user", "identity", "server"):
        _opt_str(ssh, k)
    return {
        "labels": _str_list(body, "labels", none_ok=True), "provider": _opt_str(body, "provider"),
        "environment": _opt_str(body, "environment"), "region": _opt_str(body, "region"), "size": _opt_str(body, "size"),
        "hosts": _str_list(body, "hosts"), "ssh": dict(ssh),
    }  # fmt: skip


class LifecycleService:
    """``lifecycle.*`` in the coordinator daemon: certificates with the ``admin`` role only (checked
    here, for every method), on the daemon's engine. Replies ``{"result": …, "warnings": [...]}``
    like ``engine.*``. State is used from the trio thread (calls are short); only republishing the
    signed policy (network, its own trio loop) runs in a worker thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def handle(self, peer: Any, method: str, body: dict[str, Any]) -> dict[str, Any]:
        import trio

        from lab.coordinator.enrollment import log_event, require_admin

        require_admin(peer, method)
        if method not in METHODS:
            raise NotFound(f"no method {method!r}")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise UsageError("name must be a server name")
        engine = self.engine
        engine.reload()  # other `lab` processes may have written state.db or definitions
        engine.state.warnings.clear()
        run = Lifecycle(engine, actor=f"cert:{peer.name}", publish=False, onboard_refusal=ONBOARD_REMOTE)
        if method == "lifecycle.diff":
            result = run.diff(name)
        elif method == "lifecycle.plan":
            result = run.plan(name, **plan_options(body))
        elif method == "lifecycle.apply":
            result = run.apply(name)
        else:
            result = run.sync(name)
        if result.pop("publish_due", False):
            line = await trio.to_thread.run_sync(lifecycle.republish, engine.paths.home)
            run.published(result, line)
        result.pop("publish_due", None)
        if method in WRITES:
            log_event(logging.INFO, "api.write", name=peer.name, method=method, subject=name)
        return {"result": json.loads(json.dumps(result, default=str)), "warnings": list(engine.warnings)}
