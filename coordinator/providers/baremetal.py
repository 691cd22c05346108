"""`lab onboard NAME --provider baremetal` (spec "Scenario B" and "Scenario C"; docs/ONBOARDING.md).

Pure parts: the render table, plan and warning lines, the step list, the mapping from boot
service events (``dhcp-discover``, ``tftp-done``, ``script-fetched``, …) to onboarding stages,
the stage record kept in the inventory (the server's ``facts`` until the agent enrolls and
reports real facts) and the IDENTITY pillar text shown by ``lab get servers``, the BMC
password source (environment or file; never argv). The I/O is in coordinator/cli/onboard_baremetal.py.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from lab.common.errors import UsageError

PROVIDER = "baremetal"
IPMI_PASSWORD_ENV = "LAB_IPMI_PASSWORD"
REDFISH_PASSWORD_ENV = "LAB_REDFISH_PASSWORD"


@dataclasses.dataclass(frozen=True)
class Stage:
    key: str
    line: str  # what `→ …` prints when the stage is reached
    pillar: str  # IDENTITY pillar text while it is the current stage


# In order: a stage is only ever advanced, never moved back (iPXE and the installer DHCP again).
STAGES: tuple[Stage, ...] = (
    Stage("waiting", "Waiting for network boot request...", "pxe: waiting for boot request"),
    Stage("boot-request", "Boot request received from {mac}", "pxe: boot request received"),
    Stage("ipxe", "Serving iPXE", "pxe: serving iPXE"),
    Stage("kernel", "kernel + initrd", "pxe: kernel + initrd"),
    Stage("config", "{config} config fetched", "pxe: installing OS"),
    Stage("agent", "agent install script fetched", "pxe: installing agent"),
    Stage("enrolled", "Enrolled", "enrolled"),
)
_BY_KEY = {s.key: s for s in STAGES}
_RANK = {s.key: i for i, s in enumerate(STAGES)}

CONFIG_KIND = {"user-data": "autoinstall", "meta-data": "autoinstall", "preseed.cfg": "preseed", "ks.cfg": "kickstart"}


def stage_for_event(what: str, detail: str = "") -> str | None:
    """Boot service event → onboarding stage key (None: not a progress step)."""
    if what in ("dhcp-discover", "dhcp-ack", "proxydhcp-discover", "proxydhcp-request"):
        return "boot-request"
    if what == "tftp-done" or what == "script-fetched":
        return "ipxe"
    if what in ("kernel-fetched", "initrd-fetched"):
        return "kernel"
    if what.startswith("config-fetched"):
        return "config"
    if what == "agent-script-fetched":
        return "agent"
    return None


def stage_line(key: str, mac: str, config: str = "") -> str:
    return "→ " + _BY_KEY[key].line.format(mac=mac.upper(), config=CONFIG_KIND.get(config, "installer"))


class StageTracker:
    """Follows one MAC through the stages; ``feed`` returns the new stage key when it advances."""

    def __init__(self, mac: str) -> None:
        self.mac = mac.lower()
        self.stage = "waiting"
        self.history: list[str] = []

    def feed(self, mac: str, what: str, detail: str = "") -> str | None:
        if mac.lower() != self.mac:
            return None
        key = stage_for_event(what, detail)
        if key is None or _RANK[key] <= _RANK[self.stage]:
            return None
        self.stage = key
        self.history.append(key)
        return key


# -- the inventory record --------------------------------------------------------------------


def onboarding_facts(mac: str, stage: str, *, state: str = "running", history: Sequence[str] = (),
                     at: float = 0.0, step: str | None = None, expires_at: float | None = None) -> dict[str, Any]:
    """What goes into the server's ``facts`` while it is being onboarded (the agent's facts replace
    it at enrollment). ``state``: running, timed-out or failed (``step`` names the failed step).
    ``expires_at``: when the boot services stop serving the MAC (its token and allowlist entry
    expire); a record still running after that reads as timed out (:func:`identity_pillar`)."""
    rec: dict[str, Any] = {"provider": PROVIDER, "mac": mac.lower(), "stage": stage, "state": state,
                           "history": list(history), "at": at}
    if step is not None:
        rec["step"] = step
    if expires_at is not None:
        rec["expires_at"] = expires_at
    return {"onboarding": rec}


def stage_after(key: str, previous: str | None) -> bool:
    """Whether stage ``key`` is past ``previous`` (None: nothing yet)."""
    return previous is None or _RANK[key] > _RANK.get(previous, -1)


def advance_onboarding(facts: Any, mac: str, key: str, *, at: float) -> dict[str, Any] | None:
    """The server's facts with its onboarding record moved on to stage ``key`` — what the boot
    services (`lab pxe serve`, the daemon's `pxe:`) write after `lab onboard --no-wait`. None when
    nothing changes: no onboarding record, another MAC, or a stage that is not past the recorded one."""
    rec = facts.get("onboarding") if isinstance(facts, Mapping) else None
    if not isinstance(rec, Mapping) or str(rec.get("mac", "")).lower() != mac.lower():
        return None
    if not stage_after(key, rec.get("stage") if rec.get("stage") in _RANK else None):
        return None
    history = [h for h in rec.get("history") or [] if isinstance(h, str)]
    expires = rec.get("expires_at")
    return {**facts, **onboarding_facts(mac, key, history=[*history, key], at=at,
                                        expires_at=expires if isinstance(expires, (int, float)) else None)}


def onboarding_state(rec: Mapping[str, Any], now: float | None = None) -> str:
    """running, timed-out or failed: a running record past its ``expires_at`` (an onboarding left
    waiting, e.g. `--no-wait` and the machine never booted) has timed out."""
    state = str(rec.get("state") or "running")
    expires = rec.get("expires_at")
    if state == "running" and isinstance(expires, (int, float)) and not isinstance(expires, bool):
        import time

        if (time.time() if now is None else now) >= expires:
            return "timed-out"
    return state


def identity_pillar(facts: Any, now: float | None = None) -> str | None:
    """IDENTITY pillar text for a server that is not enrolled yet: the onboarding stage, or None."""
    rec = facts.get("onboarding") if isinstance(facts, Mapping) else None
    if not isinstance(rec, Mapping) or rec.get("stage") not in _BY_KEY:
        return None
    text = _BY_KEY[rec["stage"]].pillar.removeprefix("pxe: ")
    state = onboarding_state(rec, now)
    if state == "timed-out":
        return f"pxe: timed out {text}" if rec["stage"] == "waiting" else f"pxe: timed out at {text}"
    if state == "failed":
        return f"pxe: failed at step {rec.get('step') or '?'}"
    return f"pxe: {text}"


# -- render ----------------------------------------------------------------------------------

STEPS = ("render", "register", "token", "allow", "power", "serve", "wait")


def table_rows(name: str, mac: str, image: str, labels: Sequence[str], pxe_server: str) -> list[tuple[str, str]]:
    return [("Name", name), ("Provider", "baremetal (PXE boot)"), ("MAC", mac.upper()), ("Image", image),
            ("Labels", ",".join(labels) or "none"), ("PXE server", pxe_server)]


def plan_lines(mac: str, image: str, family: str, interface: str | None, labels: Sequence[str],
               bmc: str | None = None, served_by: str | None = None, follow: bool = False) -> list[str]:
    """``served_by``: `lab onboard --no-wait` leaves the boot to these running boot services
    (``follow``: and follows the stages they record)."""
    installer = {"ubuntu": "Ubuntu autoinstall", "debian": "Debian preseed", "rhel": "kickstart"}.get(family, family)
    lines = []
    if bmc:
        lines.append(f"+ {bmc}: set next boot to PXE and power the machine on")
    lines += [
        f"+ Start PXE/DHCP/TFTP on {interface or 'all interfaces'}" if served_by is None
        else f"+ Allow the MAC; {served_by} serves the boot, its stages are followed here" if follow
        else f"+ Return once the MAC is allowed; {served_by} serves the boot",
        f"+ Wait for machine with MAC {mac.upper()} to boot",
        f"+ Serve unattended {image} installer ({installer})",
        "+ After install: auto-enroll with one-time token baked into installer",
        f"+ Assign labels{': ' + ','.join(labels) if labels else ' (none given)'}, apply puppet classes",
    ]
    return lines


def warning_lines(mac: str, mode: str, pool: str | None) -> list[str]:
    lines = ["⚠ PXE requires: network interface on same L2 segment as target machine"]
    if mode == "proxy":
        lines.append(f"⚠ DHCP: proxyDHCP, boot information ONLY to MAC {mac.upper()} (the network's DHCP server hands out the address)")
    else:
        lines.append(f"⚠ DHCP: will respond ONLY to MAC {mac.upper()} (safe for existing networks)")
        lines.append(f"⚠ DHCP: full mode, address from {pool}; only on a segment with no other DHCP server (without --pool: proxyDHCP)")
    return lines


def default_pool(server_ip: str, prefix: int) -> str:
    """A pool in the server's own subnet (the top of it, up to 50 addresses, never the server's)."""
    import ipaddress

    net = ipaddress.IPv4Network(f"{server_ip}/{prefix}", strict=False)
    server = int(ipaddress.IPv4Address(server_ip))
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    hosts = [h for h in range(max(first, last - 50), last + 1) if h != server][-50:]
    if net.num_addresses < 4 or not hosts:
        raise UsageError(f"no room for a DHCP pool in {net}: pass --pool FIRST-LAST or --proxy-dhcp")
    return f"{ipaddress.IPv4Address(hosts[0])}-{ipaddress.IPv4Address(hosts[-1])}"


# -- BMC --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bmc:
    kind: str  # "ipmi" or "redfish"
    address: str
    user: str
    password: str | None = dataclasses.field(default=None, repr=False)
    password_file: pathlib.Path | None = None

    @property
    def label(self) -> str:
        return "IPMI" if self.kind == "ipmi" else "Redfish"

    def controller(self) -> Any:  # -> PowerController
        if self.kind == "ipmi":
            from lab.coordinator.power.ipmi import IpmiPower

            host, _, port = self.address.partition(":") if self.address.count(":") == 1 else (self.address, "", "")
            return IpmiPower(host, self.user, password=self.password, password_file=self.password_file,
                             **({"port": int(port)} if port else {}))
        from lab.coordinator.power.redfish import RedfishPower

        password = self.password if self.password is not None else _read_secret_file(self.password_file)
        return RedfishPower(self.address, self.user, password)


def _read_secret_file(path: pathlib.Path | None) -> str:
    assert path is not None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read password file {path}: {exc.strerror}") from exc


def bmc_from_options(ipmi: str | None, ipmi_user: str | None, ipmi_password_file: str | None,
                     redfish: str | None, redfish_user: str | None, redfish_password_file: str | None,
                     environ: Mapping[str, str] | None = None) -> Bmc | None:
    """The BMC to power the machine with, or None. Passwords come from the environment
    ($LAB_IPMI_PASSWORD, $LAB_REDFISH_PASSWORD) or a file, never from argv."""
    env = os.environ if environ is None else environ
    if ipmi and redfish:
        raise UsageError("give --ipmi or --redfish, not both")
    if not ipmi and not redfish:
        if ipmi_user or redfish_user or ipmi_password_file or redfish_password_file:
            raise UsageError("--ipmi-user/--redfish-user need --ipmi HOST or --redfish URL")
        return None
    kind, address, user, pfile, var = (("ipmi", ipmi, ipmi_user, ipmi_password_file, IPMI_PASSWORD_ENV) if ipmi
                                       else ("redfish", redfish, redfish_user, redfish_password_file, REDFISH_PASSWORD_ENV))
    if not user:
        raise UsageError(f"--{kind} needs --{kind}-user")
    if pfile:
        return Bmc(kind, str(address), user, password_file=pathlib.Path(pfile))
    if var in env:
        return Bmc(kind, str(address), user, password=env[var])
    raise UsageError(f"the {kind.upper() if kind == 'ipmi' else 'Redfish'} password: set ${var} or pass --{kind}-password-file FILE (never on the command line)")
