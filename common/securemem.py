"""mlock'd, non-dumpable buffers for key material.

A :class:`SecretBuffer` owns an anonymous, page-aligned ``mmap`` that is

* ``mlock``-ed, so the kernel never writes it to swap;
* ``madvise(MADV_DONTDUMP)``-ed, so it is left out of core dumps;
* ``madvise(MADV_WIPEONFORK)``-ed where the kernel has it (Linux >= 4.14), so a forked child
  sees zeros instead of our keys;
* zeroed on :meth:`SecretBuffer.close`, on leaving a ``with`` block and on garbage collection.

Failing to lock (no ``CAP_IPC_LOCK``, ``RLIMIT_MEMLOCK`` exhausted) or to advise is *not* an error:
unprivileged tests and laptops must run. It is logged once per process as a warning and can be
read back from :attr:`SecretBuffer.locked` / :attr:`SecretBuffer.dontdump`.

Limits of what Python allows: bytes objects that pass through the interpreter (a key decoded from a
file, the argument handed to a PyNaCl call) are immutable copies that we cannot wipe. Hold keys
here, hand out short-lived :meth:`SecretBuffer.view` memoryviews, and keep those copies brief.

:func:`disable_core_dumps` is the process-wide companion: ``prctl(PR_SET_DUMPABLE, 0)`` and
``RLIMIT_CORE = 0``. Linux only; elsewhere it reports what it could not do instead of failing.
"""

from __future__ import annotations

import builtins
import ctypes
import hmac
import logging
import mmap
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NoReturn

__all__ = ["CoreDumpStatus", "SecretBuffer", "disable_core_dumps", "is_dumpable"]

log = logging.getLogger(__name__)

PAGE_SIZE: Final = mmap.PAGESIZE
_PR_GET_DUMPABLE: Final = 3
_PR_SET_DUMPABLE: Final = 4
# Not exported by the mmap module; the value is fixed in the Linux UAPI headers.
_MADV_WIPEONFORK: Final = 18


def _load_libc() -> ctypes.CDLL | None:
    # dlopen(NULL): the symbols already in the process, libc among them. Not
    # ctypes.util.find_library, which runs `ldconfig -p` in a subprocess on Linux.
    if sys.platform == "win32":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for fn in ("mlock", "munlock"):
        f = getattr(libc, fn, None)
        if f is not None:
            f.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            f.restype = ctypes.c_int
    return libc


_libc: Final = _load_libc()

# One warning per kind of failure per process, not one per buffer.
_warned: set[str] = set()


def _warn_once(kind: str, message: str, *args: object) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning(message, *args)


def _mlock(addr: int, length: int) -> int:
    """Return 0 on success or an errno; separate so tests can make it fail."""
    if _libc is None or not hasattr(_libc, "mlock"):
        return -1
    if _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(length)) != 0:
        return ctypes.get_errno()
    return 0


def _munlock(addr: int, length: int) -> None:
    if _libc is not None and hasattr(_libc, "munlock"):
        _libc.munlock(ctypes.c_void_p(addr), ctypes.c_size_t(length))


