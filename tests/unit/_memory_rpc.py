"""Shared by unit tests that drive an rpc.Server without sockets: `rpc.connect` replaced by a
connection over an in-memory stream pair (a plain module, not a test file)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from lab.common import rpc


def memory_connect(server: rpc.Server, seen: list[str] | None = None) -> Callable[..., Any]:
    """A drop-in for ``rpc.connect`` that serves each connection with ``server`` in memory;
    ``seen`` collects the HOST:PORT each call asked for."""

    @contextlib.asynccontextmanager
    async def connect(host: str, port: int, **kw: Any) -> Any:
        if seen is not None:
            seen.append(f"{host}:{port}")
        a, b = trio.testing.memory_stream_pair()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle_connection, b, ("127.0.0.1", 1))
                async with rpc.open_connection(a, **kw) as conn:
                    yield conn
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # as rpc.connect does
            raise rpc._unwrap(group) from None

    return connect
