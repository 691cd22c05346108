"""`lab` against a coordinator daemon: :class:`RemoteEngine`, the Engine's methods over RPC.

Chosen by the CLI when ``$LAB_HOME/config.yaml`` has ``server: HOST:PORT`` (written by
``lab server connect``). It authenticates with ``admin.key`` + ``admin.cert`` (role ``admin``)
and trusts the CA in ``ca.pub``; the daemon must present a certificate with the ``coordinator``
role. Each call is one short connection (the CLI makes one or two calls per command).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import trio

from lab.common import rpc
from lab.common.errors import AuthError, ConfigError, UsageError
from lab.coordinator.daemon import parse_endpoint
from lab.coordinator.engine import Paths, ServerFilter, _read_settings
from lab.coordinator.enrollment import load_identity

__all__ = ["RemoteEngine", "RemoteLifecycle"]

DEFAULT_TIMEOUT = 30.0


class RemoteEngine:
    """Same method names and return values as :class:`~lab.coordinator.engine.Engine` (the subset
    the daemon allows: ``lab get/show/targets/describe`` and inventory writes), and
    :attr:`lifecycle` (`lab diff|plan|apply|sync server` run by the daemon)."""

    def __init__(self, paths: Paths, host: str, port: int, identity: rpc.Identity, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.paths = paths
        self.host, self.port = host, port
        self.identity = identity
        self.timeout = timeout
        self._warnings: list[str] = []

    @classmethod
    def open(cls, paths: Paths) -> RemoteEngine:
        server = _read_settings(paths.home).get("server")
        if not isinstance(server, str):
            raise ConfigError("`server:` must be HOST:PORT", str(paths.home / "config.yaml"))
        host, port = parse_endpoint(server)
        return cls(paths, host, port, load_identity(paths.home, "admin"))

    def __getattr__(self, name: str) -> Any:
        # Engine methods the daemon does not offer: one clear line instead of a traceback.
        if name.startswith("_"):
            raise AttributeError(name)
        raise UsageError(
            f"this command is not available through the coordinator daemon ({name}); run it on the "
            "coordinator host, or `lab server disconnect` to work on this home's state"
        )

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _acall(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        async with rpc.connect(self.host, self.port, identity=self.identity, timeout=self.timeout) as conn:
            if "coordinator" not in conn.peer.roles:
                raise AuthError(f"{self.host}:{self.port} is {conn.peer.name!r}, not a coordinator")
            return await conn.call(method, body, timeout=self.timeout)

    def call(self, name: str, body: dict[str, Any]) -> Any:
        reply = trio.run(self._acall, f"engine.{name}", body)
        self._warnings.extend(str(w) for w in reply.get("warnings") or [])
        return reply.get("result")

    def _with_store(self, name: str, body: dict[str, Any], what: str) -> Any:
        """[secrets] ``engine.NAME`` completed with what the stores say (LAST ROTATED, SET BY), read
        here with this home's admin identity: the daemon never blocks on a store
        (coordinator/cli/secret_cmd.py ``connected_secrets``)."""
        from lab.coordinator.cli.secret_cmd import connected_secrets

        reply = trio.run(self._acall, f"engine.{name}", body)
        warnings = [str(w) for w in reply.get("warnings") or []]
        try:
            return connected_secrets(self, what, reply.get("result"), warnings)
        finally:
            self._warnings.extend(warnings)

    # -- the Engine's surface ---------------------------------------------------------------------

    @staticmethod
    def _filter(flt: ServerFilter) -> dict[str, Any]:
        return {k: list(v) for k, v in dataclasses.asdict(flt).items()}

    def get_servers(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        return self.call("get_servers", self._filter(flt))  # type: ignore[no-any-return]

    def get_labels(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        return self.call("get_labels", self._filter(flt))  # type: ignore[no-any-return]

    def get_groups(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        return self.call("get_groups", self._filter(flt))  # type: ignore[no-any-return]

    def get_alerts(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        return self.call("get_alerts", self._filter(flt))  # type: ignore[no-any-return]

    def get_secrets(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        return self._with_store("get_secrets", self._filter(flt), "rows")  # type: ignore[no-any-return]

    def show_server(self, name: str) -> dict[str, Any]:
        return self.call("show_server", {"name": name})  # type: ignore[no-any-return]

    def show_label(self, name: str) -> dict[str, Any]:
        return self.call("show_label", {"name": name})  # type: ignore[no-any-return]

    def show_group(self, name: str) -> dict[str, Any]:
        return self.call("show_group", {"name": name})  # type: ignore[no-any-return]

    def show_alert(self, name: str) -> dict[str, Any]:
        return self.call("show_alert", {"name": name})  # type: ignore[no-any-return]

    def show_secret(self, path: str) -> dict[str, Any]:
        return self._with_store("show_secret", {"name": path}, "view")  # type: ignore[no-any-return]

    def targets_server(self, name: str) -> dict[str, Any]:
        return self.call("targets_server", {"name": name})  # type: ignore[no-any-return]

    def describe_server(self, name: str) -> dict[str, Any]:
        return self.call("describe_server", {"name": name})  # type: ignore[no-any-return]

    def add_server(self, name: str, provider: str, labels: list[str], environment: str | None = None,
                   region: str | None = None, size: str | None = None) -> dict[str, Any]:  # fmt: skip
        body = {"name": name, "provider": provider, "labels": list(labels), "environment": environment, "region": region, "size": size}
        return self.call("add_server", body)  # type: ignore[no-any-return]

    def set_labels(self, name: str, labels: list[str]) -> dict[str, Any]:
        return self.call("set_labels", {"name": name, "labels": list(labels)})  # type: ignore[no-any-return]

    def remove_server(self, name: str) -> None:
        self.call("remove_server", {"name": name})

    # -- lifecycle (`lab diff|plan|apply|sync server`, the daemon's `lifecycle.*`) ----------------

    @property
    def lifecycle(self) -> RemoteLifecycle:
        """The same operations as :class:`lab.coordinator.lifecycle_api.Lifecycle`, run by the daemon."""
        return RemoteLifecycle(self)

    def call_method(self, method: str, body: dict[str, Any]) -> Any:
        """One daemon method outside ``engine.*`` that answers ``{"result", "warnings"}``
        (``lifecycle.*``, and ``secrets.*`` for `lab secret …`: coordinator/secrets_api.py)."""
        reply = trio.run(self._acall, method, body)
        self._warnings.extend(str(w) for w in reply.get("warnings") or [])
        return reply.get("result")


class RemoteLifecycle:
    """``lifecycle.diff|plan|apply|sync`` on the daemon: plans are stored on the coordinator, where
    apply reads them; a stale plan is refused there (:class:`~lab.coordinator.lifecycle.StalePlan`
    again here, with its exit status)."""

    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def _call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        from lab.coordinator import lifecycle

        try:
            return self.engine.call_method(method, body)  # type: ignore[no-any-return]
        except rpc.RemoteError as exc:
            if exc.code == lifecycle.StalePlan.code:
                raise lifecycle.StalePlan(str(exc)) from None
            raise

    def diff(self, name: str) -> dict[str, Any]:
        return self._call("lifecycle.diff", {"name": name})

    def plan(self, name: str, **options: Any) -> dict[str, Any]:
        body = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in options.items()}
        return self._call("lifecycle.plan", {"name": name, **body})

    def apply(self, name: str) -> dict[str, Any]:
        return self._call("lifecycle.apply", {"name": name})

    def sync(self, name: str) -> dict[str, Any]:
        return self._call("lifecycle.sync", {"name": name})
