"""`make bench` / `python -m tests.bench [NAME ...]`: run every benchmark script, one process each.

Benchmarks print figures; they are not timed tests and never fail because a machine is slow.
The figures measured so far, with their commands and machines, are in docs/BENCHMARKS.md."""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.stem.startswith(("bench_", "fuzz_")))
    if argv:
        scripts = [p for p in scripts if p.stem in argv or p.stem.split("_", 1)[1] in argv]
    status = 0
    for script in scripts:
        print(f"\n== {script.relative_to(HERE.parents[1])} ==", flush=True)
        status |= subprocess.run([sys.executable, str(script)], check=False).returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
