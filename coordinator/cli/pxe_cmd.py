"""`lab image …` (installer images) and `lab pxe …` (onboarding allowlist, boot services)."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import trio
import typer

from lab.common.errors import ConfigError, UsageError
from lab.coordinator.cli.app import Output, _format, app
from lab.common.render import emit, table
from lab.coordinator.engine import Paths

image_app = typer.Typer(rich_markup_mode=None, help="Installer images served over network boot.", no_args_is_help=True)
pxe_app = typer.Typer(rich_markup_mode=None, help="Network boot: DHCP, TFTP and HTTP for machines being onboarded.", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(pxe_app, name="pxe")

DEBIAN_IPXE_DIR = pathlib.Path("/usr/lib/ipxe")
BOOT_FILES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")


def _default_boot_dir(folder: pathlib.Path) -> pathlib.Path:
    """$LAB_HOME/pxe/tftp, first filled from Debian's ipxe package. Files are copied, not linked:
    Debian's ipxe.efi is a symlink into /boot, and TFTP refuses symlinks that leave its root."""
    if not folder.is_dir() and DEBIAN_IPXE_DIR.is_dir():
        folder.mkdir(parents=True)
        for name in BOOT_FILES:
            src = DEBIAN_IPXE_DIR / name
            if src.exists():
                shutil.copyfile(src.resolve(), folder / name)
    return folder


def _pxe_home() -> pathlib.Path:
    return Paths.resolve().home / "pxe"


ImagesDir = Annotated[str | None, typer.Option("--images-dir", help="Default: $LAB_HOME/pxe/images.", show_default=False)]


def _images(images_dir: str | None):  # -> ImageStore
    from lab.coordinator.pxe.images import ImageStore

    return ImageStore(pathlib.Path(images_dir) if images_dir else _pxe_home() / "images")


@image_app.command("add")
def image_add(
    name: Annotated[str, typer.Argument(help="Image name, e.g. ubuntu-24.04.")],
    kernel: Annotated[pathlib.Path, typer.Option("--kernel", help="Installer kernel.")],
    initrd: Annotated[pathlib.Path, typer.Option("--initrd", help="Installer initrd.")],
    family: Annotated[str | None, typer.Option("--family", help="ubuntu, debian or rhel (default: from the name).")] = None,
    cmdline: Annotated[str, typer.Option("--cmdline", help="Extra kernel arguments (e.g. url=<iso>, inst.repo=<url>).")] = "",
    images_dir: ImagesDir = None,
    output: Output = "table",
) -> None:
    """Register an installer kernel + initrd under NAME."""
    fmt = _format(output)
    image = _images(images_dir).add(name, kernel, initrd, family=family, cmdline=cmdline)
    emit({"name": image.name, "family": image.family, "cmdline": image.cmdline}, fmt,
         lambda v, out: out.write(f"image {v['name']} added ({v['family']})\n"))


@image_app.command("list")
def image_list(images_dir: ImagesDir = None, output: Output = "table") -> None:
    """List registered installer images."""
    fmt = _format(output)
    rows = [{"name": i.name, "family": i.family, "cmdline": i.cmdline} for i in _images(images_dir).list()]
    emit(rows, fmt, lambda v, out: table(["NAME", "FAMILY", "CMDLINE"], [[r["name"], r["family"], r["cmdline"]] for r in v], out))


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise UsageError(f"not a duration: {text!r} (e.g. 90m, 2h)") from None


@pxe_app.command("allow")
def pxe_allow(
    mac: Annotated[str, typer.Argument(help="MAC address of the machine to onboard.")],
    hostname: Annotated[str, typer.Option("--hostname", help="Hostname to install.")],
    image: Annotated[str, typer.Option("--image", help="Installer image name.")] = "ubuntu-24.04",
    labels: Annotated[str, typer.Option("--labels", help="Comma-separated labels.")] = "",
    token_file: Annotated[pathlib.Path | None, typer.Option("--token-file", help="File holding the one-time join token.")] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="How long to answer this MAC.")] = "2h",
    disk_gb: Annotated[int | None, typer.Option("--disk-gb", help="Boot disk size (chooses the layout).")] = None,
    coordinator: Annotated[str, typer.Option("--coordinator", help="host:port the agent enrolls with.")] = "",
) -> None:
    """Answer MAC on the boot services until the TTL runs out (the token never goes on argv)."""
    from lab.coordinator.pxe.nodes import write_node
    from lab.coordinator.pxe.registry import OnboardingNode

    token = token_file.read_text().strip() if token_file else ""
    node = OnboardingNode(mac=mac, hostname=hostname, image=image, expires_at=time.time() + _duration(ttl),
                          labels=tuple(x for x in labels.split(",") if x), token=token, disk_gb=disk_gb,
                          coordinator=coordinator)
    write_node(_pxe_home() / "nodes", node)
    print(f"allowing {node.mac} ({node.hostname}) for {ttl}")


