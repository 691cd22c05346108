"""Benchmark: `lab secret get PATH` wall time against `python3 -c pass` (and `age -d`), same run.

    .venv/bin/python tests/bench/bench_secret_get.py [--runs 60]

Starts a throw-away agent (temp home, cache seeded by `lab-agent cache import`), then times, in
interleaved rounds so that machine load hits all alike:
  * `python3 -c pass` with the same interpreter (the floor any Python CLI pays),
  * `lab secret get bench/secret` (the console script, fast path),
  * `age -d -i KEY FILE` of the same secret, if `age` is installed (the SOPS/age script workflow).
Prints medians and ratios; target ratio to the bare interpreter ≤ 1.5. Never fails on a slow machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
VALUE = "bench-secret-value-0123456789abcdef"


def timed(cmd: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr.decode()[:300]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--no-bytecode", action="store_true", help="Keep PYTHONDONTWRITEBYTECODE: compile lab's modules on every call.")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lab-bench-get-"))
    env = dict(os.environ, LAB_HOME=str(root / "home"), LAB_RUNTIME_DIR=str(root / "run"), LAB_SECRETS_DIR=str(root / "secrets"))
    if not args.no_bytecode:
        # As installed: byte-compiled modules. (Dev shells often set PYTHONDONTWRITEBYTECODE, which
        # makes every call recompile lab's own modules from source.) The cache goes to a temp dir.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    seed = root / "seed.yaml"
    seed.write_text(f'secrets:\n  - path: bench/secret\n    value: "{VALUE}"\n')
    subprocess.run([str(BIN / "lab-agent"), "cache", "import", "--from", str(seed)], env=env, check=True, capture_output=True)
    agent = subprocess.Popen([str(BIN / "lab-agent"), "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (root / "run/agent.sock").exists():
            time.sleep(0.01)
        out = subprocess.run([str(BIN / "lab"), "secret", "get", "bench/secret"], env=env, capture_output=True, check=True).stdout
        assert out == VALUE.encode(), out
        cmds: dict[str, tuple[list[str], bytes | None]] = {
            "python3 -c pass": ([sys.executable, "-c", "pass"], None),
            "lab secret get": ([str(BIN / "lab"), "secret", "get", "bench/secret"], None),
        }
        age = shutil.which("age")
        if age and shutil.which("age-keygen"):
            subprocess.run(["age-keygen", "-o", str(root / "age.key")], check=True, capture_output=True)
            recipient = subprocess.run(["age-keygen", "-y", str(root / "age.key")], check=True, capture_output=True, text=True).stdout.strip()
            subprocess.run([age, "-r", recipient, "-o", str(root / "secret.age")], input=VALUE.encode(), check=True)
            cmds["age -d"] = ([age, "-d", "-i", str(root / "age.key"), str(root / "secret.age")], None)
        else:
            print("age not installed: skipping the age -d comparison (apt-get install age)")
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for name, (cmd, stdin) in cmds.items():  # warm-up
            timed(cmd, env, stdin)
        for _ in range(args.runs):
            for name, (cmd, stdin) in cmds.items():
                times[name].append(timed(cmd, env, stdin))
        base = statistics.median(times["python3 -c pass"])
        print(f"runs={args.runs} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f} bytecode={'no' if args.no_bytecode else 'yes'}")
        for name, xs in times.items():
            med = statistics.median(xs)
            print(f"{name:<18} median {med * 1000:7.1f} ms  p10 {sorted(xs)[len(xs) // 10] * 1000:6.1f} ms  ratio to python {med / base:4.2f}x")
        lab_med = statistics.median(times["lab secret get"])
        if "age -d" in times:
            print(f"lab secret get / age -d = {lab_med / statistics.median(times['age -d']):.2f}x")
        print(f"target: lab secret get ≤ 1.5x python3 -c pass → {'met' if lab_med <= 1.5 * base else 'NOT met'}")
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
