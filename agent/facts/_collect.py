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
        "cpu": _cpuinfo,
        "psutil": _psutil,
        "udev": _udev,
        "nvml": _nvml,
        "virt": lambda: _virt(rootp),
        "os": lambda: _read_text(rootp / "etc/os-release") or _read_text(rootp / "usr/lib/os-release"),
    }
    keys = {"host": "host", "cpu": "cpuinfo", "psutil": "psutil", "udev": "udev", "nvml": "nvml", "virt": "virt", "os": "os_release"}
    for name in wanted:
        try:
            value = collectors[name]()
        except Exception as exc:  # a fact source must never take the agent down
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


def _cpuinfo() -> dict[str, Any]:
    import cpuinfo  # py-cpuinfo

    info = cpuinfo.get_cpu_info()
    keys = ("brand_raw", "arch", "arch_string_raw", "bits", "count", "vendor_id_raw")
    return {k: info.get(k) for k in keys if k in info}


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
        for kind in ("vm", "container"):
            try:
                r = subprocess.run(
                    [tool, f"--{kind}"], capture_output=True, text=True, timeout=DETECT_VIRT_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False
                )
                detected[kind] = r.stdout.strip() or "none"
            except (OSError, subprocess.SubprocessError) as exc:
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
