"""lab.common.noise against an independent implementation, as a live peer.

The peer is the PyPI package ``noiseprotocol`` (module ``noise``, by plizonczyk; X25519,
ChaCha20-Poly1305 and BLAKE2b from ``cryptography``, not libsodium). It implements the one-way
patterns N, K, X, the twelve interactive fundamental ones and the ``pskN`` modifiers; it has no
deferred patterns. Every test runs both role assignments: our Handshake as initiator and theirs as
responder, and the reverse. Static keys, psks, prologues and payloads come from hypothesis; each
side's ephemeral keys are drawn by its own library, as in production.

Nothing here knows the spec through our code: pattern roles come from the pattern's letters and
the number of handshake messages from whichever side says it is complete.
"""

from __future__ import annotations

import os
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.common.errors import LocalProtocolError, RemoteProtocolError
from lab.common.noise import MAX_MESSAGE_LEN, MAX_TRANSPORT_PAYLOAD, CipherState, Handshake, public_key

try:  # a test-only dependency: the `test` extra installs it, CI must have it
    from cryptography.exceptions import InvalidTag
    from noise.connection import Keypair, NoiseConnection
    from noise.exceptions import NoiseInvalidMessage
except ImportError:  # pragma: no cover - only without the test extra
    if os.environ.get("CI"):
        raise
    pytest.skip("noiseprotocol is not installed (pip install -e '.[test]')", allow_module_level=True)

SUITE = "25519_ChaChaPoly_BLAKE2b"
ONE_WAY = ["N", "K", "X"]
INTERACTIVE = ["NN", "NK", "NX", "XN", "XK", "XX", "KN", "KK", "KX", "IN", "IK", "IX"]
PSK_VARIANTS = [
    "Npsk0", "Kpsk0", "Xpsk1",
    "NNpsk0", "NNpsk2", "NKpsk0", "NKpsk2", "NXpsk2", "XNpsk3", "XKpsk3", "XXpsk3",
    "KNpsk0", "KNpsk2", "KKpsk0", "KKpsk2", "KXpsk2", "INpsk1", "INpsk2", "IKpsk1", "IKpsk2", "IXpsk2",
    "XNpsk1", "NNpsk0+psk2", "XXpsk0+psk3", "IKpsk0+psk1+psk2", "XXpsk0+psk1+psk2+psk3",
]  # fmt: skip
NAMES = [f"Noise_{p}_{SUITE}" for p in ONE_WAY + INTERACTIVE + PSK_VARIANTS]
OURS_INITIATES = pytest.mark.parametrize("ours_initiates", [True, False], ids=["ours-init", "theirs-init"])
HANDSHAKE_FAILURES = (RemoteProtocolError, InvalidTag)  # what each side raises on a bad message

keys32 = st.binary(min_size=32, max_size=32)
INTEROP = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the pattern's letters, read as spec sections 7.4 and 7.5 define them ---------------------


def base_of(name: str) -> str:
    return re.fullmatch(r"Noise_([A-Z]+)[a-z0-9+]*_" + SUITE, name).group(1)  # type: ignore[union-attr]


def psk_count(name: str) -> int:
    return name.count("psk")


def static_roles(name: str) -> tuple[bool, bool, bool, bool]:
    """(initiator has s, responder knows it beforehand, responder has s, initiator knows it beforehand).
    N: none, K: known beforehand, X / I: transmitted; one-way patterns name only the sender's."""
    letters = base_of(name)
    if len(letters) == 1:
        return letters != "N", letters == "K", True, True
    return letters[0] != "N", letters[0] == "K", letters[1] != "N", letters[1] == "K"


def is_one_way(name: str) -> bool:
    return len(base_of(name)) == 1


# --- one interface over both implementations ------------------------------------------------


