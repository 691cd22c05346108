"""Three store processes on 127.0.0.1 (``lab-agent store run``), no coordinator process at all.

Certificates are minted here with a CertificateAuthority; the first store's dataset is created
here and its key sealed to the two others (``dataset.key.sealed``), as a running store would.
Agents are in-process trio clients (:func:`lab.agent.sync.sync_loop`) with their own certificates
and real encrypted caches.

Proves: a write to any store reaches the others; a store killed while writes continue, then
restarted, converges and nothing acknowledged is lost; an agent gets exactly its entitlement over
the wire; a certificate from another CA claiming an entitled node's name is refused; a revoked
certificate is refused by every store and its agent drops everything; a label removed from the
policy (republished) removes the path from the agent's cache and files.

:class:`Cluster` is reused by tests/bench/bench_store_loopback.py.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
import trio

from lab.common import rpc
from lab.common.errors import AuthError, NotEntitled, TransportError
from lab.common.identity import Certificate, CertificateAuthority, NodeKey, RevocationList, write_private_file
from lab.store.dataset import Dataset
from lab.store.policy import sign_policy

pytestmark = pytest.mark.slow

STORES = ("store-1", "store-2", "store-3")
GRANTS = {"agent-a": ["db/password", "mail/key"], "agent-b": ["db/password", "web/tls"], "agent-c": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_home(home: Path, ca: CertificateAuthority, name: str, roles: list[str]) -> tuple[NodeKey, Certificate]:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = NodeKey.generate()
    key.save(home / "node.key")
    cert = ca.issue(name, f"{name}-id", key.public_key, roles, 3600, time.time())
    (home / "node.cert").write_bytes(cert.encode())
    write_private_file(home / "ca.pub", f"lab-ca-pub-v1 {base64.b64encode(ca.public_key).decode()}\n".encode())
    return key, cert


class Cluster:
    """Three store processes with their homes, and identities to talk to them."""

    def __init__(self, root: Path, *, ae_interval: float = 0.5, fsync: bool = True) -> None:
        self.root = root
        self.ae_interval = ae_interval
        self.fsync = fsync
        self.ca = CertificateAuthority.generate()
        self.ports = {name: free_port() for name in STORES}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.keys: dict[str, NodeKey] = {}
        self.certs: dict[str, Certificate] = {}
        for name in STORES:
            self.keys[name], self.certs[name] = write_home(root / name, self.ca, name, ["store"])
        first = Dataset.create(root / STORES[0] / "store", STORES[0])
        try:
            for name in STORES[1:]:
                sealed = first.seal_key_for(self.keys[name].public_key)
                write_private_file(root / name / "dataset.key.sealed", sealed)
        finally:
            first.close()
        self.admin = self.identity("operator", ["admin"])
        self.revocations: RevocationList | None = None
        self.policy_version = 0

    def identity(self, name: str, roles: list[str] | tuple[str, ...] = ("agent",), *, ca: CertificateAuthority | None = None) -> rpc.Identity:
        ca = ca or self.ca
        key = NodeKey.generate()
        cert = ca.issue(name, f"{name}-{key.fingerprint[:8]}", key.public_key, list(roles), 3600, time.time())
        return rpc.Identity(key, cert, self.ca.public_key if ca is self.ca else ca.public_key)

    def endpoint(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    # -- processes ------------------------------------------------------------------------------

    def start(self, name: str, *, peers_from_enrollment: bool = False) -> None:
        peers = [a for n in STORES if n != name for a in ("--peer", self.endpoint(n))]
        if peers_from_enrollment:  # no --peer: the store list of enrollment.yaml (our own endpoint included, as a coordinator lists it)
            doc = {"name": name, "stores": [self.endpoint(n) for n in STORES]}
            (self.root / name / "enrollment.yaml").write_text(yaml.safe_dump(doc))
            peers = []
        cmd = [sys.executable, "-c", "from lab.agent.cli import main; main()", "store", "run", "--home", str(self.root / name),
               "--listen", self.endpoint(name), "--ae-interval", str(self.ae_interval), "--backoff-cap", "0.5", *peers]
        if not self.fsync:
            cmd.append("--no-fsync")
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=10)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, signal.SIGTERM)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    # -- talking to the stores -------------------------------------------------------------------

    async def call(self, store: str, method: str, body: dict[str, Any] | None = None, identity: rpc.Identity | None = None) -> dict[str, Any]:
        async with rpc.connect("127.0.0.1", self.ports[store], identity=identity or self.admin, timeout=5) as conn:
            return await conn.call(method, body or {}, timeout=10)

    async def wait_ready(self, name: str, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while True:
                try:
                    await self.call(name, "store.status")
                    return
                except TransportError:
                    if name in self.procs and self.procs[name].poll() is not None:
                        raise AssertionError(f"{name} exited:\n{self.log(name)[-3000:]}") from None
                    await trio.sleep(0.05)

    async def publish_policy(self, store: str, grants: dict[str, list[str]]) -> None:
        self.policy_version += 1
        doc = sign_policy(self.ca, grants, STORES, [], version=self.policy_version, now=time.time())
        await self.call(store, "store.publish", {"policy": doc.encode()})

    async def revoke(self, store: str, cert: Certificate) -> None:
        self.revocations = self.ca.revoke(self.revocations, [cert], time.time())
        await self.call(store, "store.publish", {"revocations": self.revocations.encode()})

    async def set(self, store: str, path: str, value: bytes, conn: rpc.Connection | None = None) -> dict[str, Any]:
        if conn is not None:
            return await conn.call("store.set", {"path": path, "value": value})
        return await self.call(store, "store.set", {"path": path, "value": value})

    async def statuses(self) -> dict[str, dict[str, Any]]:
        return {n: await self.call(n, "store.status") for n in self.procs}

    async def converged(self, timeout: float = 15) -> dict[str, dict[str, Any]]:
        with trio.fail_after(timeout):
            while True:
                st = await self.statuses()
                if len({s["root"] for s in st.values()}) == 1:
                    return st
                await trio.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = Cluster(tmp_path_factory.mktemp("stores"))
    try:
        for name in STORES:
            c.start(name)

        async def ready() -> None:
            for name in STORES:
                await c.wait_ready(name)
            await c.publish_policy("store-1", GRANTS)
            await c.converged()

        trio.run(ready)
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------


def test_a_write_to_any_store_reaches_the_others(cluster: Cluster) -> None:
    reader = cluster.identity("agent-a")

    async def main() -> None:
        for i, store in enumerate(STORES):
            await cluster.set(store, "db/password", f"v{i}".encode())
            for other in STORES:
                async def visible(other: str = other, i: int = i) -> bool:
                    try:
                        got = await cluster.call(other, "store.fetch", {"path": "db/password"}, reader)
                    except rpc.RemoteNotFound:  # not arrived yet
                        return False
                    return got["value"] == f"v{i}".encode()

                await eventually(visible, 5, f"write at {store} visible at {other}")
        st = await cluster.converged()
        assert {s["policy"] for s in st.values()} == {1}
        assert all(sorted(p["name"] for p in s["peers"]) == sorted(set(STORES) - {n}) for n, s in st.items())

    trio.run(main)


def test_a_store_down_while_writes_continue_converges_without_loss(cluster: Cluster) -> None:
    acknowledged: dict[str, bytes] = {}

    async def main() -> None:
        cluster.stop("store-3", signal.SIGKILL)
        for i in range(20):
            store = STORES[i % 2]
            path, value = f"bulk/k{i:02d}", f"value-{i}".encode()
            await cluster.set(store, path, value)
            acknowledged[path] = value
        await cluster.call("store-2", "store.delete", {"path": "bulk/k00"})
        del acknowledged["bulk/k00"]
        cluster.start("store-3")
        await cluster.wait_ready("store-3")
        st = await cluster.converged(20)
        assert len({s["records"] for s in st.values()}) == 1
        # every acknowledged value is on the restarted store (read through an entitled reader)
        await cluster.publish_policy("store-3", {**GRANTS, "auditor": [*acknowledged, "bulk/k00"]})
        auditor = cluster.identity("auditor")
        await eventually(lambda: _policy_at(cluster, "store-3", cluster.policy_version), 5, "policy v2 at store-3")
        async with rpc.connect("127.0.0.1", cluster.ports["store-3"], identity=auditor) as conn:
            for path, value in acknowledged.items():
                assert (await conn.call("store.fetch", {"path": path}))["value"] == value
            with pytest.raises(rpc.RemoteNotFound):
                await conn.call("store.fetch", {"path": "bulk/k00"})
        await cluster.publish_policy("store-1", GRANTS)  # back to the base grants
        await cluster.converged()

    trio.run(main)


async def _policy_at(cluster: Cluster, store: str, version: int) -> bool:
    return (await cluster.call(store, "store.status"))["policy"] == version


def _agent(cluster: Cluster, tmp: Path, name: str) -> tuple[rpc.Identity, Any, Any, dict[str, Any]]:
    from lab.agent.cache import SecretCache
    from lab.agent.delivery import FileDelivery

    identity = cluster.identity(name)
    cache = SecretCache.open(tmp / name / "home", protection="file")
    files = FileDelivery(tmp / name / "secrets")
    files.root.mkdir(parents=True)
    return identity, cache, files, {}


def test_policy_over_the_wire(cluster: Cluster, tmp_path: Path) -> None:
    from lab.agent.sync import SyncConfig, sync_loop

    async def main() -> None:
        for path in ("db/password", "mail/key", "web/tls", "hidden/thing"):
            await cluster.set("store-1", path, f"secret of {path}".encode())
        await cluster.converged()
        a_id, a_cache, a_files, a_status = _agent(cluster, tmp_path, "agent-a")
        b_id, b_cache, b_files, b_status = _agent(cluster, tmp_path, "agent-b")
        fast = SyncConfig(backoff_base=0.05, backoff_cap=0.3, connect_timeout=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: sync_loop(
                a_cache, a_id, [cluster.endpoint("store-2")], a_status, files=a_files, config=fast, task_status=task_status))
            await nursery.start(lambda task_status: sync_loop(
                b_cache, b_id, [cluster.endpoint("store-3")], b_status, files=b_files, config=fast, task_status=task_status))
            # exactly the entitlement
            await eventually(lambda: sorted(a_cache.paths()) == ["db/password", "mail/key"], 10, "agent-a's secrets")
            await eventually(lambda: sorted(b_cache.paths()) == ["db/password", "web/tls"], 10, "agent-b's secrets")
            assert a_cache.get("mail/key")[0] == b"secret of mail/key"
            assert (a_files.root / "mail" / "key").read_bytes() == b"secret of mail/key"
            assert a_status["state"] == "connected" and a_status["store_name"] == "store-2"

            # refusals never reveal existence: same answer for an existing and a missing path
            msgs = []
            for path in ("hidden/thing", "no/such/path"):
                with pytest.raises(NotEntitled) as exc:
                    await cluster.call("store-1", "store.fetch", {"path": path}, a_id)
                msgs.append(str(exc.value).replace(path, "P"))
            assert msgs[0] == msgs[1]

            # a node entitled to nothing gets nothing; an agent may not write
            c_id = cluster.identity("agent-c")
            with pytest.raises(NotEntitled):
                await cluster.call("store-2", "store.fetch", {"path": "db/password"}, c_id)
            with pytest.raises(AuthError):
                await cluster.call("store-2", "store.set", {"path": "db/password", "value": b"x"}, a_id)

            # forged node id: a certificate naming agent-a from another CA is refused at the handshake
            rogue_ca = CertificateAuthority.generate()
            forged = cluster.identity("agent-a", ca=rogue_ca)
            forged = rpc.Identity(forged.key, forged.certificate, cluster.ca.public_key)
            for store in STORES:
                with pytest.raises(AuthError):
                    await cluster.call(store, "store.fetch", {"path": "db/password"}, forged)

            # a label removed: republished policy → agent-a's next update removes mail/key (cache and file)
            await cluster.publish_policy("store-1", {**GRANTS, "agent-a": ["db/password"]})
            await eventually(lambda: a_cache.paths() == ["db/password"], 10, "mail/key removed from agent-a")
            assert not (a_files.root / "mail" / "key").exists()

            # revoked: every store refuses agent-b, and its agent drops everything
            await cluster.revoke("store-1", b_id.certificate)
            await eventually(lambda: b_cache.paths() == [], 10, "agent-b's cache emptied")
            assert not (b_files.root / "db" / "password").exists()
            for store in STORES:
                async def refused(store: str = store) -> bool:
                    try:
                        await cluster.call(store, "store.fetch", {"path": "db/password"}, b_id)
                    except AuthError:
                        return True
                    return False

                await eventually(refused, 10, f"{store} refusing the revoked agent")
            assert b_status["state"] == "revoked"
            assert a_cache.paths() == ["db/password"]  # the others are untouched
            nursery.cancel_scope.cancel()
        a_cache.close()
        b_cache.close()
        logs = "".join(cluster.log(n) for n in STORES)
        assert "secret of" not in logs

    trio.run(main)


def test_agent_fails_over_when_its_store_dies(cluster: Cluster, tmp_path: Path) -> None:
    from lab.agent.sync import SyncConfig, sync_loop

    async def main() -> None:
        ident, cache, _files, status = _agent(cluster, tmp_path, "agent-a")
        fast = SyncConfig(backoff_base=0.05, backoff_cap=0.3, connect_timeout=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: sync_loop(
                cache, ident, [cluster.endpoint("store-1"), cluster.endpoint("store-2")], status, config=fast, task_status=task_status))
            await eventually(lambda: status.get("state") == "connected", 10, "agent connected")
            first = status["store_name"]
            cluster.stop(first, signal.SIGKILL)
            other = "store-2" if first == "store-1" else "store-1"
            await eventually(lambda: status.get("store_name") == other, 10, "failover to the other store")
            await cluster.set(other, "db/password", b"after failover")
            await eventually(lambda: (cache.get("db/password") or (b"",))[0] == b"after failover", 10, "push after failover")
            cluster.start(first)
            await cluster.wait_ready(first)
            await cluster.converged()
            nursery.cancel_scope.cancel()
        cache.close()

    trio.run(main)


def test_the_agent_daemon_syncs_from_the_stores(cluster: Cluster, tmp_path: Path) -> None:
    """`lab-agent run` (a real process) with an enrolled home: secrets arrive in its cache and
    /run/secrets from the stores, `lab secret get` answers, and a removal deletes the file."""
    import yaml

    home, run_dir, secrets = tmp_path / "home", tmp_path / "run", tmp_path / "secrets"
    key, cert = write_home(home, cluster.ca, "agent-a", ["agent"])
    (home / "enrollment.yaml").write_text(yaml.safe_dump({
        "node": "agent-a", "node_id": cert.node_id, "coordinator": "127.0.0.1:1", "labels": [],
        "stores": [cluster.endpoint(n) for n in STORES]}))
    env = {**os.environ, "LAB_HOME": str(home), "LAB_RUNTIME_DIR": str(run_dir), "LAB_SECRETS_DIR": str(secrets)}
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from lab.agent.cli import main; main()", "run", "--key-protection", "file"],
                            env=env, stdout=log, stderr=log)
    try:
        async def main() -> None:
            await cluster.publish_policy("store-2", {**GRANTS, "agent-a": ["db/password", "mail/key"]})
            await cluster.set("store-1", "mail/key", b"daemon-delivered")
            await eventually(lambda: (secrets / "mail" / "key").exists() and (secrets / "mail" / "key").read_bytes() == b"daemon-delivered",
                             15, "the daemon writing /run/secrets/mail/key")
            got = subprocess.run([sys.executable, "-c", "from lab.coordinator.cli import main; main()", "secret", "get", "mail/key"],
                                 env=env, capture_output=True, timeout=30)
            assert got.returncode == 0 and got.stdout.strip() == b"daemon-delivered", got.stderr
            await cluster.call("store-3", "store.delete", {"path": "mail/key"})
            await eventually(lambda: not (secrets / "mail" / "key").exists(), 10, "the file removed after the delete")

        trio.run(main)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()
    text = (tmp_path / "agent.log").read_text()
    assert "daemon-delivered" not in text and "event=sync.update" in text
