"""Framing and msgpack message schemas, with strict decoding of untrusted bytes. Sans-IO.

Layers, from the socket up::

    TCP bytes ──FrameDecoder──▶ frames (≤ 65535 B: Noise handshake or transport ciphertexts)
    frames ──Noise (common.noise)──▶ plaintext chunks (≤ 65519 B = 65535 − 16-byte tag)
    chunks ──Reassembler──▶ application message bytes (≤ max_message, 16 MiB by default)
    message bytes ──decode_untrusted──▶ Message (a frozen dataclass)

**Frame**: 2-byte big-endian length, then that many bytes. Length 0 is refused (no valid Noise
message is empty).

**Chunk** (one per Noise transport message)::

    +--------+------------------------+
    | flags  | payload (0..65518 B)   |
    +--------+------------------------+
    flags: bit 0 = MORE (another chunk of this message follows); bits 1-7 must be 0.

A message is one or more chunks: zero or more with MORE set and a non-empty payload, then one
without MORE (whose payload may be empty, so the empty message is the single byte ``00``).
The receiver refuses a message once its bytes pass ``max_message``, without buffering further.

**Message**: a msgpack map ``{"t": <type tag>, <field>: <value>, ...}`` holding exactly the tag
and the fields that the tag's schema declares. A schema is a frozen dataclass decorated with
:func:`message`; each field is annotated ``Annotated[python_type, Spec]``, where the spec (Int,
Str, Bytes, List, Struct, Body, ...) states type and size caps. An incompatible schema change takes
a new tag (``"enroll.request.2"``), so there is no separate version field. Optional fields are
always present on the wire, as nil. Example::

    @wire.message("store.get")
    @dataclass(frozen=True)
    class Get(wire.Message):
        path: Annotated[str, wire.Str(max_len=512)]
        known: Annotated[int | None, wire.Optional(wire.UInt())]

The decorator reads the hints with ``typing.get_type_hints``, so names used in them must be
importable from the defining module (declare message classes at module level). Lists are held as
tuples; messages carrying a free-form body (a dict) are not hashable.

Untrusted bytes only ever give a value or :class:`RemoteProtocolError`; building a message with
bad values in our own code raises :class:`LocalProtocolError` (a bug).

The framing and chunking code is in :mod:`lab.common._wire_framing`, re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, Final, TypeVar

import msgpack

from lab.common._wire_framing import (
    CHUNK_HEADER_LEN,
    CHUNK_MORE,
    DEFAULT_MAX_MESSAGE,
    MAX_CHUNK_LEN,
    MAX_CHUNK_PAYLOAD,
    MAX_FRAME_LEN,
    NOISE_TAG_LEN,
    FrameDecoder,
    Reassembler,
    encode_frame,
    split_message,
)
from lab.common.errors import LocalProtocolError, RemoteProtocolError

# ---------------------------------------------------------------------------------------------
# Strict msgpack

DEFAULT_MAX_ITEMS: Final = 1 << 18
"""Cap on array elements + map entries in one decoded document. msgpack turns a 1-byte map into
a ~200-byte dict, so a byte cap alone would let 16 MiB become gigabytes of Python objects."""


def _strict_hooks(max_items: int) -> tuple[Callable[[list[Any]], list[Any]], Callable[[list[tuple[Any, Any]]], dict[Any, Any]]]:
    count = 0

    def on_list(items: list[Any]) -> list[Any]:
        nonlocal count
        count += len(items)
        if count > max_items:
            raise ValueError("too many items")
        return items

    def on_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        nonlocal count
        count += len(pairs)
        if count > max_items:
            raise ValueError("too many items")
        d = dict(pairs)
        if len(d) != len(pairs):
            raise ValueError("duplicate map key")
        return d

    return on_list, on_map


def unpackb_untrusted(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_MESSAGE, max_items: int = DEFAULT_MAX_ITEMS
) -> Any:
    """msgpack-decode untrusted bytes: str keys only, no ext types, no duplicate keys, capped sizes."""
    n = len(data)
    if n > max_size:
        raise RemoteProtocolError(f"message of {n} bytes exceeds {max_size}")
    on_list, on_map = _strict_hooks(max_items)
    cap = min(n, max_items)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            list_hook=on_list,
            object_pairs_hook=on_map,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=cap,
            max_map_len=cap,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, TypeError, UnicodeDecodeError, StackError, ...
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise RemoteProtocolError(f"malformed msgpack: {detail}"[:300]) from exc


def packb(obj: Any) -> bytes:
    """msgpack-encode our own (already validated) values; a failure is our bug."""
    try:
        out: bytes = msgpack.packb(obj, use_bin_type=True)
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode: {exc}") from exc
    return out


# ---------------------------------------------------------------------------------------------
# Field specs


class Invalid(ValueError):
    """A value breaks its schema. Raised by specs and by Record._check; callers translate it."""


def _where(path: str) -> str:
    return path or "value"


class Spec:
    """Type and size rule for one field. ``check`` validates and normalizes or raises Invalid."""

    wire_identity: ClassVar[bool] = True  # to_wire(v) is v: lets encode skip work

    def check(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:
        return value


class Int(Spec):
    def __init__(self, min: int = -(2**63), max: int = 2**63 - 1) -> None:
        self.min, self.max = min, max

    def check(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"{_where(path)}: expected int, got {type(value).__name__}")
        if not self.min <= value <= self.max:
            raise Invalid(f"{_where(path)}: {value} outside {self.min}..{self.max}")
        return int(value)


def UInt(max: int = 2**63 - 1) -> Int:
    """Non-negative int (request ids, versions, serials...)."""
    return Int(0, max)


class Bool(Spec):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise Invalid(f"{_where(path)}: expected bool, got {type(value).__name__}")
        return value


class Float(Spec):
    """Finite float (ints are refused too: the types must match exactly)."""

    def check(self, value: Any, path: str) -> float:
        if not isinstance(value, float) or not math.isfinite(value):
            raise Invalid(f"{_where(path)}: expected finite float")
        return float(value)


class Str(Spec):
    def __init__(self, max_len: int, min_len: int = 0, pattern: str | None = None) -> None:
        self.max_len, self.min_len = max_len, min_len
        self.pattern = pattern
        self._re = re.compile(pattern) if pattern is not None else None

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise Invalid(f"{_where(path)}: expected str, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise Invalid(f"{_where(path)}: length {len(value)} outside {self.min_len}..{self.max_len}")
        if self._re is not None and not self._re.fullmatch(value):
            raise Invalid(f"{_where(path)}: {value[:64]!r} does not match {self.pattern}")
        return str(value)


class Bytes(Spec):
    def __init__(self, max_len: int, min_len: int = 0) -> None:
        self.max_len, self.min_len = max_len, min_len

    def check(self, value: Any, path: str) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise Invalid(f"{_where(path)}: expected bytes, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise Invalid(f"{_where(path)}: length {len(value)} outside {self.min_len}..{self.max_len}")
        return bytes(value)


class Optional(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner
        self.wire_identity = inner.wire_identity  # type: ignore[misc]

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.check(value, path)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)


class List(Spec):
    """A msgpack array, held as a tuple (frozen dataclasses stay hashable)."""

    def __init__(self, item: Spec, max_items: int, min_items: int = 0, unique: bool = False) -> None:
        self.item, self.max_items, self.min_items, self.unique = item, max_items, min_items, unique
        self.wire_identity = item.wire_identity  # type: ignore[misc]

    def check(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise Invalid(f"{_where(path)}: expected list, got {type(value).__name__}")
        if not self.min_items <= len(value) <= self.max_items:
            raise Invalid(f"{_where(path)}: {len(value)} items outside {self.min_items}..{self.max_items}")
        check = self.item.check
        try:
            out = tuple([check(v, path) for v in value])
        except Invalid as exc:  # paths are built only on failure: lists can be long
            raise Invalid(f"{exc} (in a list item)") from None
        if self.unique:
            try:
                duplicates = len(set(out)) != len(out)
            except TypeError:  # unhashable items: compare pairwise (lists under unique are short)
                duplicates = any(a == b for i, a in enumerate(out) for b in out[i + 1 :])
            if duplicates:
                raise Invalid(f"{_where(path)}: duplicate items")
        return out

    def to_wire(self, value: Any) -> Any:
        return value if self.wire_identity else [self.item.to_wire(v) for v in value]


class Dict(Spec):
    def __init__(self, key: Spec, value: Spec, max_items: int) -> None:
        self.key, self.value, self.max_items = key, value, max_items
        self.wire_identity = key.wire_identity and value.wire_identity  # type: ignore[misc]

    def check(self, value: Any, path: str) -> dict[Any, Any]:
        if not isinstance(value, Mapping):
            raise Invalid(f"{_where(path)}: expected map, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise Invalid(f"{_where(path)}: {len(value)} entries exceed {self.max_items}")
        kcheck, vcheck = self.key.check, self.value.check
        out: dict[Any, Any] = {}
        for k, v in value.items():
            try:
                out[kcheck(k, path)] = vcheck(v, path)
            except Invalid as exc:
                raise Invalid(f"{exc} (at key {str(k)!r:.40})") from None
        return out

    def to_wire(self, value: Any) -> Any:
        if self.wire_identity:
            return value
        return {self.key.to_wire(k): self.value.to_wire(v) for k, v in value.items()}


class Struct(Spec):
    """A nested :class:`Record`, a msgpack map on the wire."""

    wire_identity = False

    def __init__(self, cls: type[Record]) -> None:
        self.cls = cls

    def check(self, value: Any, path: str) -> Record:
        if isinstance(value, self.cls):
            return value
        if isinstance(value, dict):
            return self.cls._from_wire(value, path)
        raise Invalid(f"{_where(path)}: expected {self.cls.__name__} map, got {type(value).__name__}")

    def to_wire(self, value: Any) -> Any:
        return value._to_wire()


class Data(Spec):
    """Free-form msgpack data (nil, bool, int, finite float, str, bytes, list, str-keyed map),
    bounded in nesting depth, total items and leaf sizes. ``map_only`` demands a map on top."""

    def __init__(
        self,
        *,
        max_depth: int = 16,
        max_items: int = 65536,
        max_str_len: int = 1 << 20,
        max_bin_len: int = 16 << 20,
        max_key_len: int = 256,
        map_only: bool = False,
    ) -> None:
        self.max_depth, self.max_items = max_depth, max_items
        self.max_str_len, self.max_bin_len, self.max_key_len = max_str_len, max_bin_len, max_key_len
        self.map_only = map_only

    def check(self, value: Any, path: str) -> Any:
        if self.map_only and not isinstance(value, dict):
            raise Invalid(f"{_where(path)}: expected map, got {type(value).__name__}")
        items = 0
        # Iterative walk: depth is bounded by max_depth, never by Python's recursion limit.
        stack: list[tuple[Any, int, str]] = [(value, 0, path)]
        while stack:
            v, depth, p = stack.pop()
            if v is None or isinstance(v, (bool, int)):
                if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**64:
                    raise Invalid(f"{_where(p)}: int out of msgpack range")
            elif isinstance(v, str):
                if len(v) > self.max_str_len:
                    raise Invalid(f"{_where(p)}: str longer than {self.max_str_len}")
            elif isinstance(v, bytes):
                if len(v) > self.max_bin_len:
                    raise Invalid(f"{_where(p)}: bytes longer than {self.max_bin_len}")
            elif isinstance(v, float):
                if not math.isfinite(v):
                    raise Invalid(f"{_where(p)}: non-finite float")
            elif isinstance(v, (list, dict)):
                if depth >= self.max_depth:
                    raise Invalid(f"{_where(p)}: nested deeper than {self.max_depth}")
                items += len(v)
                if items > self.max_items:
                    raise Invalid(f"{_where(path)}: more than {self.max_items} items")
                if isinstance(v, list):
                    stack.extend((x, depth + 1, p) for x in v)
                else:
                    for k, x in v.items():
                        if not isinstance(k, str):
                            raise Invalid(f"{_where(p)}: map key must be str, got {type(k).__name__}")
                        if len(k) > self.max_key_len:
                            raise Invalid(f"{_where(p)}: map key longer than {self.max_key_len}")
                        stack.append((x, depth + 1, f"{p}.{k:.40}"))
            else:
                # tuples, bytearrays, ext types...: they would not survive a round trip unchanged
                raise Invalid(f"{_where(p)}: {type(v).__name__} not allowed in data")
        return value


def Body(**limits: Any) -> Data:
    """An RPC body: a str-keyed map of free-form data."""
    return Data(map_only=True, **limits)


# ---------------------------------------------------------------------------------------------
# Records and messages

R = TypeVar("R", bound="Record")
TAG_KEY: Final = "t"
TAG_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")


class Record:
    """Base of schema'd frozen dataclasses; see :func:`record`."""

    __wire_fields__: ClassVar[tuple[tuple[str, Spec], ...]] = ()
    __wire_keys__: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        try:
            for name, spec in self.__wire_fields__:
                value = getattr(self, name)
                checked = spec.check(value, name)
                if checked is not value:
                    object.__setattr__(self, name, checked)
            self._check()
        except Invalid as exc:
            raise LocalProtocolError(f"{type(self).__name__}: {exc}") from exc

    def _check(self) -> None:
        """Cross-field rules; raise Invalid. Runs on construction and on decode."""

    @classmethod
    def _from_wire(cls: type[R], raw: dict[str, Any], path: str = "") -> R:
        """Build from a decoded map holding exactly the declared fields; raises Invalid."""
        if raw.keys() != cls.__wire_keys__:
            missing = sorted(cls.__wire_keys__ - raw.keys())
            extra = sorted(str(k)[:40] for k in raw.keys() - cls.__wire_keys__)
            raise Invalid(f"{cls.__name__}{' at ' + path if path else ''}: missing {missing}, unexpected {extra}")
        obj = cls.__new__(cls)
        prefix = f"{path}." if path else ""
        for name, spec in cls.__wire_fields__:
            object.__setattr__(obj, name, spec.check(raw[name], prefix + name))
        obj._check()
        return obj

    def _to_wire(self) -> dict[str, Any]:
        return {
            name: (getattr(self, name) if spec.wire_identity else spec.to_wire(getattr(self, name)))
            for name, spec in self.__wire_fields__
        }


