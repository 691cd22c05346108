"""Onboarding records on disk (``$LAB_HOME/pxe/nodes/<mac>.yaml``, mode 0600: they hold the token),
read into an ``Allowlist`` by the boot services. Written atomically (temp file, fsync, rename)."""

from __future__ import annotations

import pathlib

import yaml

from lab.common.errors import ConfigError
from lab.common.fsutil import atomic_write
from lab.coordinator.pxe.registry import Allowlist, OnboardingNode, mac_for_url

_FIELDS = ("mac", "hostname", "image", "expires_at", "labels", "token", "disk_gb", "size", "coordinator", "domain")


def write_node(folder: pathlib.Path, node: OnboardingNode) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {f: getattr(node, f) for f in _FIELDS}
    data["labels"] = list(node.labels)
    path = folder / f"{mac_for_url(node.mac)}.yaml"
    atomic_write(path, yaml.safe_dump(data, sort_keys=False).encode(), mode=0o600)
    return path


def remove_node(folder: pathlib.Path, mac: str) -> bool:
    path = folder / f"{mac_for_url(mac)}.yaml"
    if path.exists():
        path.unlink()
        return True
    return False


def read_nodes(folder: pathlib.Path) -> list[OnboardingNode]:
    nodes = []
    if not folder.is_dir():
        return nodes
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ConfigError("onboarding record must be a mapping", str(path))
            kw = {f: data[f] for f in _FIELDS if data.get(f) is not None}
            kw["labels"] = tuple(kw.get("labels") or ())
            nodes.append(OnboardingNode(**kw))
        except (OSError, yaml.YAMLError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad onboarding record: {exc}", str(path)) from exc
    return nodes


def reload_into(folder: pathlib.Path, allowlist: Allowlist) -> None:
    allowlist.replace_all(read_nodes(folder))
