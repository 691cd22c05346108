"""The daemon's background republisher: requests never block and coalesce; failures are logged."""

from __future__ import annotations

import logging

import trio
import trio.testing

from lab.coordinator.republish import Republisher


def test_requests_during_a_publish_coalesce_into_one_more() -> None:
    calls: list[int] = []
    release = trio.Event()

    async def publish() -> list[str]:
        calls.append(len(calls))
        if len(calls) == 1:
            await release.wait()  # the first publish is slow: three requests arrive meanwhile
        return []

    async def main() -> None:
        r = Republisher(publish)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            r.request()
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [0]
            r.request(), r.request(), r.request()
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert len(calls) == 2 and r.published == 2  # one more, not three
            await trio.sleep(0.01)
            assert len(calls) == 2  # nothing without a request
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_failing_publish_is_logged_and_the_next_request_still_runs(caplog) -> None:
    calls = 0

    async def publish() -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("store unreachable")
        return ["store 127.0.0.1:1: not published (refused)"]

    async def main() -> None:
        r = Republisher(publish)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            r.request()
            await trio.testing.wait_all_tasks_blocked()
            r.request()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="lab.coordinator.republish"):
        trio.run(main)
    assert calls == 2
    text = caplog.text
    assert "store unreachable" in text and "refused" in text