class Ours:
    """Our Handshake, then our two CipherStates."""

    def __init__(
        self, name: str, initiator: bool, prologue: bytes, s: bytes | None, rs: bytes | None, psks: list[bytes]
    ) -> None:
        self.hs = Handshake(name, initiator, prologue, static_key=s, remote_static=rs, psks=psks)
        self.send: CipherState | None = None
        self.recv: CipherState | None = None

    def write(self, payload: bytes) -> bytes:
        return self.hs.write_message(payload)

    def read(self, message: bytes) -> bytes:
        return self.hs.read_message(message)

    @property
    def complete(self) -> bool:
        return self.hs.complete

    def handshake_hash(self) -> bytes:
        return self.hs.handshake_hash

    def finish(self) -> None:
        self.send, self.recv = self.hs.split()

    def encrypt(self, plaintext: bytes, ad: bytes) -> bytes:
        assert self.send is not None
        return self.send.encrypt(plaintext, ad)

    def decrypt(self, ciphertext: bytes, ad: bytes) -> bytes:
        assert self.recv is not None
        return self.recv.decrypt(ciphertext, ad)

    def rekey_send(self) -> None:
        assert self.send is not None
        self.send.rekey()

    def rekey_recv(self) -> None:
        assert self.recv is not None
        self.recv.rekey()


class Theirs:
    """noiseprotocol's NoiseConnection. Its encrypt()/decrypt() take no associated data, so messages
    with AD go through its CipherState's encrypt_with_ad()/decrypt_with_ad() (spec section 5.1 names)."""

    def __init__(
        self, name: str, initiator: bool, prologue: bytes, s: bytes | None, rs: bytes | None, psks: list[bytes]
    ) -> None:
        conn = NoiseConnection.from_name(name.encode("ascii"))
        conn.set_as_initiator() if initiator else conn.set_as_responder()
        conn.set_prologue(prologue)
        if psks:
            conn.set_psks(psks=list(psks))
        if s is not None:
            conn.set_keypair_from_private_bytes(Keypair.STATIC, s)
        if rs is not None:
            conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs)
        conn.start_handshake()
        self.conn = conn

    def write(self, payload: bytes) -> bytes:
        return bytes(self.conn.write_message(payload))

    def read(self, message: bytes) -> bytes:
        return bytes(self.conn.read_message(message))

    @property
    def complete(self) -> bool:
        return bool(self.conn.handshake_finished)

    def handshake_hash(self) -> bytes:
        return bytes(self.conn.get_handshake_hash())

    def finish(self) -> None:
        pass  # noiseprotocol splits by itself after the last handshake message

    def encrypt(self, plaintext: bytes, ad: bytes) -> bytes:
        if not ad:
            return bytes(self.conn.encrypt(plaintext))
        return bytes(self.conn.noise_protocol.cipher_state_encrypt.encrypt_with_ad(ad, plaintext))

    def decrypt(self, ciphertext: bytes, ad: bytes) -> bytes:
        if not ad:
            return bytes(self.conn.decrypt(ciphertext))
        return bytes(self.conn.noise_protocol.cipher_state_decrypt.decrypt_with_ad(ad, ciphertext))

    def rekey_send(self) -> None:
        self.conn.rekey_outbound_cipher()

    def rekey_recv(self) -> None:
        self.conn.rekey_inbound_cipher()


Side = Ours | Theirs


