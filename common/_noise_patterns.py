"""Noise handshake patterns (spec §7.4-7.6) as data, and the ``pskN`` modifiers (§9) placed on them.

Part of :mod:`lab.common.noise` (which re-exports :data:`PATTERNS` and :class:`HandshakePattern`);
only the token lists live here: nothing in this module knows the suite's keys, ciphers or hashes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from lab.common.errors import LocalProtocolError

_PATTERN_TEXT: Final[dict[str, str]] = {
    # §7.4 one-way
    "N": "<- s ... -> e, es",
    "K": "-> s <- s ... -> e, es, ss",
    "X": "<- s ... -> e, es, s, ss",
    # §7.5 interactive, fundamental
    "NN": "-> e <- e, ee",
    "NK": "<- s ... -> e, es <- e, ee",
    "NX": "-> e <- e, ee, s, es",
    "XN": "-> e <- e, ee -> s, se",
    "XK": "<- s ... -> e, es <- e, ee -> s, se",
    "XX": "-> e <- e, ee, s, es -> s, se",
    "KN": "-> s ... -> e <- e, ee, se",
    "KK": "-> s <- s ... -> e, es, ss <- e, ee, se",
    "KX": "-> s ... -> e <- e, ee, se, s, es",
    "IN": "-> e, s <- e, ee, se",
    "IK": "<- s ... -> e, es, s, ss <- e, ee, se",
    "IX": "-> e, s <- e, ee, se, s, es",
    # §7.6 interactive, deferred
    "NK1": "<- s ... -> e <- e, ee, es",
    "NX1": "-> e <- e, ee, s -> es",
    "X1N": "-> e <- e, ee -> s <- se",
    "X1K": "<- s ... -> e, es <- e, ee -> s <- se",
    "XK1": "<- s ... -> e <- e, ee, es -> s, se",
    "X1K1": "<- s ... -> e <- e, ee, es -> s <- se",
    "X1X": "-> e <- e, ee, s, es -> s <- se",
    "XX1": "-> e <- e, ee, s -> es, s, se",
    "X1X1": "-> e <- e, ee, s -> es, s <- se",
    "K1N": "-> s ... -> e <- e, ee -> se",
    "K1K": "-> s <- s ... -> e, es <- e, ee -> se",
    "KK1": "-> s <- s ... -> e <- e, ee, se, es",
    "K1K1": "-> s <- s ... -> e <- e, ee, es -> se",
    "K1X": "-> s ... -> e <- e, ee, s, es -> se",
    "KX1": "-> s ... -> e <- e, ee, se, s -> es",
    "K1X1": "-> s ... -> e <- e, ee, s -> se, es",
    "I1N": "-> e, s <- e, ee -> se",
    "I1K": "<- s ... -> e, es, s <- e, ee -> se",
    "IK1": "<- s ... -> e, s <- e, ee, se, es",
    "I1K1": "<- s ... -> e, s <- e, ee, es -> se",
    "I1X": "-> e, s <- e, ee, s, es -> se",
    "IX1": "-> e, s <- e, ee, se, s -> es",
    "I1X1": "-> e, s <- e, ee, s -> se, es",
}

_TOKENS: Final = frozenset({"e", "s", "ee", "es", "se", "ss", "psk"})


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """Tokens per message (initiator sends messages 0, 2, ...) and the pre-messages."""

    name: str
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @property
    def one_way(self) -> bool:
        return len(self.messages) == 1


def _parse_pattern(name: str, text: str) -> HandshakePattern:
    pre_text, _, msg_text = text.rpartition("...")
    pre: dict[str, tuple[str, ...]] = {"->": (), "<-": ()}
    for arrow, tokens in _arrow_split(pre_text):
        pre[arrow] = tokens
    messages = []
    for i, (arrow, tokens) in enumerate(_arrow_split(msg_text)):
        if arrow != ("->" if i % 2 == 0 else "<-"):
            raise ValueError(f"pattern {name}: messages must alternate, starting with the initiator")
        messages.append(tokens)
    return HandshakePattern(name, pre["->"], pre["<-"], tuple(messages))


def _arrow_split(text: str) -> list[tuple[str, tuple[str, ...]]]:
    parts = re.split(r"(->|<-)", text)
    return [(parts[i], tuple(t.strip() for t in parts[i + 1].split(","))) for i in range(1, len(parts), 2)]


def _validate(p: HandshakePattern) -> HandshakePattern:
    """Spec §7.3 validity rules; every table entry passes at import, so a typo cannot ship."""
    if p.initiator_pre not in ((), ("s",)) or p.responder_pre not in ((), ("s",)):
        raise ValueError(f"pattern {p.name}: only static keys are supported in pre-messages")
    # Keys the other side knows the public half of: "is" = initiator static, "re" = responder eph.
    public = {"is"} if p.initiator_pre else set()
    public |= {"rs"} if p.responder_pre else set()
    done: set[str] = set()
    for i, tokens in enumerate(p.messages):
        side = "i" if i % 2 == 0 else "r"
        for token in tokens:
            if token not in _TOKENS:
                raise ValueError(f"pattern {p.name}: unknown token {token!r}")
            key = side + token if token in ("e", "s") else token
            if key in done or (token in ("e", "s") and key in public):
                raise ValueError(f"pattern {p.name}: {token!r} repeated")
            done.add(key)
            if token in ("e", "s"):
                public.add(key)
            elif token != "psk" and not {"i" + token[0], "r" + token[1]} <= public:
                raise ValueError(f"pattern {p.name}: {token!r} before both keys are known")
    return p


PATTERNS: Final[Mapping[str, HandshakePattern]] = MappingProxyType(
    {name: _validate(_parse_pattern(name, text)) for name, text in _PATTERN_TEXT.items()}
)


# --- modifiers ------------------------------------------------------------------------------

_PATTERN_RE: Final = re.compile(r"([A-Z][A-Z0-9]*)((?:[a-z][a-z0-9]*)(?:\+[a-z][a-z0-9]*)*)?")
_PSK_RE: Final = re.compile(r"psk(0|[1-9][0-9]*)")


def pattern_with_modifiers(pattern_text: str, protocol_name: str) -> tuple[HandshakePattern, int]:
    """``XXpsk0+psk2`` → the XX pattern with its psk tokens placed, and how many psks it takes.

    ``protocol_name`` only names the whole name in the errors (LocalProtocolError)."""
    match = _PATTERN_RE.fullmatch(pattern_text)
    base = PATTERNS.get(match.group(1)) if match else None
    if match is None or base is None:
        raise LocalProtocolError(f"unknown handshake pattern {pattern_text!r} in {protocol_name!r}")
    messages = [list(m) for m in base.messages]
    psk_numbers: list[int] = []
    for modifier in match.group(2).split("+") if match.group(2) else ():
        psk = _PSK_RE.fullmatch(modifier)
        if psk is None:
            raise LocalProtocolError(f"unsupported modifier {modifier!r} in {protocol_name!r}")
        psk_numbers.append(int(psk.group(1)))
    # One spelling per protocol: the name is hashed into h, so "psk2+psk0" would not interoperate.
    if psk_numbers != sorted(set(psk_numbers)):
        raise LocalProtocolError(f"psk modifiers must be distinct and ascending in {protocol_name!r}")
    for number in psk_numbers:
        if number > len(messages):
            raise LocalProtocolError(
                f"psk{number} in {protocol_name!r}: the pattern has only {len(messages)} messages"
            )
        if number == 0:
            messages[0].insert(0, "psk")
        else:
            messages[number - 1].append("psk")
    pattern = HandshakePattern(pattern_text, base.initiator_pre, base.responder_pre, tuple(map(tuple, messages)))
    return pattern, len(psk_numbers)


def needs_static(pattern: HandshakePattern, initiator: bool) -> bool:
    own_pre = pattern.initiator_pre if initiator else pattern.responder_pre
    first = 0 if initiator else 1
    return "s" in own_pre or any("s" in pattern.messages[i] for i in range(first, len(pattern.messages), 2))
