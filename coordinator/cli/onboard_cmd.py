"""`lab onboard NAME --provider ssh|baremetal …` (spec "Scenario A/B/C"; docs/ONBOARDING.md).

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. The command and
what both flows share live here (the prompt, known_hosts files, the wheelhouse, the agent's
coordinator endpoint); the flows are coordinator/cli/onboard_ssh.py (:func:`onboard_ssh`) and
coordinator/cli/onboard_baremetal.py. The pure pieces (render table, plan, commands, host key
policy) live in :mod:`lab.coordinator.providers`; the coordinator's side (register, token, audit,
enrollment state) in :mod:`lab.coordinator.onboarding`, local or through the daemon.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
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
        from lab.coordinator.cli.onboard_baremetal import onboard_baremetal

        onboard_baremetal(
            name, mac=mac, image=image, labels=labels, environment=environment, region=region, yes=yes, server=server,
            ipmi=ipmi, ipmi_user=ipmi_user, ipmi_password_file=ipmi_password_file, redfish=redfish,
            redfish_user=redfish_user, redfish_password_file=redfish_password_file, interface=interface,
            proxy_dhcp=proxy_dhcp, pool=pool, server_address=server_address, timeout=timeout, disk_gb=disk_gb,
            http_port=http_port, boot_dir=boot_dir, definitions=definitions, no_wait=no_wait,
        )  # fmt: skip
        return
    if host is None:
        raise UsageError("--provider ssh needs --host")
    if provider != "ssh":
        raise UsageError(f"provider {provider!r} is not supported by `lab onboard` (ssh or baremetal)")
    from lab.coordinator.cli.onboard_ssh import onboard_ssh
    from lab.coordinator.engine import _split

    onboard_ssh(
        base.Paths.resolve(definitions), name, host, port, user, identity, _split(labels), environment=environment,
        region=region, server=server, accept_new_host_key=accept_new_host_key, known_hosts=known_hosts,
        target_root=target_root, service_mode=service_mode, wheels=wheels, yes=yes,
    )  # fmt: skip
