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
import os
import sys
from collections import Counter
from pathlib import Path

from nacl import bindings as sodium

from lab.common import noise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from primitive_floor import Recording, best_of, count_for, replay  # noqa: E402

NAME = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
ROUNDS = 5


def xx_handshake(i_key: bytes, r_key: bytes) -> None:
    init = noise.Handshake(NAME, True, static_key=i_key)
    resp = noise.Handshake(NAME, False, static_key=r_key)
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    resp.read_message(init.write_message())
    init.split()
    resp.split()


def bench_handshakes(seconds: float) -> None:
    i_key, _ = noise.generate_keypair()
    r_key, _ = noise.generate_keypair()

    def run() -> None:
        xx_handshake(i_key, r_key)

    run()  # warm the static-key cache as a long-running node would be
    with Recording() as recording:  # noise's primitives wrapped for one run
        run()
    calls = recording.calls
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
