"""`lab-agent store run`: run the secret-store role in this process (one store of the cluster).

The home holds the store's identity like any agent home (``node.key``, ``node.cert`` with the
``store`` role, ``ca.pub``) and its replica in ``<home>/store``. See docs/SECRETS.md, "On the network".
"""

from __future__ import annotations

from typing import Annotated

import typer

store_app = typer.Typer(rich_markup_mode=None, help="The secret-store role (hosts labelled secret-store).", no_args_is_help=True)


@store_app.command("run")
def store_run(
    home: Annotated[str | None, typer.Option("--home", help="Store home (default: $LAB_HOME, then /var/lib/lab).", show_default=False)] = None,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve agents and peer stores on.")] = "0.0.0.0:7444",
    peer: Annotated[list[str] | None, typer.Option("--peer", help="Another store, HOST:PORT (repeat; default: the stores listed at enrollment). With no replica and no sealed key yet, the dataset key is asked from them.")] = None,
    create: Annotated[bool, typer.Option("--create", help="No replica yet and no sealed key: start a new cluster's dataset.")] = False,
    ae_interval: Annotated[float, typer.Option("--ae-interval", help="Seconds between anti-entropy rounds (jittered ±50%).")] = 5.0,
    backoff_cap: Annotated[float, typer.Option("--backoff-cap", help="Longest wait between reconnects to a peer, seconds.")] = 10.0,
    no_fsync: Annotated[bool, typer.Option("--no-fsync", help="Skip fsync at commit (tests only: a crash may lose recent writes).")] = False,
) -> None:
    """Serve the secret dataset: gossip with the peer stores, sync agents, accept admin writes."""
    import os
    import signal
    from functools import partial
    from pathlib import Path

    import trio

    from lab.agent.daemon import configure_logging
    from lab.agent.enroll import ENROLLMENT_FILE
    from lab.agent.sync import enrolled_stores
    from lab.store.node import NodeConfig, run_store

    configure_logging()
    config = NodeConfig(ae_interval=ae_interval, backoff_cap=max(backoff_cap, 0.2))
    where = Path(home or os.environ.get("LAB_HOME") or "/var/lib/lab")
    # no --peer: the stores the coordinator listed at enrollment (our own endpoint is skipped on contact)
    peers = list(peer) if peer else enrolled_stores(where) if (where / ENROLLMENT_FILE).exists() else []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            await nursery.start(partial(run_store, where, listen, peers, config=config, create=create, durable=not no_fsync))

    trio.run(main)
