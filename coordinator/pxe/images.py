"""Installer images: a kernel, an initrd and a little metadata, one folder per image.

    <images dir>/<name>/vmlinuz
    <images dir>/<name>/initrd
    <images dir>/<name>/image.yaml   {name, family, cmdline, iso}
    <images dir>/<name>/image.iso    (``add_iso(..., copy_iso=True)``; else ``iso:`` records its path)

An image is written into a temporary folder beside its final one and renamed into place, so the
boot services never see half an image.
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
ISO_FILE = "image.iso"
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
    iso: pathlib.Path | None = None  # the installer ISO, served at /images/<name>/image.iso


class ImageStore:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def _check(self, name: str, family: str | None, cmdline: str) -> str:
        if not _NAME_RE.match(name):
            raise UsageError(f"image name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
        family = family or guess_family(name)
        if family not in FAMILIES:
            raise UsageError(f"cannot tell the OS family of {name!r}: pass --family {'|'.join(FAMILIES)}")
        if any(c in cmdline for c in "\n\r"):
            raise UsageError("--cmdline must be one line")
        return family

    def add(self, name: str, kernel: pathlib.Path, initrd: pathlib.Path, *, family: str | None = None,
            cmdline: str = "") -> Image:
        family = self._check(name, family, cmdline)
        for what, path in (("kernel", kernel), ("initrd", initrd)):
            if not path.is_file():
                raise UsageError(f"{what} {path} is not a file")

        def fill(tmp: pathlib.Path) -> dict[str, str]:
            shutil.copyfile(kernel, tmp / "vmlinuz")
            shutil.copyfile(initrd, tmp / "initrd")
            return {}

        return self._write(name, family, cmdline, fill)

    def add_iso(self, name: str, iso: pathlib.Path, *, family: str | None = None, cmdline: str = "",
                copy_iso: bool = False) -> Image:
        """Kernel and initrd found inside ``iso`` (coordinator/pxe/iso.py); the family comes from
        the ISO's layout unless given. The ISO itself is recorded by absolute path (it must stay
        there), or copied into the image folder with ``copy_iso``."""
        from lab.coordinator.pxe import iso as isomod

        if not _NAME_RE.match(name):
            raise UsageError(f"image name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
        layout = isomod.read_iso(iso)
        family = self._check(name, family or layout.family, cmdline)
        source = iso.resolve()

        def fill(tmp: pathlib.Path) -> dict[str, str]:
            isomod.extract(source, layout, tmp / "vmlinuz", tmp / "initrd")
            if copy_iso:
                shutil.copyfile(source, tmp / ISO_FILE)
                return {"iso": ISO_FILE}
            return {"iso": str(source)}

        return self._write(name, family, cmdline, fill)

    def _write(self, name: str, family: str, cmdline: str, fill) -> Image:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            extra = fill(tmp)
            meta = {"name": name, "family": family, "cmdline": cmdline, **extra}
            with open(tmp / "image.yaml", "w") as f:
                yaml.safe_dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the files are public installer images
            final = self.root / name
            if final.exists():
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=self.root))
                os.rename(final, old / name)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
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
        iso = meta.get("iso")
        if iso is not None and not isinstance(iso, str):
            raise ConfigError("image metadata: iso must be a path", str(meta_path))
        return Image(name, meta["family"], folder / "vmlinuz", folder / "initrd", str(meta.get("cmdline") or ""),
                     (folder / iso) if iso else None)

    def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        return [self.get(p.name) for p in sorted(self.root.iterdir())
                if not p.name.startswith(".") and (p / "image.yaml").is_file()]  # ".name.*": being written
