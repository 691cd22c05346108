"""Errors across the RPC wire: the ``{code, message}`` a handler's :class:`LabError` becomes, and
the :class:`RemoteError` a caller gets back. Part of :mod:`lab.common.rpc`, which re-exports it."""

from __future__ import annotations

import re
from typing import Final

from lab.common import wire
from lab.common.errors import (
    AuthError,
    ConfigError,
    LabError,
    NotEntitled,
    NotFound,
    ProtocolError,
    StateError,
    StoreError,
    TransportError,
    UsageError,
)


class RemoteError(LabError):
    """The peer answered a request with an error ``{code, message}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class RemoteNotFound(RemoteError, NotFound):
    pass


class RemoteNotEntitled(RemoteError, NotEntitled):
    pass


class RemoteAuthError(RemoteError, AuthError):
    pass


class RemoteUsageError(RemoteError, UsageError):
    pass


_CODE_RE: Final = re.compile(wire.ERROR_CODE_PATTERN)
_CODES: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (NotEntitled, "not-entitled"),
    (AuthError, "auth"),
    (NotFound, "not-found"),
    (ConfigError, "invalid"),
    (UsageError, "invalid"),
    (StateError, "state"),
    (StoreError, "store"),
    (ProtocolError, "protocol"),
    (TransportError, "transport"),
)
_REMOTE_CLASSES: Final[dict[str, type[RemoteError]]] = {
    "not-found": RemoteNotFound,
    "not-entitled": RemoteNotEntitled,
    "auth": RemoteAuthError,
    "invalid": RemoteUsageError,
}


def error_code(exc: LabError) -> str:
    """The wire code for an error: its ``code`` attribute when valid, else one by class."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and len(code) <= 64 and _CODE_RE.fullmatch(code):
        return code
    for cls, c in _CODES:
        if isinstance(exc, cls):
            return c
    return "error"


def _remote_error(info: wire.ErrorInfo) -> RemoteError:
    return _REMOTE_CLASSES.get(info.code, RemoteError)(info.code, info.message)
