"""`lab token create|list|revoke`: one-time join tokens (see docs/ENROLLMENT.md).

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. Tokens are
written to this coordinator's state.db ($LAB_HOME), or, in a home connected with `lab server
connect`, to the daemon's (its ``tokens.*`` methods, coordinator/onboard_api.py); the token text is
printed once and stored nowhere (only its hash).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any, TextIO

import typer

from lab.common.errors import ConfigError
from lab.common.identity import fingerprint
from lab.coordinator import tokens
from lab.coordinator.cli import app as base
from lab.common.render import emit, table
from lab.coordinator.engine import _split
from lab.coordinator.onboarding import open_onboarding

token_app = base.subcommand("token", "One-time join tokens for enrolling agents.")


def _ca_fingerprint(home: Any) -> str:
    from lab.coordinator.enrollment import load_ca_public_key

    try:
        return fingerprint(load_ca_public_key(home / "ca.pub"))
    except ConfigError as exc:
        raise ConfigError(f"{exc.message}; run `lab init --local` first", exc.file) from exc


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "—"
    delta = int(ts - now)
    span = abs(delta)
    text = f"{span // 3600}h{span % 3600 // 60:02d}m" if span >= 3600 else f"{span // 60}m{span % 60:02d}s"
    return f"in {text}" if delta >= 0 else f"{text} ago"


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="The server this token enrolls (created in the inventory on enrollment if new).")],
    labels: Annotated[list[str] | None, typer.Option("--labels", "--label", "-l", help="Comma-separated labels.")] = None,
    environment: Annotated[str | None, typer.Option("--environment", "-e")] = None,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime, e.g. 30m, 2h.")] = "30m",
    definitions: base.Definitions = None,
    output: base.Output = "table",
) -> None:
    """Mint a one-time join token; it is printed once and only its hash is kept."""
    fmt = base._format(output)
    seconds = tokens.parse_ttl(ttl)
    label_list = _split(labels)
    with open_onboarding(base.Paths.resolve(definitions)) as backend:
        text, record = backend.create_token(name, label_list, environment, region, seconds)
    result = {"token": text, "name": name, "labels": label_list, "environment": environment, "region": region, "expires_at": record["expires_at"]}

    def human(r: dict[str, Any], out: TextIO) -> None:
        print(
            f"✓ join token for {name} (labels: {','.join(label_list) or 'none'}; single use; expires in {ttl}). "
            "It is shown once; pass it with --token-file:",
            file=sys.stderr,
        )
        out.write(r["token"] + "\n")

    emit(result, fmt, human)


@token_app.command("list")
def token_list(definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """Tokens and their state (never the secret)."""
    fmt = base._format(output)
    now = time.time()
    with open_onboarding(base.Paths.resolve(definitions)) as backend:
        rows = backend.list_tokens()

    def human(rs: list[dict[str, Any]], out: TextIO) -> None:
        if not rs:
            out.write("No tokens.\n")
            return
        table(
            ["NAME", "LABELS", "STATUS", "EXPIRES", "USED"],
            [[r["name"], ",".join(r["labels"]) or "—", r["status"], _when(r["expires_at"], now), _when(r["used_at"], now)] for r in rs],
            out,
        )

    emit(rows, fmt, human)


@token_app.command("revoke")
def token_revoke(name: str, definitions: base.Definitions = None) -> None:
    """Revoke the unused tokens of a server."""
    with open_onboarding(base.Paths.resolve(definitions)) as backend:
        count = backend.revoke_tokens(name)
    print(f"✓ {count} token{'s' if count != 1 else ''} for {name} revoked")
