"""`lab diff|plan|apply|sync server NAME` (spec: "lab diff server db-1"; docs/LIFECYCLE.md).

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there (one line). The
comparison and the plan are pure (:mod:`lab.coordinator.lifecycle`); the operations (plan files,
inventory writes with audit entries, policy publication) are :mod:`lab.coordinator.lifecycle_api`,
run in-process in local mode and by the coordinator daemon after `lab server connect` (plans are
then stored on the coordinator). This module prints, and hands SSH onboarding to `lab onboard`.
"""

from __future__ import annotations

from typing import Annotated, Any, TextIO

import typer

from lab.coordinator import lifecycle, lifecycle_api
from lab.coordinator.cli import app as base
from lab.common.render import emit

diff_app = base.subcommand("diff", "What would change, as +/- lines.")
plan_app = base.subcommand("plan", "Preview what `lab apply` would create or change; nothing is written but the plan.")
apply_app = base.subcommand("apply", "Apply the plan made by `lab plan`.")
sync_app = base.subcommand("sync", "Reconcile drift that lab can fix; say what must be done by hand.")


def _say(text: str = "") -> None:
    print(text, flush=True)


def diff_view(r: dict[str, Any], out: TextIO) -> None:
    if not r["reported"]["facts"] and not r["reported"]["puppet"]:
        out.write(f"{r['server']}: no report from the agent yet — everything below is unknown\n")
    for line in lifecycle.diff_lines(r):
        out.write(line + "\n")
    word = {"sync": "in sync", "drift": "DRIFT DETECTED", "unknown": "unknown (not everything is reported yet)"}[r["sync"]]
    out.write(f"\n{r['server']}: {word}\n")


