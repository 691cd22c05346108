"""Installer kernels and initrds inside ISO 9660 images (`lab image add NAME --iso FILE`).

The layouts lab knows, in the order they are tried (paths as Rock Ridge / Joliet show them)::

    ubuntu  casper/vmlinuz                  casper/initrd            (live server ISOs)
    debian  install.amd/vmlinuz             install.amd/initrd.gz    (netinst / DVD)
    debian  debian-installer/amd64/linux    debian-installer/amd64/initrd.gz   (netboot layout)
    debian  linux                           initrd.gz                (mini.iso)
    rhel    images/pxeboot/vmlinuz          images/pxeboot/initrd.img (Rocky, Alma, RHEL, Fedora)

:func:`detect_layout` is pure (it takes the candidate paths found in the image); :func:`read_iso`
does the I/O through pycdlib (pure Python) and translates its errors into one-line ``UsageError``s.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Collection
from typing import Any, BinaryIO

from lab.common.errors import ConfigError, UsageError

__all__ = ["LAYOUTS", "IsoLayout", "candidate_paths", "detect_layout", "extract", "read_iso"]


@dataclasses.dataclass(frozen=True)
class IsoLayout:
    family: str
    kernel: str  # path inside the ISO, no leading slash
    initrd: str
    what: str  # for messages: "Ubuntu live server", …


LAYOUTS: tuple[IsoLayout, ...] = (
    IsoLayout("ubuntu", "casper/vmlinuz", "casper/initrd", "Ubuntu live server"),
    IsoLayout("debian", "install.amd/vmlinuz", "install.amd/initrd.gz", "Debian installer"),
    IsoLayout("debian", "debian-installer/amd64/linux", "debian-installer/amd64/initrd.gz", "Debian netboot"),
    IsoLayout("debian", "linux", "initrd.gz", "Debian mini.iso"),
    IsoLayout("rhel", "images/pxeboot/vmlinuz", "images/pxeboot/initrd.img", "RHEL/Rocky"),
)


def candidate_paths() -> list[str]:
    """Every path :func:`detect_layout` may ask about (the I/O side checks only these)."""
    return sorted({p for lay in LAYOUTS for p in (lay.kernel, lay.initrd)})


def detect_layout(present: Collection[str], source: str = "the ISO") -> IsoLayout:
    """The first layout whose kernel and initrd are both in ``present`` (paths inside the image,
    compared case-insensitively). UsageError naming what was looked for when none is complete."""
    have = {p.strip("/").lower() for p in present}
    for lay in LAYOUTS:
        if lay.kernel in have and lay.initrd in have:
            return lay
    half = next((lay for lay in LAYOUTS if lay.kernel in have or lay.initrd in have), None)
    if half is not None:
        missing = half.initrd if half.kernel in have else half.kernel
        raise UsageError(f"{source} looks like a {half.what} image but has no /{missing}")
    looked = ", ".join(f"/{lay.kernel} + /{lay.initrd}" for lay in LAYOUTS)
    raise UsageError(f"no installer kernel and initrd in {source} (looked for {looked})")


# -- I/O ----------------------------------------------------------------------------------------


def _open(fp: BinaryIO, source: str) -> tuple[Any, Callable[[str], dict[str, str]]]:
    """A pycdlib object on ``fp`` and a function mapping an inner path to the lookup keyword
    for the richest name space the image has (Rock Ridge, then Joliet, then plain ISO 9660)."""
    try:
        import pycdlib
        from pycdlib.pycdlibexception import PyCdlibException
    except ImportError as exc:  # a dependency of lab; missing only in a broken install
        raise ConfigError("reading ISO images needs the Python package pycdlib (pip install pycdlib)") from exc

    iso = pycdlib.PyCdlib()
    try:
        iso.open_fp(fp)
    except PyCdlibException as exc:
        raise UsageError(f"{source} is not an ISO 9660 image ({_first_line(exc)})") from exc
    except (ValueError, EOFError, IndexError, KeyError) as exc:  # pycdlib on truncated input
        raise UsageError(f"{source} is not an ISO 9660 image (truncated or damaged)") from exc
    if iso.has_rock_ridge():
        return iso, lambda p: {"rr_path": "/" + p}
    if iso.has_joliet():
        return iso, lambda p: {"joliet_path": "/" + p}
    return iso, lambda p: {"iso_path": _plain_path(iso, p)}  # plain ISO 9660: 8.3 upper-case names


def iso9660_name(name: str, *, is_dir: bool) -> str:
    """How a plain ISO 9660 (level 1) writer names ``name``: upper case, ``[A-Z0-9_]`` only, 8.3
    (directories: 8, no '.'), compared without version and trailing dot."""
    out = "".join(c if c.isascii() and (c.isalnum() or c == ".") else "_" for c in name.upper())
    if is_dir:
        return out.replace(".", "_")[:8]
    stem, dot, ext = out.partition(".")
    return stem[:8] + (dot + ext.replace(".", "_")[:3] if ext else "")


def _plain_path(iso: Any, inner: str) -> str:
    """The ISO 9660 path of ``inner``, found one component at a time among each directory's
    children (names compared without version and trailing dot, as written or as level 1 mangles
    them); "/<inner>" unchanged when not found (the lookup then fails as missing)."""
    from pycdlib.pycdlibexception import PyCdlibException

    parts = inner.split("/")
    here = ""
    for i, part in enumerate(parts):
        is_dir = i < len(parts) - 1
        wanted = {part.upper(), part.upper().replace("-", "_"), iso9660_name(part, is_dir=is_dir)}
        try:
            children = list(iso.list_children(iso_path=here or "/"))
        except PyCdlibException:
            return "/" + inner
        for child in children:
            raw = child.file_identifier().decode("ascii", "replace")
            if raw in (".", "..", "\x00", "\x01"):
                continue
            if raw.split(";")[0].rstrip(".") in wanted:
                here = f"{here}/{raw}"
                break
        else:
            return "/" + inner
    return here


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _exists(iso: Any, key: dict[str, str]) -> bool:
    from pycdlib.pycdlibexception import PyCdlibException

    try:
        rec = iso.get_record(**key)
    except PyCdlibException:
        return False
    is_dir = getattr(rec, "is_dir", None)
    return not (callable(is_dir) and is_dir())


def read_iso(path: pathlib.Path) -> IsoLayout:
    """Which layout the ISO at ``path`` has (UsageError: not a file, not an ISO, no kernel/initrd)."""
    with _open_file(path) as fp:
        iso, key = _open(fp, str(path))
        try:
            return detect_layout([p for p in candidate_paths() if _exists(iso, key(p))], str(path))
        finally:
            iso.close()


def extract(path: pathlib.Path, layout: IsoLayout, kernel_out: pathlib.Path, initrd_out: pathlib.Path) -> None:
    """Copy the layout's kernel and initrd out of the ISO (files created anew, fsynced)."""
    from pycdlib.pycdlibexception import PyCdlibException

    with _open_file(path) as fp:
        iso, key = _open(fp, str(path))
        try:
            for inner, out in ((layout.kernel, kernel_out), (layout.initrd, initrd_out)):
                with open(out, "xb") as f:
                    try:
                        iso.get_file_from_iso_fp(f, **key(inner))
                    except PyCdlibException as exc:
                        raise UsageError(f"cannot read /{inner} from {path}: {_first_line(exc)}") from exc
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            iso.close()


def _open_file(path: pathlib.Path) -> BinaryIO:
    if not path.is_file():
        raise UsageError(f"ISO {path} is not a file")
    try:
        return open(path, "rb")  # noqa: SIM115 - returned to a with block
    except OSError as exc:
        raise UsageError(f"cannot read ISO {path}: {exc.strerror}") from exc
