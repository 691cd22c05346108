"""TFTP: packets, option negotiation, windows, retransmission with explicit time, rollover, paths."""

from __future__ import annotations

import os
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common.errors import LocalProtocolError, RemoteProtocolError
from lab.coordinator.pxe.tftp import (
    Ack, Data, Error, ErrorCode, OAck, Opcode, Request, State, TftpConfig, TftpError, TftpTransfer,
    encode_ack, encode_error, encode_request, open_transfer, parse_request_untrusted, parse_untrusted,
    resolve_untrusted,
)


def rrq(name: str = "f", **options: str) -> Request:
    return parse_request_untrusted(encode_request(Opcode.RRQ, name, "octet", options))


def transfer(content: bytes, config: TftpConfig | None = None, **options: str) -> TftpTransfer:
    return TftpTransfer(rrq(**options), len(content), lambda off, n: content[off : off + n],
                        config or TftpConfig(root=pathlib.Path("/nonexistent")))


def blocks(packets: list[bytes]) -> list[tuple[int, int]]:
    out = []
    for p in packets:
        d = parse_untrusted(p)
        assert isinstance(d, Data)
        out.append((d.block, len(d.payload)))
    return out


def run_to_end(t: TftpTransfer, first: list[bytes], now: float = 0.0) -> bytes:
    """A perfect client: ACK the last block of every window, collect the data."""
    got = bytearray()
    packets = first
    while packets:
        for p in packets:
            d = parse_untrusted(p)
            if isinstance(d, OAck):
                packets = t.receive(encode_ack(0), now)
                break
            assert isinstance(d, Data)
            got += d.payload
        else:
            packets = t.receive(encode_ack(parse_untrusted(packets[-1]).block), now)  # type: ignore[union-attr]
    assert t.state == State.DONE
    return bytes(got)


# -- packets -------------------------------------------------------------------------------------


def test_request_parses_with_lowercased_options() -> None:
    r = parse_request_untrusted(b"\x00\x01undionly.kpxe\x00octet\x00BLKSIZE\x001468\x00tsize\x000\x00")
    assert r == Request(Opcode.RRQ, "undionly.kpxe", "octet", {"blksize": "1468", "tsize": "0"})


@pytest.mark.parametrize(
    "data",
    [b"\x00\x01", b"\x00\x01f\x00octet", b"\x00\x01f\x00", b"\x00\x01\x00octet\x00", b"\x00\x09xx\x00",
     b"\x00\x01f\x00octet\x00blksize\x00", b"\x00\x01\xff\x00octet\x00", b"\x00\x04\x00\x01\x00",
     b"\x00\x01" + b"a" * 600 + b"\x00octet\x00"],
)
def test_malformed_packets_raise_remote_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_untrusted(data)


@given(st.binary(max_size=700))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        parse_untrusted(data)
    except RemoteProtocolError:
        pass


def test_error_and_ack_packets() -> None:
    assert parse_untrusted(encode_error(2, "access violation")) == Error(2, "access violation")
    assert parse_untrusted(encode_ack(70000)) == Ack(70000 & 0xFFFF)


# -- transfers ----------------------------------------------------------------------------------


def test_plain_transfer_without_options() -> None:
    content = os.urandom(1300)
    t = transfer(content)
    first = t.start(0.0)
    assert blocks(first) == [(1, 512)]
    assert run_to_end(t, first) == content


def test_exact_multiple_of_blksize_ends_with_an_empty_block() -> None:
    t = transfer(b"x" * 1024)
    first = t.start(0.0)
    assert blocks(t.receive(encode_ack(1), 0.0)) == [(2, 512)]
    assert blocks(t.receive(encode_ack(2), 0.0)) == [(3, 0)]
    assert t.receive(encode_ack(3), 0.0) == [] and t.state == State.DONE
    assert first


