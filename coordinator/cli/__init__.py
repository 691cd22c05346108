"""The `lab` command line."""

from __future__ import annotations


def main() -> None:
    from lab.coordinator.cli.app import run

    run()