def make_peers(
    name: str,
    ours_initiates: bool,
    s_i: bytes,
    s_r: bytes,
    psks: list[bytes],
    prologue: bytes,
    *,
    their_prologue: bytes | None = None,
    their_psks: list[bytes] | None = None,
    rs_seen_by_initiator: bytes | None = None,
    rs_seen_by_responder: bytes | None = None,
) -> tuple[Side, Side]:
    """(initiator, responder): one ours, one theirs. Keys each side should not have are not given.
    The keyword arguments give the *theirs* side a different prologue or psks, or either side a
    different pre-known static key, to check that mismatches fail."""
    i_has, r_knows_i, r_has, i_knows_r = static_roles(name)
    i_priv, r_priv = (s_i if i_has else None), (s_r if r_has else None)
    i_rs = (rs_seen_by_initiator or public_key(s_r)) if i_knows_r else None
    r_rs = (rs_seen_by_responder or public_key(s_i)) if r_knows_i else None
    their_prologue = prologue if their_prologue is None else their_prologue
    their_psks = psks if their_psks is None else their_psks
    if ours_initiates:
        theirs: Side = Theirs(name, False, their_prologue, r_priv, r_rs, their_psks)
        return Ours(name, True, prologue, i_priv, i_rs, psks), theirs
    theirs = Theirs(name, True, their_prologue, i_priv, i_rs, their_psks)
    return theirs, Ours(name, False, prologue, r_priv, r_rs, psks)


def run_handshake(init: Side, resp: Side, payloads: list[bytes]) -> int:
    """Alternate messages until done, checking each payload arrives; returns the message count."""
    writer, reader = init, resp
    count = 0
    while not init.complete:
        assert count < 3, "no fundamental pattern has more than three messages"
        assert not resp.complete
        payload = payloads[count % len(payloads)]
        message = writer.write(payload)
        assert len(message) <= MAX_MESSAGE_LEN
        assert reader.read(message) == payload
        assert writer.complete == reader.complete  # both sides agree on where the handshake ends
        writer, reader = reader, writer
        count += 1
    assert resp.complete
    init.finish()
    resp.finish()
    return count


def exchange(sender: Side, receiver: Side, plaintext: bytes, ad: bytes = b"") -> None:
    ciphertext = sender.encrypt(plaintext, ad)
    assert len(ciphertext) == len(plaintext) + 16
    assert receiver.decrypt(ciphertext, ad) == plaintext


def transport_traffic(init: Side, resp: Side, one_way: bool, rnd: random.Random) -> None:
    """Interleaved traffic both ways (one way for N/K/X), with empty, large and maximal
    payloads and associated data, then a rekey of every direction in use, then more traffic."""
    directions = [(init, resp)] if one_way else [(init, resp), (resp, init)]
    plaintexts = [
        b"",
        rnd.randbytes(rnd.randrange(1, 200)),
        rnd.randbytes(65_000),
        rnd.randbytes(MAX_TRANSPORT_PAYLOAD),
        b"",
        rnd.randbytes(1),
    ]
    for plaintext in plaintexts:
        for sender, receiver in directions:
            exchange(sender, receiver, plaintext)
    for sender, receiver in directions:
        exchange(sender, receiver, rnd.randbytes(50), ad=rnd.randbytes(rnd.randrange(1, 40)))
        exchange(sender, receiver, b"", ad=b"associated")
    for round_ in range(2):
        for sender, receiver in directions:
            sender.rekey_send()
            receiver.rekey_recv()
        for plaintext in (b"", rnd.randbytes(65_000), rnd.randbytes(round_ + 10)):
            for sender, receiver in directions:
                exchange(sender, receiver, plaintext)


# --- the interop proper ---------------------------------------------------------------------


def test_peer_library_covers_the_patterns_we_test() -> None:
    """If a future noiseprotocol dropped or renamed something, fail here rather than skip quietly."""
    for name in NAMES:
        NoiseConnection.from_name(name.encode("ascii"))
    assert len(NAMES) == 3 + 12 + len(PSK_VARIANTS)