@pxe_app.command("deny")
def pxe_deny(mac: Annotated[str, typer.Argument(help="MAC address.")]) -> None:
    """Stop answering MAC."""
    from lab.coordinator.pxe.nodes import remove_node

    if not remove_node(_pxe_home() / "nodes", mac):
        raise UsageError(f"{mac} is not being onboarded")


def _pool(text: str | None) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv4Address | None]:
    if text is None:
        return None, None
    try:
        first, last = text.split("-", 1)
        return ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
    except ValueError:
        raise UsageError(f"--pool wants FIRST-LAST, e.g. 10.9.0.100-10.9.0.150, not {text!r}") from None


@dataclasses.dataclass
class ServeOptions:
    """What `lab pxe serve` (and `lab onboard --provider baremetal`) run the boot services with."""

    address: str
    interface: str | None = None
    pool: str | None = None
    proxy_dhcp: bool = False
    netmask: str = "255.255.255.0"
    router: str | None = None
    boot_dir: pathlib.Path | None = None
    efi_file: str = "ipxe.efi"
    dhcp_port: int = 67
    dhcp_client_port: int = 68
    tftp_port: int = 69
    http_port: int = 8080
    images_dir: str | None = None


class BootServices:
    """DHCP + TFTP + HTTP for every machine in $LAB_HOME/pxe/nodes, re-read every 2 s. Built
    (and checked: UsageError/ConfigError) synchronously; ``run`` serves until cancelled and
    reports progress as ``on_stage(mac, stage, detail)``."""

    def __init__(self, opts: ServeOptions) -> None:
        from lab.coordinator.pxe.dhcp import DhcpConfig, DhcpServer
        from lab.coordinator.pxe.nodes import reload_into
        from lab.coordinator.pxe.registry import Allowlist

        if opts.proxy_dhcp == (opts.pool is not None):
            raise UsageError("give either --pool FIRST-LAST (full DHCP) or --proxy-dhcp")
        try:
            server_ip = ipaddress.IPv4Address(opts.address)
            mask = ipaddress.IPv4Address(opts.netmask)
            gw = ipaddress.IPv4Address(opts.router) if opts.router else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        first, last = _pool(opts.pool)
        self.opts = opts
        self.server_ip = server_ip
        self.http_base = f"http://{server_ip}:{opts.http_port}"
        self.cfg = DhcpConfig(server_ip=server_ip, http_base=self.http_base, mode="proxy" if opts.proxy_dhcp else "full",
                              pool_first=first, pool_last=last, subnet_mask=mask, router=gw, efi_x64_file=opts.efi_file)
        home = _pxe_home()
        self.root = opts.boot_dir or _default_boot_dir(home / "tftp")
        if not self.root.is_dir():
            raise ConfigError(f"TFTP boot directory {self.root} does not exist (install Debian's ipxe or pass --boot-dir)")
        self.allowlist = Allowlist()
        self.nodes_dir = home / "nodes"
        reload_into(self.nodes_dir, self.allowlist)
        self.dhcp = dhcp = DhcpServer(self.cfg, self.allowlist)
        self.http = _image_tracking_class()(
            dhcp, self.allowlist, _images(opts.images_dir), self.http_base,
            lease_lookup=lambda mac: (str(ip) if (ip := dhcp.lease_for(mac, time.time())) else None))

    async def run(self, on_stage: Callable[[str, str, str], None], task_status=trio.TASK_STATUS_IGNORED) -> None:
        from lab.coordinator.pxe.dhcp import serve_dhcp
        from lab.coordinator.pxe.http import serve_http
        from lab.coordinator.pxe.nodes import reload_into
        from lab.coordinator.pxe.tftp import TftpConfig, serve_tftp

        o, dhcp = self.opts, self.dhcp

        async def reload_forever() -> None:
            while True:
                await trio.sleep(2)
                try:
                    reload_into(self.nodes_dir, self.allowlist)
                except ConfigError as exc:
                    print(f"lab: warning: {exc}", file=sys.stderr)

        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_dhcp, dhcp, interface=o.interface, port=o.dhcp_port,
                                            client_port=o.dhcp_client_port,
                                            proxy_port=4011 if o.proxy_dhcp else None,
                                            on_event=lambda e: on_stage(e.mac, e.stage, e.detail)))
            await n.start(functools.partial(serve_tftp, TftpConfig(root=self.root), port=o.tftp_port, interface=o.interface,
                                            on_event=lambda what, peer, name: on_stage(dhcp.mac_for(peer, time.time()) or "-", what,
                                                                                       f"peer={peer} file={name}")))
            await n.start(functools.partial(serve_http, self.http, address=str(self.server_ip), port=o.http_port,
                                            on_event=lambda mac, what: on_stage(mac, what, "")))
            n.start_soon(reload_forever)
            task_status.started()


