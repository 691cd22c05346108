"""Mutation fuzzer for the untrusted-input decoders (a script, not a test).

    python -m tests.bench.fuzz_wire [--count N] [--seed S]

Takes valid encodings (frame streams, RPC messages, certificates, revocation lists, join tokens),
mutates them (bit flips, msgpack-significant bytes, truncation, insertion, deletion, duplication,
splicing, pure noise) and feeds them to the decoders. Anything other than a ProtocolError escaping
is a bug: the script prints it and exits 1.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lab.common import identity, wire
from lab.common.errors import ProtocolError

# Bytes that change msgpack structure: nil/false/true, bin/str/array/map headers, ext, fix* edges.
_INTERESTING = bytes([0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5,
                      0xC6, 0xCB, 0xCF, 0xD3, 0xD4, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF])


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes]) -> bytes:
    """One to four random edits of ``data`` (or, rarely, pure noise)."""
    if rng.random() < 0.05:
        return rng.randbytes(rng.randrange(0, 64))
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        i = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[i % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[i % len(buf)] = rng.choice(_INTERESTING)
        elif op == 2:
            del buf[i:]
        elif op == 3:
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:
            del buf[i : i + rng.randint(1, 16)]
        elif op == 5 and buf:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randint(1, 16)]
        elif op == 6:
            other = rng.choice(corpus)
            j = rng.randrange(len(other) + 1)
            buf[i:] = other[j:]
        elif op == 7 and buf:
            # Rewrite a length or count byte to something large: the classic amplification probe.
            buf[i % len(buf)] = rng.choice([0xFF, 0xFE, 0x7F, 0x10])
    return bytes(buf)


def _messages(ca: identity.CertificateAuthority) -> list[bytes]:
    msgs: list[wire.Message] = [
        wire.Request(id=1, method="store.get", body={"path": "db/password", "known": {"a": 3}, "n": [1, 2.5, None, True]}),
        wire.Request(id=2**40, method="agent.facts", body={"blob": b"\x00" * 40, "deep": {"a": {"b": {"c": []}}}}),
        wire.Response.success(1, {"value": b"s3cret", "version": [1700000000000, 3, "node-1"]}),
        wire.Response.failure(2, "not-entitled", "node web-01 may not read db/password"),
        wire.StreamItem(id=7, seq=0, body={"put": {"x/y": 1}}),
        wire.StreamEnd(id=7, error=None),
        wire.StreamEnd(id=8, error=wire.ErrorInfo("cancelled", "bye")),
        wire.Cancel(id=9),
        wire.Error(code="protocol", message="bad frame"),
    ]
    return [wire.encode(m) for m in msgs]


@dataclass
class Target:
    name: str
    run: Callable[[bytes], object]
    corpus: list[bytes]
    inputs: int = 0
    accepted: int = 0
    rejected: int = 0
    escaped: list[tuple[str, bytes]] = field(default_factory=list)


def _frames_pipeline(data: bytes, rng: random.Random) -> None:
    """Bytes → FrameDecoder (random split) → Reassembler → message decoder, as a connection would."""
    dec, asm = wire.FrameDecoder(), wire.Reassembler(max_message=1 << 16)
    cut = rng.randrange(len(data) + 1)
    for part in (data[:cut], data[cut:]):
        for frame in dec.feed(part):
            msg = asm.feed(frame)
            if msg is not None:
                wire.decode_untrusted(msg)
    dec.eof()
    asm.eof()


def build_targets(rng: random.Random) -> list[Target]:
    ca = identity.CertificateAuthority.generate()
    node = identity.NodeKey.generate()
    certs = [
        ca.issue("web-01.example.org", "node-1", node.public_key, ["agent"], 86400, 1_700_000_000, serial=rng.randrange(1, 2**63)).encode(),
        ca.issue("s", "n", bytes(32), ["agent", "secret-store", "lab-server"], 1, 0, serial=1).encode(),
    ]
    crl = ca.revocation_list(3, 1_700_000_000, serials=[1, 5, 2**62], keys=[bytes(32), b"\xff" * 32])
    msgs = _messages(ca)
    streams = [b"".join(wire.encode_frame(c) for c in wire.split_message(m, max_chunk_len=40)) for m in msgs[:4]]
    tokens = [identity.mint_token(ca.fingerprint)[0].encode() for _ in range(2)]
    ca.close()
    node.close()
    return [
        Target("frames", lambda d: _frames_pipeline(d, rng), streams),
        Target("messages", wire.decode_untrusted, msgs),
        Target("certificates", identity.Certificate.decode_untrusted, certs),
        Target("revocations", identity.RevocationList.decode_untrusted, [crl.encode()]),
        Target("tokens", lambda d: identity.parse_token_untrusted(d.decode("latin-1")), tokens),
    ]


def run(count: int, seed: int) -> tuple[list[Target], float]:
    rng = random.Random(seed)
    targets = build_targets(rng)
    everything = [c for t in targets for c in t.corpus]
    start = time.perf_counter()
    for i in range(count):
        t = targets[i % len(targets)]
        data = mutate(rng, rng.choice(t.corpus), everything)
        t.inputs += 1
        try:
            t.run(data)
            t.accepted += 1
        except ProtocolError:
            t.rejected += 1
        except Exception as exc:  # the bug this script exists to find
            t.escaped.append((f"{type(exc).__name__}: {exc}"[:200], data))
    return targets, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100_000, help="mutated inputs in all (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    targets, elapsed = run(args.count, args.seed)
    total = sum(t.inputs for t in targets)
    escaped = sum(len(t.escaped) for t in targets)
    rate = total / elapsed if elapsed > 0 else float("inf")
    print(f"fuzz_wire: {total} inputs in {elapsed:.2f} s ({rate:,.0f} inputs/s), seed {args.seed}")
    for t in targets:
        print(f"  {t.name:<13} {t.inputs:>8} inputs  accepted {t.accepted:>7}  rejected {t.rejected:>7}  escaped {len(t.escaped)}")
        for what, data in t.escaped[:5]:
            print(f"    ESCAPED {what}\n      input {data[:120].hex()}")
    print(f"escaped {escaped}")
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
