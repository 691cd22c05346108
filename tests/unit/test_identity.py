"""common.identity: key files, CA, certificates, revocation, join tokens."""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common import identity
from lab.common.errors import AuthError, ConfigError, LocalProtocolError, ProtocolError, RemoteProtocolError
from lab.common.identity import (
    CLOCK_SKEW,
    Certificate,
    CertificateAuthority,
    NodeKey,
    RevocationList,
    verify_certificate,
)

# Module-level so that hypothesis tests (which cannot use function fixtures) share them.
CA = CertificateAuthority.generate()
OTHER_CA = CertificateAuthority.generate()
NODE = NodeKey.generate()
NOW = 1_700_000_000
DAY = 86400


def issue(**kw: Any) -> Certificate:
    args: dict[str, Any] = dict(name="web-01.example.org", node_id="node-1", noise_pub=NODE.public_key,
                                roles=["agent"], lifetime=30 * DAY, now=NOW)
    args.update(kw)
    return CA.issue(**args)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# Fingerprints and key files


def test_fingerprint() -> None:
    fp = identity.fingerprint(CA.public_key)
    assert re.fullmatch(r"[a-z2-7]{52}", fp) and fp == CA.fingerprint
    assert fp != identity.fingerprint(OTHER_CA.public_key)
    assert identity.matches_fingerprint(CA.public_key, fp)
    assert not identity.matches_fingerprint(OTHER_CA.public_key, fp)
    assert not identity.matches_fingerprint(b"short", fp)


def test_node_key_save_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_chmod(*a: Any, **k: Any) -> None:
        raise AssertionError("key files are created 0600, never chmod-ed afterwards")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    path = tmp_path / "node.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        NODE.save(path)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temp file left behind
    assert path.read_text().startswith("lab-node-key-v1 ")
    with NodeKey.load(path) as loaded:
        assert loaded.public_key == NODE.public_key
        assert loaded.private_bytes() == NODE.private_bytes()
        with loaded.private_view() as v:
            assert v.readonly and len(v) == 32
        assert loaded._private.locked or loaded._private.dontdump  # held in secure memory
    assert loaded._private.closed
    assert NODE.private_bytes().hex() not in repr(NODE) and NODE.fingerprint in repr(NODE)


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NODE.save(path)
    other = NodeKey.generate()
    with pytest.raises(ConfigError, match="already exists") as exc:
        other.save(path)
    assert str(path) in str(exc.value)
    assert NodeKey.load(path).public_key == NODE.public_key
    other.save(path, overwrite=True)
    assert NodeKey.load(path).public_key == other.public_key and mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_load_or_generate(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = NodeKey.load_or_generate(path)
    assert NodeKey.load_or_generate(path).public_key == first.public_key


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_readable_key_file(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "node.key"
    NODE.save(path)
    path.chmod(bad_mode)
    with pytest.raises(ConfigError) as exc:
        NodeKey.load(path)
    text = str(exc.value)
    assert str(path) in text and f"{bad_mode:04o}" in text and f"chmod 600 {path}" in text


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"lab-ca-key-v1 " + b"A" * 43 + b"=\n", "not a lab-node-key-v1 file"),
        (b"lab-node-key-v1 !!!notbase64\n", "not valid base64"),
        (b"lab-node-key-v1 AAAA\n", "must be 32 bytes"),
        (b"", "not a lab-node-key-v1 file"),
        (b"x" * 300, "larger than 256"),
    ],
)
def test_refuses_bad_key_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "node.key"
    identity.write_private_file(path, content)
    with pytest.raises(ConfigError, match=reason):
        NodeKey.load(path)


def test_refuses_missing_and_symlinked_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        NodeKey.load(tmp_path / "absent.key")
    NODE.save(tmp_path / "real.key")
    (tmp_path / "link.key").symlink_to(tmp_path / "real.key")
    with pytest.raises(ConfigError, match="cannot open"):
        NodeKey.load(tmp_path / "link.key")
    with pytest.raises(ConfigError, match="not a regular file"):
        identity.read_private_file(tmp_path)


def test_ca_key_file(tmp_path: Path) -> None:
    path = tmp_path / "ca.key"
    CA.save(path)
    assert mode(path) == 0o600
    with CertificateAuthority.load(path) as loaded:
        assert loaded.public_key == CA.public_key
        cert = loaded.issue("n", "id", NODE.public_key, [], DAY, NOW)
        assert verify_certificate(cert, CA.public_key, NOW, None) == cert
    with pytest.raises(ConfigError, match="not a lab-node-key-v1"):
        NodeKey.load(path)  # a CA key is not a node key
    assert CA.fingerprint in repr(CA)


