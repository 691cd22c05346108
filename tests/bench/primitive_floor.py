"""The "floor" of the Noise and RPC benchmarks: the libsodium / BLAKE2b calls that one run of the
measured code makes, recorded with their arguments and replayed alone, so that (ours / floor) is
what the Python around the primitives costs; and the timing loops both benchmarks use.

Shared by bench_noise.py and bench_rpc.py; a plain module, not a benchmark (``python -m
tests.bench`` runs only the bench_* and fuzz_* scripts)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from nacl import bindings as sodium

from lab.common import noise

NOISE_PRIMITIVES = [
    "crypto_scalarmult",
    "crypto_scalarmult_base",
    "crypto_box_keypair",
    "crypto_aead_chacha20poly1305_ietf_encrypt",
    "crypto_aead_chacha20poly1305_ietf_decrypt",
]
Call = tuple[Callable[..., Any], tuple[Any, ...], str]


class _CountingHash:
    """Stands in for noise's hashlib.blake2b and remembers how many bytes each hash consumed."""

    log: list[int] = []

    def __init__(self, data: bytes = b"") -> None:
        self._h = hashlib.blake2b(data)
        self._n = len(data)

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self._n += len(data)

    def digest(self) -> bytes:
        _CountingHash.log.append(self._n)
        return self._h.digest()


class Recording:
    """Context manager: while active, every primitive call made through noise (and through the
    ``also`` entries: (module, libsodium function name, label)) is logged in ``calls``, labelled
    by ``label``; the BLAKE2b hashes noise computed are added on exit."""

    def __init__(self, label: Callable[[str], str] = lambda name: name, also: Iterable[tuple[Any, str, str]] = ()) -> None:
        self.calls: list[Call] = []
        self._label = label
        self._also = tuple(also)
        self._saved: dict[tuple[Any, str], Any] = {}

    def _wrap(self, module: Any, name: str, label: str) -> None:
        real = getattr(sodium, name)
        self._saved[(module, name)] = getattr(module, name)

        def recording(*args: Any) -> Any:
            self.calls.append((real, args, label))
            return real(*args)

        setattr(module, name, recording)

    def __enter__(self) -> Recording:
        for name in NOISE_PRIMITIVES:
            self._wrap(noise, name, self._label(name))
        for module, name, label in self._also:
            self._wrap(module, name, label)
        self._saved[(noise, "_blake2b")] = noise._blake2b
        _CountingHash.log = []
        noise._blake2b = _CountingHash  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        for (module, name), value in self._saved.items():
            setattr(module, name, value)
        for size in _CountingHash.log:
            self.calls.append((lambda data: hashlib.blake2b(data).digest(), (bytes(size),), "blake2b"))


def replay(calls: list[Call]) -> Callable[[], None]:
    def body() -> None:
        for function, args, _ in calls:
            function(*args)

    return body


def timed(count: int, body: Callable[[], Any]) -> float:
    start = time.perf_counter()
    for _ in range(count):
        body()
    return time.perf_counter() - start


def count_for(seconds: float, body: Callable[[], Any]) -> int:
    """How many runs of `body` fit in about `seconds` (from a short calibration)."""
    n, elapsed = 1, 0.0
    while elapsed < 0.2:
        n *= 2
        elapsed = timed(n, body)
    return max(1, int(n * seconds / elapsed))


def best_of(rounds: int, count: int, ours: Callable[[], Any], floor: Callable[[], Any]) -> tuple[float, float]:
    """Fastest round of each, rounds interleaved: other load on the machine hits both alike."""
    best_ours = best_floor = float("inf")
    for _ in range(rounds):
        best_ours = min(best_ours, timed(count, ours))
        best_floor = min(best_floor, timed(count, floor))
    return best_ours, best_floor
