"""One-time join tokens: minting, listing, revoking and redeeming (the coordinator's side).

A token is ``lab1.<CA fingerprint>.<32 random bytes, base32>`` (:mod:`lab.common.identity`).
The coordinator keeps only the BLAKE2b hash of the secret, with the server name, labels,
environment, region, expiry and created/used/revoked times (``tokens`` table of state.db).

Redeeming is atomic: :meth:`~lab.coordinator.state.StateDB.consume_token` is one
``UPDATE … WHERE used_at IS NULL AND expires_at > now`` whose row count decides, so of any
number of concurrent attempts with one token exactly one wins. A refused token raises
:class:`TokenRejected` with a ``reason`` for the coordinator's log and audit; what goes to the
network is only "rejected" (:class:`EnrollmentRejected`).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from typing import Any, Final

from lab.common.config import format_duration
from lab.common.config.loader import parse_duration
from lab.common.errors import AuthError, ProtocolError, UsageError
from lab.common.identity import JoinToken, hash_token_secret, mint_token, parse_token_untrusted
from lab.coordinator.state import StateDB, Token, validate_server_name

__all__ = [
    "DEFAULT_TTL", "MAX_TTL", "REASONS",
    "EnrollmentRejected", "TokenRejected", "create_token", "list_tokens", "parse_ttl", "redeem", "revoke_tokens",
]

DEFAULT_TTL: Final = 30 * 60
MAX_TTL: Final = 7 * 24 * 3600
# Why a token was refused (log and audit only; the network hears "rejected").
REASONS: Final = ("malformed", "wrong-server", "unknown", "used", "revoked", "expired")


class TokenRejected(AuthError):
    """A join token was refused; ``reason`` is one of :data:`REASONS` (never sent to the peer)."""

    def __init__(self, reason: str, detail: str = "", name: str | None = None) -> None:
        super().__init__(f"token {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.name = name


class EnrollmentRejected(AuthError):
    """What the network is told about any refused enrollment: nothing but "rejected"."""

    code = "rejected"

    def __init__(self) -> None:
        super().__init__("rejected")


def parse_ttl(text: str | None) -> int:
    """``30m``, ``2h``, ``1d`` → seconds (default 30 minutes, at most a week)."""
    if text is None:
        return DEFAULT_TTL
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise UsageError(f"invalid --ttl {text!r}: use a number and a unit, e.g. 30m, 2h, 1d") from None
    if seconds > MAX_TTL:
        raise UsageError(f"--ttl {text} is longer than the maximum of {format_duration(MAX_TTL)}")
    return seconds


def create_token(
    state: StateDB,
    ca_fingerprint: str,
    name: str,
    labels: Iterable[str] = (),
    *,
    environment: str | None = None,
    region: str | None = None,
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
) -> tuple[str, Token]:
    """Mint a token for server ``name``: ``(token text, record)``. The text exists only in the
    return value; state.db keeps its hash. Caller audits (the text must not go there)."""
    validate_server_name(name)
    if ttl <= 0 or ttl > MAX_TTL:
        raise UsageError(f"token lifetime must be 1 s .. {format_duration(MAX_TTL)}")
    at = time.time() if now is None else now
    text, secret_hash = mint_token(ca_fingerprint)
    record = state.add_token(name, secret_hash, ca_fingerprint, labels, at + ttl, environment=environment, region=region)
    return text, record


def token_record(t: Token, now: float) -> dict[str, Any]:
    """Plain data for `lab token list -o json` (no hash, no secret)."""
    return {
        "name": t.name,
        "labels": list(t.labels),
        "environment": t.environment,
        "region": t.region,
        "status": t.status(now),
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "used_at": t.used_at,
        "used_by": t.used_by,
        "revoked_at": t.revoked_at,
    }


def list_tokens(state: StateDB, now: float | None = None) -> list[dict[str, Any]]:
    at = time.time() if now is None else now
    return [token_record(t, at) for t in state.list_tokens()]


def revoke_tokens(state: StateDB, name: str, now: float | None = None) -> int:
    """Revoke the unused tokens of server ``name``; NotFound-like UsageError if none."""
    count = state.revoke_tokens(name, now=now)
    if count == 0:
        raise UsageError(f"no unused token for {name!r}")
    return count


def parse_presented(text: object) -> JoinToken:
    """A token as presented by a peer; TokenRejected("malformed") on any flaw."""
    if not isinstance(text, str):
        raise TokenRejected("malformed", "not text")
    try:
        return parse_token_untrusted(text)
    except ProtocolError as exc:
        raise TokenRejected("malformed", str(exc)) from None


def redeem(state: StateDB, token: JoinToken, ca_fingerprint: str, used_by: str, *, now: float, name: str | None = None) -> Token:
    """Consume ``token`` for the key ``used_by`` (a fingerprint); the Token, or TokenRejected.

    Call inside ``state.transaction()`` together with what the enrollment records, so a failure
    after this point rolls the consumption back. ``name``, when the peer says which server it
    means to be, must match the token's.
    """
    if not hmac.compare_digest(token.fingerprint.encode(), ca_fingerprint.encode()):
        raise TokenRejected("wrong-server", f"minted by CA {token.fingerprint}, not by this coordinator")
    secret_hash = hash_token_secret(token.secret)
    record = state.consume_token(secret_hash, used_by, now=now)
    if record is None:
        found = state.find_token(secret_hash)
        if found is None:
            raise TokenRejected("unknown")
        status = found.status(now)
        # status "valid" here means another attempt won the race between our UPDATE and SELECT.
        raise TokenRejected("used" if status == "valid" else status, f"token for {found.name!r}", name=found.name)
    if name is not None and name != record.name:
        raise TokenRejected("wrong-server", f"token is for {record.name!r}, the node asked to be {name!r}", name=record.name)
    return record
