"""Raw host data (from :func:`collect_raw` or a fixture) → :class:`Facts`. Pure: no I/O.

Raw data may come from another machine, an older agent or a hand edit, so nothing is trusted:
a missing or garbled source becomes ``None`` for what it would have told and a note; the parser
itself never raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from lab.agent.facts._collect import RAW_SCHEMA, SKIP_BLOCK_PREFIXES
from lab.agent.facts._model import Cpu, Disk, Facts, Gpu, Nic, OsInfo

T = TypeVar("T")

SECTOR_BYTES = 512  # sysfs "size" is always in 512-byte sectors

# py-cpuinfo's arch names, uname's and other operating systems' spellings → one name.
ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "i386": "i686",
    "i486": "i686",
    "i586": "i686",
    "i686": "i686",
    "x86": "i686",
    "x86_32": "i686",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "arm_8": "aarch64",
    "armv8l": "armv7l",
    "armv7l": "armv7l",
    "arm_7": "armv7l",
    "ppc64le": "ppc64le",
    "ppc_64": "ppc64le",
    "ppc64": "ppc64",
    "riscv64": "riscv64",
    "riscv_64": "riscv64",
    "s390x": "s390x",
    "loongarch64": "loongarch64",
}

CPU_VENDORS = {
    "AuthenticAMD": "AMD",
    "GenuineIntel": "Intel",
    "HygonGenuine": "Hygon",
    "CentaurHauls": "Centaur",
    "ARM": "ARM",
    "Apple": "Apple",
    "NVIDIA": "NVIDIA",
    "Ampere": "Ampere",
}

# DMI strings of well-known hypervisors, for hosts without systemd-detect-virt: (field, text, name).
DMI_HYPERVISORS = (
    ("sys_vendor", "QEMU", "kvm"),
    ("product_name", "KVM", "kvm"),
    ("sys_vendor", "VMware", "vmware"),
    ("product_name", "VirtualBox", "oracle"),
    ("sys_vendor", "innotek", "oracle"),
    ("product_name", "Virtual Machine", "microsoft"),
    ("sys_vendor", "Xen", "xen"),
    ("product_name", "HVM domU", "xen"),
    ("sys_vendor", "Amazon EC2", "amazon"),
    ("product_name", "Google Compute Engine", "google"),
    ("sys_vendor", "Parallels", "parallels"),
    ("sys_vendor", "Bochs", "bochs"),
)

# Interfaces that are software, for hosts where udev cannot tell (no /sys device path).
VIRTUAL_NIC_PREFIXES = ("lo", "docker", "veth", "br-", "virbr", "tun", "tap", "wg", "bond", "vlan", "ifb", "dummy", "cni", "flannel", "cali", "vxlan", "tailscale", "zt")

NVIDIA_PCI_VENDOR = "10DE"
UNIFIED_MEMORY_GPUS = ("GB10",)  # GPUs that share system memory (NVML reports no memory of their own)


class _Notes(list[str]):
    def guard(self, section: str, fn: Callable[[], T], default: T) -> T:
        """Run one section's parser; garbled input there becomes a note and ``default``."""
        try:
            return fn()
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            self.append(f"{section}: unreadable raw data ({type(exc).__name__}: {exc})")
            return default


def parse_facts(raw: Any) -> Facts:
    notes = _Notes()
    if not isinstance(raw, dict):
        notes.append(f"raw facts are a {type(raw).__name__}, not a mapping: nothing detected")
        raw = {}
    schema = raw.get("schema")
    if schema is not None and schema != RAW_SCHEMA:
        notes.append(f"raw facts schema {schema!r} (this agent reads {RAW_SCHEMA}): reading what is recognisable")
    notes.extend(str(n) for n in _list(raw.get("notes")))
    host = _dict(raw.get("host"))
    ps = _dict(raw.get("psutil"))
    udev = raw.get("udev") if isinstance(raw.get("udev"), dict) else None
    system_disk = notes.guard("disk partitions", lambda: _system_device(ps), None)

    cpu = notes.guard("cpu", lambda: _cpu(_dict(raw.get("cpuinfo")), ps, host), Cpu(None, None, "unknown", None, None))
    if cpu.arch == "unknown" and not any(n.startswith("cpu") for n in notes):
        notes.append("cpu: architecture unknown")
    memory = _int(ps.get("memory_total"))
    if memory is None:
        notes.append("memory: total unknown")
    disks = notes.guard("disks", lambda: _disks(udev, system_disk), None)
    if disks is None and not any(n.startswith(("udev", "disks")) for n in notes):
        notes.append("disks: unknown (no udev data)")
    nics = notes.guard("nics", lambda: _nics(ps, udev), None)
    gpus = notes.guard("gpus", lambda: _gpus(raw.get("nvml"), udev), None)
    virt, container = notes.guard("virtualization", lambda: _virt(_dict(raw.get("virt"))), ("unknown", None))
    os_info = notes.guard("os", lambda: _os_release(raw.get("os_release")), None)
    return Facts(
        hostname=_str(host.get("hostname")),
        kernel=_str(host.get("kernel")),
        cpu=cpu,
        memory_bytes=memory,
        disks=disks,
        nics=nics,
        gpus=gpus,
        virtualization=virt,
        container=container,
        os=os_info,
        notes=tuple(notes),
    )


