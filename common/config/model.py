"""Validated, immutable definitions: labels, groups, alerts, sizes and secrets.

Built only by :mod:`lab.common.config.loader`; every object remembers the file:line it came from.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

SEVERITIES = ("critical", "warning", "info")
SECRET_TYPES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True, slots=True)
class Selector:
    """Which servers: each non-empty key must hold; a key holds when any of its items does."""

    labels: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    environments: frozenset[str] = frozenset()
    regions: frozenset[str] = frozenset()
    servers: frozenset[str] = frozenset()

    def is_empty(self) -> bool:
        return not (self.labels or self.groups or self.environments or self.regions or self.servers)

    def describe(self) -> str:
        parts = []
        for key, values in (
            ("label", self.labels),
            ("group", self.groups),
            ("environment", self.environments),
            ("region", self.regions),
            ("server", self.servers),
        ):
            if values:
                shown = ", ".join(sorted(values))
                parts.append(f'{key} "{shown}"' if len(values) == 1 else f"{key}s [{shown}]")
        return " and ".join(parts) if parts else "nothing"


@dataclasses.dataclass(frozen=True, slots=True)
class Exclude:
    """Servers to leave out. Named servers and members of named groups are each excluded on
    their own; the attribute keys (labels, environment, region) exclude a server when all of
    the given ones hold for it, exactly as in a match."""

    servers: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    attributes: Selector | None = None

    def describe(self) -> list[str]:
        out = [f"{s} (by name)" for s in sorted(self.servers)]
        out += [f'members of group "{g}"' for g in sorted(self.groups)]
        if self.attributes is not None:
            out.append(f"servers with {self.attributes.describe()}")
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class Label:
    name: str
    puppet_classes: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    size: str | None = None
    alerts: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    description: str = ""
    location: Location | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    name: str
    match: Selector | None = None
    groups: tuple[str, ...] = ()
    servers: tuple[str, ...] = ()
    exclude: Exclude | None = None
    description: str = ""
    location: Location | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    name: str
    target: Selector
    condition: str
    severity: str = "warning"
    for_seconds: int | None = None
    exclude: Exclude | None = None
    description: str = ""
    location: Location | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Size:
    name: str
    cores: int | None = None
    memory_mb: int | None = None
    disk: str | None = None
    providers: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    location: Location | None = None

    def describe(self) -> str:
        parts = []
        if self.cores is not None:
            parts.append(f"{self.cores} cores")
        if self.memory_mb is not None:
            mb = self.memory_mb
            parts.append(f"{mb // 1024}GB" if mb % 1024 == 0 else f"{mb}MB")
        if self.disk:
            parts.append(self.disk)
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True, slots=True)
class Secret:
    path: str
    type: str = "static"
    generator: str | None = None
    rotate_every: int | None = None
    per_machine: bool = False
    owner: str = "root"
    group: str = "root"
    mode: int = 0o400
    set_by: str | None = None
    ttl: int | None = None
    description: str = ""
    location: Location | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Definitions:
    """Everything one definitions directory declares. Never partially built."""

    root: pathlib.Path | None
    labels: Mapping[str, Label]
    groups: Mapping[str, Group]
    alerts: Mapping[str, Alert]
    sizes: Mapping[str, Size]
    secrets: Mapping[str, Secret]
    files: tuple[str, ...] = ()

    @classmethod
    def empty(cls) -> Definitions:
        return cls(None, {}, {}, {}, {}, {})
