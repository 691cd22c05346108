"""lab.common.noise: published test vectors, round trips, tampering, hostile input, misuse."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common import noise
from lab.common.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from lab.common.noise import (
    MAX_MESSAGE_LEN,
    MAX_TRANSPORT_PAYLOAD,
    PATTERNS,
    CipherState,
    Handshake,
    HandshakeState,
    generate_keypair,
    public_key,
)

SUITE = "25519_ChaChaPoly_BLAKE2b"
FUNDAMENTAL = ["N", "K", "X", "NN", "NK", "NX", "XN", "XK", "XX", "KN", "KK", "KX", "IN", "IK", "IX"]
DEFERRED = [p for p in PATTERNS if p not in FUNDAMENTAL]
VECTOR_DIR = Path(__file__).resolve().parents[1] / "vectors" / "noise"


# --- helpers that know Noise from the spec, not from the implementation ---------------------


def base_of(name: str) -> str:
    return re.fullmatch(r"Noise_([A-Z0-9]+)[a-z0-9+]*_" + SUITE, name).group(1)  # type: ignore[union-attr]


def psk_count(name: str) -> int:
    return name.count("psk")


def static_roles(name: str) -> tuple[bool, bool, bool, bool]:
    """(initiator has static, responder pre-knows it, responder has static, initiator pre-knows it).

    Spec §7.4/7.5: the letters name each side's static key: N none, K known beforehand,
    X transmitted, I transmitted immediately; one-way patterns name only the sender's.
    """
    letters = re.sub(r"[0-9]", "", base_of(name))
    if len(letters) == 1:
        return letters != "N", letters == "K", True, True
    first, second = letters
    return first != "N", first == "K", second != "N", second == "K"


def messages_in(name: str) -> int:
    return len(PATTERNS[base_of(name)].messages)


def is_one_way(name: str) -> bool:
    return messages_in(name) == 1


def tokens_with_psks(name: str) -> list[list[str]]:
    """The pattern's messages with the psk tokens placed as spec §9 says (psk0 first, pskN last in N)."""
    messages = [list(m) for m in PATTERNS[base_of(name)].messages]
    for n in map(int, re.findall(r"psk(\d+)", name)):
        if n == 0:
            messages[0].insert(0, "psk")
        else:
            messages[n - 1].append("psk")
    return messages


def first_keyed_message(name: str) -> int:
    """Index of the first message whose payload is encrypted: the first after any MixKey.
    DH and psk tokens call MixKey; in psk mode so does every "e"."""
    mix_key = {"ee", "es", "se", "ss", "psk"} | ({"e"} if psk_count(name) else set())
    return next(i for i, tokens in enumerate(tokens_with_psks(name)) if mix_key & set(tokens))


def make_pair(
    name: str, prologue: bytes = b"lab", psks: list[bytes] | None = None
) -> tuple[Handshake, Handshake, dict[str, Any]]:
    """Two fresh endpoints of `name` with random keys."""
    i_has, r_knows_i, r_has, i_knows_r = static_roles(name)
    i_priv, i_pub = generate_keypair() if i_has else (None, None)
    r_priv, r_pub = generate_keypair() if r_has else (None, None)
    if psks is None:
        psks = [os.urandom(32) for _ in range(psk_count(name))]
    init = Handshake(
        name, True, prologue, static_key=i_priv, remote_static=r_pub if i_knows_r else None, psks=psks
    )
    resp = Handshake(
        name, False, prologue, static_key=r_priv, remote_static=i_pub if r_knows_i else None, psks=psks
    )
    keys = {"i_priv": i_priv, "i_pub": i_pub, "r_priv": r_priv, "r_pub": r_pub, "psks": psks}
    return init, resp, keys


def run_handshake(init: Handshake, resp: Handshake, payload: bytes = b"") -> list[bytes]:
    wire = []
    for k in range(len(PATTERNS[base_of(init.protocol_name)].messages)):
        sender, receiver = (init, resp) if k % 2 == 0 else (resp, init)
        message = sender.write_message(payload + bytes([k]))
        assert receiver.read_message(message) == payload + bytes([k])
        wire.append(message)
    return wire


