"""Bare-metal onboarding when the coordinator daemon serves the boot (`pxe:` in its config.yaml):
from a home connected with `lab server connect` (the laptop after the coordinator moved), and in
local mode next to this home's own daemon. `lab server run` and the CLI run in one network
namespace, real clients (a proxyDHCP DISCOVER, busybox udhcpc as a PXE client, busybox wget) in
another; veth pair between them, no packet leaves them. Helpers come from test_pxe_daemon.py.

Needs root, `ip` and `busybox`; skips without them unless CI is set (then it fails).
"""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_lifecycle_daemon import connect  # noqa: E402
from test_pxe_daemon import URL_MAC, daemon, home_with_image  # noqa: E402
from test_pxe_netns import DISCOVER_SCRIPT, LAB, QEMU_MAC, REPO, Segment, need, sh  # noqa: E402
from test_pxe_onboard_qemu import NAME, identity  # noqa: E402

from lab.coordinator.pxe.dhcp import MessageType, parse_untrusted  # noqa: E402

AGENT = str(pathlib.Path(LAB).parent / "lab-agent")
ENDPOINT = "127.0.0.1:7443"  # the daemon's, inside the server namespace


def ns_lab(ns: str, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, LAB, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def remote_identity(ns: str, env: dict[str, str], name: str = NAME) -> str | None:
    """The IDENTITY pillar as `lab get servers` shows it through the daemon."""
    r = ns_lab(ns, env, "get", "servers", "-o", "json")
    assert r.returncode == 0, r.stderr
    return next((row["identity"] for row in json.loads(r.stdout) if row["name"] == name), None)


def wait_remote(ns: str, env: dict[str, str], want: str, timeout: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = remote_identity(ns, env) or ""
        if not seen or seen[-1] != now:
            seen.append(now)
        if now == want:
            return True
        time.sleep(0.3)
    return False


def audit(coord: pathlib.Path, subject: str) -> list[tuple[str, str]]:
    with sqlite3.connect(f"file:{coord / 'state.db'}?mode=ro", uri=True) as db:
        return [tuple(r) for r in db.execute("SELECT actor, action FROM audit WHERE subject = ? ORDER BY id", (subject,))]


def wget(seg: Segment, path: str) -> str:
    w = subprocess.run(["ip", "netns", "exec", seg.cli, "busybox", "wget", "-q", "-O", "-", f"http://{seg.server_ip}:8080{path}"],
                       capture_output=True, timeout=30)
    assert w.returncode == 0, (path, w.stderr)
    return w.stdout.decode("latin-1")


def node_token(coord: pathlib.Path) -> str:
    text = (coord / "pxe" / "nodes" / f"{URL_MAC}.yaml").read_text()
    return next(x.split(":", 1)[1].strip() for x in text.splitlines() if x.startswith("token:"))


def test_connected_home_hands_a_machine_over_to_the_daemons_boot_services(tmp_path: pathlib.Path) -> None:
    need("ip", "busybox")
    with Segment() as seg:
        env = home_with_image(tmp_path, f"pxe:\n  interface: {seg.if_srv}\n  address: {seg.server_ip}\n  boot_dir: {tmp_path}\n")
        coord = tmp_path / "home"
        laptop = connect(env, coord, tmp_path / "laptop", ENDPOINT)
        seg.set_client_mac(QEMU_MAC)
        log = tmp_path / "daemon.log"
        with daemon(env, log, seg.srv):
            r = ns_lab(seg.srv, laptop, "onboard", NAME, "--provider", "baremetal", "--mac", QEMU_MAC, "--image",
                       "ubuntu-24.04", "--yes", "--no-wait", "--timeout", "10m")
            assert r.returncode == 0, r.stdout + r.stderr
            out = r.stdout
            assert f"the boot is left to the coordinator daemon at {ENDPOINT} (config.yaml pxe: on {seg.if_srv})" in out, out
            assert f"proxyDHCP, boot information ONLY to MAC {QEMU_MAC.upper()}" in out
            # registered in the daemon's home, nothing in the laptop's
            assert (coord / "pxe" / "nodes" / f"{URL_MAC}.yaml").exists()
            assert not (tmp_path / "laptop" / "pxe").exists() and not (tmp_path / "laptop" / "state.db").exists()
            seen: list[str] = []
            assert wait_remote(seg.srv, laptop, "pxe: waiting for boot request", 5, seen), seen
            for _ in range(3):  # the daemon re-reads the onboarding records every 2 s
                d = subprocess.run(["ip", "netns", "exec", seg.cli, sys.executable, "-c", DISCOVER_SCRIPT, seg.if_cli,
                                    QEMU_MAC], capture_output=True, text=True, timeout=30, cwd=REPO)
                if d.returncode == 0:
                    break
            assert d.returncode == 0, (d.stderr, log.read_text())
            assert parse_untrusted(bytes.fromhex(d.stdout)).message_type == MessageType.OFFER
            assert wait_remote(seg.srv, laptop, "pxe: boot request received", 10, seen), seen
            sh("ip", "-n", seg.cli, "addr", "add", "10.250.7.50/24", "dev", seg.if_cli)
            assert "/images/ubuntu-24.04/vmlinuz" in wget(seg, f"/boot/{URL_MAC}.ipxe")
            assert wait_remote(seg.srv, laptop, "pxe: serving iPXE", 10, seen), seen

            # the daemon's boot services choose the DHCP mode and the interface
            r = ns_lab(seg.srv, laptop, "onboard", "db-9", "--provider", "baremetal", "--mac", "52:54:00:00:00:99",
                       "--image", "ubuntu-24.04", "--yes", "--pool", "auto")
            assert r.returncode == 2 and "connected to a coordinator" in r.stderr and r.stderr.count("\n") == 1, r.stderr
            # an image the coordinator does not have: refused before anything is registered
            r = ns_lab(seg.srv, laptop, "onboard", "db-9", "--provider", "baremetal", "--mac", "52:54:00:00:00:99",
                       "--image", "nope-1", "--yes", "--no-wait")
            assert r.returncode != 0 and "onboard failed at step 'render'" in r.stderr and "nope-1" in r.stderr, r.stderr
            assert remote_identity(seg.srv, laptop, "db-9") is None
            # a machine left waiting (--no-wait, never boots) reads as timed out once its allowlist entry expires
            r = ns_lab(seg.srv, laptop, "onboard", "db-9", "--provider", "baremetal", "--mac", "52:54:00:00:00:99",
                       "--image", "ubuntu-24.04", "--yes", "--no-wait", "--timeout", "2s")
            assert r.returncode == 0, r.stderr
            assert remote_identity(seg.srv, laptop, "db-9") == "pxe: waiting for boot request"
            time.sleep(2.5)
            assert remote_identity(seg.srv, laptop, "db-9") == "pxe: timed out waiting for boot request"
            assert remote_identity(seg.srv, laptop) == "pxe: serving iPXE"  # still within its 10 minutes
    assert seen == ["pxe: waiting for boot request", "pxe: boot request received", "pxe: serving iPXE"], seen
    assert audit(coord, NAME) == [("cert:admin", a) for a in
                                  ("onboard.start", "server.add", "token.create", "onboard.handed-over")]
    token = node_token(coord)
    assert token.startswith("lab1.") and token not in log.read_text() and token not in out
    assert "method=onboard.allow" in log.read_text()


UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface" && echo "bound $ip"
exit 0
"""


def test_connected_home_follows_a_waiting_onboarding_until_the_agent_enrolls(tmp_path: pathlib.Path) -> None:
    need("ip", "busybox")
    with Segment() as seg:
        env = home_with_image(tmp_path, f"pxe:\n  interface: {seg.if_srv}\n  pool: 10.250.7.100-10.250.7.110\n"
                                        f"  boot_dir: {tmp_path}\n")
        coord = tmp_path / "home"
        laptop = connect(env, coord, tmp_path / "laptop", ENDPOINT)
        seg.set_client_mac(QEMU_MAC)
        log = tmp_path / "daemon.log"
        script = tmp_path / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        with daemon(env, log, seg.srv):
            onboard = subprocess.Popen(
                ["ip", "netns", "exec", seg.srv, LAB, "onboard", NAME, "--provider", "baremetal", "--mac", QEMU_MAC,
                 "--image", "ubuntu-24.04", "--yes", "--timeout", "90s"],
                env=laptop, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            lines: list[str] = []
            # a thread reads the output line by line (select() on a buffered pipe misses lines already read ahead)
            reader = threading.Thread(target=lambda: lines.extend(x.rstrip() for x in onboard.stdout), daemon=True)  # type: ignore[union-attr]
            reader.start()
            try:
                def read_until(text: str, timeout: float) -> None:
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline and not any(text in x for x in list(lines)):
                        time.sleep(0.1)
                    assert any(text in x for x in list(lines)), (text, lines, log.read_text()[-2000:])

                read_until("Waiting for network boot", 30)
                # a real DHCP client, as a PXE client, gets its address from the daemon (full mode)
                d = subprocess.run(["ip", "netns", "exec", seg.cli, "busybox", "udhcpc", "-f", "-q", "-n", "-i", seg.if_cli,
                                    "-V", "PXEClient:Arch:00000:UNDI:002001", "-s", str(script), "-t", "6", "-T", "1"],
                                   capture_output=True, text=True, timeout=60)
                assert "bound 10.250.7.1" in d.stdout, (d.stdout, d.stderr, log.read_text()[-2000:])
                read_until(f"Boot request received from {QEMU_MAC.upper()}", 10)
                assert "/images/ubuntu-24.04/vmlinuz" in wget(seg, f"/boot/{URL_MAC}.ipxe")
                read_until("Serving iPXE", 10)
                assert wget(seg, "/images/ubuntu-24.04/vmlinuz").startswith("KERNEL")
                read_until("kernel + initrd", 10)
                assert wget(seg, f"/autoinstall/{URL_MAC}/user-data").startswith("#cloud-config")
                read_until("config fetched", 10)
                # the installed system's agent enrolls with the token the daemon baked into the install
                tok = tmp_path / "join-token"
                tok.write_text(node_token(coord) + "\n")
                r = subprocess.run(["ip", "netns", "exec", seg.srv, AGENT, "enroll", "--server", ENDPOINT, "--token-file",
                                    str(tok)], env=dict(env, LAB_HOME=str(tmp_path / "agent")), capture_output=True,
                                   text=True, timeout=60, stdin=subprocess.DEVNULL)
                assert r.returncode == 0, r.stderr
                onboard.wait(timeout=60)
                reader.join(timeout=10)
                err = onboard.stderr.read()  # type: ignore[union-attr]
            finally:
                if onboard.poll() is None:
                    onboard.kill()
                    onboard.wait(timeout=10)
                reader.join(timeout=10)
                for pipe in (onboard.stdout, onboard.stderr):
                    if pipe is not None:
                        pipe.close()
            assert remote_identity(seg.srv, laptop) == "enrolled"
    text = "\n".join(lines)
    assert onboard.returncode == 0, (text, err)
    assert (f"+ Allow the MAC; the coordinator daemon at {ENDPOINT} (config.yaml pxe: on {seg.if_srv}) serves the boot, "
            "its stages are followed here") in text, text
    assert "full mode, address from 10.250.7.100-10.250.7.110" in text and "Starting PXE server" not in text
    order = [f"→ Boot request received from {QEMU_MAC.upper()}", "→ Serving iPXE", "→ kernel + initrd",
             "→ installer config fetched", f"→ Identity established: {NAME} enrolled"]
    at = [next(i for i, x in enumerate(lines) if w in x) for w in order]
    assert at == sorted(at), lines
    actions = audit(coord, NAME)
    assert ("cert:admin", "onboard.done") in actions and ("cert:admin", "token.create") in actions, actions
    assert node_token(coord) not in text + err + log.read_text()


def test_local_onboard_follows_the_homes_daemon_instead_of_serving_a_second_dhcp(tmp_path: pathlib.Path) -> None:
    """Local mode, this home's daemon runs with pxe:: register and follow; never bind DHCP again
    (which would fail at step 'serve' with the daemon's ports taken)."""
    need("ip", "busybox")
    with Segment() as seg:
        env = home_with_image(tmp_path, f"pxe:\n  interface: {seg.if_srv}\n  address: {seg.server_ip}\n  boot_dir: {tmp_path}\n")
        with daemon(env, tmp_path / "daemon.log", seg.srv):
            r = ns_lab(seg.srv, env, "onboard", NAME, "--provider", "baremetal", "--mac", QEMU_MAC, "--image",
                       "ubuntu-24.04", "--yes", "--timeout", "3s")
            assert r.returncode != 0, r.stdout
            assert ("onboard failed at step 'wait': timed out waiting for enrollment at stage 'waiting for boot request' "
                    "after 3s") in r.stderr, r.stderr
            assert "Starting PXE server" not in r.stdout
            assert f"the coordinator daemon (config.yaml pxe: on {seg.if_srv}) serves the boot, its stages are followed here" in r.stdout
            assert identity(env) == "pxe: timed out waiting for boot request"
    assert [a for _, a in audit(tmp_path / "home", NAME)] == [
        "onboard.start", "server.add", "token.create", "onboard.handed-over", "onboard.failed"]
    assert os.path.exists(tmp_path / "home" / "pxe" / "nodes" / f"{URL_MAC}.yaml")
