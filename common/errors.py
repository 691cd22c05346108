"""One exception tree for all of lab.

::

    LabError
    ├── ConfigError (ValueError)        bad definitions or settings; carries file:line
    ├── UsageError (ValueError)         a user asked for something impossible (bad flag value, ...)
    ├── NotFound (LookupError)          a named server/label/group/alert/secret does not exist
    ├── StateError                      coordinator state could not be read or written
    ├── ProtocolError                   a protocol was violated
    │   ├── LocalProtocolError          ...by our own code (a bug: API misuse, wrong state)
    │   └── RemoteProtocolError         ...by the peer (closes that one connection)
    ├── TransportError (OSError)        the network failed under us
    ├── AuthError                       identity could not be proven (bad cert, bad token, revoked)
    │   └── NotEntitled                 proven, but not allowed to see this
    └── StoreError                      the secret store failed (LMDB, crypto, replication)

The CLI turns a LabError into one line on stderr and a non-zero exit; anything else is a bug.
Foreign exceptions are translated where they enter our code, with ``raise ... from exc``.
"""

from __future__ import annotations


class LabError(Exception):
    """Root of every error lab raises on purpose."""

    exit_code = 1


class ConfigError(LabError, ValueError):
    """Definitions or settings are wrong. ``str()`` reads ``file:line: message``."""

    exit_code = 2

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        return f"{where}{self.message}"


class UsageError(LabError, ValueError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class NotFound(LabError, LookupError):
    """A named object does not exist."""

    exit_code = 3

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class StateError(LabError):
    """Coordinator state could not be read or written."""


class ProtocolError(LabError):
    """A protocol was violated."""


class LocalProtocolError(ProtocolError):
    """Our own code misused a protocol object (a bug, never caused by the network)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something wrong; the connection to that peer must close."""


class TransportError(LabError, OSError):
    """The network failed under us (refused, reset, timed out)."""


class AuthError(LabError):
    """Identity could not be proven: bad certificate, bad or used token, revoked node."""

    exit_code = 4


class NotEntitled(AuthError):
    """The peer is who it says, but its policy does not grant this."""


class StoreError(LabError):
    """The secret store failed (storage, crypto, replication)."""
