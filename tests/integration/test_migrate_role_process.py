"""The coordinator role's child dies with its agent (coordinator/migrate/role.py): a process that
supervises a child through ``CoordinatorRole`` is killed with SIGKILL, and the child, bound to it
by PR_SET_PDEATHSIG, is gone shortly after. Real processes; the child is a stand-in that sleeps
instead of `lab server run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")

AGENT = textwrap.dedent("""
    import signal
    import sys
    from pathlib import Path

    import trio

    from lab.coordinator.migrate import role

    role._lab_argv = lambda: [sys.executable, "-c", "import time; time.sleep(120)"]  # then: server run --listen ...

    async def main():
        r = role.CoordinatorRole(Path(sys.argv[1]))
        with trio.open_signal_receiver(signal.SIGTERM) as signals:  # a stop, as systemd asks for one
            async with trio.open_nursery() as nursery:
                await nursery.start(r.run)
                while r.pid is None:
                    await trio.sleep(0.05)
                print(r.pid, flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
""")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _supervise(home: Path) -> tuple[subprocess.Popen[bytes], int]:
    (home / "coordinator").mkdir(parents=True, mode=0o700)
    (home / "coordinator-role.yaml").write_text(yaml.safe_dump({"id": "0123456789abcdef", "listen": "127.0.0.1:1"}))
    with (home / "agent.err").open("wb") as err:
        agent = subprocess.Popen([sys.executable, "-c", AGENT, str(home)], stdout=subprocess.PIPE, stderr=err,
                                 stdin=subprocess.DEVNULL)
    assert agent.stdout is not None
    line = agent.stdout.readline()  # the child's pid, once it runs
    assert line.strip().isdigit(), line
    return agent, int(line)


def test_the_child_dies_when_its_agent_is_killed(tmp_path: Path) -> None:
    agent, child = _supervise(tmp_path)
    try:
        time.sleep(0.5)
        assert _alive(child)  # bound to the agent, not killed by the binding itself
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the coordinator child outlived its SIGKILLed agent"
    finally:
        agent.kill()
        agent.wait()
        agent.stdout.close()  # type: ignore[union-attr]
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_child_is_stopped_with_its_agent(tmp_path: Path) -> None:
    """The normal path: the agent is asked to stop and terminates the child before it exits."""
    agent, child = _supervise(tmp_path)
    try:
        os.kill(agent.pid, signal.SIGTERM)
        agent.wait(timeout=15)
        assert agent.returncode == 0, (tmp_path / "agent.err").read_text()
        assert not _alive(child)
    finally:
        agent.kill()
        agent.wait()
        agent.stdout.close()  # type: ignore[union-attr]
        if _alive(child):
            os.kill(child, signal.SIGKILL)
