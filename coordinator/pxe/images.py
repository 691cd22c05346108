"""Installer images: a kernel, an initrd and a little metadata, one folder per image.

    <images dir>/<name>/vmlinuz
    <images dir>/<name>/initrd
    <images dir>/<name>/image.yaml   {name, family, cmdline}
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import tempfile

import yaml

from lab.common.errors import ConfigError, NotFound, UsageError

FAMILIES = ("ubuntu", "debian", "rhel")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_FAMILY_BY_PREFIX = {"ubuntu": "ubuntu", "debian": "debian", "rocky": "rhel", "rhel": "rhel", "alma": "rhel",
                     "centos": "rhel", "fedora": "rhel"}


def guess_family(name: str) -> str | None:
    for prefix, family in _FAMILY_BY_PREFIX.items():
        if name.startswith(prefix):
            return family
    return None


@dataclasses.dataclass(frozen=True)
class Image:
    name: str
    family: str
    kernel: pathlib.Path
    initrd: pathlib.Path
    cmdline: str = ""  # extra kernel arguments, e.g. Ubuntu's url=<iso> or RHEL's inst.repo=<url>


class ImageStore:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def add(self, name: str, kernel: pathlib.Path, initrd: pathlib.Path, *, family: str | None = None,
            cmdline: str = "") -> Image:
        if not _NAME_RE.match(name):
            raise UsageError(f"image name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
        family = family or guess_family(name)
        if family not in FAMILIES:
            raise UsageError(f"cannot tell the OS family of {name!r}: pass --family {'|'.join(FAMILIES)}")
        if any(c in cmdline for c in "\n\r"):
            raise UsageError("--cmdline must be one line")
        for what, path in (("kernel", kernel), ("initrd", initrd)):
            if not path.is_file():
                raise UsageError(f"{what} {path} is not a file")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            shutil.copyfile(kernel, tmp / "vmlinuz")
            shutil.copyfile(initrd, tmp / "initrd")
            (tmp / "image.yaml").write_text(yaml.safe_dump({"name": name, "family": family, "cmdline": cmdline}))
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(name)

    def get(self, name: str) -> Image:
        if not _NAME_RE.match(name):
            raise NotFound(f"image {name!r} not found")
        folder = self.root / name
        meta_path = folder / "image.yaml"
        if not meta_path.is_file():
            raise NotFound(f"image {name!r} not found in {self.root}")
        try:
            meta = yaml.safe_load(meta_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"bad image metadata: {exc}", str(meta_path)) from exc
        if not isinstance(meta, dict) or meta.get("family") not in FAMILIES:
            raise ConfigError("image metadata needs a family", str(meta_path))
        return Image(name, meta["family"], folder / "vmlinuz", folder / "initrd", str(meta.get("cmdline") or ""))

    def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        return [self.get(p.name) for p in sorted(self.root.iterdir()) if (p / "image.yaml").is_file()]
