"""What `lab onboard` and `lab token` do with the coordinator's state, behind one small interface.

:class:`LocalOnboarding` works on this home's ``engine.state`` (local mode, or the coordinator host
itself); :class:`RemoteOnboarding` asks a coordinator daemon (a home connected with `lab server
connect`, or a laptop after `lab server migrate`) through its admin-only ``onboard.*`` and
``tokens.*`` methods (coordinator/onboard_api.py). The CLI (coordinator/cli/onboard_*.py,
coordinator/cli/token_cmd.py) does the rest — SSH, BMC, the prompt, the display — on the operator's
machine. A join token is returned to the caller only; it travels over Noise from the daemon and
is never logged or audited.

Servers are plain data here: ``{"provider", "labels", "enrolled_at", "facts"}`` or None.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from lab.common.errors import LabError, RemoteProtocolError, UsageError

__all__ = ["LocalOnboarding", "Onboarding", "RemoteOnboarding", "allow_baremetal", "open_onboarding",
           "register_server", "server_view"]

SSH_TOKEN_TTL = 15 * 60


class Onboarding(Protocol):
    """The coordinator's side of an onboarding and of `lab token`."""

    remote: bool

    def check_labels(self, labels: Sequence[str]) -> None: ...
    def ready(self, labels: Sequence[str]) -> None: ...
    def audit(self, action: str, name: str, detail: dict[str, Any]) -> None: ...
    def server(self, name: str) -> dict[str, Any] | None: ...
    def register(self, name: str, provider: str, labels: Sequence[str], environment: str | None,
                 region: str | None) -> None: ...
    def mint(self, name: str, labels: Sequence[str], environment: str | None, region: str | None,
             ttl: float) -> str: ...
    def record(self, name: str, mac: str, stage: str, *, state: str = "running", history: Sequence[str] = (),
               step: str | None = None, expires_at: float | None = None) -> None: ...
    def allow(self, name: str, *, mac: str, image: str, labels: Sequence[str], environment: str | None,
              region: str | None, wait_s: float, disk_gb: int | None, coordinator: str) -> float: ...
    def create_token(self, name: str, labels: Sequence[str], environment: str | None, region: str | None,
                     ttl: int) -> tuple[str, dict[str, Any]]: ...
    def list_tokens(self) -> list[dict[str, Any]]: ...
    def revoke_tokens(self, name: str) -> int: ...


def server_view(s: Any) -> dict[str, Any]:
    return {"provider": s.provider, "labels": list(s.labels), "enrolled_at": getattr(s, "enrolled_at", None),
            "facts": s.facts if isinstance(getattr(s, "facts", None), dict) else {}}


def _ca_fingerprint(home: pathlib.Path) -> str:
    from lab.coordinator.cli.token_cmd import _ca_fingerprint as fpr

    return fpr(home)


def register_server(state: Any, name: str, provider: str, labels: Sequence[str], environment: str | None,
                    region: str | None, actor: str = "local") -> None:
    """Add ``name`` to the inventory unless it is there. Bare metal: refused when it exists with
    another provider or is already enrolled (UsageError; the CLI names the step)."""
    from lab.coordinator.state import validate_server_name

    validate_server_name(name)
    labels = list(labels)
    with state.transaction():
        try:
            existing = state.get_server(name)
        except LabError:
            state.add_server(name, provider, labels, environment=environment, region=region)
            state.audit("server.add", name, {"provider": provider, "labels": labels, "environment": environment,
                                             "region": region}, actor=actor)
            return
        if provider == "baremetal":
            if existing.provider != "baremetal":
                raise UsageError(f"server {name!r} exists with provider {existing.provider}")
            if getattr(existing, "enrolled_at", None):
                raise UsageError(f"{name} is already enrolled (remove it first to reinstall: `lab server remove {name}`)")


def mint_for_onboarding(state: Any, fpr: str, name: str, labels: Sequence[str], environment: str | None,
                        region: str | None, ttl: float, actor: str = "local") -> tuple[str, float]:
    """Revoke the server's unused tokens (an earlier, failed run's), mint a new one, audit it."""
    from lab.coordinator import tokens

    labels = list(labels)
    with state.transaction():
        try:
            tokens.revoke_tokens(state, name)
        except LabError:  # none unused
            pass
        text, rec = tokens.create_token(state, fpr, name, labels, environment=environment, region=region, ttl=ttl)
        state.audit("token.create", name, {"labels": labels, "by": "onboard", "expires_at": rec.expires_at}, actor=actor)
    return text, rec.expires_at


