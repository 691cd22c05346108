"""Network boot in network namespaces joined by a veth pair (traffic never leaves them):
our DHCP server against busybox udhcpc, and `lab pxe serve` booting a QEMU guest (TCG) whose
iPXE ROM / OVMF firmware gets lab's DHCP answer, TFTP bootloader and per-MAC HTTP script.

Needs root, `ip`, `busybox`, `qemu-system-x86_64` (+ Debian's ipxe-qemu, ipxe, ovmf); skips
without them unless CI is set (then it fails).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest

from lab.coordinator.pxe.dhcp import DhcpPacket, MessageType, Opt, parse_untrusted

REPO = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = "02:00:00:00:00:42"
STRANGER = "02:00:00:00:00:99"


def need(*binaries: str, root: bool = True) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if root and os.geteuid() != 0:
        missing.append("root")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


class Segment:
    """Two namespaces, `srv` (10.250.x.1/24 on `if_srv`) and `cli`, joined by a veth pair."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.srv, self.cli = f"labpxe-s-{tag}", f"labpxe-c-{tag}"
        self.if_srv, self.if_cli = f"lps{tag}", f"lpc{tag}"
        self.server_ip = "10.250.7.1"

    def __enter__(self) -> Segment:
        sh("ip", "netns", "add", self.srv)
        sh("ip", "netns", "add", self.cli)
        sh("ip", "link", "add", self.if_srv, "netns", self.srv, "type", "veth", "peer", "name", self.if_cli, "netns", self.cli)
        sh("ip", "-n", self.srv, "addr", "add", f"{self.server_ip}/24", "dev", self.if_srv)
        for ns, ifname in ((self.srv, self.if_srv), (self.cli, self.if_cli)):
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def set_client_mac(self, mac: str) -> None:
        sh("ip", "-n", self.cli, "link", "set", self.if_cli, "address", mac)

    def __exit__(self, *exc: object) -> None:
        sh("ip", "netns", "del", self.srv, check=False)
        sh("ip", "netns", "del", self.cli, check=False)


SERVER_SCRIPT = textwrap.dedent(
    """
    import functools, ipaddress, sys, time, trio
    from lab.coordinator.pxe.dhcp import DhcpConfig, DhcpServer, serve_dhcp
    from lab.coordinator.pxe.registry import Allowlist
    mode, iface, server_ip, mac = sys.argv[1:5]
    al = Allowlist(); al.allow(mac, "node-1", time.time() + 600)
    ip = ipaddress.IPv4Address
    cfg = DhcpConfig(server_ip=ip(server_ip), http_base=f"http://{server_ip}:8080", mode=mode,
                     pool_first=ip("10.250.7.100") if mode == "full" else None,
                     pool_last=ip("10.250.7.110") if mode == "full" else None, router=ip(server_ip))
    async def main():
        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_dhcp, DhcpServer(cfg, al), interface=iface,
                          proxy_port=4011 if mode == "proxy" else None,
                          on_event=lambda e: print("event", e.stage, e.mac, e.detail, flush=True)))
            print("ready", flush=True)
    trio.run(main)
    """
)


class Server:
    log = ""


@contextlib.contextmanager
def dhcp_server(seg: Segment, mode: str):
    """Runs our DHCP server in `seg.srv`; after the block, ``.log`` holds the events it printed."""
    server = Server()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", seg.srv, sys.executable, "-c", SERVER_SCRIPT, mode, seg.if_srv, seg.server_ip, ALLOWED],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
        yield server
    finally:
        proc.terminate()
        server.log, _ = proc.communicate(timeout=10)


UDHCPC_SCRIPT = '#!/bin/sh\nenv | grep -E "^(ip|siaddr|boot_file|serverid|router|hostname|lease|tftp|bootfile)=" > "$OUT.$1"\n'


def udhcpc(seg: Segment, tmp: pathlib.Path, *extra: str) -> tuple[int, dict[str, str]]:
    script = tmp / "script.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp / "lease"))
    r = subprocess.run(
        ["ip", "netns", "exec", seg.cli, "busybox", "udhcpc", "-i", seg.if_cli, "-f", "-q", "-n",
         "-t", "3", "-T", "1", "-s", str(script), *extra],
        env=env, capture_output=True, text=True, timeout=30,
    )
    bound = tmp / "lease.bound"
    values = dict(line.split("=", 1) for line in bound.read_text().splitlines()) if bound.exists() else {}
    return r.returncode, values


@pytest.fixture()
def segment():
    need("ip", "busybox")
    with Segment() as seg:
        yield seg