def with_psks(patterns: list[str]) -> list[str]:
    names = []
    for p in patterns:
        last = len(PATTERNS[p].messages)
        names += [f"Noise_{p}_{SUITE}", f"Noise_{p}psk0_{SUITE}", f"Noise_{p}psk{last}_{SUITE}"]
        if last > 1:
            names.append(f"Noise_{p}psk0+psk{last}_{SUITE}")
    return names


# Fundamental patterns with psk0, the last pskN and both; deferred patterns as they are.
ALL_NAMES = with_psks(FUNDAMENTAL) + [f"Noise_{p}_{SUITE}" for p in DEFERRED]
ALL_NAMES += [
    f"Noise_{p}_{SUITE}"
    for p in ("XXpsk1+psk2", "IKpsk1", "KXpsk0+psk1+psk2", "Npsk0+psk1", "NK1psk0+psk2", "I1K1psk3", "X1X1psk1")
]
# Tampering re-reads a message per byte; it still takes only seconds for every name above.
TAMPER_NAMES = ALL_NAMES


# --- published vectors (cacophony, snow) ----------------------------------------------------


def load_vectors() -> list[Any]:
    params = []
    for path in sorted(VECTOR_DIR.glob("*.json")):
        source = path.name.split("-")[0]
        for n, vector in enumerate(json.loads(path.read_text())["vectors"]):
            params.append(pytest.param(vector, id=f"{source}-{n}-{vector['protocol_name']}"))
    return params


VECTORS = load_vectors()


def test_vectors_present_and_cover_every_fundamental_pattern() -> None:
    assert len(VECTORS) > 0
    names = {base_of(p.values[0]["protocol_name"]) for p in VECTORS}
    assert set(FUNDAMENTAL) <= names
    assert set(PATTERNS) <= names  # and the deferred ones too


def _endpoint(vector: dict[str, Any], side: str, initiator: bool) -> Handshake:
    def get(key: str) -> bytes | None:
        return bytes.fromhex(vector[side + key]) if side + key in vector else None

    return Handshake(
        vector["protocol_name"],
        initiator,
        prologue=get("prologue") or b"",
        static_key=get("static"),
        remote_static=get("remote_static"),
        psks=[bytes.fromhex(p) for p in vector.get(side + "psks", [])],
        ephemeral_key=get("ephemeral"),
    )


