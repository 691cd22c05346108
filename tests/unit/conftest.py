"""tests/unit is pure and fast: any real socket or subprocess here is a test bug."""

from __future__ import annotations

import socket
import subprocess

import pytest


class RealIOInUnitTest(AssertionError):
    pass


def _forbidden(what: str):
    def refuse(*args, **kwargs):
        raise RealIOInUnitTest(f"unit tests must not open a real {what}; move the test to tests/integration")

    return refuse


@pytest.fixture(autouse=True)
def _no_real_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _forbidden("socket"))
    monkeypatch.setattr(socket.socket, "bind", _forbidden("socket"))
    monkeypatch.setattr(socket, "create_connection", _forbidden("socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _forbidden("subprocess"))
