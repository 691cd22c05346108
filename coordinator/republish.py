"""The daemon's background republisher: the signed secret policy and store directory follow
enrollments without delaying them.

Requests coalesce: however many enrollments arrive while a publish runs, one more publish follows
it, compiled from the state as it is then (two compiles in the same millisecond would carry the
same version, and a store refuses an equal version).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from lab.common import rpc

log = logging.getLogger("lab.coordinator.republish")


class Republisher:
    def __init__(self, publish: Callable[[], Awaitable[list[str]]]) -> None:
        self._publish = publish  # returns warnings (a store unreachable, none answering)
        self._wanted = False
        self._wake = trio.Event()
        self.published = 0  # completed publishes, for tests and status

    def request(self) -> None:
        """Ask for a publish soon; never blocks, never fails."""
        self._wanted = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._wanted:
                self._wanted = False
                try:
                    warnings = await self._publish()
                except Exception as exc:  # noqa: BLE001 - a failed publish is retried by the next request, gossip or `lab cluster publish`
                    warnings = [f"secret policy not republished: {type(exc).__name__}: {exc}"]
                for w in warnings:
                    rpc.log_event(log, logging.WARNING, "policy.republish_incomplete", detail=w)
                self.published += 1