@pytest.mark.parametrize("vector", VECTORS)
def test_vector(vector: dict[str, Any]) -> None:
    name = vector["protocol_name"]
    init, resp = _endpoint(vector, "init_", True), _endpoint(vector, "resp_", False)
    handshake_len = messages_in(name)
    messages = [(bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in vector["messages"]]
    assert len(messages) > handshake_len
    for k, (payload, ciphertext) in enumerate(messages[:handshake_len]):
        sender, receiver = (init, resp) if k % 2 == 0 else (resp, init)
        assert sender.write_message(payload) == ciphertext
        assert receiver.read_message(ciphertext) == payload
    assert init.complete and resp.complete
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash.hex() == vector["handshake_hash"]
    i_send, i_recv = init.split()
    r_send, r_recv = resp.split()
    # After the handshake the vectors keep alternating direction; one-way traffic only flows forward.
    for k, (payload, ciphertext) in enumerate(messages[handshake_len:], start=handshake_len):
        send, recv = (i_send, r_recv) if k % 2 == 0 or is_one_way(name) else (r_send, i_recv)
        assert send.encrypt(payload) == ciphertext
        assert recv.decrypt(ciphertext) == payload


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_round_trip(name: str) -> None:
    init, resp, keys = make_pair(name, prologue=os.urandom(11))
    assert init.state is HandshakeState.WRITE and resp.state is HandshakeState.READ
    run_handshake(init, resp, payload=b"payload")
    assert init.complete and resp.complete
    assert init.state is resp.state is HandshakeState.COMPLETE
    assert init.handshake_hash == resp.handshake_hash and len(init.handshake_hash) == 64
    assert init.remote_static == keys["r_pub"]
    assert resp.remote_static == keys["i_pub"]

    i_send, i_recv = init.split()
    r_send, r_recv = resp.split()
    assert init.state is HandshakeState.SPLIT and init.complete
    assert init.handshake_hash == resp.handshake_hash  # still readable for channel binding
    directions = [(i_send, r_recv)] if is_one_way(name) else [(i_send, r_recv), (r_send, i_recv)]
    for send, recv in directions:
        for n in range(3):
            assert recv.decrypt(send.encrypt(b"m%d" % n, ad=b"ad"), ad=b"ad") == b"m%d" % n
        send.rekey()
        recv.rekey()
        assert recv.decrypt(send.encrypt(b"after rekey")) == b"after rekey"
        assert send.nonce == recv.nonce == 4
    if is_one_way(name):
        with pytest.raises(LocalProtocolError, match="never receives"):
            i_recv.decrypt(b"x" * 20)
        with pytest.raises(LocalProtocolError, match="never sends"):
            r_send.encrypt(b"x")


def test_keys_differ_per_direction_and_per_session() -> None:
    name = f"Noise_NN_{SUITE}"
    init, resp, _ = make_pair(name)
    run_handshake(init, resp)
    i_send, i_recv = init.split()
    r_send, r_recv = resp.split()
    assert i_send.encrypt(b"same") != r_send.encrypt(b"same")
    init2, resp2, _ = make_pair(name)
    run_handshake(init2, resp2)
    assert init.handshake_hash != init2.handshake_hash


def test_max_sized_payloads() -> None:
    init, resp, _ = make_pair(f"Noise_XX_{SUITE}")
    big0 = os.urandom(MAX_MESSAGE_LEN - 32)  # message 0 is e + a cleartext payload
    assert resp.read_message(init.write_message(big0)) == big0
    with pytest.raises(LocalProtocolError, match="exceeds"):
        resp.write_message(bytes(MAX_MESSAGE_LEN - 32 - 48 - 16 + 1))
    assert resp.state is HandshakeState.WRITE  # refused before touching any state
    big1 = os.urandom(MAX_MESSAGE_LEN - 32 - 48 - 16)
    message = resp.write_message(big1)
    assert len(message) == MAX_MESSAGE_LEN
    assert init.read_message(message) == big1
    run_rest = init.write_message(b"")
    resp.read_message(run_rest)
    send, _ = init.split()
    _, recv = resp.split()
    top = os.urandom(MAX_TRANSPORT_PAYLOAD)
    assert recv.decrypt(send.encrypt(top)) == top
    with pytest.raises(LocalProtocolError, match="chunk"):
        send.encrypt(bytes(MAX_TRANSPORT_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        recv.decrypt(bytes(MAX_MESSAGE_LEN + 1))


@pytest.mark.parametrize("junk", ["text", 5, None, [1, 2]])
def test_non_bytes_arguments_are_local_errors_that_change_nothing(junk: object) -> None:
    init, resp, _ = make_pair(f"Noise_NN_{SUITE}")
    with pytest.raises(LocalProtocolError, match="payload must be bytes-like"):
        init.write_message(junk)  # type: ignore[arg-type]
    assert init.state is HandshakeState.WRITE
    message = init.write_message(b"")
    with pytest.raises(LocalProtocolError, match="message must be bytes-like"):
        resp.read_message(junk)  # type: ignore[arg-type]
    assert resp.read_message(message) == b""
    cipher = CipherState(bytes(32))
    with pytest.raises(LocalProtocolError, match="must be bytes-like"):
        cipher.encrypt(junk)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="must be bytes-like"):
        cipher.decrypt(bytes(20), ad=junk)  # type: ignore[arg-type]
    assert cipher.nonce == 0


def test_read_message_rejects_oversized_input() -> None:
    init, resp, _ = make_pair(f"Noise_NN_{SUITE}")
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        resp.read_message(bytes(MAX_MESSAGE_LEN + 1))
    assert resp.state is HandshakeState.FAILED


def test_accepts_bytes_like_input() -> None:
    init, resp, _ = make_pair(f"Noise_NN_{SUITE}", prologue=bytearray(b"p"))  # type: ignore[arg-type]
    message = init.write_message(bytearray(b"hi"))  # type: ignore[arg-type]
    assert resp.read_message(memoryview(message)) == b"hi"  # type: ignore[arg-type]


# --- tampering ------------------------------------------------------------------------------


def mutations(message: bytes) -> list[bytes]:
    """Every byte flipped (bit k%8 of byte k, so byte 31 of a key loses the bit X25519 ignores),
    plus one byte cut, one byte added, and nothing at all."""
    out = [message[:k] + bytes([message[k] ^ (1 << (k % 8))]) + message[k + 1 :] for k in range(len(message))]
    return out + [message[:-1], message + b"\0", b""]


def cleartext_size(name: str, index: int) -> int:
    """Bytes of keys an unencrypted message carries before its payload."""
    return 32 * sum(t in ("e", "s") for t in PATTERNS[base_of(name)].messages[index])


@pytest.mark.parametrize("name", TAMPER_NAMES)
def test_tampered_handshake_message_is_detected(name: str) -> None:
    """Spec guarantee: every encrypted payload authenticates h, the hash of all the handshake
    so far. So a change to an authenticated message fails at once; a change to a message sent
    before any key exists (e.g. NN's first: an ephemeral and a cleartext payload) is accepted
    but diverges h, and the first authenticated message after it fails."""
    init, resp, _ = make_pair(name)
    keyed_from = first_keyed_message(name)
    total = messages_in(name)
    for index in range(total):
        sender, receiver = (init, resp) if index % 2 == 0 else (resp, init)
        message = sender.write_message(b"payload")
        for bad in mutations(message):
            s, r = copy.deepcopy(sender), copy.deepcopy(receiver)
            if index >= keyed_from or len(bad) < cleartext_size(name, index):
                with pytest.raises(RemoteProtocolError):
                    r.read_message(bad)
                assert r.state is HandshakeState.FAILED
                continue
            r.read_message(bad)  # nothing authenticates this one yet
            roles = [r, s]  # r now writes next
            for later in range(index + 1, total):
                writer, reader = roles[(later - index - 1) % 2], roles[(later - index) % 2]
                next_message = writer.write_message(b"")
                if later >= keyed_from:
                    with pytest.raises(RemoteProtocolError):
                        reader.read_message(next_message)
                    break
                reader.read_message(next_message)
            else:  # pragma: no cover - no pattern ends on an unauthenticated message
                raise AssertionError("tampering was never detected")
        receiver.read_message(message)


@pytest.mark.parametrize("name", [f"Noise_XX_{SUITE}", f"Noise_N_{SUITE}"])
def test_tampered_transport_message_is_detected(name: str) -> None:
    init, resp, _ = make_pair(name)
    run_handshake(init, resp)
    send, _ = init.split()
    _, recv = resp.split()
    message = send.encrypt(b"secret value", ad=b"header")
    for bad in mutations(message) + [message[:15]]:
        r = copy.deepcopy(recv)
        with pytest.raises(RemoteProtocolError):
            r.decrypt(bad, ad=b"header")
        with pytest.raises(LocalProtocolError, match="unusable"):  # dead after a failure
            r.decrypt(message, ad=b"header")
        with pytest.raises(LocalProtocolError, match="unusable"):
            r.rekey()
    for wrong_ad in (b"", b"headeR", b"header\0"):
        with pytest.raises(RemoteProtocolError):
            copy.deepcopy(recv).decrypt(message, ad=wrong_ad)
    assert recv.decrypt(message, ad=b"header") == b"secret value"
    with pytest.raises(RemoteProtocolError):  # a replay: the nonce has moved on
        copy.deepcopy(recv).decrypt(message, ad=b"header")


def test_reordered_transport_messages_fail() -> None:
    init, resp, _ = make_pair(f"Noise_NN_{SUITE}")
    run_handshake(init, resp)
    send, _ = init.split()
    _, recv = resp.split()
    first, second = send.encrypt(b"1"), send.encrypt(b"2")
    with pytest.raises(RemoteProtocolError):
        recv.decrypt(second)


def test_rekey_on_one_side_only_breaks_the_channel() -> None:
    init, resp, _ = make_pair(f"Noise_NN_{SUITE}")
    run_handshake(init, resp)
    send, _ = init.split()
    _, recv = resp.split()
    send.rekey()
    with pytest.raises(RemoteProtocolError):
        recv.decrypt(send.encrypt(b"x"))


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if "psk" in n])
def test_wrong_psk_fails_at_the_first_psk_message(name: str) -> None:
    init, resp, keys = make_pair(name)
    bad = list(keys["psks"])
    bad[0] = os.urandom(32)
    resp = Handshake(
        name, False, b"lab", static_key=keys["r_priv"], remote_static=resp.remote_static, psks=bad
    )
    fails_at = next(i for i, tokens in enumerate(tokens_with_psks(name)) if "psk" in tokens)
    for k in range(messages_in(name)):
        sender, receiver = (init, resp) if k % 2 == 0 else (resp, init)
        message = sender.write_message(b"")
        if k == fails_at:
            with pytest.raises(RemoteProtocolError):
                receiver.read_message(message)
            return
        receiver.read_message(message)
    raise AssertionError("wrong psk not detected")


