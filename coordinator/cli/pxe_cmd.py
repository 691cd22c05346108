"""`lab image …` (installer images) and `lab pxe …` (onboarding allowlist, boot services)."""

from __future__ import annotations

import functools
import logging
import pathlib
import sys
import time
from typing import Annotated

import trio
import typer

from lab.common.errors import UsageError
from lab.coordinator.cli.app import Output, _format, app
from lab.common.render import emit, table
from lab.coordinator.engine import Paths

image_app = typer.Typer(rich_markup_mode=None, help="Installer images served over network boot.", no_args_is_help=True)
pxe_app = typer.Typer(rich_markup_mode=None, help="Network boot: DHCP, TFTP and HTTP for machines being onboarded.", no_args_is_help=True)
app.add_typer(image_app, name="image")
app.add_typer(pxe_app, name="pxe")


def _pxe_home() -> pathlib.Path:
    return Paths.resolve().home / "pxe"


ImagesDir = Annotated[str | None, typer.Option("--images-dir", help="Default: $LAB_HOME/pxe/images.", show_default=False)]


def _images(images_dir: str | None):  # -> ImageStore
    from lab.coordinator.pxe.images import ImageStore

    return ImageStore(pathlib.Path(images_dir) if images_dir else _pxe_home() / "images")


@image_app.command("add")
def image_add(
    name: Annotated[str, typer.Argument(help="Image name, e.g. ubuntu-24.04.")],
    kernel: Annotated[pathlib.Path | None, typer.Option("--kernel", help="Installer kernel (with --initrd).")] = None,
    initrd: Annotated[pathlib.Path | None, typer.Option("--initrd", help="Installer initrd (with --kernel).")] = None,
    iso: Annotated[pathlib.Path | None, typer.Option("--iso", help="Installer ISO: kernel, initrd and family are found inside it (Ubuntu live server, Debian, RHEL/Rocky).")] = None,
    copy_iso: Annotated[bool, typer.Option("--copy-iso", help="With --iso: copy the ISO into the images directory (default: record its path; it must stay there).")] = False,
    family: Annotated[str | None, typer.Option("--family", help="ubuntu, debian or rhel (default: from the ISO, else from the name).")] = None,
    cmdline: Annotated[str, typer.Option("--cmdline", help="Extra kernel arguments (e.g. url=<iso>, inst.repo=<url>).")] = "",
    images_dir: ImagesDir = None,
    output: Output = "table",
) -> None:
    """Register an installer kernel + initrd (or an ISO holding them) under NAME."""
    fmt = _format(output)
    store = _images(images_dir)
    if iso is not None:
        if kernel is not None or initrd is not None:
            raise UsageError("give --iso FILE or --kernel FILE --initrd FILE, not both")
        image = store.add_iso(name, iso, family=family, cmdline=cmdline, copy_iso=copy_iso)
    else:
        if kernel is None or initrd is None:
            raise UsageError("give --kernel FILE and --initrd FILE, or --iso FILE")
        if copy_iso:
            raise UsageError("--copy-iso goes with --iso")
        image = store.add(name, kernel, initrd, family=family, cmdline=cmdline)
    emit({"name": image.name, "family": image.family, "cmdline": image.cmdline,
          "iso": str(image.iso) if image.iso else None}, fmt,
         lambda v, out: out.write(f"image {v['name']} added ({v['family']}{', ISO served' if v['iso'] else ''})\n"))


@image_app.command("list")
def image_list(images_dir: ImagesDir = None, output: Output = "table") -> None:
    """List registered installer images."""
    fmt = _format(output)
    rows = [{"name": i.name, "family": i.family, "cmdline": i.cmdline, **({"iso": str(i.iso)} if i.iso else {})}
            for i in _images(images_dir).list()]
    emit(rows, fmt, lambda v, out: table(["NAME", "FAMILY", "ISO", "CMDLINE"],
                                         [[r["name"], r["family"], r.get("iso", ""), r["cmdline"]] for r in v], out))


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


# the boot services live in coordinator/pxe/service.py; these names stay importable from here
from lab.coordinator.pxe.service import BootServices, ServeOptions  # noqa: E402,F401


@pxe_app.command("serve")
def pxe_serve(
    address: Annotated[str, typer.Option("--address", help="This server's IPv4 address on the boot segment.")],
    interface: Annotated[str | None, typer.Option("--interface", help="Serve DHCP/TFTP on this interface only.")] = None,
    pool: Annotated[str | None, typer.Option("--pool", help="FIRST-LAST: full DHCP from this pool (only on a segment with no other DHCP server). Without it: proxyDHCP.")] = None,
    proxy_dhcp: Annotated[bool, typer.Option("--proxy-dhcp", help="Boot information only; the network's DHCP server hands out addresses (the default without --pool).")] = False,
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
    """Run DHCP (proxyDHCP unless --pool), TFTP and HTTP in the foreground for every machine being
    onboarded; records their onboarding stages in this home's inventory (`lab get servers`)."""
    from lab.coordinator.pxe.service import serve_boot
    from lab.coordinator.state import StateDB

    opts = ServeOptions(address, interface, pool, proxy_dhcp, netmask, router, boot_dir, efi_file,
                        dhcp_port, dhcp_client_port, tftp_port, http_port, images_dir)
    home = Paths.resolve().home
    services = BootServices(opts, home)  # checks the options before anything is opened
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    def stage(mac: str, what: str, detail: str = "") -> None:
        print(f"stage={what} mac={mac} {detail}".rstrip(), flush=True)

    state = StateDB.open(home) if (home / "state.db").exists() else None  # `lab init` made one: record stages there

    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_boot, services, home, state=state, on_stage=stage))
            print(f"serving mode={services.cfg.mode} address={services.server_ip} tftp={services.root} "
                  f"http={services.http_base} nodes={len(services.allowlist)}", flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
    finally:
        if state is not None:
            state.close()