def record_stage(state: Any, name: str, mac: str, stage: str, *, state_: str = "running", history: Sequence[str] = (),
                 step: str | None = None, expires_at: float | None = None) -> None:
    """The bare-metal onboarding record in the server's facts (until the agent enrolls)."""
    from lab.coordinator.providers import baremetal as bm

    if getattr(state.get_server(name), "enrolled_at", None):
        return  # the agent's own facts are there now
    facts = bm.onboarding_facts(mac, stage, state=state_, history=history, at=time.time(), step=step,
                                expires_at=expires_at)
    with state.transaction():
        state.update_server(name, facts=facts)


def allow_baremetal(state: Any, home: pathlib.Path, fpr: str, name: str, *, mac: str, image: str,
                    labels: Sequence[str], environment: str | None, region: str | None, wait_s: float,
                    disk_gb: int | None, coordinator: str, actor: str = "local") -> float:
    """Mint the machine's token and write its onboarding record (``<home>/pxe/nodes``, 0600) for
    the boot services; returns when the MAC stops being served."""
    from lab.coordinator.pxe.nodes import write_node
    from lab.coordinator.pxe.registry import OnboardingNode

    token, _ = mint_for_onboarding(state, fpr, name, labels, environment, region, wait_s + 3600, actor=actor)
    node = OnboardingNode(mac=mac, hostname=name, image=image, expires_at=time.time() + wait_s,
                          labels=tuple(labels), token=token, disk_gb=disk_gb, coordinator=str(coordinator))
    write_node(home / "pxe" / "nodes", node)
    return node.expires_at


class LocalOnboarding:
    """On this home's state.db (today's behaviour, audited as ``local``)."""

    remote = False

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.state = engine.state
        self.home = engine.paths.home

    def check_labels(self, labels: Sequence[str]) -> None:
        if labels:
            self.engine._check_labels(list(labels))

    def ready(self, labels: Sequence[str]) -> None:
        """Before anything happens: the labels are defined and this home can mint (its ca.pub)."""
        self.check_labels(labels)
        _ca_fingerprint(self.home)

    def audit(self, action: str, name: str, detail: dict[str, Any]) -> None:
        with self.state.transaction():
            self.state.audit(action, name, detail)

    def server(self, name: str) -> dict[str, Any] | None:
        try:
            return server_view(self.state.get_server(name))
        except LabError:
            return None

    def register(self, name: str, provider: str, labels: Sequence[str], environment: str | None, region: str | None) -> None:
        register_server(self.state, name, provider, labels, environment, region)

    def mint(self, name: str, labels: Sequence[str], environment: str | None, region: str | None, ttl: float) -> str:
        return mint_for_onboarding(self.state, _ca_fingerprint(self.home), name, labels, environment, region, ttl)[0]

    def record(self, name: str, mac: str, stage: str, *, state: str = "running", history: Sequence[str] = (),
               step: str | None = None, expires_at: float | None = None) -> None:
        record_stage(self.state, name, mac, stage, state_=state, history=history, step=step, expires_at=expires_at)

    def allow(self, name: str, *, mac: str, image: str, labels: Sequence[str], environment: str | None,
              region: str | None, wait_s: float, disk_gb: int | None, coordinator: str) -> float:
        return allow_baremetal(self.state, self.home, _ca_fingerprint(self.home), name, mac=mac, image=image,
                               labels=labels, environment=environment, region=region, wait_s=wait_s,
                               disk_gb=disk_gb, coordinator=coordinator)

    def create_token(self, name: str, labels: Sequence[str], environment: str | None, region: str | None,
                     ttl: int) -> tuple[str, dict[str, Any]]:
        from lab.coordinator import tokens

        self.check_labels(labels)
        fpr = _ca_fingerprint(self.home)
        with self.state.transaction():
            text, rec = tokens.create_token(self.state, fpr, name, list(labels), environment=environment, region=region, ttl=ttl)
            self.state.audit("token.create", name, {"labels": list(labels), "environment": environment, "region": region,
                                                    "expires_at": rec.expires_at})
        return text, tokens.token_record(rec, time.time())

    def list_tokens(self) -> list[dict[str, Any]]:
        from lab.coordinator import tokens

        return tokens.list_tokens(self.state, time.time())

    def revoke_tokens(self, name: str) -> int:
        from lab.coordinator import tokens

        with self.state.transaction():
            count = tokens.revoke_tokens(self.state, name)
            self.state.audit("token.revoke", name, {"count": count})
        return count


