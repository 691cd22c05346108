"""`lab-agent enroll`: join the cluster with a one-time token (see docs/ENROLLMENT.md).

1. Parse the token ``lab1.<CA fingerprint>.<secret>``; load or generate ``node.key``.
2. Connect to the coordinator in enrollment mode (:class:`lab.common.rpc.Enrollee`): the
   session is refused unless the coordinator's CA has the token's fingerprint and its
   certificate (role ``coordinator``) verifies against that CA — no trust on first use.
3. Only then send ``enroll {token, noise_pub, facts, addresses, name?}``; receive the
   certificate (for our key), the CA key, our labels, the store endpoints and the coordinator's.
4. Write ``node.key`` (0600), ``node.cert``, ``ca.pub`` and ``enrollment.yaml`` atomically into
   the agent home, and remove the token file.

The token appears in no log line, exception or child process; errors are one line each.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

import trio
import yaml

from lab.common import rpc
from lab.common.errors import AuthError, ConfigError, LabError, ProtocolError, TransportError, UsageError
from lab.common.identity import JoinToken, NodeKey, parse_token_untrusted, verify_certificate, write_private_file

__all__ = [
    "DEFAULT_HOME", "DEFAULT_TOKEN_FILE", "EnrollmentFailed", "Enrolled",
    "agent_home", "enroll", "enroll_over", "load_agent_identity", "local_addresses", "read_enrollment", "read_token_file",
    "save_enrollment",
]

DEFAULT_HOME: Final = "/var/lib/lab"
DEFAULT_TOKEN_FILE: Final = "/etc/lab/join-token"
DEFAULT_TIMEOUT: Final = 30.0
ENROLLMENT_FILE: Final = "enrollment.yaml"
CA_PUB_KIND: Final = "lab-ca-pub-v1"


class EnrollmentFailed(AuthError):
    """The coordinator refused us, or it is not the coordinator the token names."""


@dataclasses.dataclass(frozen=True)
class Enrolled:
    node: str
    node_id: str
    coordinator: str
    stores: tuple[str, ...]
    labels: tuple[str, ...]
    roles: tuple[str, ...]
    enrolled_at: float
    home: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node, "node_id": self.node_id, "coordinator": self.coordinator, "stores": list(self.stores),
            "labels": list(self.labels), "roles": list(self.roles), "enrolled_at": self.enrolled_at, "home": str(self.home),
        }  # fmt: skip


def agent_home(home: str | os.PathLike[str] | None = None) -> Path:
    return Path(home or os.environ.get("LAB_HOME") or DEFAULT_HOME)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (one line); ConfigError naming the file (never its content)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError("join token file not found (pass --token-file PATH)", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read join token file: {getattr(exc, 'strerror', None) or type(exc).__name__}", str(path)) from None
    if not text:
        raise ConfigError("join token file is empty", str(path))
    return text


def local_addresses(facts: dict[str, Any] | None) -> list[str]:
    """Global and private unicast addresses from the facts' NICs (no loopback, no link-local)."""
    out: list[str] = []
    for nic in (facts or {}).get("nics") or []:
        for addr in nic.get("addresses") or []:
            try:
                ip = ipaddress.ip_address(str(addr).split("/")[0].split("%")[0])
            except ValueError:
                continue
            if not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified) and str(ip) not in out:
                out.append(str(ip))
    return out[:64]


def _collect_facts() -> dict[str, Any] | None:
    from lab.agent.facts import collect_raw, parse_facts

    try:
        return parse_facts(collect_raw()).to_dict()  # type: ignore[no-any-return]
    except LabError as exc:  # facts are helpful, not required to join
        print(f"lab-agent: warning: facts not collected: {exc}", file=sys.stderr)
        return None


def _parse(token_text: str) -> JoinToken:
    try:
        return parse_token_untrusted(token_text)
    except ProtocolError as exc:  # the messages name the flaw, never the token's content
        raise UsageError(f"the join token is malformed: {exc}") from None


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def enroll_over(
    stream: trio.abc.Stream,
    token_text: str,
    key: NodeKey,
    *,
    endpoint: str,
    facts: dict[str, Any] | None = None,
    addresses: list[str] | None = None,
    endpoints: dict[str, str] | None = None,
    name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Any = time.time,
) -> dict[str, Any]:
    """Run the enrollment over an open stream (closed on return); the checked reply (certificate
    verified for ``key``)."""
    try:
        token = _parse(token_text)
    except UsageError:
        await trio.aclose_forcefully(stream)
        raise
    body: dict[str, Any] = {"token": token.reveal(), "noise_pub": key.public_key}
    for k, v in (("facts", facts), ("addresses", addresses), ("endpoints", endpoints), ("name", name)):
        if v is not None:
            body[k] = v
    try:
        async with rpc.open_connection(stream, identity=rpc.Enrollee(key, token.fingerprint), timeout=timeout, address=endpoint) as conn:
            pinned = conn.session.ca_public_key
            reply = await conn.call(rpc.ENROLL_METHOD, body, timeout=timeout)
    except rpc.FingerprintMismatch:
        raise EnrollmentFailed(f"{endpoint} is not the coordinator this token was minted by (fingerprint mismatch)") from None
    except rpc.RemoteError as exc:
        if exc.code == "rejected":
            raise EnrollmentFailed(f"enrollment rejected by {endpoint} (token expired, used, unknown or for another server)") from None
        raise EnrollmentFailed(f"enrollment failed at {endpoint}: {exc.code}: {exc.message}") from None
    except AuthError as exc:
        raise EnrollmentFailed(f"{endpoint} refused or failed authentication: {exc}") from None
    except ProtocolError as exc:
        raise TransportError(f"enrollment with {endpoint} failed: {exc}") from None
    finally:
        body.clear()  # drop our reference to the token text
    assert pinned is not None
    ca = reply.get("ca_public_key")
    if not isinstance(ca, bytes) or not hmac.compare_digest(ca, pinned):
        raise EnrollmentFailed(f"{endpoint} answered with a CA key other than the one it proved in the handshake")
    raw = reply.get("certificate")
    try:
        cert = verify_certificate(raw if isinstance(raw, bytes) else b"", pinned, clock(), None, key.public_key)
    except LabError as exc:
        raise EnrollmentFailed(f"{endpoint} issued an unusable certificate: {exc}") from None
    reply["_certificate"] = cert
    return reply