def test_udhcpc_gets_an_address_and_boot_file_in_full_mode(segment: Segment, tmp_path: pathlib.Path) -> None:
    segment.set_client_mac(ALLOWED)
    with dhcp_server(segment, "full") as server:
        rc, lease = udhcpc(segment, tmp_path, "-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007")
    assert rc == 0, lease
    assert lease["ip"] == "10.250.7.100"
    assert lease["serverid"] == segment.server_ip and lease["siaddr"] == segment.server_ip
    assert lease["boot_file"] == "ipxe.efi"
    assert lease["hostname"] == "node-1"
    assert "dhcp-discover" in server.log and "dhcp-ack" in server.log


def test_udhcpc_bios_client_gets_undionly(segment: Segment, tmp_path: pathlib.Path) -> None:
    segment.set_client_mac(ALLOWED)
    with dhcp_server(segment, "full"):
        rc, lease = udhcpc(segment, tmp_path, "-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000")
    assert rc == 0 and lease["boot_file"] == "undionly.kpxe"


def test_a_mac_lab_is_not_onboarding_gets_nothing(segment: Segment, tmp_path: pathlib.Path) -> None:
    segment.set_client_mac(STRANGER)
    with dhcp_server(segment, "full") as server:
        rc, lease = udhcpc(segment, tmp_path)
    assert rc != 0 and lease == {}
    assert "event" not in server.log


DISCOVER_SCRIPT = textwrap.dedent(
    """
    import socket, sys
    from lab.coordinator.pxe.dhcp import DhcpPacket, Opt
    iface, mac = sys.argv[1:3]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    s.bind(("0.0.0.0", 68)); s.settimeout(5)
    p = DhcpPacket(op=1, xid=0xC0FFEE, chaddr=bytes.fromhex(mac.replace(":", "")), flags=0x8000, options={
        Opt.MESSAGE_TYPE: b"\\x01", Opt.VENDOR_CLASS: b"PXEClient:Arch:00000:UNDI:002001",
        Opt.CLIENT_ARCH: b"\\x00\\x00", Opt.CLIENT_UUID: b"\\x00" + bytes(range(16))})
    s.sendto(p.encode(), ("255.255.255.255", 67))
    sys.stdout.buffer.write(s.recvfrom(4096)[0].hex().encode())
    """
)


def test_proxy_mode_answers_boot_info_without_an_address(segment: Segment, tmp_path: pathlib.Path) -> None:
    segment.set_client_mac(ALLOWED)
    with dhcp_server(segment, "proxy") as server:
        # a PXE-style DISCOVER from the client namespace: the proxy answers with boot info only
        r = subprocess.run(["ip", "netns", "exec", segment.cli, sys.executable, "-c", DISCOVER_SCRIPT,
                            segment.if_cli, ALLOWED], capture_output=True, text=True, timeout=30, cwd=REPO)
        assert r.returncode == 0, r.stderr
        offer: DhcpPacket = parse_untrusted(bytes.fromhex(r.stdout))
        # udhcpc, a real DHCP client, gets no lease from a proxy (there is no address to take)
        rc, lease = udhcpc(segment, tmp_path, "-V", "PXEClient:Arch:00000:UNDI:002001")
    assert offer.message_type == MessageType.OFFER and offer.xid == 0xC0FFEE
    assert str(offer.yiaddr) == "0.0.0.0"
    assert offer.options[Opt.VENDOR_CLASS] == b"PXEClient"
    assert offer.options[Opt.BOOTFILE] == b"undionly.kpxe" and str(offer.siaddr) == segment.server_ip
    assert offer.options[Opt.CLIENT_UUID] == b"\x00" + bytes(range(16))
    assert rc != 0 and lease == {}
    assert "proxydhcp-discover" in server.log


# -- QEMU: the whole boot chain ---------------------------------------------------------------

LAB = str(pathlib.Path(sys.executable).with_name("lab"))
QEMU_MAC = "52:54:00:12:34:56"
OVMF = pathlib.Path("/usr/share/OVMF/OVMF_CODE.fd")


def lab_cli(env: dict[str, str], *args: str) -> None:
    r = subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def lab_pxe_serve(seg: Segment, home: pathlib.Path) -> Iterator[subprocess.Popen[str]]:
    env = dict(os.environ, LAB_HOME=str(home))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", seg.srv, LAB, "pxe", "serve", "--address", seg.server_ip, "--interface", seg.if_srv,
         "--pool", "10.250.7.100-10.250.7.110"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def wait_for_lines(proc: subprocess.Popen[str], wanted: list[str], timeout: float) -> list[str]:
    """Read `stage=...` lines until every wanted stage was seen (or the time is up)."""
    import selectors

    assert proc.stdout is not None
    seen: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(any(w in s for s in seen) for w in wanted):
        if sel.select(timeout=1):
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line.strip())
    sel.close()
    return seen


