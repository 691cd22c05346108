"""Crash safety: a writer killed with SIGKILL at random instants leaves a consistent, openable store."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from lab.store.dataset import BUCKETS, Dataset, entry_digest, leaf_of

WRITER = textwrap.dedent(
    """
    import sys
    from lab.store.dataset import Dataset
    from lab.store.records import Meta
    d = Dataset.open(sys.argv[1], "n1") if sys.argv[2] == "open" else Dataset.create(sys.argv[1], "n1")
    start = int(sys.argv[3])
    meta = Meta.simple("crash", 1)
    i = start
    while True:
        path = f"crash/{i % 300}"
        if i % 7 == 3:
            d.delete(f"crash/{(i - 3) % 300}", 10_000 + i)
        d.merge([])  # no-op
        d.write(path, b"value-%d" % i + b"x" * (i % 500), meta, 10_000 + i)
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
        i += 1
    """
)


def _check_consistent(ds: Dataset) -> dict[str, bytes]:
    """Records decrypt; digest tree, leaf index and arrival log agree with the records."""
    buckets = [0] * BUCKETS
    leaves: dict[int, list[int]] = {}
    values = {}
    for rec in ds.records(include_deleted=True):
        leaf, d = leaf_of(rec.path), entry_digest(rec)
        buckets[leaf >> 8] ^= d
        leaves.setdefault(leaf >> 8, [0] * 256)[leaf & 0xFF] ^= d
        if not rec.deleted:
            values[rec.path] = ds.reveal(rec)
        assert rec in ds.records_in_leaves([leaf])
    assert list(struct.unpack(">256Q", ds.bucket_digests())) == buckets
    for b, arr in leaves.items():
        assert list(struct.unpack(">256Q", ds.leaf_digests(b))) == arr
    logged = ds.changes_since(0, limit=10**6)
    assert sorted(r.path for _, r in logged) == sorted(r.path for r in ds.records(include_deleted=True))
    assert len({s for s, _ in logged}) == len(logged) and max((s for s, _ in logged), default=0) <= ds.seq
    return values


@pytest.mark.slow
def test_kill_minus_nine_mid_write_loses_nothing_committed(tmp_path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = 0
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(store), "open" if round_ else "create", str(start)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        assert proc.stdout is not None
        # let it run for a while, then kill at an arbitrary instant
        deadline = time.monotonic() + 0.6 + 0.37 * round_
        last = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for line in proc.stdout:  # everything it reported before dying was committed
            last = int(line)
        proc.stdout.close()
        assert last is not None, "writer never committed"
        with Dataset.open(store, "n1") as ds:
            values = _check_consistent(ds)
            # the last acknowledged write is there (or was overwritten by a later one, same path)
            path = f"crash/{last % 300}"
            got = values.get(path)
            assert got is not None and got.startswith(b"value-")
            assert int(got.split(b"-")[1].rstrip(b"x")) >= last
        start = last + 1
