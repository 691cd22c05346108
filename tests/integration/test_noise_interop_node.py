"""lab.common.noise against a second, independent peer in another language.

The peer is the npm package ``noise-protocol`` (emilbayes; JavaScript over libsodium), driven by
``noise_peer.js`` in this folder through one long-lived ``node`` process speaking JSON lines.
That package has the one-way and the twelve interactive fundamental patterns, but no psk
modifier, so psk interop is covered by tests/unit/test_noise_interop.py only.

Needs ``node`` and ``noise-protocol`` resolvable from this folder, e.g. installed outside the
repository with ``npm install --prefix ~/.cache/lab-node noise-protocol@3.0.2`` and found through
``NODE_PATH=~/.cache/lab-node/node_modules``. Skipped without them, unless CI is set: there a
missing peer is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from lab.common.errors import RemoteProtocolError
from lab.common.noise import MAX_MESSAGE_LEN, MAX_TRANSPORT_PAYLOAD, CipherState, Handshake, public_key

HERE = Path(__file__).resolve().parent
# Where tools/system-deps.sh installs the npm package (outside the repository).
NODE_ENV = dict(
    os.environ,
    NODE_PATH=os.environ.get("NODE_PATH")
    or str(Path(os.environ.get("LAB_NODE_PEER_DIR", Path.home() / ".cache" / "lab-node")) / "node_modules"),
)
PEER = HERE / "noise_peer.js"
SUITE = "25519_ChaChaPoly_BLAKE2b"
PATTERNS = ["N", "K", "X", "NN", "NK", "NX", "XN", "XK", "XX", "KN", "KK", "KX", "IN", "IK", "IX"]
SEEDS = [0, 1, 2]


def _peer_missing() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "node is not installed"
    probe = subprocess.run(
        [node, "-e", "require.resolve('noise-protocol')"], cwd=HERE, capture_output=True, timeout=30, env=NODE_ENV
    )
    if probe.returncode != 0:
        return "npm package noise-protocol not found (see NODE_PATH in this module's docstring)"
    return None


class NodePeer:
    """The node process; every call is one JSON line out and one back."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("node") or "node", str(PEER)],
            cwd=HERE,
            env=NODE_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._ids = count()

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"node peer exited with {self.proc.poll()}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def new_id(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # end of input: the script exits by itself
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def node() -> Iterator[NodePeer]:
    why = _peer_missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the node Noise peer: {why}")
        pytest.skip(why)
    peer = NodePeer()
    yield peer
    peer.close()


class PeerError(Exception):
    """The node side refused a message (failed authentication or a failed check)."""


class Theirs:
    def __init__(self, node: NodePeer, pattern: str, initiator: bool, prologue: bytes,
                 s: bytes | None, rs: bytes | None) -> None:  # fmt: skip
        self.node, self.id = node, node.new_id()
        self.done = False
        command: dict[str, Any] = {"op": "init", "id": self.id, "pattern": pattern,
                                   "initiator": initiator, "prologue": prologue.hex()}  # fmt: skip
        if s is not None:
            command |= {"s_sk": s.hex(), "s_pk": public_key(s).hex()}
        if rs is not None:
            command["rs"] = rs.hex()
        self._call(**command)

    def _call(self, **command: Any) -> dict[str, Any]:
        reply = self.node.call(**command)
        if "error" in reply:
            raise PeerError(reply["error"])
        return reply

    def write(self, payload: bytes) -> bytes:
        reply = self._call(op="write", id=self.id, data=payload.hex())
        self.done = reply["done"]
        return bytes.fromhex(reply["data"])

    def read(self, message: bytes) -> bytes:
        reply = self._call(op="read", id=self.id, data=message.hex())
        self.done = reply["done"]
        return bytes.fromhex(reply["data"])

    def handshake_hash(self) -> bytes:
        return bytes.fromhex(self._call(op="hash", id=self.id)["data"])

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        reply = self._call(op="encrypt", id=self.id, data=plaintext.hex(), ad=ad.hex())
        return bytes.fromhex(reply["data"])

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        reply = self._call(op="decrypt", id=self.id, data=ciphertext.hex(), ad=ad.hex())
        return bytes.fromhex(reply["data"])

    def rekey_send(self) -> None:
        self._call(op="rekey_tx", id=self.id)

    def rekey_recv(self) -> None:
        self._call(op="rekey_rx", id=self.id)


class Ours:
    def __init__(
        self, pattern: str, initiator: bool, prologue: bytes, s: bytes | None, rs: bytes | None
    ) -> None:
        self.hs = Handshake(f"Noise_{pattern}_{SUITE}", initiator, prologue, static_key=s, remote_static=rs)
        self.send: CipherState | None = None
        self.recv: CipherState | None = None

    @property
    def done(self) -> bool:
        return self.hs.complete

    def write(self, payload: bytes) -> bytes:
        message = self.hs.write_message(payload)
        self._maybe_split()
        return message

    def read(self, message: bytes) -> bytes:
        payload = self.hs.read_message(message)
        self._maybe_split()
        return payload

    def _maybe_split(self) -> None:
        if self.hs.complete:
            self.send, self.recv = self.hs.split()

    def handshake_hash(self) -> bytes:
        return self.hs.handshake_hash

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        assert self.send is not None
        return self.send.encrypt(plaintext, ad)

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        assert self.recv is not None
        return self.recv.decrypt(ciphertext, ad)

    def rekey_send(self) -> None:
        assert self.send is not None
        self.send.rekey()

    def rekey_recv(self) -> None:
        assert self.recv is not None
        self.recv.rekey()


