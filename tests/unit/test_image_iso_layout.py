"""`lab image add --iso`, pure parts: which layout an ISO has (paths only), ISO 9660 level-1 names,
images built from small in-memory ISOs (pycdlib writes them; the real-tool ISOs are in
tests/integration/test_image_iso.py), and how an ISO image is booted and served."""

from __future__ import annotations

import io
import pathlib

import pycdlib
import pytest
import trio
import trio.testing

from lab.common.errors import UsageError
from lab.coordinator.pxe import boot, iso
from lab.coordinator.pxe.http import BootService, byte_range, handle_connection
from lab.coordinator.pxe.images import ImageStore
from lab.coordinator.pxe.registry import Allowlist, OnboardingNode

NOW = 1_800_000_000.0
BASE = "http://10.250.7.1:8080"


@pytest.mark.parametrize(("paths", "family", "kernel"), [
    ({"casper/vmlinuz", "casper/initrd", "boot/grub/grub.cfg"}, "ubuntu", "casper/vmlinuz"),
    ({"install.amd/vmlinuz", "install.amd/initrd.gz", "install.amd/gtk/vmlinuz"}, "debian", "install.amd/vmlinuz"),
    ({"debian-installer/amd64/linux", "debian-installer/amd64/initrd.gz"}, "debian", "debian-installer/amd64/linux"),
    ({"/LINUX", "/INITRD.GZ"}, "debian", "linux"),
    ({"images/pxeboot/vmlinuz", "images/pxeboot/initrd.img", "images/install.img"}, "rhel", "images/pxeboot/vmlinuz"),
    ({"Casper/VMLINUZ", "casper/Initrd"}, "ubuntu", "casper/vmlinuz"),  # compared case-insensitively
])  # fmt: skip
def test_layouts_are_detected(paths: set[str], family: str, kernel: str) -> None:
    lay = iso.detect_layout(paths)
    assert (lay.family, lay.kernel) == (family, kernel)


def test_a_layout_missing_its_initrd_names_what_is_missing() -> None:
    with pytest.raises(UsageError, match=r"^x.iso looks like a RHEL/Rocky image but has no /images/pxeboot/initrd.img$"):
        iso.detect_layout({"images/pxeboot/vmlinuz"}, "x.iso")
    with pytest.raises(UsageError, match=r"^no installer kernel and initrd in x.iso \(looked for /casper/vmlinuz"):
        iso.detect_layout({"EFI/boot/bootx64.efi"}, "x.iso")


def test_candidate_paths_cover_every_layout() -> None:
    assert set(iso.candidate_paths()) == {p for lay in iso.LAYOUTS for p in (lay.kernel, lay.initrd)}


def test_iso9660_level1_names() -> None:
    assert iso.iso9660_name("install.amd", is_dir=True) == "INSTALL_"
    assert iso.iso9660_name("debian-installer", is_dir=True) == "DEBIAN_I"
    assert iso.iso9660_name("initrd.img", is_dir=False) == "INITRD.IMG"
    assert iso.iso9660_name("vmlinuz", is_dir=False) == "VMLINUZ"


def _plain_iso(path: pathlib.Path, files: dict[str, bytes], *, rock_ridge: bool = False) -> pathlib.Path:
    """A small ISO 9660 (level 1; Rock Ridge names when asked) written by pycdlib."""
    out = pycdlib.PyCdlib()
    out.new(rock_ridge="1.09" if rock_ridge else None)
    made: set[str] = set()
    for inner, data in files.items():
        parts = inner.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                made.add(d)
                kw = {"rr_name": parts[i - 1]} if rock_ridge else {}
                out.add_directory("/" + "/".join(iso.iso9660_name(p, is_dir=True) for p in parts[:i]), **kw)
        iso_path = "/" + "/".join([iso.iso9660_name(p, is_dir=True) for p in parts[:-1]]
                                  + [iso.iso9660_name(parts[-1], is_dir=False) + ";1"])
        kw = {"rr_name": parts[-1]} if rock_ridge else {}
        out.add_fp(io.BytesIO(data), len(data), iso_path, **kw)
    out.write(str(path))
    out.close()
    return path


@pytest.mark.parametrize("rock_ridge", [False, True])
def test_add_iso_copies_kernel_and_initrd_and_records_the_iso(tmp_path: pathlib.Path, rock_ridge: bool) -> None:
    src = _plain_iso(tmp_path / "rocky.iso", {"images/pxeboot/vmlinuz": b"K" * 5000, "images/pxeboot/initrd.img": b"I" * 3000},
                     rock_ridge=rock_ridge)
    store = ImageStore(tmp_path / "images")
    image = store.add_iso("rocky-9", src)
    assert image.family == "rhel" and image.iso == src.resolve()
    assert image.kernel.read_bytes() == b"K" * 5000 and image.initrd.read_bytes() == b"I" * 3000
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["rocky-9"]  # no temporary folder left


def test_add_iso_can_copy_the_iso_and_replaces_an_image_whole(tmp_path: pathlib.Path) -> None:
    src = _plain_iso(tmp_path / "u.iso", {"casper/vmlinuz": b"k1", "casper/initrd": b"i1"}, rock_ridge=True)
    store = ImageStore(tmp_path / "images")
    image = store.add_iso("ubuntu-24.04", src, copy_iso=True)
    assert image.iso == tmp_path / "images" / "ubuntu-24.04" / "image.iso" and image.iso.read_bytes() == src.read_bytes()
    src2 = _plain_iso(tmp_path / "u2.iso", {"casper/vmlinuz": b"k2", "casper/initrd": b"i2"}, rock_ridge=True)
    again = store.add_iso("ubuntu-24.04", src2)
    assert again.kernel.read_bytes() == b"k2" and again.iso == src2.resolve()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["ubuntu-24.04"]


