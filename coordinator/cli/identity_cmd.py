"""`lab identity revoke|renew|show NAME`: node certificates after enrollment (docs/ENROLLMENT.md).

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. Revoke and renew
are asked of the coordinator daemon (it is the CA: coordinator/identity_ops.py); show reads this
home's files (``certs/``, ``revocations.crl``, state.db).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any, TextIO

import typer

from lab.common.errors import UsageError
from lab.coordinator import identity_ops as ops
from lab.coordinator.cli import app as base
from lab.common.render import emit

identity_app = base.subcommand("identity", "Node certificates: revoke, renew, show.")


def _iso(ts: Any) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if isinstance(ts, (int, float)) else "—"


def confirm(name: str, assume_yes: bool, *, stdin: Any = None, ask: Any = None) -> None:
    """Go on, or raise UsageError: --yes, else a yes/no question on a terminal, else refuse."""
    stream = stdin if stdin is not None else sys.stdin
    decision = ops.confirm_decision(assume_yes, bool(getattr(stream, "isatty", lambda: False)()))
    if decision == "go":
        return
    if decision == "refuse":
        raise UsageError(f"revoking {name} cannot be undone and needs confirmation: no terminal to ask on, pass --yes")
    asker = ask or (lambda q: typer.confirm(q, default=False))
    if not asker(f"Revoke {name}'s certificate everywhere (stores, coordinator, DNS, entitlements)? "
                 "The node must be enrolled again with a new key afterwards."):
        raise UsageError("not revoked")


@identity_app.command("revoke")
def identity_revoke(
    name: Annotated[str, typer.Argument(help="The enrolled server whose certificate (serial and key) is revoked.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    definitions: base.Definitions = None,
    output: base.Output = "table",
) -> None:
    """Revoke a node everywhere: stores and coordinator refuse it, DNS and entitlements drop it, its agent wipes its cache."""
    fmt = base._format(output)
    from lab.coordinator.engine import Paths

    paths = Paths.resolve(definitions)
    ops.daemon_endpoint(paths.home)  # not running: say so before asking anything
    confirm(name, yes)
    result = ops.call_daemon(paths.home, "identity.revoke", {"name": name})

    def human(r: dict[str, Any], out: TextIO) -> None:
        what = ", ".join([f"serial {s}" for s in r["serials"]] + [f"key {k[:16]}…" for k in r["keys"]])
        out.write(f"✓ {r['name']}: {what} revoked (revocation list v{r['crl_version']})\n")
        for ep, status in sorted(r["stores"].items()):
            mark = "✓" if status == "ok" else "⚠"
            out.write(f"  {mark} store {ep}: {status if status != 'ok' else 'list and policy published'}\n")
        if not r["stores"]:
            out.write("  ⚠ no store configured: nothing published\n")
        out.write(f"  ✓ entitlements: policy v{r['policy_version']} without {r['name']}\n")
        out.write(f"  {'✓' if r['dns'] in ('removed', 'off') else '⚠'} DNS: {r['dns']}\n")
        out.write("  ✓ inventory: identity revoked; the agent wipes its cache when refused\n")

    emit(result, fmt, human)


@identity_app.command("renew")
def identity_renew(
    name: Annotated[str, typer.Argument(help="The enrolled server that gets a fresh certificate for the same key.")],
    definitions: base.Definitions = None,
    output: base.Output = "table",
) -> None:
    """Issue a fresh certificate (new serial and validity, same key); the agent picks it up at its next check-in."""
    fmt = base._format(output)
    from lab.coordinator.engine import Paths

    paths = Paths.resolve(definitions)
    result = ops.call_daemon(paths.home, "identity.renew", {"name": name})
    emit(result, fmt, lambda r, out: out.write(renew_line(r) + "\n"))


def renew_line(r: dict[str, Any]) -> str:
    """What a renewal did, in one line (`lab identity renew`, and `R` in `lab dash`)."""
    return (f"✓ {r['name']}: certificate {r['serial']} issued (valid until {_iso(r['not_after'])}); the agent picks it up at "
            f"its next check-in, then serial {r['old_serial']} is revoked")  # fmt: skip


@identity_app.command("show")
def identity_show(
    name: Annotated[str, typer.Argument(help="The server.")],
    definitions: base.Definitions = None,
    output: base.Output = "table",
) -> None:
    """Serial, validity, roles, key fingerprint and revocation state of a node's certificate."""
    fmt = base._format(output)
    with base._engine(definitions, local=True) as engine:
        home = engine.paths.home
        from lab.coordinator.enrollment import load_ca_public_key

        crl = ops.load_crl(home, load_ca_public_key(home / "ca.pub"))
        result = ops.show(home, engine.state, name, crl)

    def human(r: dict[str, Any], out: TextIO) -> None:
        out.write(f"{r['name']}: {r['status']}\n")
        for title, c in (("certificate", r["certificate"]), ("renewed, not yet picked up", r["pending"])):
            if c is None:
                continue
            out.write(f"  {title}:\n")
            out.write(f"    serial       {c['serial']}{'  (REVOKED)' if c['revoked'] else ''}\n")
            out.write(f"    not before   {_iso(c['not_before'])}\n    not after    {_iso(c['not_after'])}\n")
            out.write(f"    roles        {', '.join(c['roles'])}\n    fingerprint  {c['fingerprint']}\n")
        if r["certificate"] is None:
            out.write(f"  certificate: not on file (inventory serial: {r['inventory_serial'] or '—'})\n")
        out.write(f"  revocation list: {'v' + str(r['crl_version']) if r['crl_version'] else 'none'}\n")

    emit(result, fmt, human)
