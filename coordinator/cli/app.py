"""`lab`: kubectl-style commands over the coordinator engine (local mode: in-process)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from typing import Annotated, Any, TextIO

os.environ.setdefault("TYPER_USE_RICH", "0")  # plain usage errors; must precede `import typer`

import typer  # noqa: E402

from lab.common.errors import ConfigError, LabError
from lab.coordinator.cli import render
from lab.coordinator.cli.render import aligned, emit, pillar, table, tree
from lab.coordinator.engine import Engine, Paths, ServerFilter

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
def _engine(definitions: str | None) -> Iterator[Engine]:
    """The engine for one command; its warnings go to stderr, even when the command fails."""
    engine = Engine.open(Paths.resolve(definitions))
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
    emit(view, fmt, _human_server)


@server_app.command("remove")
def server_remove(name: str, definitions: Definitions = None) -> None:
    """Remove a server from the inventory."""
    with _engine(definitions) as engine:
        engine.remove_server(name)
    print(f"✓ server {name} removed")


# -- get ---------------------------------------------------------------------------------------


def _local_banner(engine: Engine, fmt: str) -> None:
    if fmt == "table" and sys.stderr.isatty():
        print(f"ⓘ Running locally ({engine.paths.home}/state.db)", file=sys.stderr)


@get_app.command("servers")
def get_servers(
    label: LabelOpt = None,
    group: GroupOpt = None,
    environment: EnvOpt = None,
    region: RegionOpt = None,
    exclude: ExcludeOpt = None,
    definitions: Definitions = None,
    output: Output = "table",
) -> None:
    """Servers with the four pillars: sync, puppet, health, identity."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        _local_banner(engine, fmt)
        rows = engine.get_servers(_filter(label, group, environment, region, exclude))

    def human(rs: list[dict[str, Any]], out: TextIO) -> None:
        if not rs:
            out.write("No servers.\n")
            return
        table(
            ["NAME", "PROVIDER", "LABELS", "SIZE", "SYNC", "PUPPET", "HEALTH", "IDENTITY"],
            [
                [r["name"], r["provider"], ",".join(r["labels"]), r["size"] or "—", pillar(r["sync"]), pillar(r["puppet"]), pillar(r["health"]), pillar(r["identity"])]
                for r in rs
            ],
            out,
        )

    emit(rows, fmt, human)