def _pre_known() -> list[tuple[str, str]]:
    """(pattern, side given a wrong pre-message key) for every side that pre-knows a key."""
    cases = []
    for p in PATTERNS:
        name = f"Noise_{p}_{SUITE}"
        _, r_knows_i, _, i_knows_r = static_roles(name)
        cases += [(name, "initiator")] if i_knows_r else []
        cases += [(name, "responder")] if r_knows_i else []
    return cases


PRE_KNOWN = _pre_known()


@pytest.mark.parametrize(("name", "fooled"), PRE_KNOWN, ids=[f"{base_of(n)}-{s}" for n, s in PRE_KNOWN])
def test_wrong_pre_known_static_fails_the_handshake(name: str, fooled: str) -> None:
    """A pre-message key that is not the peer's real one is caught by a DH before the end."""
    _, _, keys = make_pair(name)
    i_has, r_knows_i, r_has, i_knows_r = static_roles(name)
    wrong = generate_keypair()[1]
    init = Handshake(
        name,
        True,
        static_key=keys["i_priv"],
        remote_static=(wrong if fooled == "initiator" else keys["r_pub"]) if i_knows_r else None,
    )
    resp = Handshake(
        name,
        False,
        static_key=keys["r_priv"],
        remote_static=(wrong if fooled == "responder" else keys["i_pub"]) if r_knows_i else None,
    )
    with pytest.raises(RemoteProtocolError):
        run_handshake(init, resp)