def test_options_negotiated_and_clamped() -> None:
    t = transfer(b"a" * 5000, blksize="9000", tsize="0", timeout="3", windowsize="500", bogus="1")
    (oack,) = t.start(0.0)
    assert parse_untrusted(oack) == OAck({"blksize": "1468", "tsize": "5000", "timeout": "3", "windowsize": "64"})
    assert t.state == State.OACK_SENT
    assert t.receive(encode_ack(5), 0.0) == []  # only ACK 0 confirms an OACK
    assert blocks(t.receive(encode_ack(0), 0.0)) == [(1, 1468), (2, 1468), (3, 1468), (4, 596)]


@pytest.mark.parametrize("opts", [{"blksize": "4"}, {"blksize": "big"}, {"windowsize": "0"}])
def test_bad_option_values_are_refused(opts) -> None:
    with pytest.raises(TftpError) as info:
        transfer(b"x", **opts)
    assert info.value.code == ErrorCode.OPTION_REFUSED


def test_client_rejecting_the_oack_ends_the_transfer() -> None:
    t = transfer(b"x", tsize="0")
    t.start(0.0)
    assert t.receive(encode_error(8, "no"), 0.0) == [] and t.state == State.FAILED


def test_windowsize_sends_windows_and_resumes_after_a_partial_ack() -> None:
    content = bytes(range(256)) * 40  # 10240 bytes → 20 blocks of 512 + an empty one
    t = transfer(content, windowsize="4")
    t.start(0.0)
    assert blocks(t.receive(encode_ack(0), 0.0)) == [(1, 512), (2, 512), (3, 512), (4, 512)]
    # client lost block 3: it acks 2, we resend from 3
    assert [b for b, _ in blocks(t.receive(encode_ack(2), 0.0))] == [3, 4, 5, 6]
    assert run_to_end(t, t.receive(encode_ack(6), 0.0))  # the rest completes
    assert t.state == State.DONE


def test_duplicate_ack_is_ignored_and_timeout_retransmits_with_explicit_time() -> None:
    t = transfer(b"y" * 2000, timeout="2")
    t.start(10.0)
    assert blocks(t.receive(encode_ack(0), 10.0)) == [(1, 512)]
    sent = t.receive(encode_ack(1), 10.5)
    assert blocks(sent) == [(2, 512)]
    assert t.receive(encode_ack(1), 11.0) == []  # duplicate: no Sorcerer's Apprentice resend
    assert t.timeout(12.0) == []  # deadline is 12.5
    assert t.timeout(12.5) == sent
    assert t.deadline == 14.5


def test_gives_up_after_retries() -> None:
    t = transfer(b"z" * 10, TftpConfig(root=pathlib.Path("/x"), retries=2))
    t.start(0.0)
    assert t.timeout(1.0) and t.timeout(2.0)
    (err,) = t.timeout(3.0)
    assert parse_untrusted(err) == Error(0, "timed out") and t.state == State.FAILED
    assert t.timeout(99.0) == [] and t.receive(encode_ack(1), 99.0) == []


def test_block_numbers_roll_over_at_65536() -> None:
    content = b"r" * (8 * 70000 + 3)
    t = transfer(content, blksize="8", windowsize="64")
    t.start(0.0)
    out = t.receive(encode_ack(0), 0.0)
    total = 0
    seen_zero = False
    while out:
        for p in out:
            d = parse_untrusted(p)
            assert isinstance(d, Data)
            total += len(d.payload)
            seen_zero |= d.block == 0
        out = t.receive(encode_ack(parse_untrusted(out[-1]).block), 0.0)  # type: ignore[union-attr]
    assert t.state == State.DONE and total == len(content) and seen_zero


def test_unexpected_packet_fails_and_state_machine_guards_misuse() -> None:
    t = transfer(b"q")
    t.start(0.0)
    with pytest.raises(LocalProtocolError, match="'start' in state 'sending'"):
        t.start(0.0)
    (err,) = t.receive(b"\x00\x03\x00\x01hello", 0.0)
    assert parse_untrusted(err) == Error(4, "illegal operation") and t.state == State.FAILED
    with pytest.raises(LocalProtocolError):
        TftpTransfer(Request(Opcode.WRQ, "f", "octet", {}), 0, lambda o, n: b"", TftpConfig(root=pathlib.Path("/")))


