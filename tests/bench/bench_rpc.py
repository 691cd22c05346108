"""Benchmark: the RPC session layer (lab.common._rpc_session) against the primitive work it needs.

    .venv/bin/python tests/bench/bench_rpc.py [--seconds 3]     (about 20 s in all)

1. Server-side XX handshakes per second *with certificate verification*: both sides run in this
   process, but only the responder's work is timed (building its session, reading message 1,
   writing message 2, reading message 3, verifying the initiator's certificate against the CA
   and a 1,000-entry revocation list, and encrypting rpc.ready). Target: >= 1,500/s per core,
   within 2x of the floor.
2. Transport throughput for 64 KiB application messages (65,536 msgpack bytes: 2 Noise messages
   each) through SecureSession.send -> receive_data -> next_event, i.e. encode, chunk, encrypt,
   frame, unframe, decrypt, reassemble and strictly decode. Target: >= 200 MB/s per core.

Each figure comes with its "floor": the very libsodium / BLAKE2b calls that the measured work
makes (X25519 scalarmults and key pairs, Ed25519 verifications, ChaCha20-Poly1305, BLAKE2b),
recorded with their arguments during one run and replayed alone, in the same run, rounds
interleaved. The ratio (ours / floor) is what everything around the primitives costs.
Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import nacl.bindings

from lab.common import wire
from lab.common._rpc_session import NEED_DATA, Identity, PeerAuthenticated, SecureSession
from lab.common.identity import CertificateAuthority, NodeKey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from primitive_floor import Call, Recording, best_of, count_for, replay, timed  # noqa: E402

ROUNDS = 5


def recording() -> Recording:
    """Every primitive call made through noise and identity (Ed25519 verifications), logged."""
    return Recording(
        label=lambda name: name.replace("crypto_aead_chacha20poly1305_ietf_", "chachapoly_"),
        # identity calls nacl.bindings.crypto_sign_open (Ed25519 verify) through the module
        also=[(nacl.bindings, "crypto_sign_open", "ed25519_verify")],
    )


def make_identities() -> tuple[Identity, Identity]:
    now = time.time()
    ca = CertificateAuthority.generate()
    crl = ca.revocation_list(1, now, serials=range(1, 501), keys=[os.urandom(32) for _ in range(500)])
    skey, ckey = NodeKey.generate(), NodeKey.generate()
    server = Identity(skey, ca.issue("coord-1.example.org", "n-0001", skey.public_key, ["lab-server"], 86400, now), ca.public_key, crl)
    client = Identity(ckey, ca.issue("web-17.example.org", "n-0017", ckey.public_key, ["agent"], 86400, now), ca.public_key, crl)
    return server, client


class HandshakeRig:
    """One full XX handshake + certificate checks + rpc.ready, responder's share timed separately."""

    def __init__(self, server: Identity, client: Identity) -> None:
        self.server, self.client = server, client
        self.server_time = 0.0

    def client_msg1(self) -> tuple[SecureSession, bytes]:
        c = SecureSession(self.client, initiator=True, now=time.time())
        c.initiate()
        return c, c.data_to_send()

    def server_msg2(self, msg1: bytes) -> tuple[SecureSession, bytes]:
        s = SecureSession(self.server, initiator=False, now=time.time())
        s.receive_data(msg1)
        assert s.next_event() is NEED_DATA
        return s, s.data_to_send()

    @staticmethod
    def client_msg3(c: SecureSession, msg2: bytes) -> bytes:
        c.receive_data(msg2)
        assert c.next_event() is NEED_DATA
        return c.data_to_send()

    @staticmethod
    def server_ready(s: SecureSession, msg3: bytes) -> bytes:
        s.receive_data(msg3)
        assert isinstance(s.next_event(), PeerAuthenticated)
        return s.data_to_send()

    @staticmethod
    def client_done(c: SecureSession, ready: bytes) -> None:
        c.receive_data(ready)
        assert isinstance(c.next_event(), PeerAuthenticated)

    def run(self) -> None:
        clock = time.perf_counter
        c, msg1 = self.client_msg1()
        t0 = clock()
        s, msg2 = self.server_msg2(msg1)
        t1 = clock()
        msg3 = self.client_msg3(c, msg2)
        t2 = clock()
        ready = self.server_ready(s, msg3)
        t3 = clock()
        self.client_done(c, ready)
        self.server_time += (t1 - t0) + (t3 - t2)

    def record_server_calls(self) -> list[Call]:
        c, msg1 = self.client_msg1()
        with recording() as r1:
            s, msg2 = self.server_msg2(msg1)
        msg3 = self.client_msg3(c, msg2)
        with recording() as r2:
            ready = self.server_ready(s, msg3)
        self.client_done(c, ready)
        return r1.calls + r2.calls


