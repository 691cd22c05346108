"""common.wire: framing, chunking, message schemas, strict decoding."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.common import wire
from lab.common.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

# ---------------------------------------------------------------------------------------------
# Strategies derived from the specs, so every registered message type gets a round trip.

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)


def data_strategy(map_only: bool) -> st.SearchStrategy[Any]:
    nested = st.recursive(
        _json_leaf,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
        max_leaves=8,
    )
    return st.dictionaries(st.text(max_size=8), nested, max_size=4) if map_only else nested


def spec_strategy(spec: wire.Spec) -> st.SearchStrategy[Any]:
    if isinstance(spec, wire.Int):
        return st.integers(spec.min, spec.max)
    if isinstance(spec, wire.Bool):
        return st.booleans()
    if isinstance(spec, wire.Float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(spec, wire.Str):
        lo, hi = spec.min_len, spec.max_len
        if spec.pattern is not None:
            return st.from_regex(spec.pattern, fullmatch=True).filter(lambda s: lo <= len(s) <= hi)
        return st.text(min_size=lo, max_size=min(hi, 40))
    if isinstance(spec, wire.Bytes):
        return st.binary(min_size=spec.min_len, max_size=min(spec.max_len, 64))
    if isinstance(spec, wire.Optional):
        return st.none() | spec_strategy(spec.inner)
    if isinstance(spec, wire.List):
        return st.lists(
            spec_strategy(spec.item), min_size=spec.min_items, max_size=min(spec.max_items, 5), unique=spec.unique
        ).map(tuple)
    if isinstance(spec, wire.Dict):
        return st.dictionaries(spec_strategy(spec.key), spec_strategy(spec.value), max_size=min(spec.max_items, 5))
    if isinstance(spec, wire.Struct):
        return record_strategy(spec.cls)
    if isinstance(spec, wire.Data):
        return data_strategy(spec.map_only)
    raise NotImplementedError(type(spec))


_OVERRIDES: dict[type, st.SearchStrategy[Any]] = {}


def record_strategy(cls: type[wire.Record]) -> st.SearchStrategy[Any]:
    if cls in _OVERRIDES:
        return _OVERRIDES[cls]

    def build(**kw: Any) -> Any:
        try:
            return cls(**kw)
        except LocalProtocolError:  # a cross-field rule (Record._check) said no
            return None

    fields = {name: spec_strategy(spec) for name, spec in cls.__wire_fields__}
    return st.builds(build, **fields).filter(lambda x: x is not None)


_OVERRIDES[wire.Response] = st.one_of(
    st.builds(wire.Response.success, st.integers(0, 2**63 - 1), data_strategy(True)),
    st.builds(wire.Response.failure, st.integers(0, 2**63 - 1), st.from_regex(wire.ERROR_CODE_PATTERN, fullmatch=True).filter(lambda s: len(s) <= 64), st.text(max_size=50)),
)

# A message type using every kind of spec, in its own registry.
TEST_REGISTRY = wire.Registry()


@wire.record
@dataclasses.dataclass(frozen=True)
class Point(wire.Record):
    x: Annotated[int, wire.Int(-100, 100)]
    label: Annotated[str | None, wire.Optional(wire.Str(max_len=8))]


@wire.message("test.everything", registry=TEST_REGISTRY)
@dataclasses.dataclass(frozen=True)
class Everything(wire.Message):
    n: Annotated[int, wire.UInt(1000)]
    flag: Annotated[bool, wire.Bool()]
    ratio: Annotated[float, wire.Float()]
    blob: Annotated[bytes, wire.Bytes(max_len=16, min_len=1)]
    names: Annotated[tuple[str, ...], wire.List(wire.Str(max_len=10), max_items=4, unique=True)]
    points: Annotated[tuple[Point, ...], wire.List(wire.Struct(Point), max_items=3)]
    versions: Annotated[dict[str, int], wire.Dict(wire.Str(max_len=20), wire.UInt(), max_items=5)]
    where: Annotated[Point | None, wire.Optional(wire.Struct(Point))]
    extra: Annotated[Any, wire.Data(max_depth=3, max_items=20)]


ALL_TYPES = [*wire.REGISTRY.classes(), Everything]


def decode_any(data: bytes) -> wire.Message:
    try:
        return wire.decode_untrusted(data)
    except RemoteProtocolError:
        return TEST_REGISTRY.decode_untrusted(data)


any_message = st.one_of([record_strategy(c) for c in ALL_TYPES])

# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.TAG)
def test_round_trip_every_message_type(cls: type[wire.Message]) -> None:
    registry = TEST_REGISTRY if cls is Everything else wire.REGISTRY

    @given(record_strategy(cls))
    def round_trip(msg: wire.Message) -> None:
        encoded = wire.encode(msg)
        assert registry.decode_untrusted(encoded) == msg
        assert msgpack.unpackb(encoded)["t"] == cls.TAG  # the tag is on the wire

    round_trip()


def test_envelope_types_are_registered() -> None:
    for tag in ("rpc.request", "rpc.response", "rpc.stream_item", "rpc.stream_end", "rpc.cancel", "rpc.error"):
        assert tag in wire.REGISTRY


def test_construction_normalizes_and_validates() -> None:
    e = Everything(n=1, flag=True, ratio=0.5, blob=bytearray(b"x"), names=["a"], points=[Point(1, None)],
                   versions={}, where=None, extra=None)
    assert e.names == ("a",) and type(e.blob) is bytes and e.points == (Point(1, None),)
    with pytest.raises(LocalProtocolError, match="expected int"):
        wire.Request(id=True, method="a", body={})
    with pytest.raises(LocalProtocolError, match="does not match"):
        wire.Request(id=1, method="Bad Method", body={})
    with pytest.raises(LocalProtocolError, match="tuple not allowed"):
        wire.Request(id=1, method="a", body={"x": (1, 2)})
    with pytest.raises(LocalProtocolError, match="ok response"):
        wire.Response(id=1, ok=True, body=None, error=wire.ErrorInfo("x", "y"))
    with pytest.raises(LocalProtocolError, match="non-finite"):
        wire.Request(id=1, method="a", body={"x": float("nan")})


def test_schema_declaration_errors() -> None:
    reg = wire.Registry()
    @wire.message("test.clash", registry=reg)
    @dataclasses.dataclass(frozen=True)
    class One(wire.Message):
        id: Annotated[int, wire.UInt()]

    with pytest.raises(TypeError, match="already used"):
        @wire.message("test.clash", registry=reg)
        @dataclasses.dataclass(frozen=True)
        class Two(wire.Message):
            id: Annotated[int, wire.UInt()]
    with pytest.raises(TypeError, match="reserved"):
        @wire.message("test.reserved", registry=reg)
        @dataclasses.dataclass(frozen=True)
        class Reserved(wire.Message):
            t: Annotated[int, wire.UInt()]
    with pytest.raises(TypeError, match="bad message tag"):
        wire.message("Bad Tag")
    with pytest.raises(TypeError, match="frozen"):
        @wire.message("test.unfrozen", registry=reg)
        @dataclasses.dataclass
        class Unfrozen(wire.Message):
            id: Annotated[int, wire.UInt()]
    with pytest.raises(TypeError, match="Annotated"):
        @wire.message("test.nospec", registry=reg)
        @dataclasses.dataclass(frozen=True)
        class NoSpec(wire.Message):
            id: int
    with pytest.raises(LocalProtocolError):
        wire.encode(Point(1, None))  # type: ignore[arg-type]  # a record, not a message


# ---------------------------------------------------------------------------------------------
# Strict decoding: every rejection path


def raw(d: dict[str, Any]) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


REQ = {"t": "rpc.request", "id": 1, "method": "store.get", "body": {}}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (raw({**REQ, "t": "rpc.nope"}), "unknown message type"),
        (raw({k: v for k, v in REQ.items() if k != "t"}), "no type tag"),
        (raw({**REQ, "t": 7}), "no type tag"),
        (raw({**REQ, "extra": 1}), "unexpected \\['extra'\\]"),
        (raw({k: v for k, v in REQ.items() if k != "body"}), "missing \\['body'\\]"),
        (raw({**REQ, "id": True}), "expected int, got bool"),
        (raw({**REQ, "id": -1}), "outside"),
        (raw({**REQ, "id": 2**63}), "outside"),
        (raw({**REQ, "id": 1.0}), "expected int, got float"),
        (raw({**REQ, "method": b"store.get"}), "expected str, got bytes"),
        (raw({**REQ, "method": "m" * 129}), "length 129"),
        (raw({**REQ, "body": []}), "expected map"),
        (raw({**REQ, "body": {"a": {"b": {}}}}) , None),  # fine: depth 3
        (raw({**REQ, "body": {"k" * 257: 1}}), "key longer"),
        (raw({"t": "rpc.response", "id": 1, "ok": 1, "body": {}, "error": None}), "expected bool, got int"),
        (raw({"t": "rpc.response", "id": 1, "ok": True, "body": None, "error": None}), "ok response"),
        (raw({"t": "rpc.response", "id": 1, "ok": False, "body": None, "error": {"code": "x"}}), "missing \\['message'\\]"),
        (raw({"t": "rpc.stream_end", "id": 1, "error": "oops"}), "expected ErrorInfo"),
        (raw([1, 2]), "must be a map"),
        (raw(REQ) + b"\x00", "ExtraData"),
        (raw(REQ)[:-1], "incomplete"),
        (b"\xc1", "FormatError"),
        (b"\xd4\x01\x00", "max_ext_len"),
        (b"\x81\x01\x02", "not allowed for map key|MapKey|str or bytes"),
        (b"\x82\xa1t\x01\xa1t\x02", "duplicate map key"),
        (b"\x81\xa1t\xa2\xff\xfe", "UnicodeDecodeError|utf-8"),
        (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),
        (b"\x91" * 5000, "StackError"),
        (b"", "incomplete|Unpack"),
    ],
)
def test_decode_rejections(data: bytes, reason: str | None) -> None:
    if reason is None:
        assert wire.decode_untrusted(data)
        return
    with pytest.raises(RemoteProtocolError, match=reason):
        wire.decode_untrusted(data)


def test_body_depth_and_item_caps() -> None:
    deep: Any = {}
    cur = deep
    for _ in range(20):
        cur["x"] = {}
        cur = cur["x"]
    with pytest.raises(RemoteProtocolError, match="nested deeper"):
        wire.decode_untrusted(raw({**REQ, "body": deep}))
    with pytest.raises(RemoteProtocolError, match="more than 65536 items"):
        wire.decode_untrusted(raw({**REQ, "body": {"l": [0] * 70000}}))


def test_global_size_and_item_limits() -> None:
    big = raw({**REQ, "body": {"l": [0] * 1000}})
    with pytest.raises(RemoteProtocolError, match="exceeds 100"):
        wire.decode_untrusted(big, max_size=100)
    with pytest.raises(RemoteProtocolError, match="too many items|max_array_len"):
        wire.decode_untrusted(big, max_items=500)
    # Many small maps: each 3-byte map costs ~200 bytes of Python, so items are capped overall.
    many_maps = b"\x94" + (b"\xdc\x03\x84" + b"\x81\xa0\x00" * 900) * 4
    with pytest.raises(RemoteProtocolError, match="too many items"):
        wire.unpackb_untrusted(many_maps, max_items=3000)
    assert len(wire.unpackb_untrusted(many_maps, max_items=8000)) == 4


def test_nested_struct_errors_are_remote() -> None:
    bad = {"t": "test.everything", "n": 1, "flag": True, "ratio": 1.0, "blob": b"x", "names": [],
           "points": [{"x": 101, "label": None}], "versions": {}, "where": None, "extra": None}
    with pytest.raises(RemoteProtocolError, match="outside -100..100"):
        TEST_REGISTRY.decode_untrusted(raw(bad))
    with pytest.raises(RemoteProtocolError, match="duplicate items"):
        TEST_REGISTRY.decode_untrusted(raw({**bad, "points": [], "names": ["a", "a"]}))
    with pytest.raises(RemoteProtocolError, match="at key 'k'"):
        TEST_REGISTRY.decode_untrusted(raw({**bad, "points": [], "versions": {"k": -1}}))
    with pytest.raises(RemoteProtocolError, match="expected finite float"):
        TEST_REGISTRY.decode_untrusted(raw({**bad, "points": [], "ratio": 1}))


# ---------------------------------------------------------------------------------------------
# Framing


@given(payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=8), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_frames_survive_any_split(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(wire.encode_frame(p) for p in payloads)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = wire.FrameDecoder(max_frame_len=300)
    got: list[bytes] = []
    for a, b in zip(points, points[1:]):
        got += dec.feed(stream[a:b])
        assert dec.buffered <= dec.max_buffered
    dec.eof()
    assert got == payloads


def test_frame_limits() -> None:
    assert wire.encode_frame(b"\x01" * 65535)[:2] == b"\xff\xff"
    with pytest.raises(LocalProtocolError):
        wire.encode_frame(b"")
    with pytest.raises(LocalProtocolError):
        wire.encode_frame(b"x" * 65536)
    dec = wire.FrameDecoder(max_frame_len=100)
    with pytest.raises(RemoteProtocolError, match="frame length 101"):
        dec.feed(b"\x00\x65")  # refused on the header alone, before any body is buffered
    with pytest.raises(LocalProtocolError):
        dec.feed(b"x")
    with pytest.raises(RemoteProtocolError, match="frame length 0"):
        wire.FrameDecoder().feed(b"\x00\x00")
    dec = wire.FrameDecoder()
    assert dec.feed(b"\x00\x05abc") == []
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        dec.eof()
    full = wire.FrameDecoder()
    assert full.feed(wire.encode_frame(b"y" * 65535)) == [b"y" * 65535]


# ---------------------------------------------------------------------------------------------
# Chunking


@given(msg=st.binary(max_size=2000), chunk_len=st.integers(2, 300))
def test_chunks_reassemble(msg: bytes, chunk_len: int) -> None:
    chunks = wire.split_message(msg, max_chunk_len=chunk_len)
    assert all(1 <= len(c) <= chunk_len for c in chunks)
    assert all(c[0] == wire.CHUNK_MORE and len(c) > 1 for c in chunks[:-1]) and chunks[-1][0] == 0
    r = wire.Reassembler()
    out = [r.feed(c) for c in chunks]
    assert out[:-1] == [None] * (len(chunks) - 1) and out[-1] == msg
    assert not r.in_progress
    r.eof()


def test_chunking_at_noise_size() -> None:
    msg = bytes(range(256)) * 1000  # 256000 bytes: four full chunks and a partial one
    chunks = wire.split_message(msg)
    assert [len(c) for c in chunks] == [wire.MAX_CHUNK_LEN] * 3 + [256000 - 3 * wire.MAX_CHUNK_PAYLOAD + 1]
    assert wire.MAX_CHUNK_LEN + wire.NOISE_TAG_LEN == wire.MAX_FRAME_LEN
    r = wire.Reassembler()
    assert [r.feed(c) for c in chunks][-1] == msg
    assert wire.split_message(b"") == [b"\x00"]
    exact = wire.split_message(b"x" * wire.MAX_CHUNK_PAYLOAD)
    assert exact == [b"\x00" + b"x" * wire.MAX_CHUNK_PAYLOAD]


def test_reassembly_rejections() -> None:
    r = wire.Reassembler(max_message=100)
    assert r.feed(b"\x01" + b"a" * 60) is None
    with pytest.raises(RemoteProtocolError, match="exceeds 100 bytes"):
        r.feed(b"\x01" + b"a" * 41)  # refused when the cap is passed, not at the end
    with pytest.raises(LocalProtocolError):
        r.feed(b"\x00")
    for bad, why in [(b"\x02x", "reserved bits"), (b"\x01", "empty non-final"), (b"", "outside")]:
        with pytest.raises(RemoteProtocolError, match=why):
            wire.Reassembler().feed(bad)
    r = wire.Reassembler()
    r.feed(b"\x01abc")
    with pytest.raises(RemoteProtocolError, match="inside a chunked message"):
        r.eof()
    with pytest.raises(LocalProtocolError, match="exceeds max_message"):
        wire.split_message(b"x" * 101, max_message=100)


# ---------------------------------------------------------------------------------------------
# Fuzzing: only ProtocolError may escape


def _only_protocol_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ProtocolError:
        pass


@given(st.binary(max_size=300))
def test_random_bytes_decode(data: bytes) -> None:
    _only_protocol_errors(wire.decode_untrusted, data)
    _only_protocol_errors(TEST_REGISTRY.decode_untrusted, data)
    _only_protocol_errors(wire.unpackb_untrusted, data)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xD4, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF]))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 4))]
    return bytes(data)


@given(mutated(any_message.map(wire.encode)))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mutated_messages_decode(data: bytes) -> None:
    try:
        msg = decode_any(data)
    except ProtocolError:
        return
    assert decode_any(wire.encode(msg)) == msg  # whatever is accepted is a valid message


@given(st.lists(st.binary(max_size=70), max_size=6), st.integers(1, 100))
def test_random_frames_and_chunks(pieces: list[bytes], max_frame: int) -> None:
    dec, r = wire.FrameDecoder(max_frame_len=max_frame), wire.Reassembler(max_message=200)
    try:
        for p in pieces:
            for frame in dec.feed(p):
                r.feed(frame)
        dec.eof()
        r.eof()
    except RemoteProtocolError:
        pass


def test_fuzz_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench.fuzz_wire import main

    assert main(["--count", "2000", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "inputs/s" in out and "escaped 0" in out