def test_add_iso_errors_are_one_line(tmp_path: pathlib.Path) -> None:
    store = ImageStore(tmp_path / "images")
    (tmp_path / "not.iso").write_bytes(b"\0" * 70000)
    with pytest.raises(UsageError, match=r"not.iso is not an ISO 9660 image") as e:
        store.add_iso("debian-12", tmp_path / "not.iso")
    assert "\n" not in str(e.value)
    empty = _plain_iso(tmp_path / "empty.iso", {"readme.txt": b"hi"})
    with pytest.raises(UsageError, match="no installer kernel and initrd"):
        store.add_iso("debian-12", empty)
    with pytest.raises(UsageError, match="image name"):
        store.add_iso("../../etc", empty)
    with pytest.raises(UsageError, match="is not a file"):
        store.add_iso("debian-12", tmp_path / "missing.iso")
    assert not (tmp_path / "images").exists() or list((tmp_path / "images").iterdir()) == []


def _node(image: str) -> OnboardingNode:
    return OnboardingNode(mac="aa:bb:cc:dd:ee:ff", hostname="n1", image=image, expires_at=NOW + 600)


def test_an_ubuntu_iso_image_boots_the_live_iso_from_the_boot_server(tmp_path: pathlib.Path) -> None:
    src = _plain_iso(tmp_path / "u.iso", {"casper/vmlinuz": b"k", "casper/initrd": b"i"}, rock_ridge=True)
    store = ImageStore(tmp_path / "images")
    store.add_iso("ubuntu-24.04", src)
    script = boot.ipxe_script(_node("ubuntu-24.04"), store.get("ubuntu-24.04"), BASE)
    assert f" url={BASE}/images/ubuntu-24.04/image.iso cloud-config-url=/dev/null" in script
    store.add_iso("ubuntu-24.04", src, cmdline="url=http://mirror/u.iso")  # an explicit url= wins
    script = boot.ipxe_script(_node("ubuntu-24.04"), store.get("ubuntu-24.04"), BASE)
    assert "image.iso" not in script and "url=http://mirror/u.iso" in script
    service = BootService(Allowlist(), store, BASE, agent_dir=tmp_path)
    r = service.route("GET", "/images/ubuntu-24.04/image.iso", "1.2.3.4", NOW)
    assert r.status == 200 and r.file == src.resolve()
    src.unlink()  # the recorded ISO went away: 404, not a traceback
    assert service.route("GET", "/images/ubuntu-24.04/image.iso", "1.2.3.4", NOW).status == 404


@pytest.mark.parametrize(("header", "size", "want"), [
    (None, 100, None), ("bytes=0-9", 100, (0, 9)), ("bytes=90-", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=50-500", 100, (50, 99)), ("bytes=100-", 100, False), ("bytes=-0", 100, False),
    ("bytes=9-3", 100, None), ("bytes=0-1,5-6", 100, None), ("items=0-1", 100, None), ("bytes=-", 100, None),
])  # fmt: skip
def test_byte_ranges(header: str | None, size: int, want) -> None:
    assert byte_range(header, size) == want


def test_range_requests_over_memory_streams(tmp_path: pathlib.Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: more than one read chunk
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    store = ImageStore(tmp_path / "images")
    store.add("ubuntu-24.04", tmp_path / "k", tmp_path / "i")
    (tmp_path / "u.iso").write_bytes(data)
    meta = tmp_path / "images" / "ubuntu-24.04" / "image.yaml"
    meta.write_text(meta.read_text() + f"iso: {tmp_path / 'u.iso'}\n")
    service = BootService(Allowlist(), store, BASE, agent_dir=tmp_path)

    def get(headers: bytes) -> tuple[bytes, bytes]:
        async def main() -> bytes:
            client, server = trio.testing.memory_stream_pair()
            got = bytearray()
            async with trio.open_nursery() as n:
                n.start_soon(handle_connection, service, server, "10.0.0.9", None, lambda: NOW)
                await client.send_all(b"GET /images/ubuntu-24.04/image.iso HTTP/1.1\r\nHost: x\r\n" + headers
                                      + b"Connection: close\r\n\r\n")
                while chunk := await client.receive_some(1 << 20):
                    got += chunk
            return bytes(got)

        head, _, body = trio.run(main).partition(b"\r\n\r\n")
        return head.lower(), body

    head, body = get(b"Range: bytes=1000-300000\r\n")
    assert head.startswith(b"http/1.1 206") and b"content-range: bytes 1000-300000/1048576" in head
    assert body == data[1000:300001]
    head, body = get(b"Range: bytes=-5\r\n")
    assert head.startswith(b"http/1.1 206") and body == data[-5:]
    head, body = get(b"Range: bytes=2000000-\r\n")
    assert head.startswith(b"http/1.1 416") and b"content-range: bytes */1048576" in head
    head, body = get(b"")
    assert head.startswith(b"http/1.1 200") and b"accept-ranges: bytes" in head and body == data
