"""The ``pxe:`` section of ``$LAB_HOME/config.yaml``: the coordinator daemon (`lab server run`)
serves the boot services itself when it is there (coordinator/pxe/service.py ``serve_configured``).

::

    pxe:
      interface: enp3s0            # serve DHCP/TFTP on this interface only (its address is the default)
      address: 10.9.0.1            # this server's IPv4 address on the boot segment
      pool: 10.9.0.100-10.9.0.150  # full DHCP from this pool; without it proxyDHCP (the default:
                                   #   safe on a network that has its own DHCP server)
      netmask: 255.255.255.0       # full mode
      router: 10.9.0.1             # full mode
      boot_dir: /srv/lab/tftp      # TFTP root (default $LAB_HOME/pxe/tftp, from Debian's ipxe)
      efi_file: ipxe.efi           # or snponly.efi
      images_dir: /srv/lab/images  # default $LAB_HOME/pxe/images
      ports: {dhcp: 67, dhcp_client: 68, tftp: 69, http: 8080, proxy: 4011}

Every problem is a ConfigError naming ``config.yaml:line``. Relative paths are relative to the
folder of config.yaml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pathlib
import re
from typing import Any

from lab.common.config._settings import load_section
from lab.common.config._yaml import LMap
from lab.common.errors import ConfigError, UsageError
from lab.coordinator.pxe.service import DEFAULT_HTTP_PORT, DEFAULT_PROXY_PORT, ServeOptions, interface_ipv4, parse_pool

__all__ = ["PxeConfig", "load_pxe_config", "parse_pxe_config"]

EFI_FILES = ("ipxe.efi", "snponly.efi")
_KEYS = frozenset({"interface", "address", "pool", "netmask", "router", "boot_dir", "efi_file", "images_dir", "ports"})
_PORTS = {"dhcp": 67, "dhcp_client": 68, "tftp": 69, "http": DEFAULT_HTTP_PORT, "proxy": DEFAULT_PROXY_PORT}
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")


@dataclasses.dataclass(frozen=True)
class PxeConfig:
    interface: str | None = None
    address: str | None = None
    pool: str | None = None
    netmask: str | None = None
    router: str | None = None
    boot_dir: pathlib.Path | None = None
    efi_file: str = "ipxe.efi"
    images_dir: pathlib.Path | None = None
    ports: dict[str, int] = dataclasses.field(default_factory=lambda: dict(_PORTS))
    source: str = "<config>"
    line: int | None = None
    key_lines: dict[str, int] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def mode(self) -> str:
        return "full" if self.pool is not None else "proxy"

    def options(self) -> ServeOptions:
        """The boot services' options; the address comes from the interface when not given
        (read now, so a missing interface is a ConfigError naming the line)."""
        address, netmask = self.address, self.netmask
        if self.interface is not None and (address is None or (netmask is None and self.pool is not None)):
            try:
                detected, prefix = interface_ipv4(self.interface)
            except UsageError as exc:
                raise ConfigError(f"pxe: {exc} — set pxe.address", self.source,
                                  self.key_lines.get("interface", self.line)) from exc
            address = address or detected
            netmask = netmask or str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
        assert address is not None  # parse_pxe_config wants interface or address
        return ServeOptions(
            address=address, interface=self.interface, pool=self.pool, netmask=netmask or "255.255.255.0",
            router=self.router, boot_dir=self.boot_dir, efi_file=self.efi_file,
            dhcp_port=self.ports["dhcp"], dhcp_client_port=self.ports["dhcp_client"], tftp_port=self.ports["tftp"],
            http_port=self.ports["http"], images_dir=str(self.images_dir) if self.images_dir else None,
            proxy_port=self.ports["proxy"])


def load_pxe_config(home: str | os.PathLike[str]) -> PxeConfig | None:
    """Read ``pxe:`` from ``<home>/config.yaml``; None when the file or the section is absent."""
    found = load_section(home, "pxe")
    return None if found is None else parse_pxe_config(*found)


def parse_pxe_config(section: Any, source: str = "<config>", line: int | None = None) -> PxeConfig:
    """Validate one ``pxe:`` mapping (as loaded by lab.common.config._yaml, or a plain dict)."""
    if not isinstance(section, dict):
        raise ConfigError("pxe: must be a mapping with at least 'interface' or 'address'", source, line)

    def at(key: str) -> int | None:
        return section.line_of(key) if isinstance(section, LMap) else line

    def fail(key: str | None, message: str) -> ConfigError:
        return ConfigError(f"pxe: {message}", source, at(key) if key else line)

    unknown = sorted(set(section) - _KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key '{unknown[0]}' (allowed: {', '.join(sorted(_KEYS))})")
    if section.get("interface") is None and section.get("address") is None:
        raise fail(None, "set 'interface' (the boot segment's NIC) or 'address' (this server's IPv4 address on it)")

    interface = section.get("interface")
    if interface is not None and (not isinstance(interface, str) or not _IFACE_RE.match(interface)):
        raise fail("interface", f"interface must be a network interface name, not {interface!r}")

    def ipv4(key: str) -> str | None:
        value = section.get(key)
        if value is None:
            return None
        try:
            return str(ipaddress.IPv4Address(str(value)))
        except ValueError:
            raise fail(key, f"{key} must be an IPv4 address, not {value!r}") from None

    address, netmask, router = ipv4("address"), ipv4("netmask"), ipv4("router")
    if netmask is not None:
        try:
            ipaddress.IPv4Network(f"0.0.0.0/{netmask}")
        except ValueError:
            raise fail("netmask", f"netmask {netmask} is not a contiguous mask") from None

    pool = section.get("pool")
    if pool is not None:
        if not isinstance(pool, str):
            raise fail("pool", f"pool must be FIRST-LAST, e.g. 10.9.0.100-10.9.0.150, not {pool!r}")
        try:
            first, last = parse_pool(pool)
        except UsageError as exc:
            raise fail("pool", str(exc).replace("--pool", "pool")) from None
        if address is not None and first is not None and last is not None \
                and first <= ipaddress.IPv4Address(address) <= last:
            raise fail("pool", f"pool {pool} contains the server's own address {address}")
    elif netmask is not None or router is not None:
        raise fail("netmask" if netmask is not None else "router",
                   "netmask and router are for full DHCP: set pool too (without it lab runs proxyDHCP)")

    efi_file = section.get("efi_file", "ipxe.efi")
    if efi_file not in EFI_FILES:
        raise fail("efi_file", f"efi_file must be one of {', '.join(EFI_FILES)}, not {efi_file!r}")

    base = pathlib.Path(source).parent if source and not source.startswith("<") else pathlib.Path.cwd()

    def path(key: str) -> pathlib.Path | None:
        value = section.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value or "\0" in value:
            raise fail(key, f"{key} must be a path, not {value!r}")
        p = pathlib.Path(value).expanduser()
        return p if p.is_absolute() else base / p

    ports = dict(_PORTS)
    given = section.get("ports")
    if given is not None:
        if not isinstance(given, dict):
            raise fail("ports", f"ports must be a mapping of {', '.join(_PORTS)} to port numbers")
        for key, value in given.items():
            where = given.line_of(key) if isinstance(given, LMap) else at("ports")
            if key not in _PORTS:
                raise ConfigError(f"pxe: unknown port '{key}' (allowed: {', '.join(_PORTS)})", source, where)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"pxe: ports.{key} must be a whole number from 1 to 65535, not {value!r}", source, where)
            ports[key] = value

    key_lines = {k: at(k) for k in section if at(k) is not None}
    return PxeConfig(interface=interface, address=address, pool=pool, netmask=netmask, router=router,
                     boot_dir=path("boot_dir"), efi_file=efi_file, images_dir=path("images_dir"), ports=ports,
                     source=source, line=line, key_lines=key_lines)