@pytest.mark.parametrize("name", NAMES)
@OURS_INITIATES
@INTEROP
@given(
    s_i=keys32,
    s_r=keys32,
    psk_pool=st.lists(keys32, min_size=4, max_size=4),
    prologue=st.binary(min_size=1, max_size=200),
    payloads=st.lists(st.binary(max_size=300), min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_handshake_and_transport_interoperate(
    name: str,
    ours_initiates: bool,
    s_i: bytes,
    s_r: bytes,
    psk_pool: list[bytes],
    prologue: bytes,
    payloads: list[bytes],
    seed: int,
) -> None:
    psks = psk_pool[: psk_count(name)]
    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, prologue)
    count = run_handshake(init, resp, payloads)
    assert count == (1 if is_one_way(name) else 3 if base_of(name)[0] == "X" else 2)
    assert init.handshake_hash() == resp.handshake_hash()
    assert len(init.handshake_hash()) == 64
    ours = init if isinstance(init, Ours) else resp
    assert isinstance(ours, Ours)
    i_has, _, r_has, _ = static_roles(name)
    peer_static = public_key(s_r) if ours is init else public_key(s_i)
    assert ours.hs.remote_static == (peer_static if (r_has if ours is init else i_has) else None)
    transport_traffic(init, resp, is_one_way(name), random.Random(seed))


@pytest.mark.parametrize("name", NAMES)
@OURS_INITIATES
def test_largest_handshake_messages_interoperate(name: str, ours_initiates: bool) -> None:
    """Every handshake message at exactly 65,535 bytes (spec section 3), in both directions:
    ours built to the limit, theirs read by us. One byte more we refuse to write."""
    s_i, s_r = os.urandom(32), os.urandom(32)
    psks = [os.urandom(32) for _ in range(psk_count(name))]
    # Learn each message's fixed overhead from an empty-payload run with other keys.
    probe_init, probe_resp = make_peers(name, ours_initiates, os.urandom(32), os.urandom(32), psks, b"")
    overheads = []
    writer, reader = probe_init, probe_resp
    while not probe_init.complete:
        message = writer.write(b"")
        reader.read(message)
        overheads.append(len(message))
        writer, reader = reader, writer

    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, b"")
    writer, reader = init, resp
    for overhead in overheads:
        payload = os.urandom(MAX_MESSAGE_LEN - overhead)
        if isinstance(writer, Ours):
            with pytest.raises(LocalProtocolError):
                writer.write(payload + b"x")
        message = writer.write(payload)
        assert len(message) == MAX_MESSAGE_LEN
        assert reader.read(message) == payload
        writer, reader = reader, writer
    assert init.complete and resp.complete
    assert init.handshake_hash() == resp.handshake_hash()


@pytest.mark.parametrize("name", [f"Noise_{p}_{SUITE}" for p in ("NN", "XX", "IK", "N")])
def test_we_refuse_their_oversized_messages(name: str) -> None:
    """noiseprotocol does not enforce the 65,535-byte message limit of spec section 3 (it caps
    plaintext at 65,535, so its ciphertext can reach 65,551 bytes); we must refuse such input."""
    s_i, s_r = os.urandom(32), os.urandom(32)
    init, resp = make_peers(name, False, s_i, s_r, [], b"")
    assert isinstance(init, Theirs) and isinstance(resp, Ours)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        resp.read(init.write(os.urandom(MAX_MESSAGE_LEN)))

    init, resp = make_peers(name, False, s_i, s_r, [], b"")
    run_handshake(init, resp, [b""])
    exchange(init, resp, os.urandom(MAX_TRANSPORT_PAYLOAD))  # the largest legal message passes
    oversized = init.encrypt(os.urandom(MAX_TRANSPORT_PAYLOAD + 1), b"")
    assert len(oversized) == MAX_MESSAGE_LEN + 1
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        resp.decrypt(oversized, b"")


# --- mismatches must fail, on whichever side first checks -----------------------------------


def handshake_fails(init: Side, resp: Side) -> None:
    writer, reader = init, resp
    with pytest.raises(HANDSHAKE_FAILURES):
        while not init.complete:
            reader.read(writer.write(b"payload"))
            writer, reader = reader, writer
        # A pattern whose last message carries the mismatch only shows it in transport.
        init.finish()
        resp.finish()
        exchange(init, resp, b"data")