# -- helpers -----------------------------------------------------------------------------------


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _str(v: Any) -> str | None:
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


def _int(v: Any) -> int | None:
    """A non-negative integer from an int or a decimal string; anything else is unknown."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return None


def normalise_arch(name: Any) -> str | None:
    if not isinstance(name, str) or not name.strip():
        return None
    return ARCH_ALIASES.get(name.strip().lower())


# -- sections ----------------------------------------------------------------------------------


_BRAND_NOISE = re.compile(r"\((?:R|TM|tm|r)\)|\s+\d+-Core Processor$|\s+Processor$|\s+CPU\s+@\s+[\d.]+\s*GHz$")


def clean_cpu_model(brand: str) -> str:
    """``AMD EPYC 7763 64-Core Processor`` → ``AMD EPYC 7763``; ``Intel(R) Core(TM) i5`` → ``Intel Core i5``."""
    text = _BRAND_NOISE.sub("", brand)
    return " ".join(text.split())


def _cpu(ci: dict[str, Any], ps: dict[str, Any], host: dict[str, Any]) -> Cpu:
    arch = normalise_arch(ci.get("arch_string_raw")) or normalise_arch(host.get("machine")) or normalise_arch(ci.get("arch"))
    if arch is None:
        arch = _str(ci.get("arch_string_raw")) or _str(host.get("machine")) or "unknown"
    brand = _str(ci.get("brand_raw"))
    vendor_raw = _str(ci.get("vendor_id_raw"))
    vendor = CPU_VENDORS.get(vendor_raw or "", vendor_raw)
    threads = _int(ps.get("cpu_count_logical")) or _int(ci.get("count")) or None
    cores = _int(ps.get("cpu_count_physical")) or threads
    return Cpu(model=clean_cpu_model(brand) if brand else None, vendor=vendor, arch=arch, cores=cores, threads=threads)


def _system_device(ps: dict[str, Any]) -> str | None:
    for p in _list(ps.get("disk_partitions")):
        if isinstance(p, dict) and p.get("mountpoint") == "/" and isinstance(p.get("device"), str):
            return p["device"].rsplit("/", 1)[-1]
    return None


def _holds(disk: str, device: str | None) -> bool:
    """Whether partition (or whole-disk) ``device`` lives on ``disk``: sda1, nvme0n1p2, vda."""
    if not device or not device.startswith(disk):
        return False
    rest = device[len(disk) :]
    return rest == "" or bool(re.fullmatch(r"p?\d+", rest))


def _disks(udev: dict[str, Any] | None, system_device: str | None) -> tuple[Disk, ...] | None:
    if udev is None or not isinstance(udev.get("block"), list):
        return None
    disks = []
    for d in udev["block"]:
        name = _str(d.get("name"))
        if name is None or name.startswith(SKIP_BLOCK_PREFIXES) or d.get("hidden") == "1":
            continue
        sectors = _int(d.get("size"))
        if name.startswith("nvme"):
            kind = "nvme"
        else:
            kind = {"0": "ssd", "1": "hdd"}.get(str(d.get("rotational")), "unknown")
        disks.append(
            Disk(
                name=name,
                model=_str(d.get("id_model")),
                size_bytes=None if sectors is None else sectors * SECTOR_BYTES,
                kind=kind,
                removable=str(d.get("removable")) == "1",
                system=_holds(name, system_device),
            )
        )
    return tuple(sorted(disks, key=lambda x: x.name))


def _nics(ps: dict[str, Any], udev: dict[str, Any] | None) -> tuple[Nic, ...] | None:
    stats = ps.get("net_if_stats")
    if not isinstance(stats, dict):
        return None
    addrs = _dict(ps.get("net_if_addrs"))
    by_udev = {n.get("name"): n for n in _list((udev or {}).get("net")) if isinstance(n, dict)}
    nics = []
    for name, s in stats.items():
        if not isinstance(s, dict) or name == "lo" or "loopback" in str(s.get("flags", "")).split(","):
            continue
        u = by_udev.get(name)
        if u is not None and isinstance(u.get("devpath"), str):
            virtual = u["devpath"].startswith("/devices/virtual/")
        else:
            virtual = name.startswith(VIRTUAL_NIC_PREFIXES)
        speed = _int(s.get("speed")) or _int((u or {}).get("speed")) or None  # 0 and -1 mean unknown
        mac = None
        ips = []
        for a in _list(addrs.get(name)):
            fam, addr = a.get("family"), a.get("address")
            if fam in ("AF_PACKET", "AF_LINK") and isinstance(addr, str) and addr.strip("0:"):
                mac = addr.lower()
            elif fam in ("AF_INET", "AF_INET6") and isinstance(addr, str):
                ips.append(addr)
        up = s.get("isup") if isinstance(s.get("isup"), bool) else None
        nics.append(Nic(name, mac, speed, up, virtual, _str((u or {}).get("driver")), tuple(ips)))
    return tuple(sorted(nics, key=lambda n: n.name))


def _cuda_version(v: Any) -> str | None:
    n = _int(v)
    return None if not n else f"{n // 1000}.{n % 1000 // 10}"  # 12040 → "12.4"


def _bus(slot: Any) -> str:
    """PCI addresses compare on domain:bus:dev.fn, whatever the domain width (NVML pads to 8)."""
    s = str(slot).lower()
    return s[-12:] if len(s) >= 12 else s


def _gpus(nvml: Any, udev: dict[str, Any] | None) -> tuple[Gpu, ...] | None:
    nvml = _dict(nvml)
    status = nvml.get("status")
    gpus: list[Gpu] = []
    seen: set[str] = set()
    if status == "ok":
        driver = _str(nvml.get("driver_version"))
        cuda = _cuda_version(nvml.get("cuda_driver_version"))
        for d in _list(nvml.get("devices")):
            model = _str(d.get("name")) or "NVIDIA GPU"
            mem = d.get("memory_total")
            unified = mem == "not supported" or any(u in model for u in UNIFIED_MEMORY_GPUS)
            gpus.append(Gpu("NVIDIA", model, _int(mem), driver, cuda, unified))
            if d.get("pci_bus_id"):
                seen.add(_bus(d["pci_bus_id"]))
    # NVIDIA cards the PCI bus shows but NVML does not: no driver yet (a fresh install), or NVML failed.
    pci = None if udev is None else udev.get("pci_display")
    if isinstance(pci, list):
        for p in pci:
            pci_id = str(p.get("pci_id") or "").upper()
            if not pci_id.startswith(NVIDIA_PCI_VENDOR + ":") or _bus(p.get("slot")) in seen:
                continue
            if status == "ok" and not seen:  # NVML gave no bus ids: trust its list
                continue
            model = _str(p.get("model")) or f"NVIDIA GPU [{pci_id}]"
            if not model.upper().startswith("NVIDIA"):
                model = f"NVIDIA {model}"
            gpus.append(Gpu("NVIDIA", model, None, _str(p.get("driver")), None, any(u in model for u in UNIFIED_MEMORY_GPUS)))
    if status == "ok" or gpus:
        return tuple(gpus)
    if status == "error" or (status != "absent" and not isinstance(pci, list)):
        return None  # NVML failed (or was never asked) and the PCI bus was not read: unknown
    return ()


def _virt(v: dict[str, Any]) -> tuple[str, str | None]:
    sdv = _dict(v.get("systemd_detect_virt"))
    container = _str(sdv.get("container"))
    container = None if container in (None, "none") else container
    vm = _str(sdv.get("vm"))
    if vm is not None:
        return vm, container
    dmi = _dict(v.get("dmi"))
    for field, text, name in DMI_HYPERVISORS:
        if text.lower() in str(dmi.get(field, "")).lower():
            return name, container
    flag = v.get("cpu_hypervisor_flag")
    if flag is True:
        return "vm", container
    if flag is False:
        return "none", container
    return "unknown", container


def _os_release(text: Any) -> OsInfo | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"os-release is a {type(text).__name__}, not text")
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    if not values:
        raise ValueError("no KEY=value lines")
    return OsInfo(values.get("ID"), values.get("VERSION_ID"), values.get("PRETTY_NAME"))
