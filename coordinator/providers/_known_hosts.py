"""Host key policy for SSH onboarding: pure functions over known_hosts text (no I/O).

:func:`decide` answers "may we talk to this key?" from the known_hosts files lab reads
(``~/.ssh/known_hosts`` and the lab-managed ``$LAB_HOME/known_hosts``):

* a matching entry with the same key → ``trusted``;
* the host is listed but with other key(s), or the key is ``@revoked`` → ``refuse`` (a changed
  host key is never accepted, whatever the flags);
* the host is not listed → ``accept-new`` with ``--accept-new-host-key`` (the caller prints the
  fingerprint loudly and records the key in ``$LAB_HOME/known_hosts``), else ``refuse``.

Hashed entries (``|1|salt|hmac``), comma lists, ``[host]:port``, ``*``/``?`` wildcards and
``!`` negations are understood; ``@cert-authority`` lines are ignored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Final

TRUSTED: Final = "trusted"
ACCEPT_NEW: Final = "accept-new"
REFUSE: Final = "refuse"


@dataclasses.dataclass(frozen=True)
class KnownHost:
    marker: str | None  # None, "@revoked" or "@cert-authority"
    patterns: str
    algorithm: str
    key: str  # base64 blob


@dataclasses.dataclass(frozen=True)
class HostKeyDecision:
    action: str  # TRUSTED, ACCEPT_NEW or REFUSE
    fingerprint: str
    reason: str


def fingerprint(key_b64: str) -> str:
    """OpenSSH's ``SHA256:…`` fingerprint of a base64 key blob."""
    digest = hashlib.sha256(base64.b64decode(key_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_name(host: str, port: int) -> str:
    """How known_hosts names ``host`` on ``port``."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, algorithm: str, key_b64: str) -> str:
    return f"{host_name(host, port)} {algorithm} {key_b64}\n"


def parse_known_hosts(text: str) -> list[KnownHost]:
    """Entries of a known_hosts file; malformed lines are skipped (as ssh does)."""
    out: list[KnownHost] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = None
        if fields[0].startswith("@"):
            marker, fields = fields[0], fields[1:]
        if len(fields) < 3:
            continue
        out.append(KnownHost(marker, fields[0], fields[1], fields[2]))
    return out


def _hashed_match(pattern: str, name: str) -> bool:
    parts = pattern.split("|")  # "", "1", salt, hash
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), want)


def _glob(pattern: str) -> re.Pattern[str]:
    """OpenSSH patterns know only ``*`` and ``?`` (``[`` is literal, as in ``[host]:port``)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()))


def matches(patterns: str, host: str, port: int) -> bool:
    """Whether a known_hosts host field names ``host`` on ``port``."""
    name = host_name(host, port)
    if patterns.startswith("|"):
        return _hashed_match(patterns, name)
    hit = False
    for pat in patterns.split(","):
        negated = pat.startswith("!")
        pat = pat[1:] if negated else pat
        if _glob(pat).fullmatch(name.lower()):
            if negated:
                return False
            hit = True
    return hit


def decide(sources: Iterable[str], host: str, port: int, algorithm: str, key_b64: str, *, accept_new: bool) -> HostKeyDecision:
    """The policy decision for the key ``host:port`` presented, given known_hosts texts."""
    fpr = fingerprint(key_b64)
    listed = False
    for text in sources:
        for e in parse_known_hosts(text):
            if e.marker == "@cert-authority" or not matches(e.patterns, host, port):
                continue
            same = e.algorithm == algorithm and e.key == key_b64
            if e.marker == "@revoked":
                if same:
                    return HostKeyDecision(REFUSE, fpr, f"host key {fpr} of {host_name(host, port)} is marked @revoked")
                continue
            if same:
                return HostKeyDecision(TRUSTED, fpr, "matches known_hosts")
            listed = True
    if listed:
        return HostKeyDecision(
            REFUSE, fpr,
            f"HOST KEY MISMATCH for {host_name(host, port)}: it presented {algorithm} {fpr}, which is not the key in "
            "known_hosts (possible man-in-the-middle); remove the old entry only if you know why it changed",
        )  # fmt: skip
    if accept_new:
        return HostKeyDecision(ACCEPT_NEW, fpr, "not in known_hosts; accepted because of --accept-new-host-key")
    return HostKeyDecision(
        REFUSE, fpr,
        f"unknown host key for {host_name(host, port)} ({algorithm} {fpr}): verify it and add it to known_hosts, "
        "or pass --accept-new-host-key",
    )  # fmt: skip
