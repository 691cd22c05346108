"""Redfish power control with httpx: /redfish/v1/Systems/{id}, ComputerSystem.Reset and a one-time
Boot.BootSourceOverrideTarget = Pxe. Synchronous; tests inject an ``httpx.MockTransport``."""

from __future__ import annotations

from typing import Any

import httpx

from lab.common.errors import AuthError, NotFound, RemoteProtocolError, TransportError
from lab.coordinator.power.base import PowerController, PowerState

DEFAULT_TIMEOUT = 30.0
MAX_BODY = 1024 * 1024


class RedfishPower(PowerController):
    def __init__(self, base_url: str, user: str, password: str, *, system_id: str | None = None,
                 verify: bool = True, timeout: float = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, auth=(user, password), verify=verify, timeout=timeout,
                                    transport=transport, headers={"Accept": "application/json"})
        self._system_path: str | None = f"/redfish/v1/Systems/{system_id}" if system_id else None

    def __repr__(self) -> str:  # never the password
        return f"RedfishPower({self.base_url!r}, system={self._system_path!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RedfishPower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self._client.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise TransportError(f"Redfish {self.base_url}: {exc}") from exc
        if r.status_code in (401, 403):
            raise AuthError(f"Redfish {self.base_url}: credentials refused (HTTP {r.status_code})")
        if r.status_code == 404:
            raise NotFound(f"Redfish {self.base_url}{path}: not found")
        if r.status_code >= 400:
            raise RemoteProtocolError(f"Redfish {method} {path}: HTTP {r.status_code} {r.text[:200]}")
        if not r.content or r.status_code == 204:
            return {}
        if len(r.content) > MAX_BODY:
            raise RemoteProtocolError(f"Redfish {path}: response larger than {MAX_BODY} bytes")
        try:
            body = r.json()
        except ValueError as exc:
            raise RemoteProtocolError(f"Redfish {path}: not JSON") from exc
        if not isinstance(body, dict):
            raise RemoteProtocolError(f"Redfish {path}: expected a JSON object")
        return body

    def system_path(self) -> str:
        if self._system_path is None:
            members = self._request("GET", "/redfish/v1/Systems").get("Members")
            if not isinstance(members, list) or not members or not isinstance(members[0], dict):
                raise NotFound(f"Redfish {self.base_url}: no systems")
            if len(members) > 1:
                raise NotFound(f"Redfish {self.base_url}: {len(members)} systems; pass a system id")
            path = members[0].get("@odata.id")
            if not isinstance(path, str) or not path.startswith("/redfish/v1/Systems/"):
                raise RemoteProtocolError("Redfish system member without a valid @odata.id")
            self._system_path = path
        return self._system_path

    def system(self) -> dict[str, Any]:
        return self._request("GET", self.system_path())

    def state(self) -> PowerState:
        s = self.system().get("PowerState")
        return {"On": PowerState.ON, "Off": PowerState.OFF}.get(s, PowerState.UNKNOWN) if isinstance(s, str) else PowerState.UNKNOWN

    def _allowed_resets(self) -> list[str]:
        action = self.system().get("Actions", {}).get("#ComputerSystem.Reset", {})
        allowed = action.get("ResetType@Redfish.AllowableValues") if isinstance(action, dict) else None
        return [a for a in allowed if isinstance(a, str)] if isinstance(allowed, list) else []

    def _reset(self, kind: str) -> None:
        self._request("POST", f"{self.system_path()}/Actions/ComputerSystem.Reset", {"ResetType": kind})

    def on(self) -> None:
        self._reset("On")

    def off(self) -> None:
        self._reset("ForceOff")

    def cycle(self) -> None:
        if self.state() == PowerState.OFF:
            self.on()
            return
        allowed = self._allowed_resets()
        self._reset("PowerCycle" if "PowerCycle" in allowed else "ForceRestart")

    def set_next_boot_pxe(self, *, uefi: bool = False) -> None:
        boot: dict[str, str] = {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}
        if uefi:
            boot["BootSourceOverrideMode"] = "UEFI"
        self._request("PATCH", self.system_path(), {"Boot": boot})

    def boot_override(self) -> tuple[str | None, str | None]:
        boot = self.system().get("Boot") or {}
        return boot.get("BootSourceOverrideTarget"), boot.get("BootSourceOverrideEnabled")
