"""Built-in secret generators for `lab secret rotate` (values from the OS CSPRNG).

* ``random``: ``length`` random bytes (default 32), base64url without padding, so the value is
  text that fits any config file (43 characters for 32 bytes).
* ``password``: ``length`` characters (default 24) from letters and digits, at least one of each
  kind, uniformly drawn (``secrets.choice``).

Other generators named in definitions (``acme``, ``ca``, ``kubernetes``) fetch or issue values from
outside systems; they are not built in yet and rotating them is refused with a clear message.
"""

from __future__ import annotations

import base64
import secrets
import string
from typing import Final

from lab.common.errors import UsageError

__all__ = ["BUILTIN", "generate"]

BUILTIN: Final = ("random", "password")
_ALPHABET: Final = string.ascii_letters + string.digits


def generate(generator: str, length: int | None = None) -> bytes:
    if generator == "random":
        n = length or 32
        if not 16 <= n <= 4096:
            raise UsageError("random: length must be 16..4096 bytes")
        return base64.urlsafe_b64encode(secrets.token_bytes(n)).rstrip(b"=")
    if generator == "password":
        n = length or 24
        if not 12 <= n <= 1024:
            raise UsageError("password: length must be 12..1024 characters")
        while True:
            pw = "".join(secrets.choice(_ALPHABET) for _ in range(n))
            if any(c.islower() for c in pw) and any(c.isupper() for c in pw) and any(c.isdigit() for c in pw):
                return pw.encode()
    raise UsageError(f"generator '{generator}' is not built in (built in: {', '.join(BUILTIN)}); set the value with `lab secret set`")
