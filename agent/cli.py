"""The `lab-agent` command line."""

from __future__ import annotations

import sys


def main() -> None:
    print("lab-agent: not implemented yet", file=sys.stderr)
    sys.exit(1)
