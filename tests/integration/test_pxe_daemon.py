"""The coordinator daemon serving the boot services (`pxe:` in config.yaml) for machines that
`lab onboard --provider baremetal --no-wait` handed over: `lab server run` runs in one network
namespace, real clients boot in another (veth pair between them; no packet leaves them), and
`lab get servers` shows the stages the daemon recorded.

* proxyDHCP (the default): a PXE DISCOVER from the client namespace, then the iPXE script, the
  kernel and the install config fetched with busybox wget;
* full DHCP from a pool: a QEMU guest (TCG, SeaBIOS + Debian's iPXE ROM) boots to its kernel.

Needs root, `ip`, `busybox` (and `qemu-system-x86_64`, Debian's ipxe for the slow test); skips
without them unless CI is set (then it fails).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_pxe_netns import DISCOVER_SCRIPT, LAB, QEMU_MAC, REPO, Segment, guest_nic, need, qemu, sh  # noqa: E402
from test_pxe_onboard_qemu import NAME, identity, lab  # noqa: E402

from lab.coordinator.pxe.dhcp import MessageType, Opt, parse_untrusted  # noqa: E402

URL_MAC = QEMU_MAC.replace(":", "-")


def home_with_image(tmp_path: pathlib.Path, pxe: str) -> dict[str, str]:
    env = dict(os.environ, LAB_HOME=str(tmp_path / "home"), NO_COLOR="1")
    env.pop("LAB_DEFINITIONS", None)
    assert lab(env, "init", "--local").returncode == 0
    (tmp_path / "vmlinuz").write_bytes(b"KERNEL" + os.urandom(4096))  # iPXE only fetches them
    (tmp_path / "initrd").write_bytes(os.urandom(1024))
    r = lab(env, "image", "add", "ubuntu-24.04", "--kernel", str(tmp_path / "vmlinuz"), "--initrd", str(tmp_path / "initrd"))
    assert r.returncode == 0, r.stderr
    with (tmp_path / "home" / "config.yaml").open("a") as f:
        f.write(pxe)
    return env


@contextlib.contextmanager
def daemon(env: dict[str, str], log: pathlib.Path, netns: str | None = None, port: int = 7443) -> Iterator[subprocess.Popen[bytes]]:
    """`lab server run` (in ``netns``), until the block ends; waits for event=daemon.ready."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with log.open("w") as err:
        proc = subprocess.Popen([*prefix, LAB, "server", "run", "--listen", f"127.0.0.1:{port}"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while "event=daemon.ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_identity(env: dict[str, str], want: str, timeout: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = identity(env) or ""
        if not seen or seen[-1] != now:
            seen.append(now)
        if now == want:
            return True
        time.sleep(0.3)
    return False


def onboard_no_wait(env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return lab(env, "onboard", NAME, "--provider", "baremetal", "--mac", QEMU_MAC, "--image", "ubuntu-24.04",
               "--labels", "", "--yes", "--no-wait", "--timeout", "10m", *extra)


def test_daemon_serves_a_no_wait_onboarding_in_proxy_mode(tmp_path: pathlib.Path) -> None:
    need("ip", "busybox")
    with Segment() as seg:
        env = home_with_image(tmp_path, f"pxe:\n  interface: {seg.if_srv}\n  address: {seg.server_ip}\n  boot_dir: {tmp_path}\n")
        seg.set_client_mac(QEMU_MAC)
        log = tmp_path / "daemon.log"
        with daemon(env, log, seg.srv):
            r = onboard_no_wait(env)
            assert r.returncode == 0, r.stderr
            assert "the boot is left to the coordinator daemon (config.yaml pxe: on " + seg.if_srv in r.stdout, r.stdout
            assert "proxyDHCP, boot information ONLY to MAC 52:54:00:12:34:56" in r.stdout
            seen: list[str] = []
            assert wait_identity(env, "pxe: waiting for boot request", 5, seen), seen
            # the machine's PXE ROM asks; the daemon (proxyDHCP) answers with boot information only
            for _ in range(3):  # the daemon re-reads the onboarding records every 2 s; a PXE ROM retries too
                d = subprocess.run(["ip", "netns", "exec", seg.cli, sys.executable, "-c", DISCOVER_SCRIPT, seg.if_cli,
                                    QEMU_MAC], capture_output=True, text=True, timeout=30, cwd=REPO)
                if d.returncode == 0:
                    break
            assert d.returncode == 0, (d.stderr, log.read_text())
            offer = parse_untrusted(bytes.fromhex(d.stdout))
            assert offer.message_type == MessageType.OFFER and str(offer.yiaddr) == "0.0.0.0"
            assert offer.options[Opt.BOOTFILE] == b"undionly.kpxe" and str(offer.siaddr) == seg.server_ip
            assert wait_identity(env, "pxe: boot request received", 10, seen), seen
            # iPXE (its address from the network's DHCP server: here a static one) fetches its script,
            # the kernel and, once the installer runs, the autoinstall config
            sh("ip", "-n", seg.cli, "addr", "add", "10.250.7.50/24", "dev", seg.if_cli)
            base = f"http://{seg.server_ip}:8080"

            def wget(path: str) -> str:
                w = subprocess.run(["ip", "netns", "exec", seg.cli, "busybox", "wget", "-q", "-O", "-", base + path],
                                   capture_output=True, timeout=30)
                assert w.returncode == 0, (path, w.stderr)
                return w.stdout.decode("latin-1")

            script = wget(f"/boot/{URL_MAC}.ipxe")
            assert f"kernel {base}/images/ubuntu-24.04/vmlinuz" in script
            assert wait_identity(env, "pxe: serving iPXE", 10, seen), seen
            assert wget("/images/ubuntu-24.04/vmlinuz").startswith("KERNEL")
            assert wait_identity(env, "pxe: kernel + initrd", 10, seen), seen
            assert wget(f"/autoinstall/{URL_MAC}/user-data").startswith("#cloud-config")
            assert wait_identity(env, "pxe: installing OS", 10, seen), seen
    text = log.read_text()
    assert f"event=pxe stage=proxydhcp-discover mac={QEMU_MAC}" in text
    assert f"event=pxe-onboarding-stage server={NAME} mac={QEMU_MAC} stage=config" in text
    assert seen == ["pxe: waiting for boot request", "pxe: boot request received", "pxe: serving iPXE",
                    "pxe: kernel + initrd", "pxe: installing OS"], seen
    token = next(x.split(":", 1)[1].strip() for x in (tmp_path / "home" / "pxe" / "nodes" / f"{URL_MAC}.yaml")
                 .read_text().splitlines() if x.startswith("token:"))
    assert token.startswith("lab1.") and token not in text and token not in r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("pxe", "message"), [
    ("pxe:\n  address: 10.250.7.1\n  pool: 10.250.7.100\n", "pool wants FIRST-LAST"),
    ("pxe:\n  interface: lab-nope0\n", "interface lab-nope0 has no IPv4 address here"),
    ("pxe:\n  address: 192.0.2.77\n  ports: {dhcp: 16767, tftp: 16769, http: 16780, proxy: 16711}\n",
     "pxe: cannot serve the boot services: "),
])  # fmt: skip
def test_a_bad_pxe_section_stops_the_daemon_with_one_line(tmp_path: pathlib.Path, pxe: str, message: str) -> None:
    """Checked at start: a wrong value, an interface without an address, an address this host
    does not have (the HTTP service cannot bind it)."""
    env = home_with_image(tmp_path, pxe)
    settings = (tmp_path / "home" / "config.yaml").read_text().splitlines()
    at = settings.index("pxe:") + 1
    r = subprocess.run([LAB, "server", "run", "--listen", f"127.0.0.1:{free_port()}"], env=env, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    where = f"lab: {tmp_path / 'home' / 'config.yaml'}:"
    assert last.startswith(where), r.stderr
    assert int(last.removeprefix(where).split(":")[0]) >= at and message in last, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_daemon_boots_a_qemu_guest_handed_over_by_no_wait(tmp_path: pathlib.Path) -> None:
    need("ip", "qemu-system-x86_64")
    if not pathlib.Path("/usr/lib/ipxe/undionly.kpxe").exists():
        need("debian-package-ipxe")
    with Segment() as seg:
        env = home_with_image(tmp_path, f"pxe:\n  interface: {seg.if_srv}\n  pool: 10.250.7.100-10.250.7.110\n")
        guest_nic(seg)
        log = tmp_path / "daemon.log"
        with daemon(env, log, seg.srv):  # the daemon reads its address from the interface in its netns
            r = onboard_no_wait(env, "--server", f"{seg.server_ip}:7443")  # which this namespace has not
            assert r.returncode == 0, r.stderr
            assert "full mode, address from 10.250.7.100-10.250.7.110" in r.stdout
            seen: list[str] = []
            with qemu(seg, tmp_path / "console.log"):
                ok = wait_identity(env, "pxe: kernel + initrd", 150, seen)
            assert ok, (seen, log.read_text()[-3000:], (tmp_path / "console.log").read_bytes()[-2000:])
    text = log.read_text()
    assert f"event=pxe stage=dhcp-ack mac={QEMU_MAC} 10.250.7.100" in text
    assert f"event=pxe stage=script-fetched mac={QEMU_MAC}" in text
    assert seen[0] == "pxe: waiting for boot request" and "pxe: kernel + initrd" == seen[-1], seen