def test_different_prologues_fail() -> None:
    name = f"Noise_NN_{SUITE}"
    init = Handshake(name, True, prologue=b"a")
    resp = Handshake(name, False, prologue=b"b")
    resp.read_message(init.write_message())  # nothing authenticated yet
    with pytest.raises(RemoteProtocolError):
        init.read_message(resp.write_message())


# --- low-order points -----------------------------------------------------------------------

LOW_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ec" + "ff" * 30 + "7f"),
    bytes.fromhex("ed" + "ff" * 30 + "7f"),
    bytes.fromhex("ee" + "ff" * 30 + "7f"),
]
LOW_ORDER += [p[:31] + bytes([p[31] | 0x80]) for p in LOW_ORDER]  # X25519 ignores the top bit


@pytest.mark.parametrize("point", LOW_ORDER, ids=[p.hex()[:8] + p.hex()[-2:] for p in LOW_ORDER])
def test_low_order_points_are_rejected(point: bytes) -> None:
    # The responder of NN computes ee when it writes message 1.
    resp = Handshake(f"Noise_NN_{SUITE}", False)
    resp.read_message(point + b"payload")
    with pytest.raises(RemoteProtocolError, match="low-order"):
        resp.write_message()
    assert resp.state is HandshakeState.FAILED
    # The initiator of XX computes ee when it reads message 1.
    init, resp2, _ = make_pair(f"Noise_XX_{SUITE}")
    resp2.read_message(init.write_message())
    message = resp2.write_message()
    with pytest.raises(RemoteProtocolError, match="low-order"):
        init.read_message(point + message[32:])


