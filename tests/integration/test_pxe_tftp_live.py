"""Our TFTP server on loopback against real clients: tftp-hpa (RFC 1350 only) and busybox tftp
(blksize + tsize), plus a windowsize=8 client of our own. Skips without the clients unless CI is set."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from lab.coordinator.pxe.tftp import (
    Data, Error, OAck, Opcode, encode_ack, encode_request, parse_untrusted,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def need(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


SERVER_SCRIPT = textwrap.dedent(
    """
    import functools, pathlib, sys, trio
    from lab.coordinator.pxe.tftp import TftpConfig, serve_tftp
    async def main():
        async with trio.open_nursery() as n:
            cfg = TftpConfig(root=pathlib.Path(sys.argv[1]), max_transfers=int(sys.argv[2]), retries=2)
            port = await n.start(functools.partial(serve_tftp, cfg,
                                 address="127.0.0.1", port=0,
                                 on_event=lambda *e: print("event", *e, flush=True)))
            print(port, flush=True)
    trio.run(main)
    """
)


@pytest.fixture()
def bootdir(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "boot"
    root.mkdir()
    (root / "undionly.kpxe").write_bytes(os.urandom(70_001))
    (tmp_path / "outside").write_text("secret")
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


MAX_TRANSFERS = 2


@pytest.fixture()
def server(bootdir: pathlib.Path):
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(bootdir), str(MAX_TRANSFERS)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
        yield int(line)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def hpa(port: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", *command],
                          capture_output=True, text=True, timeout=30)


def test_tftp_hpa_fetches_a_file(server: int, bootdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    need("tftp")
    out = tmp_path / "got"
    r = hpa(server, "get", "undionly.kpxe", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (bootdir / "undionly.kpxe").read_bytes()


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "escape", "../../../../etc/passwd"])
def test_tftp_hpa_is_refused_outside_the_boot_directory(server: int, tmp_path: pathlib.Path, name: str) -> None:
    need("tftp")
    out = tmp_path / "got"
    r = hpa(server, "get", name, str(out))
    assert "Access violation" in (r.stdout + r.stderr) or "access violation" in (r.stdout + r.stderr)
    assert not out.exists() or out.read_bytes() == b""


def test_tftp_hpa_put_is_refused(server: int, tmp_path: pathlib.Path, bootdir: pathlib.Path) -> None:
    need("tftp")
    src = tmp_path / "upload"
    src.write_text("evil")
    r = hpa(server, "put", str(src), "upload")
    assert "ccess violation" in (r.stdout + r.stderr)
    assert not (bootdir / "upload").exists()


def test_busybox_tftp_with_blksize_and_tsize(server: int, bootdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    need("busybox")
    out = tmp_path / "got"
    r = subprocess.run(["busybox", "tftp", "-g", "-b", "1468", "-r", "undionly.kpxe", "-l", str(out),
                        "127.0.0.1", str(server)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (bootdir / "undionly.kpxe").read_bytes()


def test_windowsize_client_over_loopback(server: int, bootdir: pathlib.Path) -> None:
    """RFC 7440 from a minimal client of ours (neither tftp-hpa nor busybox speak windowsize)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
        s.settimeout(5)
        s.sendto(encode_request(Opcode.RRQ, "undionly.kpxe", "octet",
                                {"blksize": "1468", "windowsize": "8", "tsize": "0"}), ("127.0.0.1", server))
        data, tid = s.recvfrom(70000)
        oack = parse_untrusted(data)
        assert oack == OAck({"blksize": "1468", "windowsize": "8", "tsize": "70001"})
        # a packet from another port gets "unknown transfer ID" and does not disturb the transfer
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as other:
            other.settimeout(5)
            other.sendto(encode_ack(0), tid)
            err = parse_untrusted(other.recvfrom(1000)[0])
        assert isinstance(err, Error) and err.code == 5
        s.sendto(encode_ack(0), tid)
        got = bytearray()
        expected = 1
        while True:
            pkt = parse_untrusted(s.recvfrom(70000)[0])
            assert isinstance(pkt, Data) and pkt.block == expected
            got += pkt.payload
            expected += 1
            last = len(pkt.payload) < 1468
            if last or (pkt.block % 8 == 0):
                s.sendto(encode_ack(pkt.block), tid)
            if last:
                break
        assert bytes(got) == (bootdir / "undionly.kpxe").read_bytes()


def test_concurrent_transfers_are_capped(server: int) -> None:
    """Transfers whose clients never ACK hold their slot until they time out; one more is refused."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(MAX_TRANSFERS + 1)]
    try:
        for s in socks:
            s.settimeout(5)
        for s in socks[:MAX_TRANSFERS]:
            s.sendto(encode_request(Opcode.RRQ, "undionly.kpxe"), ("127.0.0.1", server))
            assert isinstance(parse_untrusted(s.recvfrom(70000)[0]), Data)
        socks[-1].sendto(encode_request(Opcode.RRQ, "undionly.kpxe"), ("127.0.0.1", server))
        busy = parse_untrusted(socks[-1].recvfrom(70000)[0])
        assert busy == Error(0, "server busy")
    finally:
        for s in socks:
            s.close()
