"""The `lab-agent` command line."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, TextIO

os.environ.setdefault("TYPER_USE_RICH", "0")  # plain usage errors; must precede `import typer`

import typer  # noqa: E402

from lab.common.errors import LabError  # noqa: E402

# Output helpers are shared with `lab` (they decide nothing about content).
from lab.common.render import FORMATS, emit  # noqa: E402

app = typer.Typer(
    name="lab-agent",
    rich_markup_mode=None,
    help="The agent every lab host runs: hardware facts, enrollment, secrets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Output = Annotated[str, typer.Option("--output", "-o", help="table, json or yaml.")]


@app.callback()
def _root() -> None:
    """The agent every lab host runs: hardware facts, enrollment, secrets."""


def _format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise typer.BadParameter(f"'{fmt}' is not one of: {', '.join(FORMATS)}", param_hint="--output")
    return fmt


@app.command()
def facts(
    output: Output = "table",
    raw: Annotated[bool, typer.Option("--raw", help="The unparsed data from every source (for test fixtures).")] = False,
) -> None:
    """Detect this host's hardware and suggest labels for it."""
    from lab.agent.facts import collect_raw, parse_facts, render_text, suggest_labels

    fmt = _format(output)
    data = collect_raw()
    if raw:
        emit(data, "yaml" if fmt == "yaml" else "json", lambda d, out: None)
        return
    parsed = parse_facts(data)
    suggestions = suggest_labels(parsed)
    result: dict[str, Any] = {"facts": parsed.to_dict(), "suggestions": [s.to_dict() for s in suggestions]}

    def human(_: Any, out: TextIO) -> None:
        render_text(parsed, suggestions, out)

    emit(result, fmt, human)



@app.command()
def enroll(
    server: Annotated[str, typer.Option("--server", help="The coordinator, HOST:PORT (default port 7443).")],
    token: Annotated[str | None, typer.Option("--token", help="The join token (visible to other users in the process list: prefer --token-file).")] = None,
    token_file: Annotated[str | None, typer.Option("--token-file", help="File holding the join token; removed after use. Default /etc/lab/join-token.")] = None,
    home: Annotated[str | None, typer.Option("--home", help="Agent home (default: $LAB_HOME, then /var/lib/lab).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option("--name", help="Refuse unless the token is for this server.")] = None,
    output: Output = "table",
) -> None:
    """Join the cluster with a one-time token: get a certificate, the CA key and store endpoints."""
    import trio

    from lab.agent.enroll import DEFAULT_TOKEN_FILE, agent_home, enroll as do_enroll, read_token_file
    from lab.common.errors import UsageError
    from lab.common.rpc import parse_endpoint

    fmt = _format(output)
    host, port = parse_endpoint(server, 7443)
    if token is not None and token_file is not None:
        raise UsageError("give --token or --token-file, not both")
    if token is not None:
        print("lab-agent: warning: --token is visible to other users of this host (ps, /proc); prefer --token-file", file=sys.stderr)
        text, path = token, None
    else:
        path = token_file or DEFAULT_TOKEN_FILE
        text = read_token_file(path)
    result = trio.run(lambda: do_enroll(host, port, text, agent_home(home), name=name))
    if path is not None:
        try:
            os.unlink(path)
        except OSError as exc:
            print(f"lab-agent: warning: could not remove the used token file {path}: {exc.strerror}", file=sys.stderr)

    def human(r: dict[str, Any], out: TextIO) -> None:
        out.write(f"✓ enrolled as {r['node']} with {r['coordinator']} (labels: {','.join(r['labels']) or 'none'})\n")
        out.write(f"✓ identity in {r['home']}; stores: {', '.join(r['stores']) or 'none yet'}\n")

    emit(result.to_dict(), fmt, human)


# -- daemon and cache (agent/daemon.py, agent/cache.py) ----------------------------------------

HomeOpt = Annotated[str | None, typer.Option("--home", help="Agent home (default: $LAB_HOME, then /var/lib/lab).", show_default=False)]
RuntimeOpt = Annotated[str | None, typer.Option("--runtime-dir", help="Socket directory (default: $LAB_RUNTIME_DIR, then /run/lab).", show_default=False)]
SecretsOpt = Annotated[str | None, typer.Option("--secrets-dir", help="Secret files (default: $LAB_SECRETS_DIR, then /run/secrets).", show_default=False)]


@app.command("run")
def run_daemon(
    home: HomeOpt = None,
    runtime_dir: RuntimeOpt = None,
    secrets_dir: SecretsOpt = None,
    key_protection: Annotated[str, typer.Option("--key-protection", help="New cache key: auto, tpm or file.")] = "auto",
) -> None:
    """Run the agent: serve secrets from the local cache on agent.sock and /run/secrets."""
    from lab.agent.daemon import AgentConfig, main

    main(AgentConfig.resolve(home, runtime_dir, secrets_dir, key_protection=key_protection))


cache_app = typer.Typer(rich_markup_mode=None, help="The local secret cache (admin and debugging).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("import")
def cache_import(
    source: Annotated[str, typer.Option("--from", help="YAML file: {secrets: [{path, value, owner, group, mode, ttl, ...}]}.")],
    home: HomeOpt = None,
    runtime_dir: RuntimeOpt = None,
) -> None:
    """Seed the cache from a YAML file (root only; a test and bootstrap aid, not the normal path)."""
    import time
    from pathlib import Path

    import yaml

    from lab.agent import localclient
    from lab.agent.cache import SecretCache, records_from_import
    from lab.agent.daemon import AgentConfig
    from lab.common.errors import AuthError, ConfigError

    if os.geteuid() != 0:
        raise AuthError("cache import needs root")
    cfg = AgentConfig.resolve(home, runtime_dir)
    try:
        doc = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=source) from exc
    records = records_from_import(doc, time.time(), base_dir=Path(source).parent)
    with SecretCache.open(cfg.home) as cache:
        for rec in records:
            cache.put(rec)
    try:
        localclient.call({"t": "agent.reload"}, str(cfg.socket_path))
        note = "agent reloaded"
    except localclient.AgentError:
        note = "agent not running; it delivers them when it starts"
    print(f"imported {len(records)} secrets into {cfg.home / 'cache'} ({note})")


# -- store role (agent/store_cmd.py) -------------------------------------------------------------
from lab.agent.store_cmd import store_app  # noqa: E402

app.add_typer(store_app, name="store")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI; a LabError becomes one line on stderr and a non-zero status.
    With ``argv`` given (tests), the status is returned instead of exiting."""
    try:
        app(args=argv, prog_name="lab-agent")
        code: int = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except LabError as exc:
        print(f"lab-agent: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("lab-agent: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `lab-agent facts | head`
        code = 0
    if argv is None:
        sys.exit(code)
    return code


def main() -> None:
    run()