def static_roles(pattern: str) -> tuple[bool, bool, bool, bool]:
    """(initiator has s, responder knows it beforehand, responder has s, initiator knows it beforehand)."""
    if len(pattern) == 1:
        return pattern != "N", pattern == "K", True, True
    return pattern[0] != "N", pattern[0] == "K", pattern[1] != "N", pattern[1] == "K"


def make_peers(node: NodePeer, pattern: str, ours_initiates: bool, rnd: random.Random,
               prologue: bytes, their_prologue: bytes | None = None) -> tuple[Any, Any]:  # fmt: skip
    i_has, r_knows_i, r_has, i_knows_r = static_roles(pattern)
    s_i, s_r = rnd.randbytes(32), rnd.randbytes(32)
    i_args = (s_i if i_has else None, public_key(s_r) if i_knows_r else None)
    r_args = (s_r if r_has else None, public_key(s_i) if r_knows_i else None)
    theirs_prologue = prologue if their_prologue is None else their_prologue
    if ours_initiates:
        if not r_has and i_has and not r_knows_i:  # XN, IN: noise_peer.js's second quirk
            r_args = (rnd.randbytes(32), None)
        return Ours(pattern, True, prologue, *i_args), Theirs(node, pattern, False, theirs_prologue, *r_args)
    return Theirs(node, pattern, True, theirs_prologue, *i_args), Ours(pattern, False, prologue, *r_args)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ours_initiates", [True, False], ids=["ours-init", "node-init"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_interop_with_node_noise_protocol(
    node: NodePeer, pattern: str, ours_initiates: bool, seed: int
) -> None:
    rnd = random.Random(f"{pattern}-{ours_initiates}-{seed}")
    prologue = rnd.randbytes(rnd.randrange(1, 100))
    init, resp = make_peers(node, pattern, ours_initiates, rnd, prologue)
    writer, reader = init, resp
    messages = 0
    while not init.done:
        assert messages < 3
        payload = rnd.randbytes(rnd.choice([0, 1, 100, 1000]))
        message = writer.write(payload)
        assert len(message) <= MAX_MESSAGE_LEN
        assert reader.read(message) == payload
        assert writer.done == reader.done
        writer, reader = reader, writer
        messages += 1
    assert resp.done
    assert init.handshake_hash() == resp.handshake_hash()

    directions = [(init, resp)] if len(pattern) == 1 else [(init, resp), (resp, init)]
    plaintexts = [b"", rnd.randbytes(17), rnd.randbytes(65_000), rnd.randbytes(MAX_TRANSPORT_PAYLOAD), b""]
    for plaintext in plaintexts:
        for sender, receiver in directions:
            assert receiver.decrypt(sender.encrypt(plaintext)) == plaintext
    for sender, receiver in directions:
        ad = rnd.randbytes(33)
        assert receiver.decrypt(sender.encrypt(b"with ad", ad), ad) == b"with ad"
        sender.rekey_send()
        receiver.rekey_recv()
        for plaintext in (b"", rnd.randbytes(65_000), b"after rekey"):
            assert receiver.decrypt(sender.encrypt(plaintext)) == plaintext


@pytest.mark.parametrize("ours_initiates", [True, False], ids=["ours-init", "node-init"])
@pytest.mark.parametrize("pattern", ["NN", "XX", "IK", "N"])
def test_mismatch_and_tampering_fail_on_both_sides(
    node: NodePeer, pattern: str, ours_initiates: bool
) -> None:
    rnd = random.Random(f"bad-{pattern}-{ours_initiates}")
    init, resp = make_peers(node, pattern, ours_initiates, rnd, b"prologue", their_prologue=b"prologuf")
    writer, reader = init, resp
    with pytest.raises((RemoteProtocolError, PeerError)):
        while not init.done:
            reader.read(writer.write(b"x"))
            writer, reader = reader, writer

    init, resp = make_peers(node, pattern, ours_initiates, rnd, b"same")
    writer, reader = init, resp
    while not init.done:
        reader.read(writer.write(b""))
        writer, reader = reader, writer
    directions = [(init, resp)] if len(pattern) == 1 else [(init, resp), (resp, init)]
    for sender, receiver in directions:
        ciphertext = bytearray(sender.encrypt(b"attack at dawn"))
        ciphertext[-1] ^= 1
        with pytest.raises((RemoteProtocolError, PeerError)):
            receiver.decrypt(bytes(ciphertext))