def bench_handshakes(seconds: float) -> None:
    server, client = make_identities()
    rig = HandshakeRig(server, client)
    rig.run()  # warm caches (static key, CRL signature) as a long-running server would be
    calls = rig.record_server_calls()
    floor_body = replay(calls)
    count = max(200, count_for(seconds / ROUNDS / 2, rig.run))  # a run is ~2x the server's share
    best_ours = best_floor = best_both = float("inf")
    for _ in range(ROUNDS):
        rig.server_time = 0.0
        both = timed(count, rig.run)
        best_ours, best_both = min(best_ours, rig.server_time), min(best_both, both)
        best_floor = min(best_floor, timed(count, floor_body))
    ops = Counter(label for _, _, label in calls)
    per = ", ".join(f"{v} {k}" for k, v in sorted(ops.items()))
    print(f"XX handshakes with certificate verification, server side, best of {ROUNDS} rounds of {count}:")
    print(f"  ours:   {count / best_ours:8.0f} handshakes/s  ({best_ours / count * 1e6:6.1f} us each, responder's work only)")
    print(f"  floor:  {count / best_floor:8.0f} handshakes/s  ({best_floor / count * 1e6:6.1f} us each)")
    print(f"  ratio:  {best_ours / best_floor:8.2f}x   server's primitives per handshake: {per}")
    print(f"  (both sides in one process, client included: {count / best_both:.0f} handshakes/s)")


def bench_transport(seconds: float) -> None:
    server, client = make_identities()
    rig = HandshakeRig(server, client)
    c, msg1 = rig.client_msg1()
    s, msg2 = rig.server_msg2(msg1)
    rig.client_done(c, rig.server_ready(s, rig.client_msg3(c, msg2)))

    size = 64 * 1024
    n = size - len(wire.encode(wire.Request(id=1, method="store.put", body={"data": b""})))
    while len(wire.encode(wire.Request(id=1, method="store.put", body={"data": bytes(n)}))) > size:
        n -= 1  # the bin header grows from 2 to 3 bytes past 255
    message = wire.Request(id=1, method="store.put", body={"data": os.urandom(n)})
    assert len(wire.encode(message)) == size, len(wire.encode(message))

    def run() -> None:
        s.receive_data(c.send(message))
        ev = s.next_event()
        assert ev.__class__ is wire.Request

    run()
    with recording() as rec:
        run()
    floor_body = replay(rec.calls)
    count = count_for(seconds / ROUNDS, run)
    best_ours, best_floor = best_of(ROUNDS, count, run, floor_body)
    mb = count * size / 1e6
    ops = Counter(label for _, _, label in rec.calls)
    per = ", ".join(f"{v} {k}" for k, v in sorted(ops.items()))
    print(f"Transport, 64 KiB application messages (2 Noise messages each), send+receive, best of {ROUNDS} rounds of {count}:")
    print(f"  ours:   {mb / best_ours:8.0f} MB/s  ({best_ours / count * 1e6:6.1f} us per message)")
    print(f"  floor:  {mb / best_floor:8.0f} MB/s  ({best_floor / count * 1e6:6.1f} us per message)")
    print(f"  ratio:  {best_ours / best_floor:8.2f}x   primitives per message: {per}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per figure of ours; its floor about as long")
    args = parser.parse_args()
    print(f"command: {sys.executable} {' '.join(sys.argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}")
    bench_handshakes(args.seconds)
    bench_transport(args.seconds)


if __name__ == "__main__":
    main()