class RemoteOnboarding:
    """Through a coordinator daemon's ``onboard.*`` / ``tokens.*`` (admin identity of this home)."""

    remote = True

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # a RemoteEngine
        self.where = f"{engine.host}:{engine.port}"
        self._info: dict[str, Any] | None = None

    def _call(self, method: str, body: dict[str, Any]) -> Any:
        result = self.engine.call_method(method, body)
        if not isinstance(result, dict):
            raise RemoteProtocolError(f"malformed {method} reply from the coordinator")
        return result

    def info(self, name: str, labels: Sequence[str] = (), image: str | None = None) -> dict[str, Any]:
        """``{server, endpoint, pxe, image_family}``: what the daemon knows (labels checked there)."""
        self._info = self._call("onboard.status", {"name": name, "labels": list(labels), "image": image})
        return self._info

    def check_labels(self, labels: Sequence[str]) -> None:
        if labels:
            self._call("onboard.status", {"name": None, "labels": list(labels)})

    def ready(self, labels: Sequence[str]) -> None:
        self._call("onboard.status", {"name": None, "labels": list(labels)})  # reachable, admin, labels defined

    def audit(self, action: str, name: str, detail: dict[str, Any]) -> None:
        self._call("onboard.audit", {"name": name, "action": action, "detail": detail})

    def server(self, name: str) -> dict[str, Any] | None:
        s = self._call("onboard.status", {"name": name}).get("server")
        return s if isinstance(s, dict) else None

    def register(self, name: str, provider: str, labels: Sequence[str], environment: str | None, region: str | None) -> None:
        self._call("onboard.register", {"name": name, "provider": provider, "labels": list(labels),
                                        "environment": environment, "region": region})

    def mint(self, name: str, labels: Sequence[str], environment: str | None, region: str | None, ttl: float) -> str:
        token = self._call("onboard.token", {"name": name, "labels": list(labels), "environment": environment,
                                             "region": region, "ttl": ttl}).get("token")
        if not isinstance(token, str):
            raise RemoteProtocolError("malformed onboard.token reply from the coordinator")
        return token

    def record(self, name: str, mac: str, stage: str, *, state: str = "running", history: Sequence[str] = (),
               step: str | None = None, expires_at: float | None = None) -> None:
        self._call("onboard.record", {"name": name, "mac": mac, "stage": stage, "state": state,
                                      "history": list(history), "step": step, "expires_at": expires_at})

    def allow(self, name: str, *, mac: str, image: str, labels: Sequence[str], environment: str | None,
              region: str | None, wait_s: float, disk_gb: int | None, coordinator: str) -> float:
        reply = self._call("onboard.allow", {"name": name, "mac": mac, "image": image, "labels": list(labels),
                                             "environment": environment, "region": region, "wait_s": wait_s,
                                             "disk_gb": disk_gb, "coordinator": coordinator})
        return float(reply.get("expires_at") or 0.0)

    def create_token(self, name: str, labels: Sequence[str], environment: str | None, region: str | None,
                     ttl: int) -> tuple[str, dict[str, Any]]:
        reply = self._call("tokens.create", {"name": name, "labels": list(labels), "environment": environment,
                                             "region": region, "ttl": ttl})
        if not isinstance(reply.get("token"), str) or not isinstance(reply.get("record"), dict):
            raise RemoteProtocolError("malformed tokens.create reply from the coordinator")
        return reply["token"], reply["record"]

    def list_tokens(self) -> list[dict[str, Any]]:
        rows = self._call("tokens.list", {}).get("tokens")
        if not isinstance(rows, list):
            raise RemoteProtocolError("malformed tokens.list reply from the coordinator")
        return rows

    def revoke_tokens(self, name: str) -> int:
        return int(self._call("tokens.revoke", {"name": name}).get("count") or 0)


@contextlib.contextmanager
def open_onboarding(paths: Any) -> Iterator[LocalOnboarding | RemoteOnboarding]:
    """The backend for the home of ``paths`` (:class:`~lab.coordinator.engine.Paths`): the daemon's
    when `lab server connect` named one, else this home's state; the engine's warnings go to stderr
    as for every command, even when the command fails."""
    import sys

    from lab.coordinator.engine import Engine, _read_settings

    if _read_settings(paths.home).get("server"):
        from lab.coordinator.client import RemoteEngine

        engine: Any = RemoteEngine.open(paths)
        backend: LocalOnboarding | RemoteOnboarding = RemoteOnboarding(engine)
    else:
        engine = Engine.open(paths)
        backend = LocalOnboarding(engine)
    try:
        yield backend
    finally:
        for w in engine.warnings:
            print(f"lab: warning: {w}", file=sys.stderr)
        engine.close()
