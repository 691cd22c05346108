"""Sets of small integers as Python ints: union, intersection and difference of 100,000-member
sets cost microseconds, which is what lets the targeting engine compile a large fleet quickly."""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import compress

# For each byte value, the positions of its set bits.
_BYTE_BITS: tuple[tuple[int, ...], ...] = tuple(tuple(b for b in range(8) if v >> b & 1) for v in range(256))
_NONZERO_RUN = re.compile(rb"[^\x00]+")
_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


def from_indices(indices: Iterable[int], size: int) -> int:
    buf = bytearray((size + 7) // 8)
    for i in indices:
        buf[i >> 3] |= 1 << (i & 7)
    return int.from_bytes(buf, "little")


def indices(bits: int) -> list[int]:
    """The members of a bitset, ascending, at C speed: sparse sets skip runs of zero bytes,
    dense ones go through the binary digits in one pass."""
    if not bits:
        return []
    n = bits.bit_length()
    if bits.bit_count() * 64 > n:  # dense: one pass over every position
        flags = bin(bits)[:1:-1].encode().translate(_DIGITS)
        return list(compress(range(n), flags))
    data = bits.to_bytes((n + 7) // 8, "little")
    out: list[int] = []
    extend = out.extend
    table = _BYTE_BITS
    for run in _NONZERO_RUN.finditer(data):
        for offset, byte in enumerate(run.group(), run.start()):
            base = offset << 3
            extend([base + b for b in table[byte]])
    return out


def has(bits: int, i: int) -> bool:
    return (bits >> i) & 1 == 1


def count(bits: int) -> int:
    return bits.bit_count()
