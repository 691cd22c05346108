"""Benchmark: lab.common.noise against the primitive work it cannot avoid.

    .venv/bin/python tests/bench/bench_noise.py [--seconds 3]     (about 15 s in all)

1. Noise_XX_25519_ChaChaPoly_BLAKE2b handshakes per second, both sides in this process
   (empty payloads; certificate checks come later, in rpc/identity). Target: >= 1,500/s per core.
2. Transport encrypt + decrypt throughput for the largest Noise message (65,519-byte payload,
   65,535 bytes on the wire: a 64 KiB message does not fit in one Noise message).

Each figure comes with its "floor": the very same libsodium/BLAKE2b calls one run makes,
recorded with their arguments and replayed alone the same number of times. The ratio
(ours / floor) is what the Python around the primitives costs. Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from nacl import bindings as sodium

from lab.common import noise

NAME = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
ROUNDS = 5
PRIMITIVES = [
    "crypto_scalarmult",
    "crypto_scalarmult_base",
    "crypto_box_keypair",
    "crypto_aead_chacha20poly1305_ietf_encrypt",
    "crypto_aead_chacha20poly1305_ietf_decrypt",
]


def xx_handshake(i_key: bytes, r_key: bytes) -> None:
    init = noise.Handshake(NAME, True, static_key=i_key)
    resp = noise.Handshake(NAME, False, static_key=r_key)
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    resp.read_message(init.write_message())
    init.split()
    resp.split()


class _CountingHash:
    """Stands in for hashlib.blake2b and remembers how many bytes each hash consumed."""

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


def record_primitive_calls(run: Callable[[], None]) -> list[tuple[Callable[..., Any], tuple[Any, ...], str]]:
    """Run `run` once with noise's primitives wrapped; return (function, args, label) per call."""
    calls: list[tuple[Callable[..., Any], tuple[Any, ...], str]] = []
    saved = {name: getattr(noise, name) for name in [*PRIMITIVES, "_blake2b"]}

    def wrap(name: str) -> Callable[..., Any]:
        real = getattr(sodium, name)

        def recording(*args: Any) -> Any:
            calls.append((real, args, name))
            return real(*args)

        return recording

    _CountingHash.log = []
    try:
        for name in PRIMITIVES:
            setattr(noise, name, wrap(name))
        noise._blake2b = _CountingHash  # type: ignore[assignment]
        run()
    finally:
        for name, value in saved.items():
            setattr(noise, name, value)
    for size in _CountingHash.log:
        calls.append((lambda data: hashlib.blake2b(data).digest(), (bytes(size),), "blake2b"))
    return calls


def timed(count: int, body: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(count):
        body()
    return time.perf_counter() - start


def replay(calls: list[tuple[Callable[..., Any], tuple[Any, ...], str]]) -> Callable[[], None]:
    def body() -> None:
        for function, args, _ in calls:
            function(*args)

    return body


def best_of(
    rounds: int, count: int, ours: Callable[[], None], floor: Callable[[], None]
) -> tuple[float, float]:
    """Fastest round of each, rounds interleaved: other load on the machine hits both alike."""
    best_ours = best_floor = float("inf")
    for _ in range(rounds):
        best_ours = min(best_ours, timed(count, ours))
        best_floor = min(best_floor, timed(count, floor))
    return best_ours, best_floor


def count_for(seconds: float, body: Callable[[], None]) -> int:
    """How many runs of `body` fit in about `seconds` (from a short calibration)."""
    n, elapsed = 1, 0.0
    while elapsed < 0.2:
        n *= 2
        elapsed = timed(n, body)
    return max(1, int(n * seconds / elapsed))


def bench_handshakes(seconds: float) -> None:
    i_key, _ = noise.generate_keypair()
    r_key, _ = noise.generate_keypair()

    def run() -> None:
        xx_handshake(i_key, r_key)

    run()  # warm the static-key cache as a long-running node would be
    calls = record_primitive_calls(run)
    count = count_for(seconds / ROUNDS, run)
    ours, floor = best_of(ROUNDS, count, run, replay(calls))
    ops = Counter(label for _, _, label in calls)
    print(f"XX handshakes (both sides, one process), best of {ROUNDS} rounds of {count}:")
    print(f"  noise:  {count / ours:8.0f} handshakes/s  ({ours / count * 1e6:6.1f} us each)")
    print(f"  floor:  {count / floor:8.0f} handshakes/s  ({floor / count * 1e6:6.1f} us each)")
    per_handshake = ", ".join(f"{v} {k}" for k, v in sorted(ops.items()))
    print(f"  ratio:  {ours / floor:8.2f}x   per handshake: {per_handshake}")


def bench_transport(seconds: float) -> None:
    i_key, _ = noise.generate_keypair()
    r_key, _ = noise.generate_keypair()
    init = noise.Handshake(NAME, True, static_key=i_key)
    resp = noise.Handshake(NAME, False, static_key=r_key)
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    resp.read_message(init.write_message())
    send, _ = init.split()
    _, receive = resp.split()
    payload = os.urandom(noise.MAX_TRANSPORT_PAYLOAD)

    def run() -> None:
        receive.decrypt(send.encrypt(payload))

    key, nonce = os.urandom(32), bytes(12)
    encrypt = sodium.crypto_aead_chacha20poly1305_ietf_encrypt
    decrypt = sodium.crypto_aead_chacha20poly1305_ietf_decrypt

    def raw() -> None:
        decrypt(encrypt(payload, b"", nonce, key), b"", nonce, key)

    count = count_for(seconds / ROUNDS, run)
    ours, floor = best_of(ROUNDS, count, run, raw)
    megabytes = count * len(payload) / 1e6
    print(
        f"Transport, {len(payload)}-byte payloads ({len(payload) + 16} on the wire), "
        f"encrypt+decrypt, best of {ROUNDS} rounds of {count}:"
    )
    print(f"  noise:  {megabytes / ours:8.0f} MB/s")
    print(f"  floor:  {megabytes / floor:8.0f} MB/s")
    print(f"  ratio:  {ours / floor:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time per figure of ours; its floor as long"
    )
    args = parser.parse_args()
    bench_handshakes(args.seconds)
    bench_transport(args.seconds)


if __name__ == "__main__":
    main()
