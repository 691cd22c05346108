"""Benchmark: `lab dash` with a large fleet, rendered off-screen with urwid's ``render``.

    .venv/bin/python tests/bench/bench_dash.py [--servers 10000] [--size 200x50] [--refreshes 20]

Fleet: N servers with 2 of 6 example labels each, in a temporary LAB_HOME with the example
definitions. Measures, on a canvas of the given size (default 200x50):

* time to first full screen: open the Engine, fetch the servers, build the view model, build the
  widget tree and render it (everything the operator waits for after typing `lab dash`);
* per refresh, split as the dashboard splits it: the worker thread (reload, fetch, build the
  model: off the UI loop) and the UI loop (apply the new model, render) — with one server
  relabelled by another connection before each refresh, so every refresh redraws;
* a keypress (page down) and a drill-down into a label carried by a third of the fleet.

Targets (issue `lab dash`): first screen < 1 s, refresh < 100 ms. Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

from lab.coordinator.engine import Engine, Paths
from lab.coordinator.state import StateDB
from lab.coordinator.tui import app, source
from lab.coordinator.tui.source import Result

LABELS = ["k8s-worker", "production", "eu-west", "postgres", "app", "mailserver"]


def make_home(tmp: str, n: int) -> Paths:
    paths = Paths(pathlib.Path(tmp), pathlib.Path(tmp) / "definitions", "default")
    Engine.init_local(paths)
    rnd = random.Random(3)
    with StateDB.open(paths.home) as state:
        state.add_servers_bulk(
            {"name": f"srv-{i:05d}", "provider": rnd.choice(["aws", "xcpng", "baremetal", "ssh"]), "labels": rnd.sample(LABELS, 2),
             "environment": rnd.choice(["prod", "dev", "staging"]), "region": rnd.choice(["eu-west", "us-east"])}
            for i in range(n)
        )
    return paths


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=10_000)
    p.add_argument("--size", default="200x50")
    p.add_argument("--refreshes", type=int, default=20)
    args = p.parse_args(argv)
    cols, rows = (int(x) for x in args.size.split("x"))
    size = (cols, rows)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.servers} servers, canvas {cols}x{rows}")

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_home(tmp, args.servers)
        key = ("list", "servers")

        # -- first full screen
        t0 = time.perf_counter()
        engine = Engine.open(paths)
        t_open = time.perf_counter()
        table = source.load(engine, key)
        t_model = time.perf_counter()
        dash = app.Dash(refresh=2.0, unicode=True)
        dash.apply(Result(key, value=table))
        canvas = dash.root.render(size, focus=True)
        t_render = time.perf_counter()
        assert len(canvas.text) == rows and b"Servers [%d]" % args.servers in b"".join(canvas.text)
        print(
            f"first full screen: {ms(t_render - t0)}   (target < 1 s)  "
            f"[open engine {ms(t_open - t0)}, fetch+model {ms(t_model - t_open)}, widgets+render {ms(t_render - t_model)}]"
        )

        # -- refreshes: another connection changes one server each time
        other = StateDB.open(paths.home)
        worker_t, ui_t = [], []
        rnd = random.Random(9)
        try:
            for i in range(args.refreshes):
                other.set_labels(f"srv-{rnd.randrange(args.servers):05d}", rnd.sample(LABELS, 2))
                t0 = time.perf_counter()
                model = source.fetch_job(key, dash.symbols, reload=True)(engine, lambda line: None)
                t1 = time.perf_counter()
                dash.apply(Result(key, value=model))
                canvas = dash.root.render(size, focus=True)
                t2 = time.perf_counter()
                worker_t.append(t1 - t0)
                ui_t.append(t2 - t1)
        finally:
            other.close()
        print(
            f"refresh, UI loop (apply + render): median {ms(statistics.median(ui_t))}, max {ms(max(ui_t))}   (target < 100 ms)"
        )
        print(
            f"refresh, worker thread (reload + fetch + model, off the UI loop): median {ms(statistics.median(worker_t))}, max {ms(max(worker_t))}"
        )
        print(f"refresh, end to end: median {ms(statistics.median([a + b for a, b in zip(worker_t, ui_t)]))}")

        # -- unchanged data: the screen is left alone
        same = []
        for _ in range(5):
            t0 = time.perf_counter()
            dash.apply(Result(key, value=model))  # the worker hands back the same object when nothing changed
            dash.root.render(size, focus=True)
            same.append(time.perf_counter() - t0)
        print(f"refresh with unchanged data, UI loop: median {ms(statistics.median(same))}")

        # -- keys and drill-down
        keys = []
        for _ in range(20):
            t0 = time.perf_counter()
            dash.root.keypress(size, "page down")
            dash.root.render(size, focus=True)
            keys.append(time.perf_counter() - t0)
        print(f"keypress (page down) + render: median {ms(statistics.median(keys))}")
        target = dash.focused_target()
        t0 = time.perf_counter()
        dash.root.keypress(size, "enter")
        detail_key = dash.nav.current.key
        detail = source.load(engine, detail_key)
        t1 = time.perf_counter()
        dash.apply(Result(detail_key, value=detail))
        dash.root.render(size, focus=True)
        t2 = time.perf_counter()
        print(f"drill into {target}: fetch+model {ms(t1 - t0)}, apply+render {ms(t2 - t1)}")
        dash.root.keypress(size, "l")
        dash.root.keypress(size, "enter")
        label_key = dash.nav.current.key
        t0 = time.perf_counter()
        label = source.load(engine, label_key)
        t1 = time.perf_counter()
        dash.apply(Result(label_key, value=label))
        dash.root.render(size, focus=True)
        t2 = time.perf_counter()
        n = len(label.section("Servers").lines)
        print(f"drill into label {label_key[2]} ({n} servers): fetch+model {ms(t1 - t0)}, apply+render {ms(t2 - t1)}")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
