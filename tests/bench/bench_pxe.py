"""Benchmark: lab's PXE servers against dnsmasq and tftpd-hpa, side by side in one run.

    sudo .venv/bin/python tests/bench/bench_pxe.py [--clients 1000] [--window 100] [--runs 3]
                                                   [--tftp-mb 10] [--tftp-runs 3] [--skip-dhcp|--skip-tftp]

Needs root, `ip`, and for the comparison Debian's `dnsmasq` and `tftpd-hpa` (`in.tftpd`); a peer
that is missing is reported and skipped. Everything runs in two network namespaces made here
(`srv` with 10.250.0.1/16, `cli` with 10.250.255.254/16) joined by a veth pair; no packet leaves
them. Namespaces and every process started here are removed in ``finally`` (also on Ctrl-C and
SIGTERM).

1. DHCP boot storm: N distinct, allowlisted client MACs do DISCOVER → OFFER → REQUEST → ACK
   (PXE BIOS clients, broadcast flag set, from 0.0.0.0:68 to 255.255.255.255:67 with
   SO_BINDTODEVICE; --unicast: to 10.250.0.1:67). A single-process load generator keeps at most --window transactions in
   flight, matches replies by xid, and retransmits after 250 ms. Figure: time from the first
   DISCOVER to the last ACK, and the server's CPU time. Each run starts a fresh server (no leases).
   dnsmasq runs with `dhcp-host` entries for the same MACs, `dhcp-ignore=tag:!known` (silence
   for others, like lab), `no-ping` (lab does no ICMP probe either), `quiet-dhcp`, `leasefile-ro`.
2. TFTP: a 10 MB file, fetched by a small client in this file (RFC 1350 + 2347/2348/7440) with
   blksize 1468 + windowsize 8, and without options (512-byte blocks, lockstep). tftpd-hpa 5.2
   does not implement windowsize, so with it "1468/w8" negotiates blksize only (lockstep).
   tftp-hpa's and busybox's clients are timed too, as a cross-check on our client. The three
   servers run at once (dnsmasq on 69, its only TFTP port; tftpd-hpa on 1069; lab on 3069) and
   the runs go round them in turn; the median and [min–max] are printed.

Prints figures; never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[2]
SERVER_IP = "10.250.0.1"
CLIENT_IP = "10.250.255.254"
POOL = ("10.250.1.0", "10.250.15.255")
MASK = "255.255.0.0"
TICK = os.sysconf("SC_CLK_TCK")

# -- helpers -----------------------------------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``: /proc/PID/schedstat (nanoseconds on CPU), else utime+stime (ticks)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(pathlib.Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICK


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def mac_of(i: int) -> bytes:
    return bytes((0x02, 0x4c, 0x41, 0x42)) + struct.pack("!H", i)


def mac_text(i: int) -> str:
    return ":".join(f"{b:02x}" for b in mac_of(i))


class Segment:
    """Namespaces `srv` and `cli` joined by a veth pair; removed on exit."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.srv, self.cli = f"labbench-s-{tag}", f"labbench-c-{tag}"
        self.if_srv, self.if_cli = f"lbs{tag}", f"lbc{tag}"
        self.created: list[str] = []

    def __enter__(self) -> Segment:
        for ns in (self.srv, self.cli):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
        sh("ip", "link", "add", self.if_srv, "netns", self.srv, "type", "veth", "peer", "name", self.if_cli,
           "netns", self.cli)
        sh("ip", "-n", self.srv, "addr", "add", f"{SERVER_IP}/16", "dev", self.if_srv)
        sh("ip", "-n", self.cli, "addr", "add", f"{CLIENT_IP}/16", "dev", self.if_cli)
        for ns, ifname in ((self.srv, self.if_srv), (self.cli, self.if_cli)):
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.created:
            sh("ip", "netns", "del", ns, check=False)


