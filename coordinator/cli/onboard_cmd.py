"""`lab onboard NAME --provider ssh --host H …` (spec "Scenario A"; docs/ONBOARDING.md).

Registers on the ``app`` of :mod:`lab.coordinator.cli.app` when imported there. The pure
pieces (render table, plan, commands, host key policy) live in :mod:`lab.coordinator.providers`;
this module does the I/O around them: known_hosts files, the wheelhouse, the engine (token,
audit, inventory) and the prompt.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Annotated, Any

import typer

from lab.common.errors import AuthError, ConfigError, LabError, UsageError
from lab.coordinator.cli import app as base

WAIT_ENROLLED_S = 60.0
INJECT_ENV = "LAB_ONBOARD_INJECT_FAILURE"  # test hook: "install" corrupts the copied wheel, once per run
SOURCE_DIRS = ("common", "agent", "store", "coordinator")


def _say(text: str = "") -> None:
    print(text, flush=True)


# -- wheelhouse --------------------------------------------------------------------------------


def _repo_root() -> pathlib.Path:
    import lab.coordinator

    root = pathlib.Path(lab.coordinator.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise ConfigError("lab is not installed from a source checkout: pass --wheelhouse DIR with lab's wheel and its dependencies")
    return root


def _source_key(root: pathlib.Path) -> str:
    h = hashlib.sha256()
    files = [root / "pyproject.toml"]
    for d in SOURCE_DIRS:
        files += sorted(p for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheelhouse(dest: pathlib.Path) -> pathlib.Path:
    """This project's wheel plus every dependency wheel (for this machine's Python and arch) in
    ``dest``; built from a copy of the source tree so the checkout is never written to."""
    root = _repo_root()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lab-wheel-") as tmp:
        src = pathlib.Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).exists():
                shutil.copy2(root / name, src / name)
        for d in SOURCE_DIRS:
            shutil.copytree(root / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        for step in ("wheel", "download"):
            if step == "wheel":
                cmd = [*pip, "wheel", "--no-deps", "-w", str(dest), str(src)]
            else:  # every dependency, as wheels, for this Python and machine
                cmd = [*pip, "download", "-d", str(dest), *map(str, dest.glob("lab-*.whl"))]
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["failed"])[-1]
                raise LabError(f"building the agent wheels failed (pip {step}): {last}")
    return dest


def wheelhouse(home: pathlib.Path, given: str | None) -> pathlib.Path:
    """``--wheelhouse`` as given, else ``$LAB_HOME/wheels/<source hash>`` (built once per source)."""
    if given:
        path = pathlib.Path(given)
        if not list(path.glob("lab-*.whl")):
            raise ConfigError("no lab-*.whl in the wheelhouse", str(path))
        return path
    root = _repo_root()
    final = home / "wheels" / _source_key(root)
    if (final / ".complete").exists():
        return final
    _say(f"  → Build lab agent wheels into {final} (once per source version)")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_wheelhouse(tmp)
    (tmp / ".complete").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


# -- known hosts -------------------------------------------------------------------------------


def _known_hosts_files(home: pathlib.Path, extra: str | None) -> list[pathlib.Path]:
    files = [pathlib.Path.home() / ".ssh" / "known_hosts", home / "known_hosts"]
    if extra:
        files.insert(0, pathlib.Path(extra))
    return files


def _check_host_key(target: Any, home: pathlib.Path, accept_new: bool, extra: str | None) -> str:
    """Decide on the presented host key; returns the pinned "ALG BASE64" or raises AuthError."""
    from lab.coordinator.providers import _asyncssh, _known_hosts

    alg, key = _asyncssh.fetch_host_key(target)
    texts = []
    for f in _known_hosts_files(home, extra):
        try:
            texts.append(f.read_text())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read known_hosts: {exc.strerror}", str(f)) from exc
    d = _known_hosts.decide(texts, target.host, target.port, alg, key, accept_new=accept_new)
    if d.action == _known_hosts.REFUSE:
        raise AuthError(d.reason)
    if d.action == _known_hosts.ACCEPT_NEW:
        bar = "!" * 72
        print(
            f"{bar}\n!! NEW HOST KEY accepted for {_known_hosts.host_name(target.host, target.port)} (--accept-new-host-key)\n"
            f"!!   {alg} {d.fingerprint}\n!! recorded in {home / 'known_hosts'}; a different key later is refused.\n{bar}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        home.mkdir(parents=True, exist_ok=True)
        with (home / "known_hosts").open("a") as f:
            f.write(_known_hosts.known_hosts_line(target.host, target.port, alg, key))
    return f"{alg} {key}"


# -- the command -------------------------------------------------------------------------------


def _server_endpoint(home: pathlib.Path, given: str | None) -> str:
    from lab.common.rpc import parse_endpoint

    text = given or base._read_settings(home).get("server")
    if not text:
        raise UsageError("which coordinator should the agent reach? pass --server HOST:PORT (the address of `lab server run` as the target sees it)")
    host, port = parse_endpoint(str(text), 7443)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ask(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask 'Proceed? [y/N]' on: pass --yes to onboard without asking")
    answer = input(f"  {question} [y/N]: ").strip().lower()
    if answer not in ("y", "yes"):
        raise LabError("onboarding cancelled; nothing was changed on the host")


@base.app.command("onboard")
def onboard(
    name: Annotated[str, typer.Argument(help="Server name (DNS label).")],
    provider: Annotated[str, typer.Option("--provider", "-p", help="Only ssh so far.")],
    host: Annotated[str, typer.Option("--host", help="Address of the machine.")],
    port: Annotated[int, typer.Option("--port", help="SSH port.")] = 22,
    user: Annotated[str, typer.Option("--user", "-u", help="SSH user (root, or one that can write the agent's paths).")] = "root",
    identity: Annotated[str | None, typer.Option("--identity", "-i", help="Private key file (default: ~/.ssh/id_* and ssh-agent).")] = None,
    labels: Annotated[list[str] | None, typer.Option("--labels", "--label", "-l", help="Comma-separated labels.")] = None,
    environment: Annotated[str | None, typer.Option("--environment", "-e")] = None,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before applying.")] = False,
    accept_new_host_key: Annotated[bool, typer.Option("--accept-new-host-key", help="Trust an unknown host key (printed loudly; recorded in $LAB_HOME/known_hosts).")] = False,
    server: Annotated[str | None, typer.Option("--server", help="Coordinator endpoint the agent should reach (default: the configured `lab server connect` one).")] = None,
    known_hosts: Annotated[str | None, typer.Option("--known-hosts", hidden=True)] = None,
    target_root: Annotated[str, typer.Option("--target-root", hidden=True, help="Prefix for every remote path (tests).")] = "",
    service_mode: Annotated[str, typer.Option("--service-mode", hidden=True, help="auto, systemd or process.")] = "auto",
    wheels: Annotated[str | None, typer.Option("--wheelhouse", hidden=True, help="Prebuilt wheels (lab + dependencies).")] = None,
    definitions: base.Definitions = None,
) -> None:
    """Onboard a machine that already has an OS: render, ask, install the agent, enroll it."""
    from lab.coordinator import tokens
    from lab.coordinator.cli.token_cmd import _ca_fingerprint
    from lab.coordinator.engine import _split
    from lab.coordinator.providers import _asyncssh, ssh
    from lab.coordinator.state import validate_server_name

    if provider != "ssh":
        raise UsageError(f"provider {provider!r} is not supported by `lab onboard` yet (only ssh)")
    if service_mode not in ssh.SERVICE_MODES:
        raise UsageError(f"--service-mode must be one of {', '.join(ssh.SERVICE_MODES)}")
    validate_server_name(name)
    label_list = _split(labels)
    paths = base.Paths.resolve(definitions)
    home = paths.home
    endpoint = _server_endpoint(home, server)
    target = _asyncssh.SshTarget(host, port, user, identity)
    remote_paths = ssh.RemotePaths(target_root)

    with base._engine(definitions, local=True) as engine:
        if label_list:
            engine._check_labels(label_list)
        fpr = _ca_fingerprint(home)

        def audit(action: str, detail: dict[str, Any]) -> None:
            with engine.state.transaction():
                engine.state.audit(action, name, detail)

        # Step 1: render
        _say("Step 1: Render")
        try:
            pinned = _check_host_key(target, home, accept_new_host_key, known_hosts)
            client = _asyncssh.SshClient.connect(target, pinned)
        except LabError as exc:
            failed = ssh.OnboardFailed("connect", str(exc))
            failed.exit_code = exc.exit_code  # a refused host key or login stays an AuthError's status
            raise failed from exc
        with client:
            r = client.run(ssh.probe_command(), timeout=60)
            if r.rc != 0:
                raise ssh.OnboardFailed("connect", (r.stderr.strip().splitlines() or ["the facts probe failed (is python3 installed?)"])[-1])
            try:
                facts, target_info = ssh.parse_probe(r.stdout)
            except ValueError as exc:
                raise ssh.OnboardFailed("connect", str(exc)) from exc
            mode = service_mode
            if mode == "auto":
                mode = "systemd" if client.run(ssh.commands_for(ssh.Remote(remote_paths, endpoint, name, "x"))["systemd"]).stdout.strip() == "yes" else "process"
            rows = ssh.table_rows(name, host, facts)
            for line in ssh.render_table(rows).splitlines():
                _say("  " + line)
            _say("\n  Onboarding will:")
            zone = (base._read_settings(home).get("dns") or {}).get("zone")
            for line in ssh.plan_lines(name, dns_zone=zone, labels=label_list):
                _say("  " + line)
            _say(f"  + Start the agent as a {'systemd unit' if mode == 'systemd' else 'supervised background process'}; it reaches {endpoint}")
            suggestions = ssh.suggest(facts)
            if suggestions:
                _say("\n  Detected hardware:")
                for line in ssh.suggestion_lines(suggestions):
                    _say("    " + line)
            if not label_list and suggestions:
                _say(f"  (suggested: --labels {','.join(s.label for s in suggestions)})")
            local_py = f"{sys.version_info.major}.{sys.version_info.minor}"
            if target_info.get("python", "").rsplit(".", 1)[0] != local_py or target_info.get("machine") != os.uname().machine:
                _say(f"  ! the target runs Python {target_info.get('python')} on {target_info.get('machine')}; the shipped dependency wheels are for Python {local_py} on {os.uname().machine}")
            _say("")
            _ask("Proceed?", yes)

            # Step 3: apply
            _say("Step 3: Apply")
            audit("onboard.start", {"provider": "ssh", "host": host, "port": port, "user": user, "labels": label_list, "mode": mode})
            try:
                _say(f"  → SSH into {host} (connected; host key {pinned.split()[0]})")
                house = wheelhouse(home, wheels)
                wheel_files = {p.name: p for p in sorted(house.glob("*.whl"))}
                lab_wheel = next(n for n in wheel_files if n.startswith("lab-"))
                with engine.state.transaction():
                    try:
                        engine.state.get_server(name)
                    except LabError:
                        engine.state.add_server(name, "ssh", label_list, environment=environment, region=region)
                        engine.state.audit("server.add", name, {"provider": "ssh", "labels": label_list, "environment": environment, "region": region})

                def mint() -> str:
                    with engine.state.transaction():
                        try:  # an earlier, failed run's token is useless now
                            tokens.revoke_tokens(engine.state, name)
                        except LabError:  # none unused
                            pass
                        text, record = tokens.create_token(engine.state, fpr, name, label_list, environment=environment, region=region, ttl=15 * 60)
                        engine.state.audit("token.create", name, {"labels": label_list, "by": "onboard", "expires_at": record.expires_at})
                    return text

                def wait_enrolled() -> bool:
                    deadline = time.monotonic() + WAIT_ENROLLED_S
                    while time.monotonic() < deadline:
                        if getattr(engine.state.get_server(name), "enrolled_at", None):
                            return True
                        time.sleep(0.5)
                    return False

                unit = _repo_root() / "packaging" / "systemd" / "lab-agent.service" if mode == "systemd" else None
                run = ssh.Onboarding(
                    client, ssh.Remote(remote_paths, endpoint, name, lab_wheel, mode), wheel_files, mint, wait_enrolled, audit, _say,
                    unit_template=unit.read_text() if unit is not None else None, inject_failure=os.environ.get(INJECT_ENV) or None,
                )  # fmt: skip
                result = run.apply()
            except LabError as exc:
                step = getattr(exc, "step", "apply")
                audit("onboard.failed", {"step": step, "why": getattr(exc, "why", str(exc))})
                raise
        audit("onboard.done", {"mode": mode, "supervisor_pid": result["supervisor_pid"]})
        s = engine.state.get_server(name)
    _say(f"  → Identity established: {name} enrolled with {endpoint} (labels: {','.join(s.labels) or 'none'})")
    if result["supervisor_pid"]:
        _say(f"  → Agent supervisor pid {result['supervisor_pid']} (pidfile {remote_paths.pidfile}, log {remote_paths.log})")
    _say("  → Machine managed: `lab get servers` shows it")