class SecretBuffer:
    """A fixed-size secret held in locked, non-dumpable memory.

    Use as a context manager or call :meth:`close`; both zero the memory. ``repr`` never shows the
    contents. Views handed out by :meth:`view` must not outlive the buffer: after ``close`` they
    read zeros.
    """

    __slots__ = ("_mm", "_addr", "_len", "_cap", "locked", "dontdump", "__weakref__")

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("SecretBuffer size must be a non-negative int")
        self._len = size
        # mmap refuses length 0; always map at least one page.
        self._cap = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
        self._mm: mmap.mmap | None = mmap.mmap(
            -1, self._cap, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
        )
        # The address is taken through a temporary ctypes export, released at once so that
        # mmap.close() stays possible.
        anchor = ctypes.c_char.from_buffer(self._mm)
        self._addr = ctypes.addressof(anchor)
        del anchor
        self.locked = self._lock()
        self.dontdump = self._advise()

    def _lock(self) -> bool:
        err = _mlock(self._addr, self._cap)
        if err == 0:
            return True
        _warn_once(
            "mlock",
            "securemem: mlock failed (errno %s); key material may be swapped. "
            "Grant CAP_IPC_LOCK or raise RLIMIT_MEMLOCK (ulimit -l).",
            err,
        )
        return False

    def _advise(self) -> bool:
        assert self._mm is not None
        dontdump = getattr(mmap, "MADV_DONTDUMP", None)
        if dontdump is None or not hasattr(self._mm, "madvise"):
            _warn_once("dontdump", "securemem: MADV_DONTDUMP unavailable on %s; keys may appear in core dumps", sys.platform)
            return False
        try:
            self._mm.madvise(dontdump)
        except OSError as exc:
            _warn_once("dontdump", "securemem: madvise(MADV_DONTDUMP) failed: %s", exc)
            return False
        if sys.platform.startswith("linux"):
            try:
                self._mm.madvise(_MADV_WIPEONFORK)
            except OSError:
                pass  # kernels before 4.14; not worth a warning
        return True

    @classmethod
    def from_bytes(cls, data: builtins.bytes | bytearray | memoryview, *, wipe_source: bool = False) -> SecretBuffer:
        """Copy ``data`` in. With ``wipe_source`` a writable source (bytearray) is zeroed after."""
        src = memoryview(data).cast("B")
        buf = cls(len(src))
        assert buf._mm is not None
        buf._mm[: len(src)] = src
        if wipe_source and not src.readonly:
            src[:] = bytes(len(src))
        return buf

    def __len__(self) -> int:
        return self._len

    @property
    def closed(self) -> bool:
        return self._mm is None

    def _open_mm(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError("SecretBuffer is closed")
        return self._mm

    def view(self, *, writable: bool = False) -> memoryview:
        """A memoryview of the secret (read-only unless asked). Release it soon: ``with buf.view() as v``."""
        mv = memoryview(self._open_mm())[: self._len]
        return mv if writable else mv.toreadonly()

    def bytes(self) -> builtins.bytes:
        """An ordinary ``bytes`` copy, for APIs that need one. The copy cannot be wiped."""
        return self._open_mm()[: self._len]

    def equals(self, other: builtins.bytes | bytearray | memoryview | SecretBuffer) -> bool:
        """Constant-time comparison."""
        other_bytes = other.bytes() if isinstance(other, SecretBuffer) else bytes(other)
        return hmac.compare_digest(self.bytes(), other_bytes)

    def close(self) -> None:
        """Zero, unlock and unmap. Idempotent."""
        mm = self._mm
        if mm is None:
            return
        self._mm = None
        # memset through the address works even while memoryviews are exported.
        ctypes.memset(self._addr, 0, self._cap)
        if self.locked:
            _munlock(self._addr, self._cap)
        try:
            mm.close()
        except BufferError:
            # A view is still alive; the mapping (now zeros) goes when the last view does.
            pass

    def __enter__(self) -> SecretBuffer:
        self._open_mm()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # __init__ may have failed before _mm was set; at interpreter exit ctypes may be gone.
        try:
            if getattr(self, "_mm", None) is not None:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._mm is None else ("locked" if self.locked else "unlocked")
        return f"<SecretBuffer len={self._len} {state}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would write the secret somewhere we do not control.
        raise TypeError("SecretBuffer cannot be pickled")

    def __eq__(self, other: object) -> bool:  # identity only; use equals() for contents
        return self is other

    __hash__ = object.__hash__


@dataclass(frozen=True)
class CoreDumpStatus:
    """What :func:`disable_core_dumps` achieved."""

    not_dumpable: bool  # prctl(PR_SET_DUMPABLE, 0) succeeded
    core_limit_zero: bool  # RLIMIT_CORE is now (0, 0)

    @property
    def complete(self) -> bool:
        return self.not_dumpable and self.core_limit_zero


def _prctl(option: int, arg: int) -> int:
    """Return prctl's result, or -1 where prctl does not exist."""
    if _libc is None or not sys.platform.startswith("linux") or not hasattr(_libc, "prctl"):
        return -1
    _libc.prctl.restype = ctypes.c_int
    return int(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)))


def is_dumpable() -> bool | None:
    """PR_GET_DUMPABLE, or None where it cannot be asked."""
    r = _prctl(_PR_GET_DUMPABLE, 0)
    return None if r < 0 else bool(r)


def _set_dumpable(flag: bool) -> bool:
    return _prctl(_PR_SET_DUMPABLE, 1 if flag else 0) == 0


def disable_core_dumps() -> CoreDumpStatus:
    """Make this process non-dumpable and its core size limit zero; report what worked.

    Irreversible in practice (lowering the hard RLIMIT_CORE needs privilege to undo), so call it
    once at daemon start, not from libraries.
    """
    not_dumpable = _set_dumpable(False)
    if not not_dumpable:
        _warn_once("prctl", "securemem: prctl(PR_SET_DUMPABLE, 0) unavailable on %s", sys.platform)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        core_zero = True
    except (ImportError, OSError, ValueError) as exc:
        _warn_once("rlimit", "securemem: could not set RLIMIT_CORE to 0: %s", exc)
        core_zero = False
    return CoreDumpStatus(not_dumpable=not_dumpable, core_limit_zero=core_zero)
