"""`lab onboard NAME --provider ssh --host H …` (spec "Scenario A"; docs/ONBOARDING.md).

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. The pure
pieces (render table, plan, commands, host key policy) live in :mod:`lab.coordinator.providers`;
this module does the I/O around them: known_hosts files, the wheelhouse, the engine (token,
audit, inventory) and the prompt.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Any

import typer

from lab.common.errors import AuthError, ConfigError, LabError, UsageError
from lab.coordinator.cli import app as base

WAIT_ENROLLED_S = 60.0
INJECT_ENV = "LAB_ONBOARD_INJECT_FAILURE"  # test hook: "install" corrupts the copied wheel, once per run
SOURCE_DIRS = ("common", "agent", "store", "coordinator")


def _say(text: str = "") -> None:
    print(text, flush=True)


# -- wheelhouse --------------------------------------------------------------------------------


def _repo_root() -> pathlib.Path:
    import lab.coordinator

    root = pathlib.Path(lab.coordinator.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ConfigError("lab is not installed from a source checkout: pass --wheelhouse DIR with lab's wheel and its dependencies")
    return root


def _source_key(root: pathlib.Path) -> str:
    h = hashlib.sha256()
    files = [root / "pyproject.toml"]
    for d in SOURCE_DIRS:
        files += sorted(p for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheelhouse(dest: pathlib.Path) -> pathlib.Path:
    """This project's wheel plus every dependency wheel (for this machine's Python and arch) in
    ``dest``; built from a copy of the source tree so the checkout is never written to."""
    root = _repo_root()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lab-wheel-") as tmp:
        src = pathlib.Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).exists():
                shutil.copy2(root / name, src / name)
        for d in SOURCE_DIRS:
            shutil.copytree(root / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        for step in ("wheel", "download"):
            if step == "wheel":
                cmd = [*pip, "wheel", "--no-deps", "-w", str(dest), str(src)]
            else:  # every dependency, as wheels, for this Python and machine
                cmd = [*pip, "download", "-d", str(dest), *map(str, dest.glob("lab-*.whl"))]
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["failed"])[-1]
                raise LabError(f"building the agent wheels failed (pip {step}): {last}")
    return dest


def wheelhouse(home: pathlib.Path, given: str | None) -> pathlib.Path:
    """``--wheelhouse`` as given, else ``$LAB_HOME/wheels/<source hash>`` (built once per source)."""
    if given:
        path = pathlib.Path(given)
        if not list(path.glob("lab-*.whl")):
            raise ConfigError("no lab-*.whl in the wheelhouse", str(path))
        return path
    root = _repo_root()
    final = home / "wheels" / _source_key(root)
    if (final / ".complete").exists():
        return final
    _say(f"  → Build lab agent wheels into {final} (once per source version)")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_wheelhouse(tmp)
    (tmp / ".complete").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# -- known hosts -------------------------------------------------------------------------------


def _known_hosts_files(home: pathlib.Path, extra: str | None) -> list[pathlib.Path]:
    files = [pathlib.Path.home() / ".ssh" / "known_hosts", home / "known_hosts"]
    if extra:
        files.insert(0, pathlib.Path(extra))
    return files


def _check_host_key(target: Any, home: pathlib.Path, accept_new: bool, extra: str | None) -> str:
    """Decide on the presented host key; returns the pinned "ALG BASE64" or raises AuthError."""
    from lab.coordinator.providers import _asyncssh, _known_hosts

    alg, key = _asyncssh.fetch_host_key(target)
    texts = []
    for f in _known_hosts_files(home, extra):
        try:
            texts.append(f.read_text())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read known_hosts: {exc.strerror}", str(f)) from exc
    d = _known_hosts.decide(texts, target.host, target.port, alg, key, accept_new=accept_new)
    if d.action == _known_hosts.REFUSE:
        raise AuthError(d.reason)
    if d.action == _known_hosts.ACCEPT_NEW:
        bar = "!" * 72
        print(
            f"{bar}\n!! NEW HOST KEY accepted for {_known_hosts.host_name(target.host, target.port)} (--accept-new-host-key)\n"
            f"!!   {alg} {d.fingerprint}\n!! recorded in {home / 'known_hosts'}; a different key later is refused.\n{bar}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        home.mkdir(parents=True, exist_ok=True)
        with (home / "known_hosts").open("a") as f:
            f.write(_known_hosts.known_hosts_line(target.host, target.port, alg, key))
    return f"{alg} {key}"


# -- the command -------------------------------------------------------------------------------


def _server_endpoint(home: pathlib.Path, given: str | None) -> str:
    from lab.common.rpc import parse_endpoint

    text = given or base._read_settings(home).get("server")
    if not text:
        raise UsageError("which coordinator should the agent reach? pass --server HOST:PORT (the address of `lab server run` as the target sees it)")
    host, port = parse_endpoint(str(text), 7443)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ask(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask 'Proceed? [y/N]' on: pass --yes to onboard without asking")
    answer = input(f"  {question} [y/N]: ").strip().lower()
    if answer not in ("y", "yes"):
        raise LabError("onboarding cancelled; nothing was changed on the host")


# -- bare metal (spec "Scenario B/C") --------------------------------------------------------


def _interface_ipv4(iface: str) -> tuple[str, int]:
    from lab.coordinator.pxe.service import interface_ipv4

    try:
        return interface_ipv4(iface)
    except UsageError as exc:
        raise UsageError(f"{exc}: pass --server-address IP") from None


def _onboard_baremetal(
    name: str, *, mac: str | None, image: str | None, labels: list[str] | None, environment: str | None,
    region: str | None, yes: bool, server: str | None, ipmi: str | None, ipmi_user: str | None,
    ipmi_password_file: str | None, redfish: str | None, redfish_user: str | None, redfish_password_file: str | None,
    interface: str | None, proxy_dhcp: bool, pool: str | None, server_address: str | None, timeout: str,
    disk_gb: int | None, http_port: int, boot_dir: pathlib.Path | None, definitions: str | None,
    no_wait: bool = False,
) -> None:
    """Render, ask, register, mint a token, allow the MAC, power on (BMC), serve, follow the stages.
    ``no_wait``: stop after the power step; the running boot services (`lab pxe serve`, or the
    daemon's ``pxe:``) serve the machine and record its stages."""
    import ipaddress

    import trio

    from lab.coordinator import tokens
    from lab.coordinator.cli.pxe_cmd import BootServices, ServeOptions, _duration, _images, _pxe_home
    from lab.coordinator.pxe.config import load_pxe_config
    from lab.coordinator.pxe.service import why as _why
    from lab.coordinator.cli.token_cmd import _ca_fingerprint
    from lab.coordinator.engine import _split
    from lab.coordinator.power.base import PowerState
    from lab.coordinator.providers import baremetal as bm
    from lab.coordinator.providers.ssh import OnboardFailed, render_table
    from lab.coordinator.pxe.nodes import write_node
    from lab.coordinator.pxe.registry import OnboardingNode, normalize_mac
    from lab.coordinator.state import validate_server_name

    validate_server_name(name)
    if not mac:
        raise UsageError("--provider baremetal needs --mac MAC (the machine's boot NIC)")
    if not image:
        raise UsageError("--provider baremetal needs --image NAME (see `lab image list`)")
    if proxy_dhcp and pool:
        raise UsageError("give --pool FIRST-LAST (full DHCP) or --proxy-dhcp, not both")
    if no_wait and (proxy_dhcp or pool):
        raise UsageError("with --no-wait the running boot services choose the DHCP mode (`lab pxe serve --pool …`, "
                         "or pool: in config.yaml's pxe: section); leave out --pool/--proxy-dhcp")
    mac_n = normalize_mac(mac)
    wait_s = _duration(timeout)
    bmc = bm.bmc_from_options(ipmi, ipmi_user, ipmi_password_file, redfish, redfish_user, redfish_password_file)
    label_list = _split(labels)
    pxe_cfg = load_pxe_config(base.Paths.resolve(definitions).home) if no_wait else None
    prefix = 24
    if interface:
        try:
            detected, prefix = _interface_ipv4(interface)
        except UsageError:
            if server_address is None:
                raise
            detected = server_address
        server_address = server_address or detected
    if no_wait and not server_address and pxe_cfg is not None:
        try:  # the daemon's address on the boot segment (its interface may live elsewhere, e.g. a netns)
            server_address = pxe_cfg.address or pxe_cfg.options().address
        except ConfigError:
            server_address = None
    if not server_address and not (no_wait and (server or base._read_settings(base.Paths.resolve(definitions).home).get("server"))):
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
    paths = base.Paths.resolve(definitions)
    home = paths.home
    try:
        img = _images(None).get(image)
    except LabError as exc:
        raise OnboardFailed("render", f"{exc} (register it with `lab image add {image} --kernel … --initrd …`)") from exc
    endpoint = server or base._read_settings(home).get("server") or f"{server_address}:7443"
    if no_wait:
        mode, pool = (pxe_cfg.mode, pxe_cfg.pool) if pxe_cfg is not None else ("proxy", None)
        where = ("the coordinator daemon (config.yaml pxe:" + (f" on {pxe_cfg.interface}" if pxe_cfg.interface else "")
                 + ")" if pxe_cfg is not None else "`lab pxe serve` (start it on the boot segment)")
    else:
        mode = "full" if pool is not None else "proxy"
        where = "this device" + (f" ({interface}, {server_address})" if interface else f" ({server_address})")

    with base._engine(definitions, local=True) as engine:
        if label_list:
            engine._check_labels(label_list)
        fpr = _ca_fingerprint(home)

        def audit(action: str, detail: dict[str, Any]) -> None:
            with engine.state.transaction():
                engine.state.audit(action, name, detail)

        # Step 1: render
        _say("Step 1: Render")
        for line in render_table(bm.table_rows(name, mac_n, image, label_list, where)).splitlines():
            _say("  " + line)
        _say("\n  Onboarding will:")
        for line in bm.plan_lines(mac_n, image, img.family, interface, label_list, bmc.label if bmc else None,
                                  served_by=where if no_wait else None):
            _say("  " + line)
        _say("")
        for line in bm.warning_lines(mac_n, mode, pool):
            _say("  " + line)
        _say("")
        _ask("Proceed?", yes)

        _say("Step 2: PXE boot phase")
        audit("onboard.start", {"provider": "baremetal", "mac": mac_n, "image": image, "labels": label_list,
                                "dhcp": mode, "bmc": bmc.kind if bmc else None})
        step = "register"
        tracker = bm.StageTracker(mac_n)

        def record(state: str = "running", failed_step: str | None = None) -> None:
            if getattr(engine.state.get_server(name), "enrolled_at", None):
                return  # the agent's own facts are there now
            facts = bm.onboarding_facts(mac_n, tracker.stage, state=state, history=tracker.history,
                                        at=time.time(), step=failed_step)
            with engine.state.transaction():
                engine.state.update_server(name, facts=facts)

        try:
            with engine.state.transaction():
                try:
                    existing = engine.state.get_server(name)
                except LabError:
                    engine.state.add_server(name, "baremetal", label_list, environment=environment, region=region)
                    engine.state.audit("server.add", name, {"provider": "baremetal", "labels": label_list,
                                                            "environment": environment, "region": region})
                else:
                    if existing.provider != "baremetal":
                        raise OnboardFailed("register", f"server {name!r} exists with provider {existing.provider}")
                    if getattr(existing, "enrolled_at", None):
                        raise OnboardFailed("register", f"{name} is already enrolled (remove it first to reinstall: `lab server remove {name}`)")
            record()
            step = "token"
            with engine.state.transaction():
                try:  # an earlier, failed run's token is useless now
                    tokens.revoke_tokens(engine.state, name)
                except LabError:
                    pass
                token, trec = tokens.create_token(engine.state, fpr, name, label_list, environment=environment,
                                                  region=region, ttl=wait_s + 3600)
                engine.state.audit("token.create", name, {"labels": label_list, "by": "onboard", "expires_at": trec.expires_at})
            step = "allow"
            node = OnboardingNode(mac=mac_n, hostname=name, image=image, expires_at=time.time() + wait_s,
                                  labels=tuple(label_list), token=token, disk_gb=disk_gb, coordinator=str(endpoint))
            write_node(_pxe_home() / "nodes", node)
            del token
            if not no_wait:
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

        if no_wait:
            if bmc is not None:
                try:
                    power()
                except LabError as exc:
                    record("failed", "power")
                    audit("onboard.failed", {"step": "power", "why": str(exc)})
                    raise OnboardFailed("power", str(exc)) from exc
            audit("onboard.handed-over", {"provider": "baremetal", "served_by": "daemon" if pxe_cfg is not None else "pxe-serve",
                                          "expires_at": node.expires_at})
            _say(f"  → MAC {mac_n.upper()} allowed for {timeout}; the boot is left to {where}")
            if pxe_cfg is None:
                _say("  ! no pxe: section in config.yaml: nothing serves this machine until `lab pxe serve` runs on its segment")
            _say(f"  → `lab get servers` shows {name}'s stage as the boot services record it")
            return

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
                        if getattr(engine.state.get_server(name), "enrolled_at", None):
                            outcome["enrolled"] = True
                            return
                        await trio.sleep(1)
                    outcome["enrolled"] = False
                except OnboardFailed as exc:
                    outcome["error"] = exc
                finally:
                    n.cancel_scope.cancel()

        try:
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
        s = engine.state.get_server(name)
    _say(f"  → Identity established: {name} enrolled (labels: {','.join(s.labels) or 'none'})")
    _say("  → Machine managed: `lab get servers` shows it")


@base.app.command("onboard")
def onboard(
    name: Annotated[str, typer.Argument(help="Server name (DNS label).")],
    provider: Annotated[str, typer.Option("--provider", "-p", help="ssh (a machine with an OS) or baremetal (PXE boot + install).")],
    host: Annotated[str | None, typer.Option("--host", help="ssh: address of the machine.")] = None,
    port: Annotated[int, typer.Option("--port", help="SSH port.")] = 22,
    user: Annotated[str, typer.Option("--user", "-u", help="SSH user (root, or one that can write the agent's paths).")] = "root",
    identity: Annotated[str | None, typer.Option("--identity", "-i", help="Private key file (default: ~/.ssh/id_* and ssh-agent).")] = None,
    labels: Annotated[list[str] | None, typer.Option("--labels", "--label", "-l", help="Comma-separated labels.")] = None,
    environment: Annotated[str | None, typer.Option("--environment", "-e")] = None,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before applying.")] = False,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="Trust an unknown host key (printed loudly; recorded in $LAB_HOME/known_hosts).")] = False,
    server: Annotated[str | None, typer.Option("--server", help="Coordinator endpoint the agent should reach (default: the configured `lab server connect` one).")] = None,
    known_hosts: Annotated[str | None, typer.Option("--known-hosts", hidden=True)] = None,
    target_root: Annotated[str, typer.Option("--target-root", hidden=True, help="Prefix for every remote path (tests).")] = "",
    service_mode: Annotated[str, typer.Option("--service-mode", hidden=True, help="auto, systemd or process.")] = "auto",
    wheels: Annotated[str | None, typer.Option("--wheelhouse", hidden=True, help="Prebuilt wheels (lab + dependencies).")] = None,
    mac: Annotated[str | None, typer.Option("--mac", help="baremetal: MAC address of the machine's boot NIC.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="baremetal: installer image (`lab image add`).")] = None,
    ipmi: Annotated[str | None, typer.Option("--ipmi", help="baremetal: BMC address (IPMI over LAN); password from $LAB_IPMI_PASSWORD or --ipmi-password-file.")] = None,
    ipmi_user: Annotated[str | None, typer.Option("--ipmi-user")] = None,
    ipmi_password_file: Annotated[str | None, typer.Option("--ipmi-password-file", help="0600 file holding the IPMI password.")] = None,
    redfish: Annotated[str | None, typer.Option("--redfish", help="baremetal: Redfish service URL; password from $LAB_REDFISH_PASSWORD or --redfish-password-file.")] = None,
    redfish_user: Annotated[str | None, typer.Option("--redfish-user")] = None,
    redfish_password_file: Annotated[str | None, typer.Option("--redfish-password-file")] = None,
    interface: Annotated[str | None, typer.Option("--interface", help="baremetal: serve DHCP/TFTP on this interface (the target's L2 segment).")] = None,
    proxy_dhcp: Annotated[bool, typer.Option("--proxy-dhcp", help="baremetal: boot information only; the network's DHCP server hands out addresses (the default without --pool).")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="baremetal: register, allow the MAC and power on, then return; the running boot services (`lab pxe serve`, or `lab server run` with pxe: in config.yaml) serve the boot and record its stages.")] = False,
    pool: Annotated[str | None, typer.Option("--pool", help="baremetal: FIRST-LAST (or auto: the top of the interface's subnet): full DHCP, only on a segment with no other DHCP server (default: proxyDHCP).")] = None,
    server_address: Annotated[str | None, typer.Option("--server-address", help="baremetal: this device's IPv4 address on the boot segment (default: the interface's).")] = None,
    timeout: Annotated[str, typer.Option("--timeout", help="baremetal: how long to wait for enrollment (e.g. 30m, 2h).")] = "30m",
    disk_gb: Annotated[int | None, typer.Option("--disk-gb", help="baremetal: boot disk size (chooses the disk layout).")] = None,
    http_port: Annotated[int, typer.Option("--http-port", hidden=True)] = 8080,
    boot_dir: Annotated[pathlib.Path | None, typer.Option("--boot-dir", hidden=True)] = None,
    definitions: base.Definitions = None,
) -> None:
    """Onboard a machine: ssh (it has an OS: install the agent, enroll it) or baremetal (PXE boot, unattended install, enroll)."""
    if provider == "baremetal":
        if host is not None:
            raise UsageError("--host is for --provider ssh; bare metal is found by --mac")
        _onboard_baremetal(
            name, mac=mac, image=image, labels=labels, environment=environment, region=region, yes=yes, server=server,
            ipmi=ipmi, ipmi_user=ipmi_user, ipmi_password_file=ipmi_password_file, redfish=redfish,
            redfish_user=redfish_user, redfish_password_file=redfish_password_file, interface=interface,
            proxy_dhcp=proxy_dhcp, pool=pool, server_address=server_address, timeout=timeout, disk_gb=disk_gb,
            http_port=http_port, boot_dir=boot_dir, definitions=definitions, no_wait=no_wait,
        )  # fmt: skip
        return
    if host is None:
        raise UsageError("--provider ssh needs --host")
    from lab.coordinator import tokens
    from lab.coordinator.cli.token_cmd import _ca_fingerprint
    from lab.coordinator.engine import _split
    from lab.coordinator.providers import _asyncssh, ssh
    from lab.coordinator.state import validate_server_name

    if provider != "ssh":
        raise UsageError(f"provider {provider!r} is not supported by `lab onboard` (ssh or baremetal)")
    if service_mode not in ssh.SERVICE_MODES:
        raise UsageError(f"--service-mode must be one of {', '.join(ssh.SERVICE_MODES)}")
    validate_server_name(name)
    label_list = _split(labels)
    paths = base.Paths.resolve(definitions)
    home = paths.home
    endpoint = _server_endpoint(home, server)
    target = _asyncssh.SshTarget(host, port, user, identity)
    remote_paths = ssh.RemotePaths(target_root)

    with base._engine(definitions, local=True) as engine:
        if label_list:
            engine._check_labels(label_list)
        fpr = _ca_fingerprint(home)

        def audit(action: str, detail: dict[str, Any]) -> None:
            with engine.state.transaction():
                engine.state.audit(action, name, detail)

        # Step 1: render
        _say("Step 1: Render")
        try:
            pinned = _check_host_key(target, home, accept_new_host_key, known_hosts)
            client = _asyncssh.SshClient.connect(target, pinned)
        except LabError as exc:
            failed = ssh.OnboardFailed("connect", str(exc))
            failed.exit_code = exc.exit_code  # a refused host key or login stays an AuthError's status
            raise failed from exc
        with client:
            r = client.run(ssh.probe_command(), timeout=60)
            if r.rc != 0:
                raise ssh.OnboardFailed("connect", (r.stderr.strip().splitlines() or ["the facts probe failed (is python3 installed?)"])[-1])
            try:
                facts, target_info = ssh.parse_probe(r.stdout)
            except ValueError as exc:
                raise ssh.OnboardFailed("connect", str(exc)) from exc
            mode = service_mode
            if mode == "auto":
                mode = "systemd" if client.run(ssh.commands_for(ssh.Remote(remote_paths, endpoint, name, "x"))["systemd"]).stdout.strip() == "yes" else "process"
            rows = ssh.table_rows(name, host, facts)
            for line in ssh.render_table(rows).splitlines():
                _say("  " + line)
            _say("\n  Onboarding will:")
            zone = (base._read_settings(home).get("dns") or {}).get("zone")
            for line in ssh.plan_lines(name, dns_zone=zone, labels=label_list):
                _say("  " + line)
            _say(f"  + Start the agent as a {'systemd unit' if mode == 'systemd' else 'supervised background process'}; it reaches {endpoint}")
            suggestions = ssh.suggest(facts)
            if suggestions:
                _say("\n  Detected hardware:")
                for line in ssh.suggestion_lines(suggestions):
                    _say("    " + line)
            if not label_list and suggestions:
                _say(f"  (suggested: --labels {','.join(s.label for s in suggestions)})")
            local_py = f"{sys.version_info.major}.{sys.version_info.minor}"
            if target_info.get("python", "").rsplit(".", 1)[0] != local_py or target_info.get("machine") != os.uname().machine:
                _say(f"  ! the target runs Python {target_info.get('python')} on {target_info.get('machine')}; the shipped dependency wheels are for Python {local_py} on {os.uname().machine}")
            _say("")
            _ask("Proceed?", yes)

            # Step 3: apply
            _say("Step 3: Apply")
            audit("onboard.start", {"provider": "ssh", "host": host, "port": port, "user": user, "labels": label_list, "mode": mode})
            try:
                _say(f"  → SSH into {host} (connected; host key {pinned.split()[0]})")
                house = wheelhouse(home, wheels)
                wheel_files = {p.name: p for p in sorted(house.glob("*.whl"))}
                lab_wheel = next(n for n in wheel_files if n.startswith("lab-"))
                with engine.state.transaction():
                    try:
                        engine.state.get_server(name)
                    except LabError:
                        engine.state.add_server(name, "ssh", label_list, environment=environment, region=region)
                        engine.state.audit("server.add", name, {"provider": "ssh", "labels": label_list, "environment": environment, "region": region})

                def mint() -> str:
                    with engine.state.transaction():
                        try:  # an earlier, failed run's token is useless now
                            tokens.revoke_tokens(engine.state, name)
                        except LabError:  # none unused
                            pass
                        text, record = tokens.create_token(engine.state, fpr, name, label_list, environment=environment, region=region, ttl=15 * 60)
                        engine.state.audit("token.create", name, {"labels": label_list, "by": "onboard", "expires_at": record.expires_at})
                    return text

                def wait_enrolled() -> bool:
                    deadline = time.monotonic() + WAIT_ENROLLED_S
                    while time.monotonic() < deadline:
                        if getattr(engine.state.get_server(name), "enrolled_at", None):
                            return True
                        time.sleep(0.5)
                    return False

                unit = _repo_root() / "packaging" / "systemd" / "lab-agent.service" if mode == "systemd" else None
                run = ssh.Onboarding(
                    client, ssh.Remote(remote_paths, endpoint, name, lab_wheel, mode), wheel_files, mint, wait_enrolled, audit, _say,
                    unit_template=unit.read_text() if unit is not None else None, inject_failure=os.environ.get(INJECT_ENV) or None,
                )  # fmt: skip
                result = run.apply()
            except LabError as exc:
                step = getattr(exc, "step", "apply")
                audit("onboard.failed", {"step": step, "why": getattr(exc, "why", str(exc))})
                raise
        audit("onboard.done", {"mode": mode, "supervisor_pid": result["supervisor_pid"]})
        s = engine.state.get_server(name)
    _say(f"  → Identity established: {name} enrolled with {endpoint} (labels: {','.join(s.labels) or 'none'})")
    if result["supervisor_pid"]:
        _say(f"  → Agent supervisor pid {result['supervisor_pid']} (pidfile {remote_paths.pidfile}, log {remote_paths.log})")
    _say("  → Machine managed: `lab get servers` shows it")