# ---------------------------------------------------------------------------------------------
# Certificates

names = st.from_regex(identity.NAME_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 253)
node_ids = st.from_regex(identity.NODE_ID_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 64)
roles = st.lists(st.from_regex(identity.ROLE_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 32), max_size=16, unique=True)


@given(names, node_ids, st.binary(min_size=32, max_size=32), roles, st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 2**63 - 1))
def test_certificate_round_trip(name: str, node_id: str, key: bytes, rs: list[str], now: int, life: int, serial: int) -> None:
    cert = CA.issue(name, node_id, key, rs, life, now, serial=serial)
    data = cert.encode()
    assert Certificate.decode_untrusted(data) == cert
    assert verify_certificate(data, CA.public_key, now, None, key) == cert
    assert cert.roles == tuple(rs) and cert.not_after == now + life


def test_certificate_fields() -> None:
    cert = issue(roles=["agent", "secret-store"])
    assert (cert.v, cert.name, cert.node_id, cert.noise_pub) == (1, "web-01.example.org", "node-1", NODE.public_key)
    assert cert.not_before == NOW and cert.not_after == NOW + 30 * DAY and 1 <= cert.serial < 2**63
    assert "signature" not in repr(cert)
    body = msgpack.unpackb(msgpack.unpackb(cert.encode())[0])
    assert list(body) == ["v", "serial", "node_id", "name", "noise_pub", "roles", "not_before", "not_after"]


def test_verify_accepts_within_skew() -> None:
    cert = issue()
    for now in (NOW - CLOCK_SKEW, NOW, cert.not_after, cert.not_after + CLOCK_SKEW):
        verify_certificate(cert, CA.public_key, now, None, NODE.public_key)


def _tamper_body(cert: Certificate, **changes: Any) -> bytes:
    body, sig = msgpack.unpackb(cert.encode())
    fields = msgpack.unpackb(body)
    fields.update(changes)
    return msgpack.packb([msgpack.packb(fields), sig])


def _flip_sig(cert: Certificate) -> bytes:
    body, sig = msgpack.unpackb(cert.encode())
    return msgpack.packb([body, bytes([sig[0] ^ 1]) + sig[1:]])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired at"),
        ("not_yet_valid", "not valid before"),
        ("wrong_ca", "not signed by this cluster CA"),
        ("tampered_signature", "not signed by this cluster CA"),
        ("tampered_body", "not signed by this cluster CA"),
        ("revoked_serial", "serial .* is revoked"),
        ("revoked_key", "key .* is revoked"),
        ("key_mismatch", "handshake key differs"),
        ("crl_from_other_ca", "revocation list v1 is not signed"),
    ],
)
def test_verify_rejections(case: str, reason: str) -> None:
    cert = issue()
    target: Certificate | bytes = cert
    ca_pub, now, crl, peer = CA.public_key, NOW + DAY, None, NODE.public_key
    if case == "expired":
        now = cert.not_after + CLOCK_SKEW + 1
    elif case == "not_yet_valid":
        now = cert.not_before - CLOCK_SKEW - 1
    elif case == "wrong_ca":
        ca_pub = OTHER_CA.public_key
    elif case == "tampered_signature":
        target = _flip_sig(cert)
    elif case == "tampered_body":
        target = _tamper_body(cert, roles=["agent", "lab-server"])
    elif case == "revoked_serial":
        crl = CA.revocation_list(1, NOW, serials=[cert.serial])
    elif case == "revoked_key":
        # An earlier certificate for the same key was revoked: the new one is refused as well.
        crl = CA.revocation_list(1, NOW, keys=[NODE.public_key])
        target = issue(serial=cert.serial + 1 if cert.serial < 2**62 else 1)
    elif case == "key_mismatch":
        peer = NodeKey.generate().public_key
    elif case == "crl_from_other_ca":
        crl = OTHER_CA.revocation_list(1, NOW)
    with pytest.raises(AuthError, match=reason):
        verify_certificate(target, ca_pub, now, crl, peer)


def test_verify_passes_unrelated_revocations() -> None:
    cert = issue()
    crl = CA.revocation_list(4, NOW, serials=[cert.serial ^ 1 or 1], keys=[bytes(32)])
    assert verify_certificate(cert.encode(), CA.public_key, NOW, crl, NODE.public_key) == cert