class Procs:
    """Processes started here, each in its own session (process group); stopped by PID/PGID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
        p = subprocess.Popen(argv, start_new_session=True, text=True, cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[str]) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        else:  # the leader is gone; children of its group (in.tftpd workers) may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)


def wait_port(ns: str, proto: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    flag = "-ulnH" if proto == "udp" else "-tlnH"
    while time.monotonic() < deadline:
        out = sh("ip", "netns", "exec", ns, "ss", flag, check=False).stdout
        if any(line.split()[3].endswith(f":{port}") for line in out.splitlines() if len(line.split()) > 3):
            return True
        time.sleep(0.05)
    return False


# -- servers -----------------------------------------------------------------------------------

LAB_DHCP = textwrap.dedent(
    """
    import functools, ipaddress, sys, time, trio
    from lab.coordinator.pxe.dhcp import DhcpConfig, DhcpServer, serve_dhcp
    from lab.coordinator.pxe.registry import Allowlist, OnboardingNode
    iface, server_ip, first, last, mask, macs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6].split(",")
    until = time.time() + 3600
    al = Allowlist()
    for i, mac in enumerate(macs):
        al.add(OnboardingNode(mac=mac, hostname=f"node-{i}", expires_at=until))
    ip = ipaddress.IPv4Address
    cfg = DhcpConfig(server_ip=ip(server_ip), http_base=f"http://{server_ip}:8080", mode="full",
                     pool_first=ip(first), pool_last=ip(last), subnet_mask=ip(mask), router=ip(server_ip))
    async def main():
        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_dhcp, DhcpServer(cfg, al), interface=iface))
            print("ready", flush=True)
    trio.run(main)
    """
)

LAB_TFTP = textwrap.dedent(
    """
    import functools, pathlib, sys, trio
    from lab.coordinator.pxe.tftp import TftpConfig, serve_tftp
    async def main():
        async with trio.open_nursery() as n:
            await n.start(functools.partial(serve_tftp, TftpConfig(root=pathlib.Path(sys.argv[1])),
                          address=sys.argv[2], port=int(sys.argv[4]), interface=sys.argv[3]))
            print("ready", flush=True)
    trio.run(main)
    """
)


def start_lab_dhcp(seg: Segment, procs: Procs, n: int) -> subprocess.Popen[str]:
    macs = ",".join(mac_text(i) for i in range(n))
    p = procs.start(["ip", "netns", "exec", seg.srv, sys.executable, "-c", LAB_DHCP, seg.if_srv, SERVER_IP,
                     *POOL, MASK, macs], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"lab DHCP server did not start: {line}{p.stderr.read() if p.stderr else ''}")
    return p


def dnsmasq_conf(seg: Segment, tmp: pathlib.Path, n: int, tftp_root: pathlib.Path) -> pathlib.Path:
    lines = [
        "port=0",  # no DNS
        f"interface={seg.if_srv}", "bind-interfaces",
        f"dhcp-range={POOL[0]},{POOL[1]},{MASK},1h",
        "dhcp-ignore=tag:!known",  # answer only the dhcp-host MACs, like lab's allowlist
        "dhcp-boot=undionly.kpxe",
        f"dhcp-option=option:router,{SERVER_IP}",
        "dhcp-lease-max=100000", "no-ping", "leasefile-ro", "quiet-dhcp",
        "enable-tftp", f"tftp-root={tftp_root}",
        "user=root", "pid-file=", f"log-facility={tmp / 'dnsmasq.log'}",
    ]
    lines += [f"dhcp-host={mac_text(i)},node-{i}" for i in range(n)]
    conf = tmp / "dnsmasq.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start_dnsmasq(seg: Segment, procs: Procs, conf: pathlib.Path) -> subprocess.Popen[str]:
    p = procs.start(["ip", "netns", "exec", seg.srv, "dnsmasq", "--no-daemon", f"--conf-file={conf}"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not wait_port(seg.srv, "udp", 67):
        procs.stop(p)
        raise RuntimeError("dnsmasq did not start")
    return p


# -- DHCP load generator (runs inside the client namespace) ------------------------------------

HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
COOKIE = 0x63825363
PXE_OPTS = (b"\x3c\x20PXEClient:Arch:00000:UNDI:002001"  # 60
            b"\x5d\x02\x00\x00"  # 93: BIOS
            b"\x37\x07\x01\x03\x06\x0c\x0f\x42\x43")  # 55: param request list


def dhcp_packet(xid: int, chaddr: bytes, msg: int, extra: bytes = b"") -> bytes:
    head = HEADER.pack(1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4), bytes(4), chaddr.ljust(16, b"\0"),
                       b"", b"", COOKIE)
    return head + bytes((53, 1, msg)) + extra + PXE_OPTS + b"\xff"


def reply_fields(data: bytes) -> tuple[int, bytes, int, bytes] | None:
    """xid, yiaddr, message type, server id of a BOOTREPLY (None if not one)."""
    if len(data) < 240 or data[0] != 2:
        return None
    xid = struct.unpack_from("!I", data, 4)[0]
    yiaddr = data[16:20]
    mt, sid, pos = 0, b"", 240
    while pos < len(data):
        code = data[pos]
        if code == 255:
            break
        if code == 0:
            pos += 1
            continue
        ln = data[pos + 1]
        if code == 53:
            mt = data[pos + 2]
        elif code == 54:
            sid = data[pos + 2 : pos + 2 + ln]
        pos += 2 + ln
    return xid, yiaddr, mt, sid


def storm(ifname: str, n: int, window: int, rto: float, limit: float, unicast: bool = False) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE (root)
    sock.bind(("0.0.0.0", 68))
    sock.setblocking(False)
    dest = (SERVER_IP if unicast else "255.255.255.255", 67)
    base = int.from_bytes(os.urandom(4), "big") & 0x7FFF0000
    state = [0] * n  # 0 waiting, 1 discover sent, 2 request sent, 3 acked
    sent_at = [0.0] * n
    packets = [b""] * n
    nxt = done = retrans = naks = sends = 0
    inflight = 0
    t0 = time.perf_counter()
    deadline = t0 + limit
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while done < n:
        now = time.perf_counter()
        if now > deadline:
            break
        while inflight < window and nxt < n:
            packets[nxt] = dhcp_packet(base + nxt, mac_of(nxt), 1)
            sock.sendto(packets[nxt], dest)
            sends += 1
            state[nxt], sent_at[nxt] = 1, now
            nxt += 1
            inflight += 1
        got = False
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                break
            got = True
            f = reply_fields(data)
            if f is None:
                continue
            xid, yiaddr, mt, sid = f
            i = xid - base
            if not 0 <= i < n:
                continue
            if mt == 2 and state[i] == 1:  # OFFER → REQUEST (SELECTING)
                packets[i] = dhcp_packet(xid, mac_of(i), 3, b"\x32\x04" + yiaddr + b"\x36\x04" + sid)
                sock.sendto(packets[i], dest)
                sends += 1
                state[i], sent_at[i] = 2, time.perf_counter()
            elif mt == 5 and state[i] == 2:
                state[i] = 3
                done += 1
                inflight -= 1
            elif mt == 6 and state[i] == 2:  # NAK: start over
                naks += 1
                packets[i] = dhcp_packet(xid, mac_of(i), 1)
                sock.sendto(packets[i], dest)
                state[i], sent_at[i] = 1, time.perf_counter()
        if not got:
            now = time.perf_counter()
            for i in range(nxt):  # retransmit what timed out (rare; a linear scan is fine)
                if state[i] in (1, 2) and now - sent_at[i] > rto:
                    sock.sendto(packets[i], dest)
                    sends += 1
                    retrans += 1
                    sent_at[i] = now
            poller.poll(5)
    elapsed = time.perf_counter() - t0
    sock.close()
    return {"acked": done, "clients": n, "seconds": elapsed, "retransmits": retrans, "naks": naks, "sent": sends}


def run_storm(seg: Segment, procs: Procs, n: int, window: int, server: subprocess.Popen[str], unicast: bool) -> dict:
    cpu0 = cpu_seconds(server.pid)
    r = sh("ip", "netns", "exec", seg.cli, sys.executable, __file__, "--_storm", seg.if_cli, str(n), str(window),
           "unicast" if unicast else "broadcast")
    result = json.loads(r.stdout)
    time.sleep(0.05)
    result["server_cpu"] = cpu_seconds(server.pid) - cpu0
    return result


# -- TFTP client (runs inside the client namespace) ---------------------------------------------


def tftp_get(server: str, name: str, blksize: int | None, window: int | None, port: int = 69,
             limit: float = 120.0) -> dict:
    """RRQ ``name``; options only if given. Returns bytes, seconds, the options the server accepted."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    opts: dict[str, str] = {}
    if blksize:
        opts["blksize"] = str(blksize)
    if window:
        opts["windowsize"] = str(window)
    if opts:
        opts["tsize"] = "0"
    rrq = b"\0\x01" + name.encode() + b"\0octet\0" + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                              for k, v in opts.items())
    t0 = time.perf_counter()
    s.settimeout(1.0)
    s.sendto(rrq, (server, port))
    size, win, accepted = 512, 1, {}
    expected, received, tid = 1, 0, None
    last_ack = 0
    retries = 0
    while True:
        if time.perf_counter() - t0 > limit:
            raise RuntimeError("TFTP transfer timed out")
        try:
            data, peer = s.recvfrom(70000)
        except TimeoutError:
            retries += 1
            if retries > 10:
                raise RuntimeError("TFTP: no answer") from None
            if tid is None:
                s.sendto(rrq, (server, port))
            else:
                s.sendto(struct.pack("!HH", 4, last_ack), tid)
            continue
        if tid is None:
            tid = peer
        elif peer != tid:
            continue
        op = struct.unpack_from("!H", data)[0]
        if op == 6:  # OACK
            fields = data[2:].split(b"\0")
            accepted = {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}
            size = int(accepted.get("blksize", 512))
            win = int(accepted.get("windowsize", 1))
            s.sendto(struct.pack("!HH", 4, 0), tid)
            continue
        if op == 5:
            raise RuntimeError(f"TFTP error: {data[4:-1].decode(errors='replace')}")
        if op != 3:
            continue
        block = struct.unpack_from("!H", data, 2)[0]
        if block != expected & 0xFFFF:
            s.sendto(struct.pack("!HH", 4, last_ack), tid)  # RFC 7440: ack the last good block
            continue
        received += len(data) - 4
        last = len(data) - 4 < size
        if last or expected % win == 0:
            last_ack = block
            s.sendto(struct.pack("!HH", 4, block), tid)
        expected += 1
        if last:
            break
    elapsed = time.perf_counter() - t0
    s.close()
    return {"bytes": received, "seconds": elapsed, "accepted": accepted}