@pytest.fixture()
def boot_lab(segment: Segment, tmp_path: pathlib.Path):
    need("qemu-system-x86_64")
    if not pathlib.Path("/usr/lib/ipxe/ipxe.efi").exists():
        need("debian-package-ipxe")
    home = tmp_path / "home"
    env = dict(os.environ, LAB_HOME=str(home))
    (tmp_path / "vmlinuz").write_bytes(os.urandom(4096))
    (tmp_path / "initrd").write_bytes(os.urandom(1024))
    lab_cli(env, "image", "add", "ubuntu-24.04", "--kernel", str(tmp_path / "vmlinuz"), "--initrd", str(tmp_path / "initrd"))
    from lab.common.identity import b32, mint_token

    (tmp_path / "token").write_text(mint_token(b32(bytes(32)))[0])
    lab_cli(env, "pxe", "allow", QEMU_MAC, "--hostname", "qemu-1", "--token-file", str(tmp_path / "token"))
    guest_nic(segment)
    return home


def guest_nic(seg: Segment) -> None:
    """The guest's NIC: a tap (`labtap`, what `qemu` attaches to) in the client namespace, bridged to the veth."""
    sh("ip", "-n", seg.cli, "link", "add", "labbr", "type", "bridge")
    sh("ip", "-n", seg.cli, "tuntap", "add", "dev", "labtap", "mode", "tap")
    for ifname in (seg.if_cli, "labtap"):
        sh("ip", "-n", seg.cli, "link", "set", ifname, "master", "labbr")
    for ifname in ("labtap", "labbr"):
        sh("ip", "-n", seg.cli, "link", "set", ifname, "up")


@contextlib.contextmanager
def qemu(seg: Segment, log: pathlib.Path, *firmware: str) -> Iterator[subprocess.Popen[bytes]]:
    """A TCG guest whose only NIC is on the tap; killed when the block ends."""
    with log.open("wb") as out:
        vm = subprocess.Popen(
        ["ip", "netns", "exec", seg.cli, "qemu-system-x86_64", "-nographic", "-no-reboot", "-m", "512",
         "-accel", "tcg", *firmware, "-netdev", "tap,id=n0,ifname=labtap,script=no,downscript=no",
         "-device", f"virtio-net-pci,netdev=n0,mac={QEMU_MAC}" + (",romfile=" if firmware else "")],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield vm
        finally:
            vm.kill()
            vm.wait(timeout=10)


@pytest.mark.slow
def test_qemu_bios_ipxe_rom_fetches_its_per_mac_script(segment: Segment, boot_lab: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """SeaBIOS + Debian's iPXE NIC ROM: iPXE is recognised (option 175 / user class) and gets the
    HTTP URL of its script straight from DHCP, fetches it, then the kernel and initrd."""
    with lab_pxe_serve(segment, boot_lab) as serve:
        with qemu(segment, tmp_path / "console.log"):
            stages = wait_for_lines(serve, ["stage=script-fetched"], timeout=120)
    console = (tmp_path / "console.log").read_bytes().decode("utf-8", "replace")
    assert f"stage=dhcp-discover mac={QEMU_MAC} ipxe" in stages
    assert f"stage=dhcp-ack mac={QEMU_MAC} 10.250.7.100" in stages
    assert f"stage=script-fetched mac={QEMU_MAC}" in stages, console[-2000:]
    assert "Filename: http://10.250.7.1:8080/boot/52-54-00-12-34-56.ipxe" in console
    assert "52-54-00-12-34-56.ipxe" in console


@pytest.mark.slow
def test_qemu_uefi_pxe_loads_ipxe_over_tftp_then_the_script(segment: Segment, boot_lab: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """OVMF's own PXE (no iPXE ROM): DHCP arch 7 → ipxe.efi over TFTP → iPXE DHCP → HTTP script."""
    if not OVMF.exists():
        need("ovmf-firmware")
    with lab_pxe_serve(segment, boot_lab) as serve:
        with qemu(segment, tmp_path / "console.log", "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF}"):
            stages = wait_for_lines(serve, ["stage=script-fetched"], timeout=300)
    console = (tmp_path / "console.log").read_bytes().decode("utf-8", "replace")
    assert f"stage=dhcp-discover mac={QEMU_MAC} arch=7" in stages, console[-2000:]
    assert any(s.startswith(f"stage=tftp-done mac={QEMU_MAC}") and "file=ipxe.efi" in s for s in stages), stages
    assert f"stage=dhcp-discover mac={QEMU_MAC} ipxe" in stages
    assert f"stage=script-fetched mac={QEMU_MAC}" in stages, console[-2000:]
