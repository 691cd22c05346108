"""`lab image add NAME --iso FILE` on ISO images written by a real tool (xorriso, Debian package
`xorriso`), one per installer layout, plus the boot HTTP service serving the ISO with ranges over
a real socket. Skips without xorriso unless CI is set (then it fails)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import urllib.request

import pytest
import trio
import yaml

LAB = str(pathlib.Path(sys.executable).with_name("lab"))

LAYOUTS = {  # image name → files in the ISO (kernel, initrd, and some neighbours real ISOs have)
    "ubuntu-24.04": {"casper/vmlinuz": b"UBUNTU-KERNEL", "casper/initrd": b"UBUNTU-INITRD",
                     "casper/ubuntu-server-minimal.squashfs": b"sq", ".disk/info": b"Ubuntu-Server 24.04"},
    "debian-12": {"install.amd/vmlinuz": b"DEBIAN-KERNEL", "install.amd/initrd.gz": b"DEBIAN-INITRD",
                  "install.amd/gtk/vmlinuz": b"GTK", "pool/main/x.deb": b"deb"},
    "debian-12-netboot": {"debian-installer/amd64/linux": b"NETBOOT-KERNEL",
                          "debian-installer/amd64/initrd.gz": b"NETBOOT-INITRD", "pxelinux.0": b"p"},
    "rocky-9": {"images/pxeboot/vmlinuz": b"ROCKY-KERNEL", "images/pxeboot/initrd.img": b"ROCKY-INITRD",
                "images/install.img": b"stage2", ".treeinfo": b"[general]\nfamily = Rocky Linux\n"},
}
FAMILY = {"ubuntu-24.04": "ubuntu", "debian-12": "debian", "debian-12-netboot": "debian", "rocky-9": "rhel"}


def need_xorriso() -> None:
    if shutil.which("xorriso") is None:
        if os.environ.get("CI"):
            pytest.fail("CI requires xorriso (Debian package xorriso)")
        pytest.skip("needs xorriso")


def make_iso(tmp: pathlib.Path, name: str, files: dict[str, bytes], *extra: str) -> pathlib.Path:
    tree = tmp / f"tree-{name}"
    for inner, data in files.items():
        (tree / inner).parent.mkdir(parents=True, exist_ok=True)
        (tree / inner).write_bytes(data)
    out = tmp / f"{name}.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", *extra, "-V", name[:16].upper(), "-o", str(out), str(tree)],
                   check=True, capture_output=True, timeout=60)
    return out


def lab(home: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LAB_HOME=str(home), NO_COLOR="1")
    return subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("names", ["rock-ridge", "joliet"])
def test_image_add_iso_finds_kernel_and_initrd(tmp_path: pathlib.Path, name: str, names: str) -> None:
    need_xorriso()
    iso = make_iso(tmp_path, name, LAYOUTS[name], *(["-R", "-J"] if names == "rock-ridge" else ["-J"]))
    home = tmp_path / "home"
    r = lab(home, "image", "add", name, "--iso", str(iso))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"image {name} added ({FAMILY[name]}, ISO served)\n"
    folder = home / "pxe" / "images" / name
    (kernel,) = (v for v in LAYOUTS[name].values() if v.endswith(b"-KERNEL"))
    (initrd,) = (v for v in LAYOUTS[name].values() if v.endswith(b"-INITRD"))
    assert (folder / "vmlinuz").read_bytes() == kernel and (folder / "initrd").read_bytes() == initrd
    meta = yaml.safe_load((folder / "image.yaml").read_text())
    assert meta == {"name": name, "family": FAMILY[name], "cmdline": "", "iso": str(iso.resolve())}
    assert sorted(p.name for p in (home / "pxe" / "images").iterdir()) == [name]  # no temporary folder left


def test_image_add_iso_copy_and_list(tmp_path: pathlib.Path) -> None:
    need_xorriso()
    iso = make_iso(tmp_path, "u", LAYOUTS["ubuntu-24.04"], "-R", "-J")
    home = tmp_path / "home"
    assert lab(home, "image", "add", "ubuntu-24.04", "--iso", str(iso), "--copy-iso").returncode == 0
    copied = home / "pxe" / "images" / "ubuntu-24.04" / "image.iso"
    assert copied.read_bytes() == iso.read_bytes()
    r = lab(home, "image", "list", "-o", "json")
    assert r.returncode == 0 and '"iso": "' + str(copied) + '"' in r.stdout


@pytest.mark.parametrize(("setup", "args", "message"), [
    ("notiso", ["debian-12", "--iso", "{tmp}/notes.txt"], "{tmp}/notes.txt is not an ISO 9660 image"),
    ("noinitrd", ["rocky-9", "--iso", "{tmp}/noinitrd.iso"], "looks like a RHEL/Rocky image but has no /images/pxeboot/initrd.img"),
    ("empty", ["debian-12", "--iso", "{tmp}/empty.iso"], "no installer kernel and initrd in {tmp}/empty.iso"),
    ("empty", ["../../etc/cron.d", "--iso", "{tmp}/empty.iso"], "image name '../../etc/cron.d'"),
    ("empty", ["debian-12", "--iso", "{tmp}/missing.iso"], "ISO {tmp}/missing.iso is not a file"),
    ("empty", ["debian-12", "--iso", "{tmp}/empty.iso", "--kernel", "{tmp}/k"], "not both"),
    ("symlink", ["ubuntu-24.04", "--iso", "{tmp}/symlink.iso"], "cannot read /casper/vmlinuz from {tmp}/symlink.iso"),
])  # fmt: skip
def test_image_add_iso_errors_are_one_line(tmp_path: pathlib.Path, setup: str, args: list[str], message: str) -> None:
    need_xorriso()
    (tmp_path / "notes.txt").write_text("not an image\n" * 10000)
    if setup == "noinitrd":
        make_iso(tmp_path, "noinitrd", {"images/pxeboot/vmlinuz": b"k"}, "-R")
    if setup == "empty":
        make_iso(tmp_path, "empty", {"README": b"hello"}, "-R")
    if setup == "symlink":  # a Rock Ridge symlink pointing out of the image: never followed
        tree = tmp_path / "tree-symlink"
        (tree / "casper").mkdir(parents=True)
        (tree / "casper" / "vmlinuz").symlink_to("../../../../../etc/passwd")
        make_iso(tmp_path, "symlink", {"casper/initrd": b"i"}, "-R")
    home = tmp_path / "home"
    r = lab(home, "image", "add", *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r
    assert r.stderr.startswith("lab: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(tmp=tmp_path) in r.stderr
    assert not (home / "pxe" / "images").exists() or list((home / "pxe" / "images").iterdir()) == []


def test_the_iso_is_served_with_ranges_over_a_socket(tmp_path: pathlib.Path) -> None:
    """The boot HTTP service on a real (loopback) socket: the whole ISO, a range, and the image's
    iPXE script pointing Ubuntu's casper at it."""
    need_xorriso()
    from lab.coordinator.pxe.http import BootService, serve_http
    from lab.coordinator.pxe.images import ImageStore
    from lab.coordinator.pxe.registry import Allowlist

    files = dict(LAYOUTS["ubuntu-24.04"], **{"casper/filesystem.squashfs": os.urandom(300_000)})
    iso = make_iso(tmp_path, "u", files, "-R", "-J")
    store = ImageStore(tmp_path / "images")
    store.add_iso("ubuntu-24.04", iso)
    allow = Allowlist()
    allow.allow("52:54:00:12:34:56", "n1", 4e9, image="ubuntu-24.04")
    data = iso.read_bytes()

    async def main() -> None:
        async with trio.open_nursery() as n:
            port = await n.start(lambda task_status: serve_http(
                BootService(allow, store, "http://127.0.0.1:0", agent_dir=tmp_path), address="127.0.0.1", port=0,
                task_status=task_status))

            def fetch(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
                req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()

            status, headers, body = await trio.to_thread.run_sync(fetch, "/images/ubuntu-24.04/image.iso", {})
            assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
            status, headers, body = await trio.to_thread.run_sync(
                fetch, "/images/ubuntu-24.04/image.iso", {"Range": "bytes=32768-33000"})
            assert status == 206 and body == data[32768:33001]
            assert headers["content-range"] == f"bytes 32768-33000/{len(data)}"
            status, _, body = await trio.to_thread.run_sync(fetch, "/boot/52-54-00-12-34-56.ipxe", {})
            assert status == 200 and b"url=http://127.0.0.1:0/images/ubuntu-24.04/image.iso" in body
            n.cancel_scope.cancel()

    trio.run(main)
