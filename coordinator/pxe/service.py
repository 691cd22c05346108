"""The boot services as one thing to run: DHCP + TFTP + HTTP for every machine being onboarded.

`lab pxe serve`, `lab onboard --provider baremetal` and the coordinator daemon (`pxe:` in
``$LAB_HOME/config.yaml``, coordinator/pxe/config.py) all run :class:`BootServices`; the first and
the daemon through :func:`serve_boot`, which also records each machine's onboarding stage in the
inventory (:class:`StageRecorder`), so that `lab get servers` follows a boot that
`lab onboard --no-wait` left to them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import ipaddress
import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import trio

from lab.common.errors import ConfigError, LabError, UsageError

__all__ = ["BOOT_FILES", "BootServices", "ServeOptions", "StageRecorder", "default_boot_dir", "interface_ipv4",
           "serve_boot", "serve_configured", "why"]

log = logging.getLogger("lab.pxe")

DEBIAN_IPXE_DIR = pathlib.Path("/usr/lib/ipxe")
BOOT_FILES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")
DEFAULT_HTTP_PORT = 8080
DEFAULT_PROXY_PORT = 4011
RELOAD_S = 2.0
_PEERS_KEPT = 4096

OnStage = Callable[[str, str, str], None]  # (mac, event, detail)


@dataclasses.dataclass
class ServeOptions:
    """What the boot services run with. No ``pool``: proxyDHCP (the network's DHCP server hands out
    addresses; lab answers only allowlisted PXE clients with boot information)."""

    address: str
    interface: str | None = None
    pool: str | None = None
    proxy_dhcp: bool = False  # explicit proxy mode; the default without a pool anyway
    netmask: str = "255.255.255.0"
    router: str | None = None
    boot_dir: pathlib.Path | None = None
    efi_file: str = "ipxe.efi"
    dhcp_port: int = 67
    dhcp_client_port: int = 68
    tftp_port: int = 69
    http_port: int = DEFAULT_HTTP_PORT
    images_dir: str | None = None
    proxy_port: int = DEFAULT_PROXY_PORT

    @property
    def mode(self) -> str:
        return "full" if self.pool is not None else "proxy"


def parse_pool(text: str | None) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv4Address | None]:
    if text is None:
        return None, None
    try:
        first, last = text.split("-", 1)
        a, b = ipaddress.IPv4Address(first.strip()), ipaddress.IPv4Address(last.strip())
    except ValueError:
        raise UsageError(f"--pool wants FIRST-LAST, e.g. 10.9.0.100-10.9.0.150, not {text!r}") from None
    if a > b:
        raise UsageError(f"--pool {text}: the first address is after the last")
    return a, b


def default_boot_dir(folder: pathlib.Path) -> pathlib.Path:
    """``folder`` ($LAB_HOME/pxe/tftp), first filled from Debian's ipxe package. Files are copied,
    not linked: Debian's ipxe.efi is a symlink into /boot, and TFTP refuses symlinks leaving its root."""
    if not folder.is_dir() and DEBIAN_IPXE_DIR.is_dir():
        folder.mkdir(parents=True)
        for name in BOOT_FILES:
            src = DEBIAN_IPXE_DIR / name
            if src.exists():
                shutil.copyfile(src.resolve(), folder / name)
    return folder


def interface_ipv4(iface: str) -> tuple[str, int]:
    """(address, prefix length) of the interface's first IPv4 address (SIOCGIFADDR/SIOCGIFNETMASK);
    UsageError when it has none."""
    import fcntl
    import socket
    import struct

    req = struct.pack("256s", iface.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            addr = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x8915, req)[20:24])
            mask = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x891B, req)[20:24])
        except OSError as exc:
            raise UsageError(f"interface {iface} has no IPv4 address here ({exc.strerror})") from None
    return addr, ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen


def why(exc: BaseException) -> str:
    """One line for an exception, ExceptionGroups (trio nurseries) flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(why(e) for e in exc.exceptions)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno}){' — run as root to bind the DHCP/TFTP ports' if exc.errno == 13 else ''}"
    return str(exc) or type(exc).__name__


class BootServices:
    """DHCP + TFTP + HTTP for every machine in ``<home>/pxe/nodes``, re-read every 2 s. Built (and
    checked: UsageError/ConfigError) synchronously; ``run`` serves until cancelled, reports progress
    as ``on_stage(mac, event, detail)`` and hands itself to ``task_status.started``."""

    def __init__(self, opts: ServeOptions, home: pathlib.Path) -> None:
        from lab.coordinator.pxe.dhcp import DhcpConfig, DhcpServer
        from lab.coordinator.pxe.images import ImageStore
        from lab.coordinator.pxe.nodes import reload_into
        from lab.coordinator.pxe.registry import Allowlist

        if opts.proxy_dhcp and opts.pool is not None:
            raise UsageError("give --pool FIRST-LAST (full DHCP) or --proxy-dhcp, not both")
        try:
            server_ip = ipaddress.IPv4Address(opts.address)
            mask = ipaddress.IPv4Address(opts.netmask)
            gw = ipaddress.IPv4Address(opts.router) if opts.router else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        first, last = parse_pool(opts.pool)
        self.opts = opts
        self.server_ip = server_ip
        self.http_base = f"http://{server_ip}:{opts.http_port}"
        self.cfg = DhcpConfig(server_ip=server_ip, http_base=self.http_base, mode=opts.mode,
                              pool_first=first, pool_last=last, subnet_mask=mask, router=gw, efi_x64_file=opts.efi_file)
        pxe_home = home / "pxe"
        self.root = opts.boot_dir or default_boot_dir(pxe_home / "tftp")
        if not self.root.is_dir():
            raise ConfigError(f"TFTP boot directory {self.root} does not exist (install Debian's ipxe or pass --boot-dir)")
        self.allowlist = Allowlist()
        self.nodes_dir = pxe_home / "nodes"
        reload_into(self.nodes_dir, self.allowlist)
        self.dhcp = dhcp = DhcpServer(self.cfg, self.allowlist)
        images = ImageStore(pathlib.Path(opts.images_dir) if opts.images_dir else pxe_home / "images")
        self.http = _image_tracking_class()(
            dhcp, self.allowlist, images, self.http_base,
            lease_lookup=lambda mac: (str(ip) if (ip := dhcp.lease_for(mac, time.time())) else None))

    async def run(self, on_stage: OnStage, task_status: trio.TaskStatus[BootServices] = trio.TASK_STATUS_IGNORED) -> None:
        from lab.coordinator.pxe.dhcp import serve_dhcp
        from lab.coordinator.pxe.http import serve_http
        from lab.coordinator.pxe.nodes import reload_into
        from lab.coordinator.pxe.tftp import TftpConfig, serve_tftp

        o, dhcp = self.opts, self.dhcp

        async def reload_forever() -> None:
            while True:
                await trio.sleep(RELOAD_S)
                try:
                    reload_into(self.nodes_dir, self.allowlist)
                except ConfigError as exc:
                    log.warning("event=pxe-nodes-unreadable error=%s", exc)

        def tftp_event(what: str, peer: str, name: str) -> None:
            on_stage(dhcp.mac_for(peer, time.time()) or self.http.mac_seen_at(peer) or "-", what, f"peer={peer} file={name}")

        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_dhcp, dhcp, interface=o.interface, port=o.dhcp_port,
                                            client_port=o.dhcp_client_port,
                                            proxy_port=o.proxy_port if o.mode == "proxy" else None,
                                            on_event=lambda e: on_stage(e.mac, e.stage, e.detail)))
            await n.start(functools.partial(serve_tftp, TftpConfig(root=self.root), port=o.tftp_port,
                                            interface=o.interface, on_event=tftp_event))
            await n.start(functools.partial(serve_http, self.http, address=str(self.server_ip), port=o.http_port,
                                            on_event=lambda mac, what: on_stage(mac, what, "")))
            n.start_soon(reload_forever)
            task_status.started(self)


def _image_tracking_class():  # BootService is imported lazily (the CLI starts fast)
    from lab.coordinator.pxe.http import _IMAGE_RE, BootService, Response

    class ImageTracking(BootService):
        """Also reports kernel/initrd downloads (``kernel-fetched``/``initrd-fetched``) for the MAC
        that leased the requesting address (full mode) or, in proxy mode where lab hands out no
        address, for the MAC whose iPXE script that address fetched."""

        def __init__(self, dhcp: Any, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._dhcp = dhcp
            self._peers: collections.OrderedDict[str, str] = collections.OrderedDict()

        def mac_seen_at(self, peer_ip: str) -> str | None:
            return self._peers.get(peer_ip)

        def route(self, method: str, path: str, peer_ip: str, now: float) -> Response:
            resp = super().route(method, path, peer_ip, now)
            if resp.event is not None and resp.event[1] == "script-fetched":
                self._peers[peer_ip] = resp.event[0]
                self._peers.move_to_end(peer_ip)
                while len(self._peers) > _PEERS_KEPT:
                    self._peers.popitem(last=False)
            if resp.status == 200 and resp.event is None and (m := _IMAGE_RE.match(path)) and m[2] != "image.iso":
                mac = self._dhcp.mac_for(peer_ip, now) or self._peers.get(peer_ip)
                if mac is not None:
                    resp = dataclasses.replace(resp, event=(mac, "kernel-fetched" if m[2] == "vmlinuz" else "initrd-fetched"))
            return resp

    return ImageTracking


class StageRecorder:
    """Boot-service events → the onboarding stage in the inventory (the server's
    ``facts.onboarding``, shown by `lab get servers`), for machines that `lab onboard --provider
    baremetal` registered: the onboarding record's hostname is the server, its MAC must be the
    one the server is onboarding with. Stages only advance (coordinator/providers/baremetal.py)."""

    def __init__(self, state: Any, allowlist: Any, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.allowlist = allowlist
        self.clock = clock
        # (mac, expiry of its onboarding record) → last stage written: skips the inventory when nothing
        # advances; a new `lab onboard` of the same MAC writes a new record (new expiry) and starts over
        self._done: dict[tuple[str, float], str] = {}

    def __call__(self, mac: str, what: str, detail: str = "") -> None:
        from lab.coordinator.providers import baremetal as bm

        key = bm.stage_for_event(what, detail)
        if key is None or mac == "-":
            return
        now = self.clock()
        node = self.allowlist.lookup(mac, now)
        if node is None or not bm.stage_after(key, self._done.get((node.mac, node.expires_at))):
            return
        done = (node.mac, node.expires_at)
        try:
            with self.state.transaction():
                server = self.state.get_server(node.hostname)
                if server.provider == bm.PROVIDER and not getattr(server, "enrolled_at", None):
                    facts = bm.advance_onboarding(server.facts, node.mac, key, at=now)
                    if facts is not None:
                        self.state.update_server(node.hostname, facts=facts)
                        log.info("event=pxe-onboarding-stage server=%s mac=%s stage=%s", node.hostname, node.mac, key)
            self._done[done] = key  # written, or nothing to write (another provider, enrolled, not onboarding)
        except LabError as exc:  # no such server (`lab pxe allow` alone), or the state is busy: the next event retries
            if self._done.get(done) != "?":
                log.warning("event=pxe-stage-not-recorded server=%s mac=%s stage=%s error=%s",
                            node.hostname, node.mac, key, exc)
            self._done.setdefault(done, "?")  # warned once per onboarding


async def serve_boot(opts: ServeOptions | BootServices, home: pathlib.Path, *, state: Any = None,
                     on_stage: OnStage | None = None,
                     task_status: trio.TaskStatus[BootServices] = trio.TASK_STATUS_IGNORED) -> None:
    """Build the boot services (errors raised before anything listens; or take them built), serve
    until cancelled, call ``on_stage`` for every progress event and, given the coordinator
    ``state``, record the onboarding stages there. `lab pxe serve` and the daemon both run this."""
    services = opts if isinstance(opts, BootServices) else BootServices(opts, home)
    recorder = StageRecorder(state, services.allowlist) if state is not None else None

    def stage(mac: str, what: str, detail: str) -> None:
        if on_stage is not None:
            on_stage(mac, what, detail)
        if recorder is not None:
            recorder(mac, what, detail)

    await services.run(stage, task_status=task_status)


async def serve_configured(home: pathlib.Path, state: Any,
                           task_status: trio.TaskStatus[BootServices | None] = trio.TASK_STATUS_IGNORED) -> None:
    """The daemon's part: serve the boot services when ``<home>/config.yaml`` has a ``pxe:``
    section (``started(None)`` and return when it has none). A bad section, or ports that cannot
    be bound, is a ConfigError naming ``config.yaml:line``."""
    from lab.coordinator.pxe.config import load_pxe_config

    cfg = load_pxe_config(home)
    if cfg is None:
        task_status.started(None)
        return
    opts = cfg.options()

    def logged(mac: str, what: str, detail: str) -> None:
        log.info("event=pxe stage=%s mac=%s %s", what, mac, detail)

    class Started:  # remembers whether the services got as far as listening
        value = False

        def started(self, v: Any = None) -> None:
            Started.value = True
            task_status.started(v)

    try:
        await serve_boot(opts, home, state=state, on_stage=logged, task_status=Started())
    except (BaseExceptionGroup, OSError, LabError) as exc:
        group = isinstance(exc, BaseExceptionGroup)
        if group and (exc.subgroup(trio.Cancelled) is not None or exc.subgroup((OSError, LabError)) is None):
            raise
        if Started.value:  # a failure while serving: logged; the daemon's API keeps running
            log.error("event=pxe-stopped error=%s", why(exc))
            return
        if isinstance(exc, ConfigError) and exc.file:
            raise
        raise ConfigError(f"pxe: cannot serve the boot services: {why(exc)}", cfg.source, cfg.line) from exc