@get_app.command("labels")
def get_labels(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Labels, what they provide and how many servers carry them."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        rows = engine.get_labels(_filter(label, group, environment, region, exclude))
    emit(rows, fmt, lambda rs, out: table(
        ["LABEL", "PUPPET CLASSES", "SECRETS", "PORTS", "SIZE", "SERVERS"],
        [[r["name"], ", ".join(r["puppet_classes"]) or "—", ", ".join(r["secrets"]) or "—", ",".join(map(str, r["ports"])) or "—", r["size"] or "—", r["servers"]] for r in rs],
        out,
    ))


@get_app.command("groups")
def get_groups(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Groups with their members, subgroups and exclusions."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        rows = engine.get_groups(_filter(label, group, environment, region, exclude))
    emit(rows, fmt, lambda rs, out: table(
        ["GROUP", "SERVERS", "EXCLUDED", "SUBGROUPS", "MATCH"],
        [[r["name"], r["servers"], r["excluded"], ", ".join(r["subgroups"]) or "—", r["match"] or ("servers: " + ", ".join(r["explicit_servers"]) if r["explicit_servers"] else "—")] for r in rs],
        out,
    ))


@get_app.command("alerts")
def get_alerts(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """User-defined alerts, their targets and how many servers they apply to."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        rows = engine.get_alerts(_filter(label, group, environment, region, exclude))
    emit(rows, fmt, lambda rs, out: table(
        ["ALERT", "SEVERITY", "TARGET", "CONDITION", "FOR", "SERVERS"],
        [[r["name"], r["severity"], r["target"] + ("; excluding " + ", ".join(r["excludes"]) if r["excludes"] else ""), r["condition"], r["for"] or "—", r["servers"]] for r in rs],
        out,
    ))


@get_app.command("secrets")
def get_secrets(
    label: LabelOpt = None, group: GroupOpt = None, environment: EnvOpt = None, region: RegionOpt = None,
    exclude: ExcludeOpt = None, definitions: Definitions = None, output: Output = "table",
) -> None:
    """Secret definitions and who may read them (metadata only, never values)."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        rows = engine.get_secrets(_filter(label, group, environment, region, exclude))

    def used_by(r: dict[str, Any]) -> str:
        if not r["used_by"]:
            return "— (not referenced)"
        return ", ".join(f"{u['label']} ({u['servers']} srv)" for u in r["used_by"])

    emit(rows, fmt, lambda rs, out: table(
        ["SECRET", "TYPE", "USED BY", "ROTATE", "PER-MACHINE"],
        [[r["path"], r["type"], used_by(r), r["rotate_every"] or "—", "yes" if r["per_machine"] else "no"] for r in rs],
        out,
    ))


# -- show / targets ----------------------------------------------------------------------------


def _by_source(items: list[dict[str, Any]], key: str = "name") -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in items:
        grouped[i["source"]].append(i)
    return grouped


def _source_heading(source: str) -> str:
    kind, _, name = source.partition(":")
    if kind == "auto":
        return "AUTO-GENERATED"
    return f"FROM {kind.upper()} {name}"


def _auto_note(source: str) -> str:
    reason = source.split(":", 1)[1]
    kind, _, detail = reason.partition(":")
    return f"(from {kind}: {detail})" if detail else f"(from {kind})"


def _human_server(v: dict[str, Any], out: TextIO) -> None:
    where = ", ".join(x for x in (v["provider"], v["region"]) if x)
    out.write(f"Server: {v['name']} ({where})\n")
    out.write(f"Labels:   [{', '.join(v['labels'])}]\n")
    out.write(f"Groups:   [{', '.join(v['groups'])}]\n")
    out.write(f"Environment: {v['environment'] or '—'}\n")
    if v["size"]:
        detail = f" ({v['size_detail']})" if v["size_detail"] else ""
        out.write(f"Size:     {v['size']}{detail}\n")
    if v["undefined_labels"]:
        out.write(f"⚠ Undefined labels (they give nothing): {', '.join(v['undefined_labels'])}\n")
    for title, items, key in (("Puppet Classes", v["puppet_classes"], "name"), ("Alerts", v["alerts"], "name"), ("Secrets", v["secrets"], "path")):
        out.write(f"\n{title} ({len(items)}):\n")
        groups = _by_source(items, key)
        auto = [i for s, lst in groups.items() if s.startswith("auto:") for i in lst]
        for source, lst in groups.items():
            if source.startswith("auto:"):
                continue
            out.write(f"  {_source_heading(source)}:\n")
            tree([f"{i[key]}" + (f" ({i['type']})" if i.get("type") else "") for i in lst], out, "    ")
        if auto:
            out.write("  AUTO-GENERATED:\n")
            tree([f"{i[key]} {_auto_note(i['source'])}" for i in auto], out, "    ")
    if v["excluded_from"]:
        out.write("\nExcluded From:\n")
        tree([f"{e['kind']} \"{e['name']}\" ({e['reason']})" if "explicitly" not in e["reason"] and e["reason"] != "by name" else f"{e['kind']} \"{e['name']}\" (explicitly excluded{': by name' if e['reason'] == 'by name' else ''})" for e in v["excluded_from"]], out)


@show_app.command("server")
def show_server(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """What a server gets, and from where."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.show_server(name)
    emit(view, fmt, _human_server)


def _server_line(s: dict[str, Any]) -> tuple[str, str]:
    meta = ", ".join(x for x in (s["provider"], s["environment"]) if x)
    pillars = "  ".join(pillar(s[p]) for p in ("sync", "puppet", "health", "identity"))
    return f"{s['name']} ({meta})", pillars


@show_app.command("label")
def show_label(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """Where a label applies and what it provides."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.show_label(name)

    def human(v: dict[str, Any], out: TextIO) -> None:
        out.write(f"Label: {v['name']}\n")
        if v["description"]:
            out.write(f"{v['description']}\n")
        n = len(v["servers"])
        out.write(f"Applied to: {n} server{'s' if n != 1 else ''}\n")
        if v["servers"]:
            out.write("\nServers:\n")
            aligned([_server_line(s) for s in v["servers"]], out)
        out.write("\nProvides:\n")
        out.write(f"  Puppet Classes: {', '.join(v['puppet_classes']) or '—'}\n")
        out.write(f"  Alerts: {', '.join(v['alerts']) or '—'}\n")
        out.write(f"  Secrets: {', '.join(v['secrets']) or '—'}\n")
        out.write(f"  Ports: {', '.join(map(str, v['ports'])) or '—'}\n")
        out.write(f"  Size: {v['size'] or '—'}{' (' + v['size_detail'] + ')' if v['size_detail'] else ''}\n")
        if v["groups_matching"]:
            out.write(f"\nGroups matching this label: {', '.join(v['groups_matching'])}\n")

    emit(view, fmt, human)


@show_app.command("group")
def show_group(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """A group's subgroup tree, members and exclusions."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.show_group(name)

    def human(v: dict[str, Any], out: TextIO) -> None:
        out.write(f"Group: {v['name']}\n")
        subs, n, ex = len(v["subgroups"]), len(v["members"]), len(v["excluded"])
        parts = [f"{subs} subgroup{'s' if subs != 1 else ''}"] if subs else []
        parts.append(f"{n} server{'s' if n != 1 else ''}" + (f" ({ex} excluded)" if ex else ""))
        out.write(f"Contains: {', '.join(parts)}\n")
        if v["match"]:
            out.write(f"Match: {v['match']}\n")
        if v["parents"]:
            out.write(f"Part of: {', '.join(v['parents'])}\n")
        if v["subgroups"]:
            out.write("\nSubgroups:\n")
            aligned([(s["name"], f"({s['servers']} server{'s' if s['servers'] != 1 else ''})") for s in v["subgroups"]], out)
        if v["members"]:
            out.write("\nServers:\n")
            aligned([_server_line(s) for s in v["members"]], out)
        if v["explicit_servers"]:
            out.write(f"\nListed by name: {', '.join(v['explicit_servers'])}\n")
        if v["missing_servers"]:
            out.write(f"⚠ Not in the inventory: {', '.join(v['missing_servers'])}\n")
        if v["exclusion_rules"]:
            out.write("\nExcluded:\n")
            lines = []
            for rule in v["exclusion_rules"]:
                n = len(rule["servers"])
                if rule["rule"].endswith("(by name)"):
                    lines.append(rule["rule"] + ("" if n else " — not a member anyway"))
                else:
                    names = f": {', '.join(rule['servers'])}" if n else ""
                    lines.append(f"{n} server{'s' if n != 1 else ''} {rule['rule']}{names}")
            tree(lines, out)
        if v["alerts"]:
            out.write("\nAlerts targeting this group:\n")
            tree([f"{a['name']} ({a['severity']})" for a in v["alerts"]], out)

    emit(view, fmt, human)


@show_app.command("alert")
def show_alert(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """Where an alert applies."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.show_alert(name)

    def human(v: dict[str, Any], out: TextIO) -> None:
        out.write(f"Alert: {v['name']}\n")
        if v["kind"] == "defined":
            out.write(f"Severity: {v['severity']}\nCondition: {v['condition']}\n")
            if v["for"]:
                out.write(f"For: {v['for']}\n")
            out.write(f"Target: {v['target']}\nExcludes: {', '.join(v['excludes']) or 'none'}\n")
        else:
            out.write(f"Kind: {v['kind']}\n")
        if v["labels"]:
            out.write(f"Named by labels: {', '.join(v['labels'])}\n")
        n = len(v["servers"])
        out.write(f"\nApplies to {n} server{'s' if n != 1 else ''}:\n")
        aligned([(f"{s['name']} ({s['provider']})", "" if s["source"] == "target" else f"via {s['source']}") for s in v["servers"]], out)
        if v["excluded"]:
            out.write("\nExcluded:\n")
            tree([f"{e['server']} ({e['reason']})" for e in v["excluded"]], out)

    emit(view, fmt, human)


@show_app.command("secret")
def show_secret(path: str, definitions: Definitions = None, output: Output = "table") -> None:
    """A secret's definition and who may read it (never its value)."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.show_secret(path)

    def human(v: dict[str, Any], out: TextIO) -> None:
        out.write(f"Secret: {v['path']}\nType: {v['type']}" + (f" (generator: {v['generator']})" if v["generator"] else "") + "\n")
        if v["rotate_every"]:
            out.write(f"Rotate every: {v['rotate_every']}\n")
        if v["per_machine"]:
            out.write("Per machine: each server gets its own value\n")
        out.write(f"Delivered as: owner {v['owner']}, group {v['group']}, mode {v['mode']}\n")
        out.write("\nAccessible by (derived from definitions):\n")
        if not v["accessible_by"]:
            out.write("  nothing references it — orphaned?\n")
        for a in v["accessible_by"]:
            out.write(f'  Label "{a["label"]}"\n')
            tree([f"{s['name']} ({s['provider']})" for s in a["servers"]] or ["(no servers carry it yet)"], out, "    ")

    emit(view, fmt, human)


@targets_app.command("server")
def targets_server(name: str, definitions: Definitions = None, output: Output = "table") -> None:
    """Everything targeting a server, each with where it comes from."""
    fmt = _format(output)
    with _engine(definitions) as engine:
        view = engine.targets_server(name)

    def human(v: dict[str, Any], out: TextIO) -> None:
        out.write(f"Everything targeting {v['name']}:\n")
        out.write(f"  Labels:     [{', '.join(v['labels'])}]\n")
        out.write(f"  Groups:     [{', '.join(v['groups'])}]\n")
        out.write(f"  Environment: {v['environment'] or '—'}\n")
        for title, items, key in (("Alerts", v["alerts"], "name"), ("Puppet Classes", v["puppet_classes"], "name"), ("Secrets", v["secrets"], "path")):
            out.write(f"\n  {title} ({len(items)}):\n")
            aligned([(i[key], _from(i["source"])) for i in items], out, "    ")
        if v["excluded_from"]:
            out.write("\n  Excluded from:\n")
            aligned([(f"{e['kind']} {e['name']}", f"({e['reason']})") for e in v["excluded_from"]], out, "    ")

    emit(view, fmt, human)


def _from(source: str) -> str:
    kind, _, name = source.partition(":")
    if kind == "auto":
        return f"(auto-generated: {name})"
    return f"(from {kind}: {name})"


# -- command modules -------------------------------------------------------------------------
# Larger command families live in their own modules and register on `app` (or its sub-apps)
# when imported here, one line each.
from lab.coordinator.cli import dash_cmd  # noqa: E402,F401  `lab dash`
from lab.coordinator.cli import alerts_cmd  # noqa: E402,F401  `lab render/diff alerts`, health in show


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
