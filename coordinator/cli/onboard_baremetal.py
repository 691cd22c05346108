"""`lab onboard NAME --provider baremetal --mac M --image I` (spec "Scenario B/C"; docs/ONBOARDING.md).

Who serves the boot (DHCP/TFTP/HTTP):

* this process, on ``--interface`` (local mode, waiting — the default);
* the running boot services, left to them (``--no-wait``): the coordinator daemon's ``pxe:`` or
  `lab pxe serve`;
* the coordinator daemon, followed from here: in a home connected with `lab server connect` (its
  ``onboard.*`` methods register the machine, mint its token and write its onboarding record in the
  daemon's home: coordinator/onboard_api.py), or in local mode when this home's own daemon runs
  with ``pxe:`` — never a second DHCP server next to it. The stages are read from the inventory
  the daemon's boot services write.

The BMC (``--ipmi``/``--redfish``) is driven from here in every case. The coordinator's side goes
through :mod:`lab.coordinator.onboarding`.
"""

from __future__ import annotations

import ipaddress
import pathlib
import time
from typing import Any

from lab.common.errors import ConfigError, LabError, TransportError, UsageError
from lab.coordinator.cli import app as base

__all__ = ["local_daemon_pxe", "onboard_baremetal"]

FOLLOW_POLL_S = 1.0


def local_daemon_pxe(home: pathlib.Path) -> Any:
    """The ``pxe:`` section of this home when its coordinator daemon (`lab server run`) is up and
    serves it (``coordinator.endpoint`` written and answering); else None."""
    import socket

    from lab.common.rpc import parse_endpoint
    from lab.coordinator.pxe.config import load_pxe_config

    cfg = load_pxe_config(home)
    if cfg is None:
        return None
    try:
        host, port = parse_endpoint((home / "coordinator.endpoint").read_text().strip(), 7443)
        socket.create_connection((host, port), 1.0).close()
    except (OSError, LabError):
        return None
    return cfg


def _interface_ipv4(iface: str) -> tuple[str, int]:
    from lab.coordinator.pxe.service import interface_ipv4

    try:
        return interface_ipv4(iface)
    except UsageError as exc:
        raise UsageError(f"{exc}: pass --server-address IP") from None


