"""`lab`: kubectl-style commands over the coordinator engine (local mode: in-process)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TextIO

os.environ.setdefault("TYPER_USE_RICH", "0")  # plain usage errors; must precede `import typer`

import typer  # noqa: E402

from lab.common import render
from lab.common.errors import ConfigError, LabError
from lab.common.render import emit
from lab.coordinator.cli import views
from lab.coordinator.engine import Engine, Paths, ServerFilter, _read_settings

app = typer.Typer(
    name="lab",
    rich_markup_mode=None,
    help="Run the whole life of a fleet with labels as the one abstraction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
get_app = typer.Typer(rich_markup_mode=None, help="List servers, labels, groups, alerts or secrets.", no_args_is_help=True)
show_app = typer.Typer(rich_markup_mode=None, help="Everything about one thing, in both directions.", no_args_is_help=True)
server_app = typer.Typer(rich_markup_mode=None, help="Manage the inventory (and, later, the coordinator itself).", no_args_is_help=True)
targets_app = typer.Typer(rich_markup_mode=None, help="Everything that targets a thing.", no_args_is_help=True)
app.add_typer(get_app, name="get")
app.add_typer(show_app, name="show")
app.add_typer(server_app, name="server")
app.add_typer(targets_app, name="targets")


def subcommand(name: str, help_text: str) -> typer.Typer:
    """The sub-app ``lab NAME``, created once and shared by every command module that registers
    under it (``lab secret`` has store-side and agent-side commands, for instance)."""
    for group in app.registered_groups:
        if group.name == name and group.typer_instance is not None:
            return group.typer_instance
    sub = typer.Typer(rich_markup_mode=None, help=help_text, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub

Definitions = Annotated[
    str | None,
    typer.Option("--definitions", help="Definitions directory (default: $LAB_DEFINITIONS, then $LAB_HOME/definitions).", show_default=False),
]
Output = Annotated[str, typer.Option("--output", "-o", help="table, json or yaml.")]
LabelOpt = Annotated[list[str] | None, typer.Option("--label", "-l", help="Has any of these labels (repeat or comma-separate).")]
GroupOpt = Annotated[list[str] | None, typer.Option("--group", "-g", help="Member of any of these groups.")]
EnvOpt = Annotated[list[str] | None, typer.Option("--environment", "-e", help="In any of these environments.")]
RegionOpt = Annotated[list[str] | None, typer.Option("--region", "-r", help="In any of these regions.")]
ExcludeOpt = Annotated[list[str] | None, typer.Option("--exclude", "-x", help="Leave out these servers.")]


def _format(fmt: str) -> str:
    if fmt not in render.FORMATS:
        raise typer.BadParameter(f"'{fmt}' is not one of: {', '.join(render.FORMATS)}", param_hint="--output")
    return fmt


@contextlib.contextmanager
def _engine(definitions: str | None, *, local: bool = False) -> Iterator[Engine]:
    """The engine for one command; its warnings go to stderr, even when the command fails.
    When $LAB_HOME/config.yaml names a `server:` (`lab server connect`), the daemon's engine over
    RPC (coordinator/client.py), unless ``local`` (commands that work on this home's state.db)."""
    paths = Paths.resolve(definitions)
    if not local and _read_settings(paths.home).get("server"):
        from lab.coordinator.client import RemoteEngine

        engine = RemoteEngine.open(paths)
    else:
        engine = Engine.open(paths)
    try:
        yield engine
    finally:
        for w in engine.warnings:
            print(f"lab: warning: {w}", file=sys.stderr)
        engine.close()


def _filter(label, group, environment, region, exclude) -> ServerFilter:
    return ServerFilter.from_options(label, group, environment, region, exclude)


# -- init / validate ---------------------------------------------------------------------------


@app.command()
def init(
    local: Annotated[bool, typer.Option("--local", help="Run the engine on this device; state in $LAB_HOME (~/.lab).")] = False,
    definitions: Definitions = None,
    output: Output = "table",
) -> None:
    """Set up lab: state database, snapshots and a definitions directory with examples."""
    fmt = _format(output)
    if not local:
        raise LabError("only local mode exists so far: run `lab init --local`")
    result = Engine.init_local(Paths.resolve(definitions))

    def human(r: dict[str, Any], out: TextIO) -> None:
        out.write("✓ Lab engine running locally\n")
        out.write(f"✓ State: {r['state']}\n")
        made = "created with examples" if r["definitions_created"] else "validated"
        c = r["counts"]
        out.write(
            f"✓ Definitions: {r['definitions']} ({made}: {c['labels']} labels, {c['groups']} groups, "
            f"{c['alerts']} alerts, {c['sizes']} sizes, {c['secrets']} secrets)\n"
        )
        for w in r["warnings"]:
            out.write(f"⚠ {w}\n")
        out.write("✓ Ready to onboard servers\n")

    emit(result, fmt, human)


@app.command()
def validate(definitions: Definitions = None, output: Output = "table") -> None:
    """Check the definitions directory; report every problem as file:line."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        result = engine.validate()

    def human(r: dict[str, Any], out: TextIO) -> None:
        c = r["counts"]
        out.write(
            f"✓ {r['definitions']}: {r['files']} files, {c['labels']} labels, {c['groups']} groups, "
            f"{c['alerts']} alerts, {c['sizes']} sizes, {c['secrets']} secrets\n"
        )

    emit(result, fmt, human)


# -- inventory ---------------------------------------------------------------------------------


@server_app.command("add")
def server_add(
    name: Annotated[str, typer.Argument(help="Server name (DNS label).")],
    provider: Annotated[str, typer.Option("--provider", "-p", help="ssh, baremetal, aws, xcpng, ...")],
    labels: Annotated[list[str] | None, typer.Option("--labels", "--label", "-l", help="Comma-separated labels.")] = None,
    environment: Annotated[str | None, typer.Option("--environment", "-e")] = None,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    size: Annotated[str | None, typer.Option("--size", "-s")] = None,
    definitions: Definitions = None,
    output: Output = "table",
) -> None:
    """Register a server in the inventory (enrollment fills in the rest later)."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        record = engine.add_server(name, provider, labels or [], environment, region, size)
        _republish(engine)
    emit(record, fmt, lambda r, out: out.write(f"✓ server {r['name']} added ({r['provider']}; labels: {','.join(r['labels']) or 'none'})\n"))


@server_app.command("relabel")
def server_relabel(
    name: str,
    labels: Annotated[list[str], typer.Option("--labels", "--label", "-l", help="The complete new label list.")],
    definitions: Definitions = None,
    output: Output = "table",
) -> None:
    """Replace a server's labels; shows what it gets afterwards."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.set_labels(name, labels)
        _republish(engine)
    emit(view, fmt, views.server)


@server_app.command("remove")
def server_remove(name: str, definitions: Definitions = None) -> None:
    """Remove a server from the inventory."""
    with _engine(definitions) as engine:
        engine.remove_server(name)
        _republish(engine)
    print(f"✓ server {name} removed")


def _republish(engine: Engine) -> None:
    """[secrets] An inventory change republishes the signed secret policy when config.yaml lists
    `stores:` (a store unreachable: a warning, gossip catches it up)."""
    from lab.coordinator.cluster import republish_after_change

    line = republish_after_change(engine)
    if line:
        print(f"→ {line}", file=sys.stderr)


# -- get / show / targets -------------------------------------------------------------------------


def _query(definitions: str | None, output: str, fetch: Callable[[Engine], Any], human: Callable[[Any, TextIO], None]) -> None:
    """Fetch one view from the engine and print it as a table/tree or as JSON/YAML."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        if fmt == "table" and sys.stderr.isatty():
            print(f"ⓘ Running locally ({engine.paths.home}/state.db)", file=sys.stderr)
        data = fetch(engine)
    emit(data, fmt, human)


@get_app.command("servers")
def get_servers(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Servers with the four pillars: sync, puppet, health, identity."""
    flt = _filter(label, group, environment, region, exclude)
    _query(definitions, output, lambda e: e.get_servers(flt), views.servers_table)


@get_app.command("labels")
def get_labels(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Labels, what they provide and how many servers carry them."""
    flt = _filter(label, group, environment, region, exclude)
    _query(definitions, output, lambda e: e.get_labels(flt), views.labels_table)


@get_app.command("groups")
def get_groups(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Groups with their members, subgroups and exclusions."""
    flt = _filter(label, group, environment, region, exclude)
    _query(definitions, output, lambda e: e.get_groups(flt), views.groups_table)


@get_app.command("alerts")
def get_alerts(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """User-defined alerts, their targets and how many servers they apply to."""
    flt = _filter(label, group, environment, region, exclude)
    _query(definitions, output, lambda e: e.get_alerts(flt), views.alerts_table)


@get_app.command("secrets")
def get_secrets(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Secret definitions and who may read them (metadata only, never values)."""
    flt = _filter(label, group, environment, region, exclude)
    _query(definitions, output, lambda e: e.get_secrets(flt), views.secrets_table)


@show_app.command("server")
def show_server(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """What a server gets, from where, and how it is doing."""
    _query(definitions, output, lambda e: e.show_server(name), views.server)


@show_app.command("label")
def show_label(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """Where a label applies and what it provides."""
    _query(definitions, output, lambda e: e.show_label(name), views.label)


@show_app.command("group")
def show_group(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """A group's subgroup tree, members and exclusions."""
    _query(definitions, output, lambda e: e.show_group(name), views.group)


@show_app.command("alert")
def show_alert(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """Where an alert applies, its current value on each server, and where it is rendered."""
    _query(definitions, output, lambda e: e.show_alert(name), views.alert)


@show_app.command("secret")
def show_secret(path: str, definitions: Definitions = None, output: Output = "table") -> None:
    """A secret's definition and who may read it (never its value)."""
    _query(definitions, output, lambda e: e.show_secret(path), views.secret)


@targets_app.command("server")
def targets_server(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """Everything targeting a server, each with where it comes from."""
    _query(definitions, output, lambda e: e.targets_server(name), views.targets)


# -- command modules -------------------------------------------------------------------------
# Larger command families live in their own modules and register on `app` (or its sub-apps)
# when imported here, one line each.
from lab.coordinator.cli import secret_cmd  # noqa: E402,F401  (lab secret ...)
from lab.coordinator.cli import agent_secret_cmd  # noqa: E402,F401  lab secret get/exec/cache/status (agent socket)
from lab.coordinator.cli import pxe_cmd  # noqa: E402,F401  lab image …, lab pxe …
from lab.coordinator.cli import dash_cmd  # noqa: E402,F401  `lab dash`
from lab.coordinator.cli import alerts_cmd  # noqa: E402,F401  `lab render/diff alerts`, health in show
from lab.coordinator.cli import server_cmd, token_cmd  # noqa: E402,F401  `lab server run|connect`, `lab token …`
from lab.coordinator.cli import describe_cmd  # noqa: E402,F401  `lab describe server NAME` (pillars in detail)
from lab.coordinator.cli import onboard_cmd  # noqa: E402,F401  `lab onboard NAME --provider ssh` (docs/ONBOARDING.md)
from lab.coordinator.cli import cluster_cmd  # noqa: E402,F401  `lab cluster up|status|stop|start|down|publish`
from lab.coordinator.cli import identity_cmd  # noqa: E402,F401  `lab identity revoke|renew|show NAME` (issue 6)
from lab.coordinator.cli import lifecycle_cmd  # noqa: E402,F401  `lab diff|plan|apply|sync server NAME` (docs/LIFECYCLE.md)


# -- entry point -------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; a LabError becomes one line per problem on stderr and a non-zero status.
    With ``argv`` given (tests), the status is returned instead of exiting."""
    try:
        app(args=argv, prog_name="lab")  # standalone mode: usage errors print and exit 2
        code: int = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ConfigError as exc:
        for problem in getattr(exc, "problems", None) or [exc]:
            print(f"lab: {problem}", file=sys.stderr)
        code = exc.exit_code
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `lab get servers | head`
        code = 0
    if argv is None:
        sys.exit(code)
    return code