@pytest.mark.parametrize("name", NAMES)
@OURS_INITIATES
def test_different_prologues_fail(name: str, ours_initiates: bool) -> None:
    s_i, s_r = os.urandom(32), os.urandom(32)
    psks = [os.urandom(32) for _ in range(psk_count(name))]
    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, b"prologue", their_prologue=b"prologuf")
    handshake_fails(init, resp)


@pytest.mark.parametrize("name", [n for n in NAMES if "psk" in n])
@OURS_INITIATES
def test_different_psks_fail(name: str, ours_initiates: bool) -> None:
    s_i, s_r = os.urandom(32), os.urandom(32)
    psks = [os.urandom(32) for _ in range(psk_count(name))]
    wrong = list(psks)
    wrong[-1] = bytes([wrong[-1][0] ^ 1]) + wrong[-1][1:]
    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, b"p", their_psks=wrong)
    handshake_fails(init, resp)


PRE_KNOWN = [
    (name, fooled)
    for name in NAMES
    for fooled, knows in zip(("responder", "initiator"), static_roles(name)[1::2])
    if knows
]


@pytest.mark.parametrize(("name", "fooled"), PRE_KNOWN)
@OURS_INITIATES
def test_wrong_pre_known_static_fails(name: str, fooled: str, ours_initiates: bool) -> None:
    """Whichever side was given a wrong key for its peer beforehand, the handshake fails."""
    s_i, s_r = os.urandom(32), os.urandom(32)
    psks = [os.urandom(32) for _ in range(psk_count(name))]
    impostor = public_key(os.urandom(32))
    extra = {"rs_seen_by_initiator" if fooled == "initiator" else "rs_seen_by_responder": impostor}
    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, b"p", **extra)
    handshake_fails(init, resp)


@pytest.mark.parametrize("name", [f"Noise_{p}_{SUITE}" for p in ("NN", "XX", "IKpsk2", "X")])
@OURS_INITIATES
def test_tampered_messages_are_rejected_by_both(name: str, ours_initiates: bool) -> None:
    """One flipped bit in a transport message: we raise RemoteProtocolError, they NoiseInvalidMessage."""
    s_i, s_r = os.urandom(32), os.urandom(32)
    psks = [os.urandom(32) for _ in range(psk_count(name))]
    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, b"p")
    run_handshake(init, resp, [b""])
    directions = [(init, resp)] if is_one_way(name) else [(init, resp), (resp, init)]
    for sender, receiver in directions:
        ciphertext = bytearray(sender.encrypt(b"attack at dawn", b""))
        ciphertext[3] ^= 0x20
        expected: type[Exception] = RemoteProtocolError if isinstance(receiver, Ours) else NoiseInvalidMessage
        with pytest.raises(expected):
            receiver.decrypt(bytes(ciphertext), b"")


def _flip(message: bytes, index: int) -> bytes:
    return message[:index] + bytes([message[index] ^ 1]) + message[index + 1 :]


@pytest.mark.parametrize("name", [f"Noise_{p}_{SUITE}" for p in ("XX", "IK", "NNpsk0", "X")])
def test_tampered_handshake_from_them_is_a_remote_error(name: str) -> None:
    """A bit flipped in their last handshake message makes our read_message() fail cleanly."""
    s_i, s_r = os.urandom(32), os.urandom(32)
    psks = [os.urandom(32) for _ in range(psk_count(name))]
    count = 1 if is_one_way(name) else 3 if base_of(name)[0] == "X" else 2
    ours_initiates = count % 2 == 0  # theirs writes the last message
    init, resp = make_peers(name, ours_initiates, s_i, s_r, psks, b"p")
    writer, reader = init, resp
    for _ in range(count - 1):
        reader.read(writer.write(b""))
        writer, reader = reader, writer
    assert isinstance(writer, Theirs) and isinstance(reader, Ours)
    message = writer.write(b"last")
    with pytest.raises(RemoteProtocolError):
        reader.read(_flip(message, len(message) - 1))