def _image_tracking_class():  # BootService is imported lazily (the CLI starts fast)
    from lab.coordinator.pxe.http import _IMAGE_RE, BootService, Response

    class ImageTracking(BootService):
        """Also reports kernel/initrd downloads (``kernel-fetched``/``initrd-fetched``) for the MAC
        that leased the requesting address (full mode; in proxy mode lab does not know it)."""

        def __init__(self, dhcp: Any, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._dhcp = dhcp

        def route(self, method: str, path: str, peer_ip: str, now: float) -> Response:
            resp = super().route(method, path, peer_ip, now)
            if resp.status == 200 and resp.event is None and (m := _IMAGE_RE.match(path)):
                mac = self._dhcp.mac_for(peer_ip, now)
                if mac is not None:
                    resp = dataclasses.replace(resp, event=(mac, "kernel-fetched" if m[2] == "vmlinuz" else "initrd-fetched"))
            return resp

    return ImageTracking


@pxe_app.command("serve")
def pxe_serve(
    address: Annotated[str, typer.Option("--address", help="This server's IPv4 address on the boot segment.")],
    interface: Annotated[str | None, typer.Option("--interface", help="Serve DHCP/TFTP on this interface only.")] = None,
    pool: Annotated[str | None, typer.Option("--pool", help="FIRST-LAST: full DHCP from this pool.")] = None,
    proxy_dhcp: Annotated[bool, typer.Option("--proxy-dhcp", help="Boot info only; the network's DHCP server hands out addresses.")] = False,
    netmask: Annotated[str, typer.Option("--netmask")] = "255.255.255.0",
    router: Annotated[str | None, typer.Option("--router")] = None,
    boot_dir: Annotated[pathlib.Path | None, typer.Option("--boot-dir", help="TFTP root (default $LAB_HOME/pxe/tftp, else /usr/lib/ipxe).")] = None,
    efi_file: Annotated[str, typer.Option("--efi-file", help="ipxe.efi or snponly.efi.")] = "ipxe.efi",
    dhcp_port: Annotated[int, typer.Option("--dhcp-port")] = 67,
    dhcp_client_port: Annotated[int, typer.Option("--dhcp-client-port")] = 68,
    tftp_port: Annotated[int, typer.Option("--tftp-port")] = 69,
    http_port: Annotated[int, typer.Option("--http-port")] = 8080,
    images_dir: ImagesDir = None,
) -> None:
    """Run DHCP, TFTP and HTTP in the foreground for every machine being onboarded."""
    services = BootServices(ServeOptions(address, interface, pool, proxy_dhcp, netmask, router, boot_dir, efi_file,
                                         dhcp_port, dhcp_client_port, tftp_port, http_port, images_dir))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    def stage(mac: str, what: str, detail: str = "") -> None:
        print(f"stage={what} mac={mac} {detail}".rstrip(), flush=True)

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(services.run, stage)
            print(f"serving mode={services.cfg.mode} address={services.server_ip} tftp={services.root} "
                  f"http={services.http_base} nodes={len(services.allowlist)}", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