def save_enrollment(home: Path, key: NodeKey, reply: dict[str, Any], coordinator: str, *, now: float) -> Enrolled:
    """Write node.key (if new), node.cert, ca.pub and enrollment.yaml atomically into ``home``."""
    cert = reply["_certificate"]
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (home / "node.key").exists():
        key.save(home / "node.key")
    write_private_file(home / "node.cert", cert.encode(), overwrite=True)
    os.chmod(home / "node.cert", 0o644)
    ca_line = f"{CA_PUB_KIND} {base64.b64encode(reply['ca_public_key']).decode()}\n"  # as the coordinator's ca.pub
    write_private_file(home / "ca.pub", ca_line.encode(), overwrite=True)
    os.chmod(home / "ca.pub", 0o644)
    stores = [s for s in reply.get("stores") or [] if isinstance(s, str)]
    labels = [s for s in reply.get("labels") or [] if isinstance(s, str)]
    doc = {
        "node": cert.name,
        "node_id": cert.node_id,
        "coordinator": reply.get("coordinator") if isinstance(reply.get("coordinator"), str) else coordinator,
        "stores": stores,
        "labels": labels,
        "roles": list(cert.roles),
        "enrolled_at": now,
    }
    write_private_file(home / ENROLLMENT_FILE, yaml.safe_dump(doc, sort_keys=False).encode(), overwrite=True)
    os.chmod(home / ENROLLMENT_FILE, 0o644)
    return Enrolled(cert.name, cert.node_id, doc["coordinator"], tuple(stores), tuple(labels), cert.roles, now, home)


def read_enrollment(home: str | os.PathLike[str]) -> dict[str, Any]:
    """``enrollment.yaml`` of an enrolled agent; ConfigError if the node has not enrolled."""
    path = Path(home) / ENROLLMENT_FILE
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("not enrolled yet: run `lab-agent enroll --server HOST:PORT`", str(path)) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read: {exc}", str(path)) from None
    if not isinstance(doc, dict):
        raise ConfigError("not a mapping", str(path))
    return doc


def load_agent_identity(home: str | os.PathLike[str]) -> rpc.Identity:
    """The enrolled agent's :class:`rpc.Identity` (node.key, node.cert, ca.pub) for its sessions
    with the coordinator (``checkin``) and the stores."""
    home = Path(home)
    try:
        kind, _, body = (home / "ca.pub").read_text().strip().partition(" ")
        ca = base64.b64decode(body, validate=True)
        raw = (home / "node.cert").read_bytes()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"not enrolled or damaged identity: {exc}", str(home)) from None
    if kind != CA_PUB_KIND or len(ca) != 32:
        raise ConfigError(f"not a {CA_PUB_KIND} file", str(home / "ca.pub"))
    key = NodeKey.load(home / "node.key")
    try:
        cert = verify_certificate(raw, ca, time.time(), None, key.public_key)
    except LabError as exc:
        raise ConfigError(f"certificate unusable: {exc}", str(home / "node.cert")) from None
    return rpc.Identity(key, cert, ca)


async def enroll(
    host: str,
    port: int,
    token_text: str,
    home: Path,
    *,
    facts: dict[str, Any] | None = None,
    collect: bool = True,
    name: str | None = None,
    endpoints: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Enrolled:
    """Enroll with the coordinator at ``host:port`` and save the identity into ``home``."""
    _parse(token_text)  # a malformed token never reaches the network
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path = home / "node.key"
    key = NodeKey.load(key_path) if key_path.exists() else NodeKey.generate()
    if facts is None and collect:
        facts = await trio.to_thread.run_sync(_collect_facts)
    endpoint = _endpoint(host, port)
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise TransportError(f"connecting to {endpoint} timed out after {timeout:g} s") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    try:
        reply = await enroll_over(
            stream, token_text, key, endpoint=endpoint, facts=facts, addresses=local_addresses(facts),
            endpoints=endpoints, name=name, timeout=timeout,
        )  # fmt: skip
        return save_enrollment(home, key, reply, endpoint, now=time.time())
    finally:
        key.close()
