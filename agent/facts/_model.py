"""The facts a host reports about itself: frozen records, ``None`` where a value is unknown.

A list field that is ``None`` means "could not be read"; an empty tuple means "read, none found".
"""

from __future__ import annotations

import dataclasses
from typing import Any

DISK_KINDS = ("nvme", "ssd", "hdd", "unknown")


@dataclasses.dataclass(frozen=True)
class Cpu:
    model: str | None
    vendor: str | None
    arch: str  # normalised: x86_64, aarch64, armv7l, ppc64le, riscv64, s390x, ... or "unknown"
    cores: int | None  # physical
    threads: int | None  # logical


@dataclasses.dataclass(frozen=True)
class Disk:
    name: str
    model: str | None
    size_bytes: int | None
    kind: str  # one of DISK_KINDS
    removable: bool
    system: bool = False  # holds the root filesystem


@dataclasses.dataclass(frozen=True)
class Nic:
    name: str
    mac: str | None
    speed_mbps: int | None
    up: bool | None
    virtual: bool
    driver: str | None = None
    addresses: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Gpu:
    vendor: str
    model: str
    memory_bytes: int | None
    driver: str | None
    cuda_version: str | None = None
    unified_memory: bool = False  # shares system RAM (GB10-class): no memory of its own to report


@dataclasses.dataclass(frozen=True)
class OsInfo:
    id: str | None
    version: str | None
    pretty: str | None


@dataclasses.dataclass(frozen=True)
class Facts:
    hostname: str | None
    kernel: str | None
    cpu: Cpu
    memory_bytes: int | None
    disks: tuple[Disk, ...] | None
    nics: tuple[Nic, ...] | None
    gpus: tuple[Gpu, ...] | None
    virtualization: str  # systemd-detect-virt's word (kvm, vmware, microsoft, ...), "none", "vm" or "unknown"
    container: str | None
    os: OsInfo | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe data (lists, not tuples)."""
        return _plain(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Suggestion:
    label: str
    rule: str  # the name of the rule in RULES that produced it
    evidence: str  # what was seen: "GPU: NVIDIA A100 80GB PCIe"

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