def run_tftp(seg: Segment, name: str, blksize: int | None, window: int | None, port: int = 69) -> dict:
    args = ["ip", "netns", "exec", seg.cli, sys.executable, __file__, "--_tftp", SERVER_IP, name,
            str(blksize or 0), str(window or 0), str(port)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout)


def run_external_client(seg: Segment, argv: list[str], out: pathlib.Path) -> float | str:
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    t0 = time.perf_counter()
    r = subprocess.run(["ip", "netns", "exec", seg.cli, *argv], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0 or not out.exists():
        return f"failed: {(r.stdout + r.stderr).strip()[:120]}"
    return elapsed


# -- main --------------------------------------------------------------------------------------


def fmt_storm(rs: list[dict]) -> str:
    secs = [r["seconds"] for r in rs]
    best = min(secs)
    return (f"median {statistics.median(secs) * 1000:7.1f} ms  best {best * 1000:7.1f} ms  "
            f"acked {min(r['acked'] for r in rs)}/{rs[0]['clients']}  "
            f"retransmits {sum(r['retransmits'] for r in rs)}  "
            f"server CPU median {statistics.median(r['server_cpu'] for r in rs) * 1000:6.1f} ms")


def bench_dhcp(seg: Segment, procs: Procs, tmp: pathlib.Path, args: argparse.Namespace, tftp_root: pathlib.Path) -> None:
    print(f"\n-- DHCP boot storm: {args.clients} clients DISCOVER→OFFER→REQUEST→ACK, "
          f"window {args.window} in flight, requests {'unicast to the server' if args.unicast else 'broadcast'}, "
          f"{args.runs} runs, fresh server each run --", flush=True)
    results: dict[str, list[dict]] = {"lab": [], "dnsmasq": []}
    have_dnsmasq = shutil.which("dnsmasq") is not None
    conf = dnsmasq_conf(seg, tmp, args.clients, tftp_root) if have_dnsmasq else None
    for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
        p = start_lab_dhcp(seg, procs, args.clients)
        try:
            results["lab"].append(run_storm(seg, procs, args.clients, args.window, p, args.unicast))
        finally:
            procs.stop(p)
        if conf is not None:
            p = start_dnsmasq(seg, procs, conf)
            try:
                results["dnsmasq"].append(run_storm(seg, procs, args.clients, args.window, p, args.unicast))
            finally:
                procs.stop(p)
    print(f"lab (coordinator/pxe/dhcp.py)  {fmt_storm(results['lab'])}")
    if results["dnsmasq"]:
        print(f"dnsmasq {dnsmasq_version():22s} {fmt_storm(results['dnsmasq'])}")
    else:
        print("dnsmasq                        not installed (Debian package dnsmasq): skipped")


def in_tftpd() -> str | None:
    """$IN_TFTPD, `in.tftpd` on PATH, or Debian's tftpd-hpa .deb unpacked (not installed, so no
    service) under $LAB_TEST_TOOLS (~/.cache/lab-test-tools)/tftpd-hpa-root."""
    if found := os.environ.get("IN_TFTPD") or shutil.which("in.tftpd"):
        return found
    tools = pathlib.Path(os.environ.get("LAB_TEST_TOOLS") or pathlib.Path.home() / ".cache" / "lab-test-tools")
    unpacked = tools / "tftpd-hpa-root" / "usr" / "sbin" / "in.tftpd"
    return str(unpacked) if unpacked.exists() else None


def dnsmasq_version() -> str:
    out = sh("dnsmasq", "--version", check=False).stdout.split()
    return out[2] if len(out) > 2 else "?"


def bench_tftp(seg: Segment, procs: Procs, tmp: pathlib.Path, args: argparse.Namespace, root: pathlib.Path) -> None:
    """All servers run at once on their own ports; the runs go round them in turn, so load
    that comes and goes on a shared machine hits each server alike."""
    name = "big.bin"
    size = int(args.tftp_mb * 1_000_000)
    (root / name).write_bytes(os.urandom(size))
    os.chmod(root, 0o755)
    os.chmod(root / name, 0o644)
    print(f"\n-- TFTP: {size / 1e6:.0f} MB file, median of {args.tftp_runs} runs (servers in turn), "
          f"MB/s = 10^6 bytes/s --", flush=True)
    servers: list[tuple[str, int, list[str]]] = [
        ("lab (coordinator/pxe/tftp.py)", 3069,  # dnsmasq's TFTP port cannot be moved from 69
         ["ip", "netns", "exec", seg.srv, sys.executable, "-c", LAB_TFTP, str(root), SERVER_IP, seg.if_srv, "3069"]),
    ]
    if tftpd := in_tftpd():
        servers.append(("tftpd-hpa 5.2 (in.tftpd -L -s)", 1069,
                        ["ip", "netns", "exec", seg.srv, tftpd, "-L", "-s", "-u", "root",
                         "-a", f"{SERVER_IP}:1069", str(root)]))
    else:
        print("tftpd-hpa: in.tftpd not found (Debian package tftpd-hpa, or $IN_TFTPD): skipped")
    if shutil.which("dnsmasq"):
        conf = tmp / "dnsmasq-tftp.conf"
        conf.write_text(f"port=0\ninterface={seg.if_srv}\nbind-interfaces\nenable-tftp\ntftp-root={root}\n"
                        f"user=root\npid-file=\nlog-facility={tmp / 'dnsmasq-tftp.log'}\n")
        servers.append((f"dnsmasq {dnsmasq_version()} (enable-tftp)", 69,
                        ["ip", "netns", "exec", seg.srv, "dnsmasq", "--no-daemon", f"--conf-file={conf}"]))
    running: list[tuple[str, int]] = []
    for label, port, argv in servers:
        p = procs.start(argv, stdout=subprocess.PIPE if label.startswith("lab") else subprocess.DEVNULL,
                        stderr=subprocess.PIPE)
        if label.startswith("lab"):
            assert p.stdout is not None
            ok = p.stdout.readline().strip() == "ready"
        else:
            ok = wait_port(seg.srv, "udp", port)
        if ok:
            running.append((label, port))
        else:
            print(f"{label}: did not start")
            procs.stop(p)
    cases: list[tuple[str, str, object]] = [
        ("blksize 1468 + windowsize 8", "ours", (1468, 8)),
        ("no options (512, lockstep)", "ours", (None, None)),
    ]
    if shutil.which("tftp"):
        cases.append(("tftp-hpa client, no options", "tftp", None))
    if shutil.which("busybox"):
        cases.append(("busybox client, blksize 1468", "busybox", None))
    out = tmp / "got.bin"
    results: dict[tuple[str, str], list[float | str]] = {}
    negotiated: dict[tuple[str, str], str] = {}
    for _ in range(args.tftp_runs):
        for label, port in running:
            for case, client, opts in cases:
                key = (label, case)
                if client == "ours":
                    blk, win = opts  # type: ignore[misc]
                    r = run_tftp(seg, name, blk, win, port)
                    if "error" in r:
                        results.setdefault(key, []).append(f"failed: {r['error']}")
                        continue
                    if r["bytes"] != size:
                        results.setdefault(key, []).append(f"size mismatch: {r['bytes']}")
                        continue
                    acc = r["accepted"]
                    negotiated[key] = ("negotiated " + ",".join(f"{k}={v}" for k, v in acc.items() if k != "tsize")
                                       if acc else "no OACK")
                    results.setdefault(key, []).append(r["seconds"])
                elif client == "tftp":
                    results.setdefault(key, []).append(run_external_client(
                        seg, ["tftp", "-m", "binary", SERVER_IP, str(port), "-c", "get", name, str(out)], out))
                else:
                    results.setdefault(key, []).append(run_external_client(
                        seg, ["busybox", "tftp", "-g", "-b", "1468", "-r", name, "-l", str(out), SERVER_IP, str(port)],
                        out))
    for label, _port in running:
        for case, _client, _opts in cases:
            rs = results.get((label, case), [])
            errors = [r for r in rs if isinstance(r, str)]
            if errors or not rs:
                print(f"{label:34s} {case:28s} {errors[0] if errors else 'no result'}")
                continue
            rates = sorted(size / t / 1e6 for t in rs)  # type: ignore[operator]
            note = f"  ({negotiated[(label, case)]})" if (label, case) in negotiated else ""
            print(f"{label:34s} {case:28s} {statistics.median(rates):7.2f} MB/s  "
                  f"[{rates[0]:.1f}–{rates[-1]:.1f}]{note}", flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--_storm"]:
        print(json.dumps(storm(argv[1], int(argv[2]), int(argv[3]), rto=0.25, limit=30.0, unicast=argv[4] == "unicast")))
        return 0
    if argv[:1] == ["--_tftp"]:
        print(json.dumps(tftp_get(argv[1], argv[2], int(argv[3]) or None, int(argv[4]) or None, int(argv[5]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100, help="DHCP transactions in flight at once")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--unicast", action="store_true",
                    help="clients send to 10.250.0.1:67 instead of broadcasting (replies stay broadcast)")
    ap.add_argument("--tftp-mb", type=float, default=10)
    ap.add_argument("--tftp-runs", type=int, default=3)
    ap.add_argument("--skip-dhcp", action="store_true")
    ap.add_argument("--skip-tftp", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench_pxe: needs root and iproute2 (network namespaces); skipped")
        return 0
    if args.clients > 0xFFFF:
        ap.error("at most 65535 clients")

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    print(f"command: {' '.join([pathlib.Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    procs = Procs()
    try:
        with tempfile.TemporaryDirectory(prefix="lab-bench-pxe-") as td, Segment() as seg:
            tmp = pathlib.Path(td)
            os.chmod(tmp, 0o755)
            root = tmp / "tftp"
            root.mkdir()
            (root / "undionly.kpxe").write_bytes(os.urandom(70_000))
            try:
                if not args.skip_dhcp:
                    bench_dhcp(seg, procs, tmp, args, root)
                if not args.skip_tftp:
                    bench_tftp(seg, procs, tmp, args, root)
            finally:
                procs.stop_all()
    except KeyboardInterrupt:
        print("\ninterrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