@diff_app.command("server")
def diff_server(name: str, definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """Declared spec vs what the agent reported: unchanged lines indented, - declared, + actual."""
    fmt = base._format(output)
    with base._engine(definitions) as engine:
        result = lifecycle_api.ops(engine).diff(name)
    emit(result, fmt, diff_view)


# -- plan ----------------------------------------------------------------------------------------


@plan_app.command("server")
def plan_server(
    name: Annotated[str, typer.Argument(help="Server name (DNS label).")],
    labels: Annotated[list[str] | None, typer.Option("--label", "--labels", "-l", help="The complete label list (repeat or comma-separate); default: keep.")] = None,
    provider: Annotated[str | None, typer.Option("--provider", "-p", help="ssh, manual, baremetal, aws, xcpng … (required for a new server).")] = None,
    environment: Annotated[str | None, typer.Option("--environment", "-e")] = None,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    size: Annotated[str | None, typer.Option("--size", "-s")] = None,
    host: Annotated[list[str] | None, typer.Option("--host", help="ssh: address of the machine (onboarded by `lab apply`).")] = None,
    port: Annotated[int, typer.Option("--port", help="ssh: SSH port.")] = 22,
    user: Annotated[str, typer.Option("--user", "-u", help="ssh: SSH user.")] = "root",
    identity: Annotated[str | None, typer.Option("--identity", "-i", help="ssh: private key file.")] = None,
    server: Annotated[str | None, typer.Option("--server", help="ssh: coordinator endpoint as the target sees it.")] = None,
    definitions: base.Definitions = None,
    output: base.Output = "table",
) -> None:
    """Preview a new or existing server (labels, size, classes, secrets, alerts, DNS); store the plan."""
    from lab.coordinator.state import validate_server_name

    fmt = base._format(output)
    validate_server_name(name)
    label_list = lifecycle.split(labels) if labels else None
    hosts = lifecycle.split(host)
    ssh = {"port": port, "user": user, "identity": identity, "server": server} if hosts else {}
    with base._engine(definitions) as engine:
        plan = lifecycle_api.ops(engine).plan(
            name, labels=label_list, provider=provider, environment=environment, region=region, size=size, hosts=hosts, ssh=ssh,
        )  # fmt: skip

    def human(p: dict[str, Any], out: TextIO) -> None:
        state = "new server" if p["new"] else ("enrolled" if p["enrolled"] else "in the inventory, not enrolled")
        out.write(f"Plan for {p['server']} (provider {p['provider']}, {state}):\n")
        lines = lifecycle.plan_lines(p)
        for line in lines or ["(no changes)"]:
            out.write(f"  {line}\n")
        out.write(f"\n  `lab apply server {p['server']}` will: {_action_text(p)}\n")
        out.write(f"Plan saved to {p['path']} (nothing else was written).\n")

    emit(plan, fmt, human)


def _action_text(p: dict[str, Any]) -> str:
    if p["action"] == "not-implemented":
        return lifecycle.not_implemented(p["provider"])
    if p["action"] == "onboard":
        return f"record it in the inventory, then onboard it over SSH at {p['hosts'][0]} (install the agent, enroll)"
    if p["new"]:
        extra = " (no --host: nothing is installed; onboard it later)" if p["provider"] == "ssh" else ""
        return f"register it in the inventory only{extra}"
    return "change the inventory record" + (" and republish the secret policy if stores are configured" if p["changes"] else "")


# -- apply ---------------------------------------------------------------------------------------


def _onboard(plan: dict[str, Any], yes: bool, accept_new_host_key: bool, definitions: str | None) -> None:
    """Hand over to `lab onboard NAME --provider ssh …` (coordinator/providers/ssh.py)."""
    from typer.main import get_command

    ssh = plan["ssh"]
    argv = ["onboard", plan["server"], "--provider", "ssh", "--host", plan["hosts"][0], "--port", str(ssh.get("port") or 22),
            "--user", ssh.get("user") or "root"]  # fmt: skip
    if ssh.get("identity"):
        argv += ["--identity", ssh["identity"]]
    if ssh.get("server"):
        argv += ["--server", ssh["server"]]
    t = plan["target"]
    if t["labels"]:
        argv += ["--labels", ",".join(t["labels"])]
    if t["environment"]:
        argv += ["--environment", t["environment"]]
    if t["region"]:
        argv += ["--region", t["region"]]
    if yes:
        argv.append("--yes")
    if accept_new_host_key:
        argv.append("--accept-new-host-key")
    if definitions:
        argv += ["--definitions", definitions]
    get_command(base.app).main(args=argv, prog_name="lab", standalone_mode=False)


@apply_app.command("server")
def apply_server(
    name: Annotated[str, typer.Argument(help="Server name (planned with `lab plan server`).")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="ssh onboarding: do not ask.")] = False,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="ssh onboarding: trust an unknown host key.")] = False,
    definitions: base.Definitions = None,
) -> None:
    """Apply exactly what `lab plan server NAME` showed; refuse a stale plan."""
    with base._engine(definitions) as engine:
        result = lifecycle_api.ops(engine).apply(name)
    for line in result["lines"]:
        _say(line)
    if result["action"] == "onboard":  # local mode only: the daemon refuses it before changing anything
        _onboard(result["plan"], yes, accept_new_host_key, definitions)


# -- sync ----------------------------------------------------------------------------------------


@sync_app.command("server")
def sync_server(name: str, definitions: base.Definitions = None, output: base.Output = "table") -> None:
    """Re-apply what lab controls (labels and the secret policy), list what must be fixed by hand, show the diff."""
    fmt = base._format(output)
    with base._engine(definitions) as engine:
        result = lifecycle_api.ops(engine).sync(name)

    def human(r: dict[str, Any], out: TextIO) -> None:
        for line in r["done"]:
            out.write(f"{line}\n")
        if r["by_hand"]:
            out.write("To do by hand (lab cannot fix these):\n")
            for line in r["by_hand"]:
                out.write(f"  - {line}\n")
        elif r["sync"] == "sync":
            out.write("Nothing to reconcile.\n")
        out.write("\n")
        diff_view(r, out)

    emit(result, fmt, human)
