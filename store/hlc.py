"""Hybrid logical clocks: the versions of secret records.

A version is ``(wall_ms, counter, origin)``: the writer's physical clock in milliseconds, a counter
that breaks ties inside one millisecond (and carries causality when a clock lags), and the node id
of the writer, which makes every version unique and the order total. Versions compare as tuples,
so "the highest version wins" is plain ``max``.

:class:`HLC` is the usual algorithm (Kulkarni et al., 2014): ``tick`` for a local event and
``observe`` for a version seen from a peer, so a write always gets a version above everything its
writer has seen, even when the writer's clock is behind. ``now`` is always passed in (ms).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from lab.common.errors import LocalProtocolError

__all__ = ["HLC", "MAX_DRIFT_MS", "ZERO", "Version"]

MAX_DRIFT_MS: Final = 24 * 3600 * 1000
"""A peer version more than this far ahead of our clock is refused by :meth:`HLC.observe`
(a peer with a wildly wrong clock must not drag every future version into the future)."""


class Version(NamedTuple):
    wall_ms: int
    counter: int
    origin: str

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}.{self.origin}"

    @classmethod
    def parse(cls, text: str) -> Version:
        wall, counter, origin = text.split(".", 2)
        return cls(int(wall), int(counter), origin)

    def to_wire(self) -> list[object]:
        return [self.wall_ms, self.counter, self.origin]


ZERO: Final = Version(0, 0, "")


class HLC:
    """One node's hybrid logical clock."""

    def __init__(self, node: str, last: Version = ZERO) -> None:
        if not node:
            raise LocalProtocolError("HLC needs a node id")
        self.node = node
        self._wall = last.wall_ms
        self._counter = last.counter

    @property
    def last(self) -> Version:
        return Version(self._wall, self._counter, self.node)

    def tick(self, now_ms: int) -> Version:
        """A new version for a local write, above every version seen so far."""
        if now_ms > self._wall:
            self._wall, self._counter = int(now_ms), 0
        else:
            self._counter += 1
        return Version(self._wall, self._counter, self.node)

    def observe(self, seen: Version, now_ms: int) -> None:
        """Move past a version received from a peer (so our next tick is above it)."""
        if seen.wall_ms > now_ms + MAX_DRIFT_MS:
            raise LocalProtocolError(f"version {seen} is more than {MAX_DRIFT_MS} ms ahead of our clock")
        self.witness(seen)

    def witness(self, seen: Version) -> None:
        """Move past a version already accepted (no drift check)."""
        if seen.wall_ms > self._wall:
            self._wall, self._counter = seen.wall_ms, seen.counter
        elif seen.wall_ms == self._wall and seen.counter > self._counter:
            self._counter = seen.counter