def test_all_zero_dh_is_rejected_even_if_libsodium_allowed_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older libsodium returned zeros for low-order points instead of failing; we check too."""
    monkeypatch.setattr(noise, "crypto_scalarmult", lambda private, public: bytes(32))
    resp = Handshake(f"Noise_NN_{SUITE}", False)
    resp.read_message(generate_keypair()[1])
    with pytest.raises(RemoteProtocolError, match="low-order"):
        resp.write_message()


# --- hostile input and misuse (hypothesis) --------------------------------------------------

NAME_STRATEGY = st.sampled_from(ALL_NAMES)


@st.composite
def hostile_message(draw: st.DrawFn, honest: bytes) -> bytes:
    """Random bytes, or the honest message cut, extended or with some bytes changed."""
    kind = draw(st.sampled_from(["random", "cut", "edit", "extend"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "cut":
        return honest[: draw(st.integers(0, max(len(honest) - 1, 0)))]
    if kind == "extend":
        return honest + draw(st.binary(min_size=1, max_size=40))
    edited = bytearray(honest)
    changes = st.lists(st.tuples(st.integers(0, len(honest) - 1), st.integers(0, 255)), max_size=4)
    for pos, value in draw(changes):
        edited[pos] = value
    return bytes(edited)


@given(name=NAME_STRATEGY, step=st.integers(0, 5), data=st.data())
def test_hostile_bytes_only_raise_protocol_error(name: str, step: int, data: st.DataObject) -> None:
    init, resp, _ = make_pair(name)
    total = messages_in(name)
    step = min(step, total)
    for k in range(step):  # honest until `step`
        sender, receiver = (init, resp) if k % 2 == 0 else (resp, init)
        receiver.read_message(sender.write_message(b"x"))
    if step == total:
        for side in (init, resp):
            with pytest.raises(LocalProtocolError, match="read_message.*COMPLETE"):
                side.read_message(data.draw(st.binary(max_size=100)))
        return
    sender, receiver = (init, resp) if step % 2 == 0 else (resp, init)
    with pytest.raises(LocalProtocolError, match="read_message.*WRITE"):
        sender.read_message(data.draw(st.binary(max_size=100)))
    hostile = data.draw(hostile_message(copy.deepcopy(sender).write_message(b"payload")))
    try:
        payload = receiver.read_message(hostile)
    except ProtocolError:
        assert receiver.state is HandshakeState.FAILED
        with pytest.raises(LocalProtocolError, match="FAILED"):
            receiver.write_message(b"")
    else:
        assert isinstance(payload, bytes)


@given(data=st.binary(max_size=200), ad=st.binary(max_size=20))
def test_hostile_transport_bytes_only_raise_remote_error(data: bytes, ad: bytes) -> None:
    recv = CipherState(bytes(range(32)))
    with pytest.raises(RemoteProtocolError):
        recv.decrypt(data, ad)


OPS = st.lists(
    st.tuples(st.sampled_from(["init", "resp"]), st.sampled_from(["write", "read", "split", "hash"])),
    max_size=14,
)
CALL_NAMES = {"write": "write_message", "read": "read_message", "split": "split", "hash": "handshake_hash"}


@given(name=NAME_STRATEGY, ops=OPS)
def test_calls_out_of_turn_raise_local_error_and_change_nothing(
    name: str, ops: list[tuple[str, str]]
) -> None:
    """A model of whose turn it is, from the spec alone, against the implementation."""
    init, resp, _ = make_pair(name)
    sides = {"init": init, "resp": resp}
    done = {"init": 0, "resp": 0}  # messages each side has processed
    wire: list[bytes] = []
    split: set[str] = set()
    total = messages_in(name)
    for who, op in ops:
        side, mine = sides[who], done[who]
        my_turn_to_write = mine < total and (mine % 2 == 0) == (who == "init")
        complete = mine == total
        legal = {
            "write": my_turn_to_write,
            "read": mine < total and not my_turn_to_write,
            "split": complete and who not in split,
            "hash": complete,
        }[op]
        if op == "read" and legal and len(wire) <= mine:
            continue  # the peer has not written it yet; feeding junk would end the handshake
        expected = (
            HandshakeState.WRITE if my_turn_to_write
            else HandshakeState.READ if mine < total
            else HandshakeState.SPLIT if who in split
            else HandshakeState.COMPLETE
        )  # fmt: skip
        before = side.state
        assert before is expected
        if not legal:
            call = CALL_NAMES[op]
            with pytest.raises(LocalProtocolError, match=rf"{call}\(\) not allowed in state {before.name}"):
                if op == "write":
                    side.write_message(b"")
                elif op == "read":
                    side.read_message(b"\0" * 100)
                elif op == "split":
                    side.split()
                else:
                    side.handshake_hash  # noqa: B018
            assert side.state is before
        elif op == "write":
            wire.append(side.write_message(b"w"))
            done[who] += 1
        elif op == "read":
            assert side.read_message(wire[mine]) == b"w"
            done[who] += 1
        elif op == "split":
            side.split()
            split.add(who)
        else:
            assert len(side.handshake_hash) == 64
    # Whatever happened, the handshake can still be finished honestly.
    for k in range(total):
        writer, reader = ("init", "resp") if k % 2 == 0 else ("resp", "init")
        if len(wire) == k:
            wire.append(sides[writer].write_message(b"w"))
            done[writer] += 1
        if done[reader] == k:
            sides[reader].read_message(wire[k])
            done[reader] += 1
    assert init.handshake_hash == resp.handshake_hash


# --- construction and API misuse ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Noise",
        "noise_XX_25519_ChaChaPoly_BLAKE2b",
        "Noise_XX_448_ChaChaPoly_BLAKE2b",
        "Noise_XX_25519_AESGCM_BLAKE2b",
        "Noise_XX_25519_ChaChaPoly_SHA256",
        "Noise_XX_25519_ChaChaPoly_BLAKE2s",
        "Noise_XX_25519_ChaChaPoly_BLAKE2b_",
        "Noise_QQ_25519_ChaChaPoly_BLAKE2b",
        "Noise_xx_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXfallback_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk4_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk01_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk0+psk0_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk2+psk0_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk0+_25519_ChaChaPoly_BLAKE2b",
        "Noise_Npsk2_25519_ChaChaPoly_BLAKE2b",
        "Noise_XX\u0661_25519_ChaChaPoly_BLAKE2b",
        "Noise_XXpsk\u0661_25519_ChaChaPoly_BLAKE2b",
    ],
)
def test_unsupported_protocol_names(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        Handshake(name, True, static_key=bytes(32), psks=[bytes(32)])


def test_protocol_name_must_be_str() -> None:
    with pytest.raises(LocalProtocolError):
        Handshake(b"Noise_NN_25519_ChaChaPoly_BLAKE2b", True)  # type: ignore[arg-type]


def test_missing_and_surplus_keys() -> None:
    priv, pub = generate_keypair()
    xx, ik, nn = (f"Noise_{p}_{SUITE}" for p in ("XX", "IK", "NN"))
    with pytest.raises(LocalProtocolError, match="needs static_key"):
        Handshake(xx, True)
    with pytest.raises(LocalProtocolError, match="needs static_key"):
        Handshake(xx, False)
    with pytest.raises(LocalProtocolError, match="needs remote_static"):
        Handshake(ik, True, static_key=priv)
    with pytest.raises(LocalProtocolError, match="remote_static after the handshake"):
        Handshake(xx, True, static_key=priv, remote_static=pub)  # not a pinning mechanism
    with pytest.raises(LocalProtocolError, match="uses no static_key"):
        Handshake(nn, True, static_key=priv)
    for bad in (b"", bytes(31), bytes(33), "x" * 32):
        with pytest.raises(LocalProtocolError, match="static_key"):
            Handshake(xx, True, static_key=bad)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError, match="remote_static"):
            Handshake(ik, True, static_key=priv, remote_static=bad)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError, match="ephemeral_key"):
            Handshake(nn, True, ephemeral_key=bad)  # type: ignore[arg-type]
    Handshake(xx, True, static_key=bytearray(priv))  # bytes-like is fine  # type: ignore[arg-type]


def test_psk_count_and_size() -> None:
    name = f"Noise_NNpsk0+psk2_{SUITE}"
    with pytest.raises(LocalProtocolError, match="takes 2 psks, got 0"):
        Handshake(name, True)
    with pytest.raises(LocalProtocolError, match="takes 2 psks, got 1"):
        Handshake(name, True, psks=[bytes(32)])
    with pytest.raises(LocalProtocolError, match="psk must be 32 bytes"):
        Handshake(name, True, psks=[bytes(32), bytes(16)])
    with pytest.raises(LocalProtocolError, match="takes 0 psks"):
        Handshake(f"Noise_NN_{SUITE}", True, psks=[bytes(32)])


def test_handshake_hash_and_split_only_when_complete() -> None:
    init, resp, _ = make_pair(f"Noise_NN_{SUITE}")
    with pytest.raises(LocalProtocolError, match=r"handshake_hash\(\) not allowed in state WRITE"):
        init.handshake_hash  # noqa: B018
    with pytest.raises(LocalProtocolError, match=r"split\(\) not allowed in state READ"):
        resp.split()
    run_handshake(init, resp)
    init.split()
    with pytest.raises(LocalProtocolError, match=r"split\(\) not allowed in state SPLIT"):
        init.split()  # a second pair of ciphers would reuse nonces
    with pytest.raises(LocalProtocolError, match=r"write_message\(\) not allowed in state SPLIT"):
        init.write_message(b"")


def test_failed_handshake_is_dead() -> None:
    init, resp, _ = make_pair(f"Noise_NK_{SUITE}")
    message = init.write_message(b"x")
    with pytest.raises(RemoteProtocolError):
        resp.read_message(message[:-1] + bytes([message[-1] ^ 1]))
    for call in (lambda: resp.read_message(message), lambda: resp.write_message(b""), resp.split):
        with pytest.raises(LocalProtocolError, match="FAILED"):
            call()
    assert not resp.complete
    with pytest.raises(RemoteProtocolError, match="truncated"):
        Handshake(f"Noise_NN_{SUITE}", False).read_message(bytes(31))


def test_remote_static_is_known_when_the_pattern_says() -> None:
    init, resp, keys = make_pair(f"Noise_XX_{SUITE}")
    assert init.remote_static is None
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    assert init.remote_static == keys["r_pub"] and resp.remote_static is None
    resp.read_message(init.write_message())
    assert resp.remote_static == keys["i_pub"]
    ik_init, _, ik_keys = make_pair(f"Noise_IK_{SUITE}")
    assert ik_init.remote_static == ik_keys["r_pub"]  # pre-message


# --- CipherState ----------------------------------------------------------------------------


def test_nonce_exhaustion() -> None:
    send, recv = CipherState(bytes(32)), CipherState(bytes(32))
    send._n = recv._n = noise.MAX_NONCE - 1  # reaching it honestly takes 2^64 messages
    assert recv.decrypt(send.encrypt(b"last")) == b"last"
    with pytest.raises(LocalProtocolError, match="exhausted"):
        send.encrypt(b"one too many")
    with pytest.raises(RemoteProtocolError, match="nonce space"):
        recv.decrypt(bytes(32))


def test_rekey_matches_the_spec_definition() -> None:
    key = bytes(range(32))
    cipher = CipherState(key)
    cipher.encrypt(b"a")
    cipher.rekey()
    nonce = b"\0" * 4 + (2**64 - 1).to_bytes(8, "little")
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

    expected = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(32), b"", nonce, key)[:32]
    assert cipher._k == expected and cipher.nonce == 1  # rekey keeps n


def test_cipher_state_validation_and_repr() -> None:
    with pytest.raises(LocalProtocolError):
        CipherState(bytes(16))
    cipher = CipherState(b"k" * 32)
    assert "6b6b" not in repr(cipher) and "kkkk" not in repr(cipher)
    with pytest.raises(RemoteProtocolError, match="shorter than its tag"):
        cipher.decrypt(b"")


# --- primitives -----------------------------------------------------------------------------


@pytest.mark.parametrize("key_len", [0, 32, 64, 127, 128, 129, 300])
def test_hmac_blake2b_matches_stdlib(key_len: int) -> None:
    key, data = os.urandom(key_len), os.urandom(77)
    assert noise._hmac(key, data) == hmac.new(key, data, hashlib.blake2b).digest()


def test_hkdf_matches_its_definition() -> None:
    ck, ikm = os.urandom(64), os.urandom(32)

    def mac(k: bytes, d: bytes) -> bytes:
        return hmac.new(k, d, hashlib.blake2b).digest()

    temp = mac(ck, ikm)
    o1 = mac(temp, b"\x01")
    o2 = mac(temp, o1 + b"\x02")
    o3 = mac(temp, o2 + b"\x03")
    assert noise._hkdf(ck, ikm, 2) == (o1, o2)
    assert noise._hkdf(ck, ikm, 3) == (o1, o2, o3)


def test_keypairs() -> None:
    priv, pub = generate_keypair()
    assert len(priv) == len(pub) == 32 and public_key(priv) == pub
    assert generate_keypair() != generate_keypair()
    with pytest.raises(LocalProtocolError):
        public_key(bytes(31))


def test_patterns_table_is_complete() -> None:
    assert len(PATTERNS) == 38  # 3 one-way + 12 interactive + 23 deferred (spec §7.4-7.6)
    assert PATTERNS["XX"].messages == (("e",), ("e", "ee", "s", "es"), ("s", "se"))
    assert PATTERNS["IK"].responder_pre == ("s",) and PATTERNS["IK"].initiator_pre == ()
    assert all(p.one_way == (len(p.name) == 1) for p in PATTERNS.values())