# -- paths ---------------------------------------------------------------------------------------


@pytest.fixture()
def bootdir(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "boot"
    (root / "efi").mkdir(parents=True)
    (root / "undionly.kpxe").write_bytes(b"kpxe")
    (root / "efi" / "ipxe.efi").write_bytes(b"efi")
    (tmp_path / "secret").write_text("no")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "inside").symlink_to(root / "undionly.kpxe")
    return root


def test_files_inside_the_boot_directory_resolve(bootdir: pathlib.Path) -> None:
    assert resolve_untrusted(bootdir, "undionly.kpxe").read_bytes() == b"kpxe"
    assert resolve_untrusted(bootdir, "efi/ipxe.efi").read_bytes() == b"efi"
    assert resolve_untrusted(bootdir, "inside").read_bytes() == b"kpxe"


@pytest.mark.parametrize(
    "name, code",
    [("../secret", 2), ("efi/../../secret", 2), ("/etc/passwd", 2), ("escape", 2), ("a\\..\\b", 2),
     ("x\x01y", 2), ("missing", 1), ("efi", 1), ("..", 2)],
)
def test_traversal_and_missing_files_are_refused(bootdir: pathlib.Path, name: str, code: int) -> None:
    with pytest.raises(TftpError) as info:
        resolve_untrusted(bootdir, name)
    assert info.value.code == code


def test_nul_cannot_smuggle_a_path(bootdir: pathlib.Path) -> None:
    r = parse_request_untrusted(b"\x00\x01undionly.kpxe\x00/../etc/passwd\x00octet\x00x\x00")
    assert r.filename == "undionly.kpxe" and r.mode == "/../etc/passwd"
    # the NUL ends the file name; what follows is a (bogus) mode, refused
    with pytest.raises(TftpError):
        open_transfer(r, TftpConfig(root=bootdir))


def test_write_requests_and_netascii_are_refused(bootdir: pathlib.Path) -> None:
    cfg = TftpConfig(root=bootdir)
    with pytest.raises(TftpError, match="access violation"):
        open_transfer(parse_request_untrusted(encode_request(Opcode.WRQ, "undionly.kpxe")), cfg)
    with pytest.raises(TftpError, match="octet"):
        open_transfer(parse_request_untrusted(encode_request(Opcode.RRQ, "undionly.kpxe", "netascii")), cfg)


def test_open_transfer_reads_the_file(bootdir: pathlib.Path) -> None:
    t, fd = open_transfer(rrq("undionly.kpxe", tsize="0"), TftpConfig(root=bootdir))
    try:
        assert t.accepted == {"tsize": "4"}
        t.start(0.0)
        assert run_to_end(t, t.receive(encode_ack(0), 0.0)) == b"kpxe"
    finally:
        os.close(fd)


@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("ack"), st.integers(0, 0xFFFF)),
            st.tuples(st.just("raw"), st.binary(max_size=40)),
            st.tuples(st.just("tick"), st.floats(0, 5)),
        ),
        max_size=60,
    ),
    window=st.integers(1, 8),
)
def test_any_packet_sequence_keeps_the_transfer_consistent(events, window: int) -> None:
    content = b"w" * 3000
    t = transfer(content, blksize="512", windowsize=str(window))
    now = 0.0
    t.start(now)
    for kind, value in events:
        try:
            if kind == "ack":
                out = t.receive(encode_ack(value), now)
            elif kind == "raw":
                out = t.receive(value, now)
            else:
                now += value
                out = t.timeout(now)
        except RemoteProtocolError:
            continue
        for p in out:
            parse_untrusted(p)  # everything we send is well-formed
        assert 1 <= t.base <= t.last_block + 1
