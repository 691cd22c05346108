"""Simulate N secret stores gossiping under message loss and partitions; check they converge.

    .venv/bin/python tools/gossip_sim.py [--stores 5] [--writes 500] [--loss 0.3] [--seeds 20]

Each run: random writes and deletes at random stores, a partition that splits the stores in two
for the middle third of the writes, message loss throughout; then the partition heals, loss stops,
and anti-entropy rounds run until every store's digest root is equal. The final datasets are
compared with a model (highest version of each path wins). Prints one line per seed; exits 1 if
any run fails to converge or disagrees with the model.
"""

from __future__ import annotations

import argparse
import random
import sys

from lab.store.simulate import Network


def run(seed: int, stores: int, writes: int, loss: float) -> tuple[bool, str]:
    rnd = random.Random(seed)
    model: dict[str, tuple[object, bytes | None]] = {}
    with Network(stores, seed=seed, loss=loss, clock_offsets=[rnd.randint(-2000, 2000) for _ in range(stores)],
                 tombstone_grace_ms=10**9) as net:
        for i in range(writes):
            if i == writes // 3:
                cut = rnd.randint(1, stores - 1)
                net.partition(net.names[:cut], net.names[cut:])
            if i == 2 * writes // 3:
                net.heal()
            name = rnd.choice(net.names)
            path = f"app/k{rnd.randrange(50)}"
            if rnd.random() < 0.2:
                rec, value = net.delete(name, path), None
            else:
                value = b"%d" % i
                rec = net.write(name, path, value)
            if rec is not None and (path not in model or model[path][0] < rec.version):  # type: ignore[operator]
                model[path] = (rec.version, value)
            net.advance(rnd.randint(0, 3))
            net.deliver()
            if rnd.random() < 0.05:
                net.anti_entropy_round()
        net.heal()
        net.loss = 0.0
        rounds = net.settle(max_rounds=100)
        want = {p: (v, val) for p, (v, val) in model.items() if val is not None}
        ok = net.converged() and all(net.live(n) == want for n in net.names)
        return ok, (f"seed {seed}: {'ok' if ok else 'FAILED'}; {len(want)} live paths, settled in {rounds} rounds; "
                    f"{net.link.sent} messages, {net.link.lost} lost, {net.link.bytes:,} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", type=int, default=5)
    ap.add_argument("--writes", type=int, default=500)
    ap.add_argument("--loss", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=20)
    a = ap.parse_args()
    failed = 0
    for seed in range(a.seeds):
        ok, line = run(seed, a.stores, a.writes, a.loss)
        print(line, flush=True)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