def onboard_baremetal(
    name: str, *, mac: str | None, image: str | None, labels: list[str] | None, environment: str | None,
    region: str | None, yes: bool, server: str | None, ipmi: str | None, ipmi_user: str | None,
    ipmi_password_file: str | None, redfish: str | None, redfish_user: str | None, redfish_password_file: str | None,
    interface: str | None, proxy_dhcp: bool, pool: str | None, server_address: str | None, timeout: str,
    disk_gb: int | None, http_port: int, boot_dir: pathlib.Path | None, definitions: str | None,
    no_wait: bool = False,
) -> None:
    """Render, ask, register, mint a token, allow the MAC, power on (BMC), serve or hand over, follow
    the stages. ``no_wait``: stop after the power step; the running boot services serve the machine
    and record its stages."""
    import trio

    from lab.coordinator.cli.onboard_cmd import _ask, _say
    from lab.coordinator.cli.pxe_cmd import BootServices, ServeOptions, _duration, _images
    from lab.coordinator.engine import _split
    from lab.coordinator.onboarding import open_onboarding
    from lab.coordinator.power.base import PowerState
    from lab.coordinator.providers import baremetal as bm
    from lab.coordinator.providers.ssh import OnboardFailed, render_table
    from lab.coordinator.pxe.config import load_pxe_config
    from lab.coordinator.pxe.registry import normalize_mac
    from lab.coordinator.pxe.service import why as _why
    from lab.coordinator.state import validate_server_name

    validate_server_name(name)
    if not mac:
        raise UsageError("--provider baremetal needs --mac MAC (the machine's boot NIC)")
    if not image:
        raise UsageError("--provider baremetal needs --image NAME (see `lab image list`)")
    paths = base.Paths.resolve(definitions)
    home = paths.home
    settings = base._read_settings(home)
    connected = bool(settings.get("server"))
    if connected and (interface or pool or proxy_dhcp or server_address):
        raise UsageError("this home is connected to a coordinator (`lab server connect`): its boot services (pxe: in its "
                         "config.yaml) serve the machine; leave out --interface/--pool/--proxy-dhcp/--server-address")
    if proxy_dhcp and pool:
        raise UsageError("give --pool FIRST-LAST (full DHCP) or --proxy-dhcp, not both")
    if no_wait and (proxy_dhcp or pool):
        raise UsageError("with --no-wait the running boot services choose the DHCP mode (`lab pxe serve --pool …`, "
                         "or pool: in config.yaml's pxe: section); leave out --pool/--proxy-dhcp")
    # the coordinator daemon of this home serves pxe: itself: register and follow, never a second DHCP server
    daemon_cfg = local_daemon_pxe(home) if not (connected or no_wait) else None
    if daemon_cfg is not None and (proxy_dhcp or pool):
        raise UsageError("this home's coordinator daemon serves the boot (pxe: in config.yaml) and chooses the DHCP mode; "
                         "leave out --pool/--proxy-dhcp")
    follow = not no_wait and (connected or daemon_cfg is not None)
    leave = no_wait or follow  # the boot is left to running boot services
    mac_n = normalize_mac(mac)
    wait_s = _duration(timeout)
    bmc = bm.bmc_from_options(ipmi, ipmi_user, ipmi_password_file, redfish, redfish_user, redfish_password_file)
    label_list = _split(labels)
    pxe_cfg = (daemon_cfg or load_pxe_config(home)) if leave and not connected else None
    prefix = 24
    if interface:
        try:
            detected, prefix = _interface_ipv4(interface)
        except UsageError:
            if server_address is None:
                raise
            detected = server_address
        server_address = server_address or detected
    if leave and not server_address and pxe_cfg is not None:
        try:  # the daemon's address on the boot segment (its interface may live elsewhere, e.g. a netns)
            server_address = pxe_cfg.address or pxe_cfg.options().address
        except ConfigError:
            server_address = None
    if not connected and not server_address and not (leave and (server or settings.get("server"))):
        raise UsageError("which address do machines reach this device at? pass --interface IFACE or --server-address IP"
                         + (" (or --server HOST:PORT with --no-wait)" if no_wait else ""))
    if server_address:
        try:
            ipaddress.IPv4Address(server_address)
        except ValueError:
            raise UsageError(f"--server-address wants an IPv4 address, not {server_address!r}") from None
    netmask = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
    if pool == "auto":  # full DHCP from the top of the interface's subnet
        pool = bm.default_pool(str(server_address), prefix)
    family = None
    if not connected:
        try:
            family = _images(None).get(image).family
        except LabError as exc:
            raise OnboardFailed("render", f"{exc} (register it with `lab image add {image} --kernel … --initrd …`)") from exc
    endpoint = server or settings.get("server") or f"{server_address}:7443"
    not_served = None
    if connected:
        mode, pool, where = "proxy", None, ""  # the daemon's, below
    elif leave:
        mode, pool = (pxe_cfg.mode, pxe_cfg.pool) if pxe_cfg is not None else ("proxy", None)
        where = ("the coordinator daemon (config.yaml pxe:" + (f" on {pxe_cfg.interface}" if pxe_cfg.interface else "")
                 + ")" if pxe_cfg is not None else "`lab pxe serve` (start it on the boot segment)")
    else:
        mode = "full" if pool is not None else "proxy"
        where = "this device" + (f" ({interface}, {server_address})" if interface else f" ({server_address})")

    with open_onboarding(paths) as backend:
        backend.ready(label_list)
        if connected:
            try:
                info = backend.info(name, image=image)  # type: ignore[attr-defined]
            except LabError as exc:
                raise OnboardFailed("render", f"{exc} (register it on the coordinator host: `lab image add {image} "
                                              "--kernel … --initrd …`)") from exc
            family, pxe = info.get("image_family") or "?", info.get("pxe")
            at = backend.where  # type: ignore[attr-defined]
            if isinstance(pxe, dict):
                mode, pool = str(pxe.get("mode") or "proxy"), pxe.get("pool")
                where = f"the coordinator daemon at {at} (config.yaml pxe:" + (f" on {pxe['interface']}" if pxe.get("interface") else "") + ")"
            else:
                where = f"`lab pxe serve` on the coordinator host ({at})"
                not_served = (f"! the coordinator at {at} does not serve PXE (no pxe: in its config.yaml): nothing serves this "
                              "machine until `lab pxe serve` runs on the coordinator host, or pxe: is set there (docs/PXE.md)")

        def audit(action: str, detail: dict[str, Any]) -> None:
            backend.audit(action, name, detail)

        # Step 1: render
        _say("Step 1: Render")
        for line in render_table(bm.table_rows(name, mac_n, image, label_list, where)).splitlines():
            _say("  " + line)
        _say("\n  Onboarding will:")
        for line in bm.plan_lines(mac_n, image, str(family), interface, label_list, bmc.label if bmc else None,
                                  served_by=where if leave else None, follow=follow):
            _say("  " + line)
        _say("")
        for line in bm.warning_lines(mac_n, mode, pool):
            _say("  " + line)
        if not_served:
            _say("  " + not_served)
        _say("")
        _ask("Proceed?", yes)

        _say("Step 2: PXE boot phase")
        audit("onboard.start", {"provider": "baremetal", "mac": mac_n, "image": image, "labels": label_list,
                                "dhcp": mode, "bmc": bmc.kind if bmc else None})
        step = "register"
        tracker = bm.StageTracker(mac_n)
        expires_at = time.time() + wait_s

        def record(state: str = "running", failed_step: str | None = None) -> None:
            backend.record(name, mac_n, tracker.stage, state=state, history=tracker.history, step=failed_step,
                           expires_at=expires_at)

        try:
            backend.register(name, "baremetal", label_list, environment, region)
            record()
            step = "token"
            expires_at = backend.allow(name, mac=mac_n, image=image, labels=label_list, environment=environment,
                                       region=region, wait_s=wait_s, disk_gb=disk_gb, coordinator=str(endpoint))
            if not leave:
                step = "serve"
                services = BootServices(ServeOptions(server_address or "", interface, pool, proxy_dhcp, netmask, None,
                                                     boot_dir, http_port=http_port), home)
        except OnboardFailed as exc:
            audit("onboard.failed", {"step": exc.step, "why": exc.why})
            raise
        except LabError as exc:
            audit("onboard.failed", {"step": step, "why": str(exc)})
            raise OnboardFailed(step, str(exc)) from exc

        def on_stage(m: str, what: str, detail: str) -> None:
            key = tracker.feed(m, what, detail)
            if key is not None:
                _say("  " + bm.stage_line(key, mac_n, what.partition(":")[2]))
                record()

        def power() -> None:
            assert bmc is not None
            ctl = bmc.controller()
            try:
                _say(f"  → {bmc.label}: setting next boot to PXE")
                ctl.set_next_boot_pxe()
                if ctl.state() == PowerState.ON:
                    _say(f"  → {bmc.label}: power cycling machine")
                    ctl.cycle()
                else:
                    _say(f"  → {bmc.label}: powering on machine")
                    ctl.on()
            finally:
                if hasattr(ctl, "close"):
                    ctl.close()

        if leave:
            if bmc is not None:
                try:
                    power()
                except LabError as exc:
                    record("failed", "power")
                    audit("onboard.failed", {"step": "power", "why": str(exc)})
                    raise OnboardFailed("power", str(exc)) from exc
            served = ("daemon" if (pxe_cfg is not None or (connected and not_served is None)) else "pxe-serve")
            audit("onboard.handed-over", {"provider": "baremetal", "served_by": served, "expires_at": expires_at,
                                          **({"follow": True} if follow else {})})
            if not follow:
                _say(f"  → MAC {mac_n.upper()} allowed for {timeout}; the boot is left to {where}")
                if pxe_cfg is None and not connected:
                    _say("  ! no pxe: section in config.yaml: nothing serves this machine until `lab pxe serve` runs on its segment")
                _say(f"  → `lab get servers` shows {name}'s stage as the boot services record it")
                return
            _say(f"  → MAC {mac_n.upper()} allowed for {timeout}; {where} serves the boot")

        outcome: dict[str, Any] = {}

        async def main() -> None:
            async with trio.open_nursery() as n:
                try:
                    try:
                        await n.start(services.run, on_stage)
                    except (OSError, BaseExceptionGroup, LabError) as exc:
                        raise OnboardFailed("serve", _why(exc)) from exc
                    _say(f"  → Starting PXE server on {interface or 'all interfaces'} ({server_address}, DHCP {mode})")
                    _say(f"  → DHCP {'offer' if mode == 'full' else 'boot information'} scoped to MAC {mac_n.upper()} only")
                    if bmc is not None:
                        try:
                            await trio.to_thread.run_sync(power)
                        except LabError as exc:
                            raise OnboardFailed("power", str(exc)) from exc
                    _say("  → " + bm.STAGES[0].line)
                    if bmc is None:
                        _say("\n  ⏳ Power on the machine and set it to boot from network (PXE)\n")
                    deadline = trio.current_time() + wait_s
                    while trio.current_time() < deadline:
                        if (backend.server(name) or {}).get("enrolled_at"):
                            outcome["enrolled"] = True
                            return
                        await trio.sleep(1)
                    outcome["enrolled"] = False
                except OnboardFailed as exc:
                    outcome["error"] = exc
                finally:
                    n.cancel_scope.cancel()

        def follow_stages() -> None:
            """The daemon's boot services serve the machine and write its stages; show each new one."""
            keys = {s.key for s in bm.STAGES}
            _say("  → " + bm.STAGES[0].line)
            if bmc is None:
                _say("\n  ⏳ Power on the machine and set it to boot from network (PXE)\n")
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    s = backend.server(name) or {}
                except TransportError:  # the coordinator restarting, a network blip: ask again
                    s = {}
                if s.get("enrolled_at"):
                    outcome["enrolled"] = True
                    return
                rec = (s.get("facts") or {}).get("onboarding")
                if isinstance(rec, dict) and str(rec.get("mac", "")).lower() == mac_n:
                    history = [h for h in rec.get("history") or [] if h in keys]
                    for key in history[len(tracker.history):]:
                        _say("  " + bm.stage_line(key, mac_n))
                    if len(history) > len(tracker.history):
                        tracker.history, tracker.stage = history, history[-1]
                if time.monotonic() >= deadline:
                    outcome["enrolled"] = False
                    return
                time.sleep(FOLLOW_POLL_S)

        try:
            if follow:
                follow_stages()
            else:
                trio.run(main)
        except KeyboardInterrupt:
            record("failed", "wait")
            audit("onboard.failed", {"step": "wait", "why": "interrupted"})
            raise LabError(f"onboarding interrupted at stage {tracker.stage}; run the same `lab onboard` again") from None
        if "error" in outcome:
            exc = outcome["error"]
            record("failed", exc.step)
            audit("onboard.failed", {"step": exc.step, "why": exc.why})
            raise exc
        if not outcome.get("enrolled"):
            record("timed-out")
            at = bm.identity_pillar(bm.onboarding_facts(mac_n, tracker.stage)).removeprefix("pxe: ")
            why = f"timed out waiting for enrollment at stage '{at}' after {timeout}"
            audit("onboard.failed", {"step": "wait", "why": why, "stage": tracker.stage})
            raise OnboardFailed("wait", why)
        audit("onboard.done", {"provider": "baremetal", "stages": tracker.history})
        s = backend.server(name) or {}
    _say(f"  → Identity established: {name} enrolled (labels: {','.join(s.get('labels') or []) or 'none'})")
    _say("  → Machine managed: `lab get servers` shows it")