class Message(Record):
    """Base of tagged messages; see :func:`message`."""

    TAG: ClassVar[str] = ""


def record(cls: type[R]) -> type[R]:
    """Read the field specs of a frozen dataclass subclassing Record from its ``Annotated`` hints."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{cls.__name__} must be a @dataclass(frozen=True)")
    if not issubclass(cls, Record):
        raise TypeError(f"{cls.__name__} must subclass wire.Record")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[tuple[str, Spec]] = []
    for f in dataclasses.fields(cls):
        if f.name == TAG_KEY:
            raise TypeError(f"{cls.__name__}: field name {TAG_KEY!r} is reserved for the type tag")
        specs = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Spec)]
        if len(specs) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: annotate as Annotated[type, <one wire Spec>]")
        fields.append((f.name, specs[0]))
    cls.__wire_fields__ = tuple(fields)
    cls.__wire_keys__ = frozenset(n for n, _ in fields)
    return cls


M = TypeVar("M", bound=Message)


class Registry:
    """Maps type tags to message classes. One global :data:`REGISTRY`; tests may make their own."""

    def __init__(self) -> None:
        self._by_tag: dict[str, type[Message]] = {}

    def register(self, cls: type[M]) -> type[M]:
        tag = cls.TAG
        if tag in self._by_tag and self._by_tag[tag] is not cls:
            raise TypeError(f"type tag {tag!r} already used by {self._by_tag[tag].__qualname__}")
        self._by_tag[tag] = cls
        return cls

    def __contains__(self, tag: object) -> bool:
        return tag in self._by_tag

    def __getitem__(self, tag: str) -> type[Message]:
        return self._by_tag[tag]

    def classes(self) -> list[type[Message]]:
        return list(self._by_tag.values())

    def decode_untrusted(
        self, data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_MESSAGE, max_items: int = DEFAULT_MAX_ITEMS
    ) -> Message:
        raw = unpackb_untrusted(data, max_size=max_size, max_items=max_items)
        if not isinstance(raw, dict):
            raise RemoteProtocolError(f"message must be a map, got {type(raw).__name__}")
        tag = raw.pop(TAG_KEY, None)
        if not isinstance(tag, str):
            raise RemoteProtocolError("message has no type tag")
        cls = self._by_tag.get(tag)
        if cls is None:
            raise RemoteProtocolError(f"unknown message type {tag[:64]!r}")
        try:
            return cls._from_wire(raw)
        except Invalid as exc:
            raise RemoteProtocolError(f"bad {tag}: {exc}") from exc


REGISTRY: Final = Registry()


def message(tag: str, *, registry: Registry = REGISTRY) -> Callable[[type[M]], type[M]]:
    """Class decorator: declare a message type with this tag (put it above ``@dataclass``)."""
    if not TAG_PATTERN.fullmatch(tag) or len(tag) > 64:
        raise TypeError(f"bad message tag {tag!r}")

    def decorate(cls: type[M]) -> type[M]:
        if not issubclass(cls, Message):
            raise TypeError(f"{cls.__name__} must subclass wire.Message")
        cls.TAG = tag
        record(cls)
        return registry.register(cls)

    return decorate


def encode(msg: Message) -> bytes:
    """msgpack bytes of a message, tag first."""
    if not isinstance(msg, Message) or not msg.TAG:
        raise LocalProtocolError(f"not a registered message: {type(msg).__name__}")
    return packb({TAG_KEY: msg.TAG, **msg._to_wire()})


def decode_untrusted(
    data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_MESSAGE, max_items: int = DEFAULT_MAX_ITEMS
) -> Message:
    """Decode a message of any type in the global registry; anything wrong → RemoteProtocolError."""
    return REGISTRY.decode_untrusted(data, max_size=max_size, max_items=max_items)


# ---------------------------------------------------------------------------------------------
# RPC envelope

METHOD_PATTERN: Final = r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*"
ERROR_CODE_PATTERN: Final = r"[a-z][a-z0-9_.-]*"
ReqId = Annotated[int, UInt()]
BodyMap = Annotated[dict[str, Any], Body()]


@record
@dataclasses.dataclass(frozen=True)
class ErrorInfo(Record):
    """Why a request failed: a stable machine code (``not-found``, ``not-entitled``...) and text."""

    code: Annotated[str, Str(max_len=64, min_len=1, pattern=ERROR_CODE_PATTERN)]
    message: Annotated[str, Str(max_len=4096)]


@message("rpc.request")
@dataclasses.dataclass(frozen=True)
class Request(Message):
    id: ReqId
    method: Annotated[str, Str(max_len=128, min_len=1, pattern=METHOD_PATTERN)]
    body: BodyMap


@message("rpc.response")
@dataclasses.dataclass(frozen=True)
class Response(Message):
    """Exactly one of ``body`` (ok) and ``error`` (not ok) is set."""

    id: ReqId
    ok: Annotated[bool, Bool()]
    body: Annotated[dict[str, Any] | None, Optional(Body())]
    error: Annotated[ErrorInfo | None, Optional(Struct(ErrorInfo))]

    def _check(self) -> None:
        if self.ok != (self.body is not None) or self.ok == (self.error is not None):
            raise Invalid("ok response carries a body and no error; failed one an error and no body")

    @classmethod
    def success(cls, id: int, body: dict[str, Any]) -> Response:
        return cls(id=id, ok=True, body=body, error=None)

    @classmethod
    def failure(cls, id: int, code: str, message: str) -> Response:
        return cls(id=id, ok=False, body=None, error=ErrorInfo(code=code, message=message))


@message("rpc.stream_item")
@dataclasses.dataclass(frozen=True)
class StreamItem(Message):
    """One pushed item of the stream opened by request ``id``; ``seq`` counts from 0."""

    id: ReqId
    seq: Annotated[int, UInt()]
    body: BodyMap


@message("rpc.stream_end")
@dataclasses.dataclass(frozen=True)
class StreamEnd(Message):
    """The stream opened by request ``id`` is over: cleanly (``error`` None) or not."""

    id: ReqId
    error: Annotated[ErrorInfo | None, Optional(Struct(ErrorInfo))]


@message("rpc.cancel")
@dataclasses.dataclass(frozen=True)
class Cancel(Message):
    """The client no longer wants the answer or stream for request ``id``."""

    id: ReqId


@message("rpc.error")
@dataclasses.dataclass(frozen=True)
class Error(Message):
    """Connection-level error, sent just before closing (not tied to one request)."""

    code: Annotated[str, Str(max_len=64, min_len=1, pattern=ERROR_CODE_PATTERN)]
    message: Annotated[str, Str(max_len=4096)]


__all__ = [
    "CHUNK_MORE", "DEFAULT_MAX_ITEMS", "DEFAULT_MAX_MESSAGE", "MAX_CHUNK_LEN", "MAX_CHUNK_PAYLOAD",
    "MAX_FRAME_LEN", "NOISE_TAG_LEN", "REGISTRY", "TAG_KEY",
    "Body", "Bool", "Bytes", "Cancel", "Data", "Dict", "Error", "ErrorInfo", "Float", "FrameDecoder",
    "Int", "Invalid", "List", "Message", "Optional", "Reassembler", "Record", "Registry", "Request",
    "Response", "Spec", "StreamEnd", "StreamItem", "Str", "Struct", "UInt",
    "decode_untrusted", "encode", "encode_frame", "message", "packb", "record", "split_message",
    "unpackb_untrusted",
]
