"""A local cluster of real processes on 127.0.0.1: `lab cluster up|status|stop|start|down|publish`.

One coordinator (``lab server run``), N stores (agents labelled ``secret-store`` running
``lab-agent store run`` and ``lab-agent run``) and named agents (``lab-agent run``), each with its
own home ``DIR/<node>`` (socket in ``DIR/<node>/run``, secret files in ``DIR/<node>/secrets``).
``DIR/cluster.yaml`` records what runs where (pids, ports, argv). See docs/CLUSTER.md.

The pure parts (agent specs, the plan, cluster.yaml) are unit-tested without sockets or processes
(tests/unit/test_cluster.py); the rest is proven by tests/integration/test_local_cluster.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from lab.common.errors import ConfigError, LabError, UsageError

CLUSTER_FILE: Final = "cluster.yaml"
COORDINATOR: Final = "coordinator"
STORE_LABEL: Final = "secret-store"
RUN_SUBDIR: Final = "run"  # = lab.agent.localclient.HOME_RUNTIME_SUBDIR
SECRETS_SUBDIR: Final = "secrets"
HOST: Final = "127.0.0.1"
STOP_TIMEOUT: Final = 10.0
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,62})$")


# ---------------------------------------------------------------------------------------------
# Pure parts


def parse_agent_spec(text: str) -> tuple[str, list[str]]:
    """``NAME=label1,label2`` (or just ``NAME``) → (name, labels)."""
    name, _, labels = text.partition("=")
    name = name.strip()
    if not _NAME.match(name):
        raise UsageError(f"bad agent name {name!r} in --agent {text!r} (lower-case letters, digits, '-')")
    out = [x.strip() for x in labels.split(",") if x.strip()]
    for label in out:
        if not _LABEL.match(label):
            raise UsageError(f"bad label {label!r} in --agent {text!r}")
    return name, list(dict.fromkeys(out))


@dataclasses.dataclass
class Process:
    role: str  # coordinator | store | agent
    argv: list[str]
    port: int | None = None
    pid: int | None = None
    started: int | None = None  # /proc/<pid>/stat start time (clock ticks): guards against pid reuse
    log: str = ""


@dataclasses.dataclass
class Node:
    name: str
    kind: str  # coordinator | store | agent
    home: str
    labels: list[str] = dataclasses.field(default_factory=list)
    processes: list[Process] = dataclasses.field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"LAB_HOME": self.home}


@dataclasses.dataclass
class ClusterSpec:
    dir: str
    nodes: list[Node]
    definitions: str | None = None

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UsageError(f"no node {name!r} in this cluster (nodes: {', '.join(n.name for n in self.nodes)})")

    @property
    def coordinator(self) -> Node:
        return self.node(COORDINATOR)

    @property
    def stores(self) -> list[Node]:
        return [n for n in self.nodes if n.kind == "store"]

    def port(self, node: str, role: str) -> int:
        for p in self.node(node).processes:
            if p.role == role and p.port:
                return p.port
        raise ConfigError(f"{node} has no {role} port", file=str(Path(self.dir) / CLUSTER_FILE))

    def store_endpoints(self) -> list[str]:
        return [f"{HOST}:{self.port(n.name, 'store')}" for n in self.stores]

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "dir": self.dir, "definitions": self.definitions,
                "nodes": [dataclasses.asdict(n) for n in self.nodes]}

    @classmethod
    def from_dict(cls, data: Any, where: str = CLUSTER_FILE) -> ClusterSpec:
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("nodes"), list):
            raise ConfigError("not a lab cluster file (version 1)", file=where)
        try:
            nodes = [Node(**{**n, "processes": [Process(**p) for p in n.get("processes") or []]}) for n in data["nodes"]]
        except TypeError as exc:
            raise ConfigError(f"malformed cluster file: {exc}", file=where) from None
        return cls(str(data.get("dir") or ""), nodes, data.get("definitions"))


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    module = "lab.agent.cli" if name == "lab-agent" else "lab.coordinator.cli"
    return [sys.executable, "-c", f"from {module} import main; main()"]


def plan(directory: str | os.PathLike[str], stores: int, agents: Sequence[tuple[str, list[str]]], ports: Iterable[int],
         definitions: str | None = None) -> ClusterSpec:
    """The nodes, homes, ports and command lines of a cluster (no process is started here)."""
    if stores < 1:
        raise UsageError("a cluster needs at least one store (--stores 1 or more)")
    root = Path(directory).resolve()
    names = [COORDINATOR] + [f"store-{i}" for i in range(1, stores + 1)]
    for name, _ in agents:
        if name in names:
            raise UsageError(f"node name {name!r} is taken (coordinator and store-N are the cluster's own)")
        names.append(name)
    port_iter = iter(ports)
    lab, agent = _bin("lab"), _bin("lab-agent")
    coord_home = str(root / COORDINATOR)
    cport = next(port_iter)
    nodes = [Node(COORDINATOR, "coordinator", coord_home, [], [Process(
        "coordinator", [*lab, "server", "run", "--listen", f"{HOST}:{cport}"], cport, log=str(root / COORDINATOR / "coordinator.log"))])]
    store_ports = {f"store-{i}": next(port_iter) for i in range(1, stores + 1)}
    members: list[tuple[str, str, list[str]]] = [(n, "store", [STORE_LABEL]) for n in store_ports]
    members += [(n, "agent", labels) for n, labels in agents]
    for name, kind, labels in members:
        home = root / name
        procs = []
        if kind == "store":
            peers = [a for other, p in store_ports.items() if other != name for a in ("--peer", f"{HOST}:{p}")]
            procs.append(Process("store", [*agent, "store", "run", "--home", str(home), "--listen", f"{HOST}:{store_ports[name]}",
                                           "--ae-interval", "2", "--backoff-cap", "2", *peers],
                                 store_ports[name], log=str(home / "store.log")))
        procs.append(Process("agent", [*agent, "run", "--home", str(home), "--runtime-dir", str(home / RUN_SUBDIR),
                                       "--secrets-dir", str(home / SECRETS_SUBDIR), "--key-protection", "file"],
                             log=str(home / "agent.log")))
        nodes.append(Node(name, kind, str(home), labels, procs))
    return ClusterSpec(str(root), nodes, definitions)


def save(spec: ClusterSpec) -> Path:
    path = Path(spec.dir) / CLUSTER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


def load(directory: str | os.PathLike[str]) -> ClusterSpec:
    path = Path(directory) / CLUSTER_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("no cluster here (run `lab cluster up --dir DIR` first)", file=str(path)) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the cluster file: {exc}", file=str(path)) from None
    return ClusterSpec.from_dict(data, str(path))


def status_rows(spec: ClusterSpec, alive: Any = None) -> list[dict[str, Any]]:
    """One row per process: node, role, pid, port, alive (``alive(Process) -> bool``)."""
    check = alive or is_alive
    return [{"node": n.name, "role": p.role, "pid": p.pid, "port": p.port, "alive": bool(p.pid) and check(p), "home": n.home}
            for n in spec.nodes for p in n.processes]


# ---------------------------------------------------------------------------------------------
# Processes (only the ones recorded in cluster.yaml, checked by pid *and* start time)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie is not running
    return int(fields[19])


def is_alive(proc: Process) -> bool:
    if not proc.pid:
        return False
    started = _start_time(proc.pid)
    return started is not None and (proc.started is None or started == proc.started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _child_env(node: Node) -> dict[str, str]:
    env = dict(os.environ, **node.env(), PYTHONUNBUFFERED="1")
    for k in ("LAB_DEFINITIONS", "LAB_RUNTIME_DIR", "LAB_SECRETS_DIR", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    return env


def spawn(node: Node, proc: Process) -> None:
    Path(node.home).mkdir(mode=0o700, parents=True, exist_ok=True)
    log = Path(proc.log)
    if log.exists():
        with log.open("ab") as f:
            f.write(f"--- restart {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
    with log.open("ab") as out:
        child = subprocess.Popen(proc.argv, env=_child_env(node), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True)
    proc.pid, proc.started = child.pid, None
    proc.started = _start_time(child.pid)


def _log_mark(proc: Process) -> int:
    try:
        return Path(proc.log).stat().st_size
    except OSError:
        return 0


def wait_ready(proc: Process, since: int, timeout: float = 60.0) -> None:
    marker = {"coordinator": "event=daemon.ready", "store": "event=store.ready", "agent": "event=ready"}[proc.role]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(proc.log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        if marker in text:
            return
        if not is_alive(proc):
            raise LabError(f"{proc.role} process {proc.pid} exited before it was ready; see {proc.log}:\n{text[-1500:]}")
        time.sleep(0.05)
    raise LabError(f"{proc.role} process {proc.pid} not ready after {timeout:g}s; see {proc.log}")


def start_node(node: Node, timeout: float = 60.0) -> None:
    """Start the node's processes that are not running, and wait until each serves."""
    for proc in node.processes:
        if is_alive(proc):
            continue
        mark = _log_mark(proc)
        spawn(node, proc)
        wait_ready(proc, mark, timeout)


