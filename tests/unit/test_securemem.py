"""common.securemem: locked, non-dumpable, zeroed key buffers."""

from __future__ import annotations

import logging
import pickle
import sys

import pytest

from lab.common import securemem
from lab.common.securemem import PAGE_SIZE, SecretBuffer

SECRET = b"correct horse battery staple!!!!"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(securemem, "_warned", set())


def _vmflags(addr: int) -> set[str]:
    """VmFlags of the mapping holding ``addr``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError("mapping not found")


def test_holds_and_reads_back() -> None:
    with SecretBuffer.from_bytes(SECRET) as buf:
        assert len(buf) == len(SECRET)
        assert buf.bytes() == SECRET
        with buf.view() as v:
            assert v.readonly and bytes(v) == SECRET
        assert buf.equals(SECRET) and not buf.equals(b"x" * len(SECRET))
        assert buf._addr % PAGE_SIZE == 0  # page-aligned, whole pages
    assert buf.closed


def test_repr_never_shows_contents() -> None:
    buf = SecretBuffer.from_bytes(SECRET)
    for text in (repr(buf), str(buf), f"{buf}"):
        assert "horse" not in text and SECRET.hex() not in text and "len=32" in text
    with pytest.raises(TypeError):
        pickle.dumps(buf)
    buf.close()


def test_close_zeroes_and_forbids_use() -> None:
    buf = SecretBuffer.from_bytes(SECRET)
    view = buf.view()  # a view kept too long only ever sees zeros
    buf.close()
    assert bytes(view) == bytes(len(SECRET))
    view.release()
    buf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        buf.view()
    with pytest.raises(ValueError, match="closed"):
        buf.bytes()
    with pytest.raises(ValueError, match="closed"):
        with buf:
            pass


def test_wipe_source_and_sizes() -> None:
    src = bytearray(SECRET)
    with SecretBuffer.from_bytes(src, wipe_source=True) as buf:
        assert src == bytearray(len(SECRET)) and buf.bytes() == SECRET
    with SecretBuffer(0) as empty:
        assert empty.bytes() == b""
    with SecretBuffer(PAGE_SIZE + 1) as big:
        with big.view(writable=True) as v:
            v[-1] = 7
        assert big.bytes()[-1] == 7
    with pytest.raises(ValueError):
        SecretBuffer(-1)


@linux_only
def test_memory_is_locked_and_not_dumped() -> None:
    with SecretBuffer.from_bytes(SECRET) as buf:
        flags = _vmflags(buf._addr)
        assert buf.dontdump and "dd" in flags
        assert ("lo" in flags) == buf.locked


def test_mlock_failure_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(securemem, "_mlock", lambda addr, length: 12)  # ENOMEM, as without CAP_IPC_LOCK
    with caplog.at_level(logging.WARNING, logger="lab.common.securemem"):
        bufs = [SecretBuffer.from_bytes(SECRET) for _ in range(3)]
    assert all(not b.locked for b in bufs) and all(b.bytes() == SECRET for b in bufs)
    warnings = [r for r in caplog.records if "mlock failed" in r.getMessage()]
    assert len(warnings) == 1 and "CAP_IPC_LOCK" in warnings[0].getMessage()
    for b in bufs:
        b.close()


def test_garbage_collection_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[int] = []
    real_close = SecretBuffer.close

    def spy(self: SecretBuffer) -> None:
        closed.append(len(self))
        real_close(self)

    monkeypatch.setattr(SecretBuffer, "close", spy)
    buf = SecretBuffer.from_bytes(b"abc")
    del buf
    assert closed == [3]


@linux_only
def test_disable_core_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    calls: list[tuple[int, tuple[int, int]]] = []
    # RLIMIT_CORE cannot be raised again without privilege: record instead of lowering ours.
    monkeypatch.setattr(resource, "setrlimit", lambda which, lim: calls.append((which, lim)))
    try:
        status = securemem.disable_core_dumps()
        assert securemem.is_dumpable() is False
    finally:
        assert securemem._set_dumpable(True)  # give the test process its default back
    assert status.not_dumpable and status.core_limit_zero and status.complete
    assert calls == [(resource.RLIMIT_CORE, (0, 0))]


def test_disable_core_dumps_degrades(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import resource

    def refuse(which: int, lim: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(securemem, "_prctl", lambda option, arg: -1)
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.WARNING, logger="lab.common.securemem"):
        status = securemem.disable_core_dumps()
    assert status == securemem.CoreDumpStatus(not_dumpable=False, core_limit_zero=False)
    assert not status.complete
    text = caplog.text
    assert "PR_SET_DUMPABLE" in text and "RLIMIT_CORE" in text
