"""Gather raw hardware data: the only part of facts that touches the host.

Every source is optional. A source that is missing or fails leaves its key out (or marks it)
and adds one line to ``raw["notes"]``; nothing here raises. The result is plain JSON (str, int,
float, bool, None, lists, dicts) so that ``lab-agent facts --raw -o json`` can be saved as a
test fixture and fed to :func:`lab.agent.facts.parse_facts` on any machine.

Heavy or optional libraries (py-cpuinfo, psutil, pyudev, pynvml) are imported inside the
function that needs them.
"""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

RAW_SCHEMA = 1
SOURCES = ("host", "cpu", "psutil", "udev", "nvml", "virt", "os")
DETECT_VIRT_TIMEOUT_S = 5.0

# Block devices that are never hardware disks.
SKIP_BLOCK_PREFIXES = ("loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd")

# NVML errors that mean "no NVIDIA driver on this host": no GPUs, and nothing to report.
_NVML_ABSENT = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "NVMLError_NoPermission")


def collect_raw(sources: Iterable[str] | None = None, root: str | os.PathLike[str] = "/") -> dict[str, Any]:
    """Raw facts from this host. ``sources`` picks a subset of :data:`SOURCES`; ``root`` prefixes
    the files read directly (``/etc/os-release``, ``/sys/class/dmi``, ``/proc/cpuinfo``), for tests."""
    wanted = SOURCES if sources is None else tuple(sources)
    unknown = [s for s in wanted if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown facts source(s): {', '.join(unknown)}")
    raw: dict[str, Any] = {"schema": RAW_SCHEMA, "notes": []}
    rootp = pathlib.Path(root)
    collectors: dict[str, Callable[[], Any]] = {
        "host": _host,
        "cpu": lambda: _cpuinfo(rootp),
        "psutil": _psutil,
        "udev": _udev,
        "nvml": _nvml,
        "virt": lambda: _virt(rootp),
        "os": lambda: _read_text(rootp / "etc/os-release") or _read_text(rootp / "usr/lib/os-release"),
    }
    keys = {"host": "host", "cpu": "cpuinfo", "psutil": "psutil", "udev": "udev", "nvml": "nvml", "virt": "virt", "os": "os_release"}
    results = _run_all({name: collectors[name] for name in wanted})
    for name in wanted:
        value, exc = results[name]
        if exc is not None:  # a fact source must never take the agent down
            raw["notes"].append(f"{name}: {_describe(exc)}")
            continue
        if isinstance(value, _Noted):
            raw["notes"].extend(f"{name}: {n}" for n in value.notes)
            value = value.value
        if value is None:
            if name == "os":
                raw["notes"].append("os: no /etc/os-release")
            continue
        raw[keys[name]] = value
    return raw


def _run_all(fns: dict[str, Callable[[], Any]]) -> dict[str, tuple[Any, BaseException | None]]:
    """Run independent sources side by side: most of their time is imports, syscalls and
    waiting on systemd-detect-virt, so threads overlap it. Results keep no order of their own;
    the caller walks :data:`SOURCES` order, so the raw output is the same as a serial run."""
    results: dict[str, tuple[Any, BaseException | None]] = {}

    def run(name: str, fn: Callable[[], Any]) -> None:
        try:
            results[name] = (fn(), None)
        except Exception as exc:
            results[name] = (None, exc)

    if len(fns) <= 1:
        for name, fn in fns.items():
            run(name, fn)
        return results
    import threading

    threads = [threading.Thread(target=run, args=(name, fn), name=f"facts-{name}", daemon=True) for name, fn in fns.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class _Noted:
    """A collector's value together with notes about what it could not read."""

    def __init__(self, value: Any, notes: list[str]) -> None:
        self.value = value
        self.notes = notes


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_text(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


# -- sources -----------------------------------------------------------------------------------


def _host() -> dict[str, Any]:
    u = platform.uname()
    return {"hostname": u.node, "system": u.system, "kernel": u.release, "machine": u.machine}


def _cpuinfo(root: pathlib.Path | None = None) -> dict[str, Any]:
    """Model, vendor, arch and count. On Linux straight from ``/proc/cpuinfo`` (a file read: about a
    millisecond); py-cpuinfo, which runs itself in a subprocess and costs over a second, only where
    that file is missing or says nothing useful (other platforms)."""
    text = _read_text((root or pathlib.Path("/")) / "proc/cpuinfo")
    if text is not None:
        info = parse_proc_cpuinfo(text, platform.machine())
        if info.get("brand_raw") or info.get("vendor_id_raw"):
            info["count"] = os.cpu_count() or info.get("count")
            return info
    import cpuinfo  # py-cpuinfo

    info = cpuinfo.get_cpu_info()
    keys = ("brand_raw", "arch", "arch_string_raw", "bits", "count", "vendor_id_raw")
    return {k: info.get(k) for k in keys if k in info}


# Arm "CPU implementer" codes → the vendor names py-cpuinfo reports (and _parse.CPU_VENDORS knows).
ARM_IMPLEMENTERS = {
    0x41: "ARM", 0x42: "Broadcom", 0x43: "Cavium", 0x46: "Fujitsu", 0x48: "HiSilicon", 0x4E: "NVIDIA",
    0x50: "APM", 0x51: "Qualcomm", 0x53: "Samsung", 0x61: "Apple", 0x6D: "Microsoft", 0xC0: "Ampere",
}
# (implementer, part) → core name, for Arm hosts whose /proc/cpuinfo has no "model name".
ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55", (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73", (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1", (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4D): "Cortex-A715", (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD80): "Cortex-A520", (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4", (0x41, 0xD84): "Neoverse-V3",
    (0x41, 0xD85): "Cortex-X925", (0x41, 0xD87): "Cortex-A725", (0x41, 0xD8E): "Neoverse-N3",
    (0x61, 0x022): "Icestorm-M1", (0x61, 0x023): "Firestorm-M1", (0x61, 0x032): "Blizzard-M2", (0x61, 0x033): "Avalanche-M2",
    (0xC0, 0xAC3): "Ampere-1", (0xC0, 0xAC4): "Ampere-1a",
}
# Keys that name the CPU model, by architecture: x86 "model name", ppc "cpu", s390 "machine",
# riscv "uarch", older arm "Processor", mips "cpu model".
_MODEL_KEYS = ("model name", "cpu model", "uarch", "cpu", "Processor")
_BITS = {"x86_64": 64, "aarch64": 64, "ppc64le": 64, "ppc64": 64, "riscv64": 64, "s390x": 64, "loongarch64": 64}


def parse_proc_cpuinfo(text: str, machine: str) -> dict[str, Any]:
    """``/proc/cpuinfo`` → the py-cpuinfo subset the parser reads (``brand_raw``, ``vendor_id_raw``,
    ``arch_string_raw``, ``bits``, ``count``) plus ``source``. ``count`` is the number of
    ``processor`` entries here; :func:`_cpuinfo` replaces it with ``os.cpu_count()``. Pure."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if not line.strip() and current:
                blocks.append(current)
                current = {}
            continue
        current.setdefault(key.strip(), value.strip())
    if current:
        blocks.append(current)
    procs = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    everything = {k: v for b in reversed(blocks) for k, v in b.items()}  # first value wins
    out: dict[str, Any] = {"source": "/proc/cpuinfo", "arch_string_raw": machine}
    if machine in _BITS:
        out["bits"] = _BITS[machine]
    if procs:
        out["count"] = len(procs)
    brand = next((everything[k] for k in _MODEL_KEYS if everything.get(k)), None)
    vendor = everything.get("vendor_id") or everything.get("vendor") or None
    implementer = _hex(everything.get("CPU implementer"))
    if implementer is not None:
        vendor = ARM_IMPLEMENTERS.get(implementer, vendor or f"0x{implementer:02x}")
        if brand is None:  # aarch64: name the cores from their part numbers, in order of appearance
            names: list[str] = []
            for b in procs or blocks:
                part = _hex(b.get("CPU part"))
                name = ARM_PARTS.get((implementer, part)) if part is not None else None
                if name and name not in names:
                    names.append(name)
            brand = " + ".join(names) or None
    if brand:
        out["brand_raw"] = brand
    if vendor:
        out["vendor_id_raw"] = vendor
    return out


def _hex(value: str | None) -> int | None:
    try:
        return int(value, 16) if value else None
    except ValueError:
        return None


def _psutil() -> _Noted:
    import psutil

    notes: list[str] = []
    out: dict[str, Any] = {
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "memory_total": psutil.virtual_memory().total,
    }
    try:
        out["net_if_stats"] = {
            name: {"isup": s.isup, "speed": s.speed, "mtu": s.mtu, "flags": getattr(s, "flags", "")}
            for name, s in psutil.net_if_stats().items()
        }
        out["net_if_addrs"] = {
            name: [{"family": getattr(a.family, "name", str(a.family)), "address": a.address} for a in addrs]
            for name, addrs in psutil.net_if_addrs().items()
        }
    except Exception as exc:
        notes.append(f"network interfaces: {_describe(exc)}")
    try:
        out["disk_partitions"] = [
            {"device": p.device, "mountpoint": p.mountpoint, "fstype": p.fstype} for p in psutil.disk_partitions(all=False)
        ]
    except Exception as exc:
        notes.append(f"disk partitions: {_describe(exc)}")
    return _Noted(out, notes)


def _attr(device: Any, name: str) -> str | None:
    try:
        value = device.attributes.get(name)
    except Exception:  # unreadable attribute (EINVAL on a down link's speed, permissions)
        return None
    if value is None:
        return None
    return value.decode("utf-8", "replace").strip() if isinstance(value, bytes) else str(value).strip()


def _driver(device: Any) -> str | None:
    """The kernel driver bound to a device or, failing that, to its nearest parent."""
    d = device
    while d is not None:
        if d.driver:
            return str(d.driver)
        d = d.parent
    return None


def _udev() -> _Noted:
    import pyudev

    ctx = pyudev.Context()
    notes: list[str] = []
    out: dict[str, Any] = {}
    parts: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("block", lambda: _udev_block(ctx)),
        ("net", lambda: _udev_net(ctx)),
        ("pci_display", lambda: _udev_pci_display(ctx)),
    ]
    for key, fn in parts:
        try:
            out[key] = fn()
        except Exception as exc:
            notes.append(f"{key}: {_describe(exc)}")
    return _Noted(out, notes)


def _udev_block(ctx: Any) -> list[dict[str, Any]]:
    disks = []
    for d in ctx.list_devices(subsystem="block", DEVTYPE="disk"):
        name = d.sys_name
        if name.startswith(SKIP_BLOCK_PREFIXES):
            continue
        props = d.properties
        disks.append(
            {
                "name": name,
                "devpath": d.device_path,
                "id_model": props.get("ID_MODEL") or _attr(d, "device/model"),
                "id_serial": props.get("ID_SERIAL"),
                "size": _attr(d, "size"),  # 512-byte sectors, whatever the logical block size
                "rotational": _attr(d, "queue/rotational"),
                "removable": _attr(d, "removable"),
                "hidden": _attr(d, "hidden"),
            }
        )
    return disks


def _udev_net(ctx: Any) -> list[dict[str, Any]]:
    nics = []
    for d in ctx.list_devices(subsystem="net"):
        nics.append(
            {
                "name": d.sys_name,
                "devpath": d.device_path,
                "driver": d.properties.get("ID_NET_DRIVER") or _driver(d),
                "speed": _attr(d, "speed"),
            }
        )
    return nics


def _udev_pci_display(ctx: Any) -> list[dict[str, Any]]:
    """PCI display controllers (class 0x03): a GPU is visible here before its driver is installed."""
    found = []
    for d in ctx.list_devices(subsystem="pci"):
        cls = d.properties.get("PCI_CLASS", "")
        try:
            if int(cls, 16) >> 16 != 0x03:
                continue
        except ValueError:
            continue
        found.append(
            {
                "slot": d.sys_name,
                "class": cls,
                "pci_id": d.properties.get("PCI_ID"),
                "model": d.properties.get("ID_MODEL_FROM_DATABASE"),
                "driver": d.driver,
            }
        )
    return found


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _nvml() -> _Noted:
    """NVIDIA GPUs through NVML. No library or no driver: ``status: absent``, no note."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if type(exc).__name__ in _NVML_ABSENT:
            return _Noted({"status": "absent", "reason": _describe(exc)}, [])
        return _Noted({"status": "error", "error": _describe(exc)}, [f"NVML failed, GPUs unknown: {_describe(exc)}"])
    notes: list[str] = []
    try:
        out: dict[str, Any] = {"status": "ok", "devices": []}
        for key, fn in (("driver_version", pynvml.nvmlSystemGetDriverVersion), ("cuda_driver_version", pynvml.nvmlSystemGetCudaDriverVersion)):
            try:
                v = fn()
                out[key] = _text(v) if key == "driver_version" else int(v)
            except pynvml.NVMLError as exc:
                notes.append(f"{key}: {_describe(exc)}")
        count = pynvml.nvmlDeviceGetCount()
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            dev: dict[str, Any] = {"index": i, "name": _text(pynvml.nvmlDeviceGetName(h))}
            try:
                dev["memory_total"] = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            except pynvml.NVMLError_NotSupported:
                dev["memory_total"] = "not supported"  # unified memory (GB10-class)
            except pynvml.NVMLError as exc:
                notes.append(f"GPU {i} memory: {_describe(exc)}")
            try:
                dev["pci_bus_id"] = _text(pynvml.nvmlDeviceGetPciInfo(h).busId)
            except pynvml.NVMLError:
                pass
            out["devices"].append(dev)
        return _Noted(out, notes)
    except pynvml.NVMLError as exc:
        return _Noted({"status": "error", "error": _describe(exc)}, [f"NVML failed, GPUs unknown: {_describe(exc)}"])
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _virt(root: pathlib.Path) -> _Noted:
    notes: list[str] = []
    out: dict[str, Any] = {}
    tool = shutil.which("systemd-detect-virt")
    if tool:
        detected: dict[str, str] = {}
        procs: dict[str, subprocess.Popen[str]] = {}
        for kind in ("vm", "container"):  # both at once: each is a process start
            try:
                procs[kind] = subprocess.Popen(
                    [tool, f"--{kind}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
                )
            except OSError as exc:
                notes.append(f"systemd-detect-virt --{kind}: {_describe(exc)}")
        for kind, proc in procs.items():
            try:
                stdout, _ = proc.communicate(timeout=DETECT_VIRT_TIMEOUT_S)
                detected[kind] = stdout.strip() or "none"
            except (OSError, subprocess.SubprocessError) as exc:
                proc.kill()
                proc.wait()
                notes.append(f"systemd-detect-virt --{kind}: {_describe(exc)}")
        if detected:
            out["systemd_detect_virt"] = detected
    dmi = {}
    for key in ("product_name", "sys_vendor"):
        value = _read_text(root / "sys/class/dmi/id" / key)
        if value is not None:
            dmi[key] = value.strip()
    if dmi:
        out["dmi"] = dmi
    cpuinfo = _read_text(root / "proc/cpuinfo")
    if cpuinfo is not None:
        out["cpu_hypervisor_flag"] = any(
            line.startswith("flags") and "hypervisor" in line.split(":", 1)[-1].split() for line in cpuinfo.splitlines()
        )
    return _Noted(out, notes)