def _cert_body(**changes: Any) -> dict[str, Any]:
    body = dict(v=1, serial=5, node_id="n1", name="host", noise_pub=bytes(32), roles=["agent"], not_before=0, not_after=10)
    body.update(changes)
    return body


def _signed_blob(body: Any, sig: bytes = bytes(64)) -> bytes:
    return msgpack.packb([msgpack.packb(body, use_bin_type=True), sig], use_bin_type=True)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (_signed_blob(_cert_body(extra=1)), "unexpected \\['extra'\\]"),
        (_signed_blob({k: v for k, v in _cert_body().items() if k != "roles"}), "missing \\['roles'\\]"),
        (_signed_blob(_cert_body(signature=b"x")), "unexpected key 'signature'"),
        (_signed_blob(_cert_body(serial=True)), "expected int, got bool"),
        (_signed_blob(_cert_body(serial=0)), "outside 1"),
        (_signed_blob(_cert_body(serial=2**63)), "outside 1"),
        (_signed_blob(_cert_body(v=2)), "v: 2 outside 1..1"),
        (_signed_blob(_cert_body(name="a" * 254)), "length 254"),
        (_signed_blob(_cert_body(name="bad name")), "does not match"),
        (_signed_blob(_cert_body(roles=[f"r{i}" for i in range(17)])), "17 items"),
        (_signed_blob(_cert_body(roles=["agent", "agent"])), "duplicate"),
        (_signed_blob(_cert_body(roles=["x" * 33])), "length 33"),
        (_signed_blob(_cert_body(noise_pub=bytes(31))), "length 31"),
        (_signed_blob(_cert_body(noise_pub="k" * 32)), "expected bytes"),
        (_signed_blob(_cert_body(not_before=11)), "not_before is after not_after"),
        (_signed_blob(dict(reversed(list(_cert_body().items())))), "canonical"),
        (_signed_blob(_cert_body(), sig=bytes(63)), "signature must be 64"),
        (_signed_blob([1, 2]), "body must be a map"),
        (msgpack.packb([b"x"]), "two byte strings"),
        (msgpack.packb({"a": 1}), "two byte strings"),
        (b"\x92\xc4\x01", "malformed msgpack"),
        (b"\x00" * 5000, "exceeds 4096"),
    ],
)
def test_certificate_decode_rejections(blob: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        Certificate.decode_untrusted(blob)


def test_issue_validates() -> None:
    with pytest.raises(LocalProtocolError, match="noise_pub"):
        issue(noise_pub=b"short")
    with pytest.raises(LocalProtocolError, match="roles"):
        issue(roles=["UPPER"])
    with pytest.raises(LocalProtocolError, match="not_before is after"):
        issue(lifetime=-1)


# ---------------------------------------------------------------------------------------------
# Revocation lists


def test_revocation_list_round_trip_and_replace() -> None:
    c1, c2 = issue(serial=10), issue(serial=3, noise_pub=bytes(range(32)))
    crl1 = CA.revoke(None, [c1], NOW)
    assert crl1.version == 1 and crl1.serials == (10,) and crl1.keys == (NODE.public_key,)
    crl2 = CA.revoke(crl1, [c2], NOW + 1)
    assert crl2.version == 2 and crl2.serials == (3, 10) and set(crl2.keys) == {NODE.public_key, bytes(range(32))}
    decoded = RevocationList.decode_untrusted(crl2.encode())
    assert decoded == crl2
    decoded.verify(CA.public_key)
    decoded.verify(CA.public_key)  # cached
    assert crl2.replaces(crl1) and crl2.replaces(None)
    assert not crl1.replaces(crl2) and not crl2.replaces(decoded)
    assert decoded.revoked_reason(c2) == "serial 3 is revoked"
    assert "signature" not in repr(crl2)


@given(st.lists(st.integers(1, 2**63 - 1), max_size=20), st.lists(st.binary(min_size=32, max_size=32), max_size=20), st.integers(0, 2**63 - 1))
def test_revocation_list_hypothesis_round_trip(serials: list[int], keys: list[bytes], version: int) -> None:
    crl = CA.revocation_list(version, NOW, serials, keys)
    assert RevocationList.decode_untrusted(crl.encode()) == crl


def test_revocation_list_rejections() -> None:
    crl = CA.revocation_list(2, NOW, serials=[1, 2])
    body, sig = msgpack.unpackb(crl.encode())
    fields = msgpack.unpackb(body)
    unsorted = dict(fields, serials=[2, 1])
    with pytest.raises(RemoteProtocolError, match="strictly ascending"):
        RevocationList.decode_untrusted(_signed_blob(unsorted, sig))
    with pytest.raises(RemoteProtocolError, match="strictly ascending"):
        RevocationList.decode_untrusted(_signed_blob(dict(fields, keys=[bytes(32), bytes(32)]), sig))
    tampered = _signed_blob(dict(fields, serials=[1]), sig)
    with pytest.raises(AuthError, match="not signed"):
        RevocationList.decode_untrusted(tampered).verify(CA.public_key)
    with pytest.raises(AuthError, match="not signed"):
        crl.verify(OTHER_CA.public_key)


# ---------------------------------------------------------------------------------------------
# Join tokens


def test_token_mint_parse_compare() -> None:
    text, stored = identity.mint_token(CA.fingerprint)
    assert re.fullmatch(rf"lab1\.{CA.fingerprint}\.[a-z2-7]{{52}}", text)
    token = identity.parse_token_untrusted(f"  {text}\n")
    assert token.fingerprint == CA.fingerprint and len(token.secret) == 32
    assert token.reveal() == text and identity.hash_token_secret(token.secret) == stored
    assert token.secret.hex() not in repr(token) and text.split(".")[2] not in repr(token)
    assert identity.token_matches(text, stored) and identity.token_matches(token, stored)
    other, other_hash = identity.mint_token(CA.fingerprint)
    assert not identity.token_matches(other, stored)
    assert identity.verify_token(text, stored, CA.fingerprint) == token
    with pytest.raises(AuthError, match="not valid"):
        identity.verify_token(other, stored)
    with pytest.raises(AuthError, match="another cluster"):
        identity.verify_token(text, stored, OTHER_CA.fingerprint)
    assert text != other and stored != other_hash
    with pytest.raises(LocalProtocolError):
        identity.mint_token("not-a-fingerprint")


FP = identity.fingerprint(bytes(32))
SECRET = identity.b32(bytes(range(32)))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"lab2.{FP}.{SECRET}", "unsupported token version 'lab2'"),
        (f"xyz.{FP}.{SECRET}", "must start with 'lab1.'"),
        ("", "must start with 'lab1.'"),
        (f"lab1.{FP}", "3 dot-separated parts, got 2"),
        (f"lab1.{FP}.{SECRET}.x", "got 4"),
        (f"lab1.{FP[:-1]}.{SECRET}", "fingerprint must be 52 characters, got 51"),
        (f"lab1.{FP.upper()}.{SECRET}", "fingerprint is not lowercase base32"),
        (f"lab1.{FP}.{SECRET[:-1]}1", "secret is not lowercase base32"),
        (f"lab1.{FP}.{SECRET[:-1]}z", "secret is not canonical"),
        (f"lab1.{FP}.{SECRET}aaaa", "secret must be 52"),
        ("lab1." + "a" * 300, "too long"),
    ],
)
def test_token_parse_errors(text: str, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        identity.parse_token_untrusted(text)


# ---------------------------------------------------------------------------------------------
# Fuzzing: only ProtocolError may escape the decoders

VALID_BLOBS = [issue().encode(), CA.revocation_list(1, NOW, [1, 2], [bytes(32)]).encode()]


def _decode_all(data: bytes) -> None:
    for fn in (Certificate.decode_untrusted, RevocationList.decode_untrusted):
        try:
            fn(data)
        except ProtocolError:
            pass


@given(st.binary(max_size=400))
def test_random_bytes_only_protocol_errors(data: bytes) -> None:
    _decode_all(data)


@given(st.sampled_from(VALID_BLOBS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4), st.integers(0, 10**6))
def test_mutated_blobs_only_protocol_errors(blob: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(blob)
    for pos, value in edits:
        data[pos % len(data)] = value
    _decode_all(bytes(data))
    _decode_all(bytes(data[: cut % (len(data) + 1)]))


@given(st.text(max_size=150))
def test_random_tokens_only_protocol_errors(text: str) -> None:
    try:
        identity.parse_token_untrusted(text)
    except ProtocolError:
        pass


def test_certificate_is_immutable() -> None:
    cert = issue()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cert.name = "other"  # type: ignore[misc]