def stop_processes(procs: Sequence[Process], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM each live process, SIGKILL what remains after ``timeout``; the pids signalled."""
    live = [p for p in procs if is_alive(p)]
    for p in live:
        try:
            os.kill(p.pid, signal.SIGTERM)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(is_alive(p) for p in live) and time.monotonic() < deadline:
        for p in live:  # our own children (cluster up in this process): reap them
            try:
                os.waitpid(p.pid, os.WNOHANG)  # type: ignore[arg-type]
            except ChildProcessError:
                pass
        time.sleep(0.05)
    for p in live:
        if is_alive(p):
            try:
                os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(is_alive(p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p.pid for p in live if p.pid]


def stop_node(node: Node, timeout: float = STOP_TIMEOUT) -> list[int]:
    return stop_processes(list(reversed(node.processes)), timeout)


# ---------------------------------------------------------------------------------------------
# Store RPC from the coordinator's home (admin identity): writes and policy


def configured_stores(home: Path) -> list[str]:
    """``stores:`` of ``home/config.yaml`` (written by `lab cluster up`): where `lab secret set` writes."""
    from lab.coordinator.engine import _read_settings

    stores = _read_settings(Path(home)).get("stores")
    if stores is None:
        return []
    if not isinstance(stores, list) or not all(isinstance(s, str) for s in stores):
        raise ConfigError("stores must be a list of HOST:PORT", file=str(Path(home) / "config.yaml"))
    return stores


def store_call(home: Path, stores: Sequence[str], method: str, body: dict[str, Any], *, every: bool = False) -> list[tuple[str, Any]]:
    """Call ``method`` on the first store that answers (or on ``every`` one), as the home's admin.
    Returns (endpoint, reply or the LabError). Raises when no store answered at all."""
    import trio

    from lab.common import rpc
    from lab.common.errors import TransportError
    from lab.coordinator.enrollment import load_identity

    identity = load_identity(home, "admin")
    results: list[tuple[str, Any]] = []
    errors: list[str] = []

    async def main() -> None:
        for ep in stores:
            host, port = rpc.parse_endpoint(ep, 7444)
            try:
                async with rpc.connect(host, port, identity=identity, timeout=5) as conn:
                    try:
                        results.append((ep, await conn.call(method, body, timeout=15)))
                    except rpc.RemoteError as exc:
                        results.append((ep, exc))
            except (TransportError, OSError) as exc:
                errors.append(f"{ep}: {exc}")
                continue
            if not every:
                return

    trio.run(main)
    if not results:
        raise TransportError(f"no store reachable ({'; '.join(errors)})")
    return results


def remote_set(home: Path, stores: Sequence[str], path: str, value: bytes, meta: Any, node: str | None) -> str:
    body: dict[str, Any] = {"path": path, "value": value, "type": meta.type, "owner": meta.owner, "group": meta.group,
                            "mode": meta.mode, "ttl": meta.ttl, "rotate_every": meta.rotate_every, "node": node}
    ep, reply = store_call(home, stores, "store.set", {k: v for k, v in body.items() if v is not None})[0]
    if isinstance(reply, Exception):
        raise reply
    return str(reply["version"])


def _reply(ep_reply: tuple[str, Any]) -> tuple[str, dict[str, Any]]:
    ep, reply = ep_reply
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, dict):
        raise LabError(f"{ep}: malformed reply")
    return ep, reply


def remote_backup(home: Path, stores: Sequence[str], directory: str | os.PathLike[str], recipients: Sequence[str], *,
                  now: float, remote: str | None = None) -> Any:
    """`lab secret backup` against the cluster: one store (the first that answers, then the same
    one for every page) encrypts the values to ``recipients`` and sends the ``.age`` files and the
    index data (``store.backup``, admin only); they are written and committed here exactly as a
    local backup (lab.store.backup). Values the repository already holds at the same version are
    not sent again, so Git history shows only what changed."""
    from lab.store import backup as backup_mod

    backup_mod.parse_recipients(recipients)  # a bad recipient is refused before any store is asked
    have, have_key = backup_mod.plan_backup(directory, recipients)
    entries: dict[str, dict[str, Any]] = {}
    policy: dict[str, Any] | None = None
    key_age: bytes | None = None
    after: str | None = None
    where = list(stores)
    while True:
        body: dict[str, Any] = {"recipients": list(recipients), "have": have, "key": not have_key and after is None}
        if after is not None:
            body["after"] = after
        ep, reply = _reply(store_call(home, where, "store.backup", body)[0])
        where = [ep]  # every page from the same replica
        page = reply.get("secrets")
        if not isinstance(page, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in page.items()):
            raise LabError(f"{ep}: malformed backup page")
        entries.update(page)
        if isinstance(reply.get("policy"), dict):
            policy = reply["policy"]
        if after is None and isinstance(reply.get("key"), bytes):
            key_age = reply["key"]
        nxt = reply.get("next")
        if nxt is None:
            break
        if not isinstance(nxt, str) or (after is not None and nxt <= after):
            raise LabError(f"{ep}: malformed backup page cursor")
        after = nxt
    if not have_key and key_age is None:
        raise LabError(f"{where[0]} did not send the dataset key")
    result = backup_mod.write_files(directory, recipients, entries, policy, key_age, now=now)
    return backup_mod.commit_backup(result, remote=remote)


RESTORE_BATCH_BYTES: Final = 4 * 1024 * 1024
RESTORE_BATCH_ITEMS: Final = 1000


def remote_restore(home: Path, stores: Sequence[str], backup_dir: str | os.PathLike[str], identity_file: str | os.PathLike[str],
                   *, force: bool = False) -> dict[str, Any]:
    """`lab secret recover` against the cluster: decrypt the backup here with the age identity,
    publish its CA-signed revocation list and policy (``store.publish``, every store that answers),
    and write every secret back (``store.restore``, admin only, first store that answers) with its
    metadata at a fresh version, so the recovered values win on every store once gossip has
    carried them. Refuses stores that already hold secrets unless ``force``."""
    from lab.store import backup as backup_mod
    from lab.store.policy import COORDINATOR_PATH, POLICY_PATH, REVOCATIONS_PATH, STORES_PATH

    identities = backup_mod.load_identities(identity_file)
    ep, meta = _reply(store_call(home, stores, "store.meta", {})[0])
    held = meta.get("records") or {}
    if held and not force:
        raise UsageError(f"{ep} already holds {len(held)} secrets: recovering would replace them with the backup's values; "
                         f"give --force to do it anyway")
    where = [ep, *[s for s in stores if s != ep]]
    system: dict[str, bytes] = {}
    batch: list[dict[str, Any]] = []
    size = restored = 0

    def flush() -> None:
        nonlocal batch, size, restored, where
        if batch:
            used, _ = _reply(store_call(home, where, "store.restore", {"records": batch})[0])
            where = [used, *[s for s in where if s != used]]
            restored += len(batch)
        batch, size = [], 0

    for path, _version, m, value in backup_mod.read_backup(backup_dir, identities):
        if path in (POLICY_PATH, REVOCATIONS_PATH, STORES_PATH, COORDINATOR_PATH):
            system[path] = value
            continue
        batch.append({"path": path, "value": value, "meta": m._to_wire()})
        size += len(value) + 512
        if size >= RESTORE_BATCH_BYTES or len(batch) >= RESTORE_BATCH_ITEMS:
            flush()
    published: dict[str, list[str]] = {}
    if REVOCATIONS_PATH in system:  # revoked nodes stay revoked before anything is served
        published["revocations"] = _publish_signed(home, stores, {"revocations": system[REVOCATIONS_PATH]})
    flush()
    signed = {k: system[p] for k, p in (("policy", POLICY_PATH), ("stores", STORES_PATH)) if p in system}
    if signed:  # the policy with the store directory (either may be missing from an older backup)
        published["policy" if "policy" in signed else "stores"] = _publish_signed(home, stores, signed)
    if COORDINATOR_PATH in system:  # [migrate] where the coordinator answers (a store keeps it only if newer)
        published["coordinator"] = _publish_signed(home, stores, {"coordinator": system[COORDINATOR_PATH]})
    return {"store": where[0], "restored": restored, "published": published}


def _publish_signed(home: Path, stores: Sequence[str], body: dict[str, Any]) -> list[str]:
    """``store.publish`` a signed document to every store that answers; the endpoints that hold it
    (an equal or newer one counts)."""
    results = store_call(home, stores, "store.publish", body, every=True)
    return [ep for ep, r in results if not isinstance(r, Exception) or "not newer" in str(r)]


def publish_policy(home: Path, stores: Sequence[str] | None = None) -> dict[str, Any]:
    """Compile the policy (definitions + inventory of ``home``, revoked nodes left out), sign it
    with the CA, publish it to every reachable store. Version: milliseconds since the epoch (always
    newer than the last). ``unreachable``: the stores that did not answer (gossip catches them up)."""
    from lab.common.identity import CertificateAuthority
    from lab.coordinator.engine import Engine, Paths
    from lab.coordinator.identity_ops import compile_policy_doc

    home = Path(home)
    stores = list(stores) if stores is not None else configured_stores(home)
    if not stores:
        raise ConfigError("no stores configured (config.yaml `stores:`)", file=str(home / "config.yaml"))
    ca = CertificateAuthority.load(home / "ca.key")
    engine = Engine.open(Paths.resolve(None, str(home)))
    try:
        now = time.time()
        doc = compile_policy_doc(engine, ca, now)
        directory = store_directory(engine, ca, doc.version, now)
    finally:
        engine.close()
    results = store_call(home, stores, "store.publish", {"policy": doc.encode(), "stores": directory.encode()}, every=True)
    accepted = [ep for ep, r in results if not isinstance(r, Exception) or "not newer" in str(r)]
    if not accepted:
        raise LabError(f"no store accepted the policy: {results[0][1]}")
    reached = {ep for ep, _ in results}
    return {"version": doc.version, "stores": accepted, "unreachable": [ep for ep in stores if ep not in reached],
            "grants": {n: list(g) for n, g in sorted(doc.grants.items())}, "store_names": list(doc.stores)}


def store_directory(engine: Any, ca: Any, version: int, now: float) -> Any:
    """The CA-signed store directory (``_lab/stores``): ``name → HOST:PORT`` of the enrolled,
    unrevoked nodes labelled secret-store that reported a store endpoint. Published with each
    policy, so running stores link to a store added later (store/node.py ``adopt_peers``)."""
    from lab.coordinator.identity_ops import is_revoked_marker
    from lab.store.policy import ENDPOINT_PATTERN, sign_directory

    reported = engine.state.endpoints()
    endpoints = {}
    for s in engine.state.list_servers():
        if STORE_LABEL not in s.labels or not s.enrolled_at or is_revoked_marker(s.cert_serial):
            continue
        ep = reported.get(s.name, {}).get("store")
        if ep and len(ep) <= 300 and re.fullmatch(ENDPOINT_PATTERN, ep):
            endpoints[s.name] = ep
    return sign_directory(ca, endpoints, version=version, now=now)


def republish_after_change(engine: Any) -> str | None:
    """[secrets] After an inventory change (`lab server add|relabel|remove`) in a home whose
    config.yaml lists ``stores:``: publish the recompiled signed policy. A store that does not
    answer is a warning on the engine, not a failure (gossip carries the policy to it); the line to
    show on success, else None. A remote engine (`lab server connect`): the daemon republishes."""
    from lab.coordinator.engine import Engine

    if not isinstance(engine, Engine):
        return None
    home = engine.paths.home
    try:
        stores = configured_stores(home)
        if not stores:
            return None
        r = publish_policy(home, stores)
    except Exception as exc:  # noqa: BLE001 - the inventory change is committed: republishing is best effort, never a failure
        why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        engine.state.warnings.append(f"secret policy not republished: {why} (run `lab cluster publish` once the stores answer)")
        return None
    for ep in r["unreachable"]:
        engine.state.warnings.append(f"store {ep} unreachable: policy version {r['version']} reaches it by gossip")
    return f"policy version {r['version']} published to {len(r['stores'])} store(s)"


async def republish_from_daemon(ops: Any) -> list[str]:
    """[secrets] The daemon's counterpart of :func:`republish_after_change` after an admin's
    inventory write over the API (``ops``: the daemon's IdentityService — engine, CA, identity,
    stores). Never blocks the event loop on a store; returns warnings (a store unreachable, or
    none answering)."""
    from lab.coordinator.identity_ops import compile_policy_doc, publish_everywhere

    stores = ops.stores()
    if not stores:
        return []
    try:
        now = time.time()
        doc = compile_policy_doc(ops.engine, ops.ca, now)
        directory = store_directory(ops.engine, ops.ca, doc.version, now)
    except LabError as exc:
        return [f"secret policy not republished: {exc}"]
    published = await publish_everywhere(stores, ops.identity, [{"policy": doc.encode(), "stores": directory.encode()}])
    return [f"store {ep}: policy version {doc.version} not published ({why}); gossip or `lab cluster publish` catches it up"
            for ep, why in published.items() if why != "ok"]


# ---------------------------------------------------------------------------------------------
# up / down


def _run(argv: list[str], env: dict[str, str], what: str, stdin: bytes | None = None) -> str:
    r = subprocess.run(argv, env=env, capture_output=True, input=stdin if stdin is not None else b"", timeout=120)
    if r.returncode != 0:
        raise LabError(f"{what} failed: {r.stderr.decode(errors='replace').strip()[-800:]}")
    return r.stdout.decode()


def _token(coord: Node, name: str, labels: list[str]) -> str:
    import json

    args = [*_bin("lab"), "token", "create", name, "--ttl", "10m", "-o", "json"]
    if labels:
        args += ["--labels", ",".join(labels)]
    return str(json.loads(_run(args, _child_env(coord), f"lab token create {name}"))["token"])


def _write_settings(home: Path, **kw: Any) -> None:
    from lab.coordinator.engine import _read_settings

    settings = _read_settings(home)
    settings.update(kw)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = home / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(settings, sort_keys=True))
    os.replace(tmp, home / "config.yaml")


def up(directory: str | os.PathLike[str], *, stores: int = 2, agents: Sequence[tuple[str, list[str]]] = (),
       definitions: str | None = None, progress: Any = None) -> ClusterSpec:
    """Start the whole cluster; on any failure, stop what was started and re-raise."""
    import trio

    from lab.agent.enroll import enroll
    from lab.common.identity import NodeKey, write_private_file
    from lab.store.dataset import Dataset

    say = progress or (lambda _msg: None)
    root = Path(directory).resolve()
    if (root / CLUSTER_FILE).exists():
        old = load(root)
        if any(r["alive"] for r in status_rows(old)):
            raise UsageError(f"a cluster is already running in {root} (lab cluster status/down --dir {root})")
    if root.exists() and any(p.name != CLUSTER_FILE for p in root.iterdir()):
        raise UsageError(f"{root} is not empty: give a new directory (or `lab cluster down` and remove it)")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec = plan(root, stores, agents, free_ports(1 + stores), str(Path(definitions).resolve()) if definitions else None)
    coord = spec.coordinator
    try:
        home = Path(coord.home)
        if spec.definitions:
            _write_settings(home, definitions=spec.definitions)
        _run([*_bin("lab"), "init", "--local"], _child_env(coord), "lab init --local")
        say(f"coordinator: home {coord.home}")
        start_node(coord)
        save(spec)
        cport = spec.port(COORDINATOR, "coordinator")

        async def enroll_all() -> None:
            for node in spec.nodes[1:]:
                text = _token(coord, node.name, node.labels)
                endpoints = {"store": f"{HOST}:{spec.port(node.name, 'store')}"} if node.kind == "store" else None
                await enroll(HOST, cport, text, Path(node.home), collect=False, facts={"hostname": node.name},
                             endpoints=endpoints, name=node.name)
                say(f"{node.name}: enrolled (labels: {','.join(node.labels) or 'none'})")

        trio.run(enroll_all)
        # the dataset: created for store-1, its key sealed to the other stores' node keys
        first = spec.stores[0]
        ds = Dataset.create(Path(first.home) / "store", first.name)
        try:
            for other in spec.stores[1:]:
                pub = NodeKey.load(Path(other.home) / "node.key").public_key
                write_private_file(Path(other.home) / "dataset.key.sealed", ds.seal_key_for(pub))
        finally:
            ds.close()
        for node in spec.stores:
            start_node(node)
            save(spec)
        _write_settings(home, stores=spec.store_endpoints())
        pol = publish_policy(home, spec.store_endpoints())
        say(f"policy v{pol['version']} published to {', '.join(pol['stores'])}")
        for node in spec.nodes[1:]:
            if node.kind != "store":
                start_node(node)
                save(spec)
        save(spec)
    except BaseException:
        down(spec)
        raise
    return spec


def down(spec: ClusterSpec, timeout: float = STOP_TIMEOUT) -> list[int]:
    """Stop every recorded process (agents, then stores, then the coordinator). Idempotent."""
    order = [n for n in spec.nodes if n.kind == "agent"] + [n for n in spec.nodes if n.kind == "store"] + \
        [n for n in spec.nodes if n.kind == "coordinator"]
    procs = [p for n in order for p in reversed(n.processes)]
    return stop_processes(procs, timeout)


def describe(spec: ClusterSpec) -> str:
    """What runs where, and how to act as a node."""
    lines = [f"lab cluster in {spec.dir}", ""]
    for row in status_rows(spec):
        lines.append(f"  {row['node']:<14} {row['role']:<12} pid {row['pid'] or '—':<8} "
                     f"{(HOST + ':' + str(row['port'])) if row['port'] else '(unix socket ' + row['home'] + '/run/agent.sock)'}")
    coord = spec.coordinator.home
    lines += [
        "",
        "Act as a node: LAB_HOME=<dir>/<node> lab …, e.g.",
        f"  LAB_HOME={coord} lab get servers",
        f"  printf %s VALUE | LAB_HOME={coord} lab secret set PATH      # written to the stores",
    ]
    agents = [n for n in spec.nodes if n.kind != "coordinator"]
    if agents:
        lines.append(f"  LAB_HOME={agents[-1].home} lab secret get PATH")
    lines += [
        f"Status: lab cluster status --dir {spec.dir}   one node: lab cluster stop|start --dir {spec.dir} NODE",
        f"Stop everything: lab cluster down --dir {spec.dir}",
    ]
    return "\n".join(lines)
