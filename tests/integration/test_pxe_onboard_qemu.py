"""`lab onboard --provider baremetal` end to end, up to the point where a real OS install would
start: `lab onboard` runs its boot services in one network namespace, a QEMU guest (TCG, SeaBIOS
+ Debian's iPXE ROM) boots from the network in another (veth pair between them; no packet leaves
them). The test follows the stages in `lab onboard`'s output and in `lab get servers -o json`
(IDENTITY pillar), and checks that, with no OS to install, onboard gives up at --timeout with
a clear message naming the stage. The machine is "powered on" through OpenIPMI's ipmi_sim
(running in the server namespace), so next-boot PXE and power-on are checked as well.

Needs root, `ip`, `qemu-system-x86_64` and Debian's ipxe/ipxe-qemu (and ipmitool + ipmi_sim for
the BMC part); skips without them unless CI is set (then it fails).
"""

from __future__ import annotations

import json
import os
import pathlib
import selectors
import shutil
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_pxe_netns import LAB, QEMU_MAC, Segment, guest_nic, need, qemu  # noqa: E402
from _ipmi_sim import ipmi_sim_args  # noqa: E402

NAME = "qemu-1"


def lab(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LAB, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def identity(env: dict[str, str]) -> str | None:
    r = lab(env, "get", "servers", "-o", "json")
    if r.returncode != 0:
        return None
    rows = json.loads(r.stdout)
    rows = rows.get("servers", rows) if isinstance(rows, dict) else rows
    return next((row["identity"] for row in rows if row["name"] == NAME), None)


def start_ipmi_sim(ns: str, tmp: pathlib.Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns, "ipmi_sim", *ipmi_sim_args(tmp, port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_baremetal_onboard_follows_the_boot_and_times_out_at_the_install(tmp_path: pathlib.Path) -> None:
    need("ip", "qemu-system-x86_64")
    if not pathlib.Path("/usr/lib/ipxe/undionly.kpxe").exists():
        need("debian-package-ipxe")
    use_bmc = shutil.which("ipmi_sim") is not None and shutil.which("ipmitool") is not None
    if not use_bmc and os.environ.get("CI"):
        pytest.fail("CI requires ipmi_sim and ipmitool")
    home = tmp_path / "home"
    env = dict(os.environ, LAB_HOME=str(home), NO_COLOR="1")
    env.pop("LAB_IPMI_PASSWORD", None)
    assert lab(env, "init", "--local").returncode == 0
    (tmp_path / "vmlinuz").write_bytes(os.urandom(4096))  # iPXE only fetches them
    (tmp_path / "initrd").write_bytes(os.urandom(1024))
    r = lab(env, "image", "add", "test-image", "--family", "ubuntu", "--kernel", str(tmp_path / "vmlinuz"),
            "--initrd", str(tmp_path / "initrd"))
    assert r.returncode == 0, r.stderr

    with Segment() as seg:
        guest_nic(seg)
        bmc_args: list[str] = []
        sim = None
        if use_bmc:
            sim = start_ipmi_sim(seg.srv, tmp_path, 9623)
            env["LAB_IPMI_PASSWORD"] = "s3cret"
            bmc_args = ["--ipmi", "127.0.0.1:9623", "--ipmi-user", "admin"]
        onboard = subprocess.Popen(
            ["ip", "netns", "exec", seg.srv, LAB, "onboard", NAME, "--provider", "baremetal", "--mac", QEMU_MAC,
             "--image", "test-image", "--interface", seg.if_srv, "--server-address", seg.server_ip, "--pool", "auto", *bmc_args,
             "--yes", "--timeout", "60s"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        lines: list[str] = []
        seen_identity: list[str] = []
        try:
            assert onboard.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(onboard.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any("Waiting for network boot" in x for x in lines):
                if sel.select(timeout=1):
                    line = onboard.stdout.readline()
                    if not line:
                        break
                    lines.append(line.rstrip())
            assert any("Waiting for network boot" in x for x in lines), (lines, onboard.stderr.read() if onboard.poll() is not None else "")
            seen_identity.append(identity(env) or "")
            with qemu(seg, tmp_path / "console.log"):
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline and not any("kernel + initrd" in x for x in lines):
                    if sel.select(timeout=1):
                        line = onboard.stdout.readline()
                        if not line:
                            break
                        lines.append(line.rstrip())
                        seen_identity.append(identity(env) or "")
                assert any("kernel + initrd" in x for x in lines), (lines, (tmp_path / "console.log").read_bytes()[-2000:])
                seen_identity.append(identity(env) or "")
            sel.close()
            out, err = onboard.communicate(timeout=90)
            lines += out.splitlines()
        finally:
            if onboard.poll() is None:
                onboard.kill()
                onboard.wait(timeout=10)
            if sim is not None:
                sim.terminate()
                sim.wait(timeout=10)

    text = "\n".join(lines)
    print(text, err, sep="\n")  # shown when an assertion fails (and with -s)
    # Step 1: the render and the warnings
    assert "│ Provider   │ baremetal (PXE boot)" in text and f"│ MAC        │ {QEMU_MAC.upper()}" in text, text
    assert "⚠ PXE requires: network interface on same L2 segment as target machine" in text
    assert f"⚠ DHCP: will respond ONLY to MAC {QEMU_MAC.upper()}" in text
    # Step 2: the stages, in order
    order = [f"→ Boot request received from {QEMU_MAC.upper()}", "→ Serving iPXE", "→ kernel + initrd"]
    at = [next(i for i, x in enumerate(lines) if w in x) for w in order]
    assert at == sorted(at), lines
    if use_bmc:
        assert "→ IPMI: setting next boot to PXE" in text and "→ IPMI: powering on machine" in text, text
        assert (tmp_path / "boot").read_text().strip() == "pxe"
        assert (tmp_path / "power").read_text().strip() == "1"
    # the IDENTITY pillar followed the boot, and tells where it stopped
    assert seen_identity[0] == "pxe: waiting for boot request", seen_identity
    assert "pxe: kernel + initrd" in seen_identity, seen_identity
    assert onboard.returncode != 0
    assert "onboard failed at step 'wait': timed out waiting for enrollment at stage 'kernel + initrd'" in err, err
    assert identity(env) == "pxe: timed out at kernel + initrd"
    # the token never shows up in the output
    record = (home / "pxe" / "nodes" / f"{QEMU_MAC.replace(':', '-')}.yaml").read_text()
    token = next(x.split(":", 1)[1].strip() for x in record.splitlines() if x.startswith("token:"))
    assert token.startswith("lab1.") and token not in text and token not in err
