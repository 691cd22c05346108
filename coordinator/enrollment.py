"""Enrollment on the coordinator: the cluster identity files and the ``enroll`` / ``checkin`` methods.

Files in LAB_HOME (made by :func:`ensure_cluster_identity`, i.e. ``lab init --local``)::

    ca.key              cluster CA (Ed25519), 0600
    ca.pub              its public key (one line: lab-ca-pub-v1 <base64>)
    coordinator.key     the coordinator's node key (X25519), 0600
    coordinator.cert    its certificate, roles ["coordinator"]
    admin.key           the operator's key, 0600
    admin.cert          its certificate, roles ["admin"]: what `lab` uses to call the daemon

The protocol is described in docs/ENROLLMENT.md; the transport part in
:mod:`lab.common._rpc_session` (enrollment mode).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from lab.common import rpc, wire
from lab.common.errors import AuthError, ConfigError, LabError, NotEntitled, UsageError
from lab.common.identity import (
    DEFAULT_CERT_LIFETIME,
    KEY_LEN,
    Certificate,
    CertificateAuthority,
    NodeKey,
    fingerprint,
    verify_certificate,
    write_private_file,
)
from lab.coordinator import tokens
from lab.coordinator.reports import record_report
from lab.coordinator.state import StateDB, validate_server_name

__all__ = [
    "ADMIN_ROLE", "COORDINATOR_NAME", "LABEL_ROLES", "STORE_PORT",
    "ClusterFiles", "EnrollmentService", "ensure_cluster_identity", "load_ca_public_key", "load_identity", "log_event",
    "roles_for_labels", "save_ca_public_key",
]

log = logging.getLogger("lab.enroll")

ADMIN_ROLE: Final = "admin"
COORDINATOR_ROLE: Final = "coordinator"
COORDINATOR_NAME: Final = "coordinator"
ADMIN_NAME: Final = "admin"
STORE_PORT: Final = 7444
# label → role in the certificate. Every enrolled node also gets "agent".
LABEL_ROLES: Final = {"secret-store": "store", "lab-server": COORDINATOR_ROLE}
RENEW_BEFORE: Final = 30 * 24 * 3600  # init re-issues a local certificate that expires sooner
CA_PUB_KIND: Final = "lab-ca-pub-v1"
MAX_FACTS: Final = 1024 * 1024


def log_event(level: int, event: str, **fields: object) -> None:
    """One structured line on ``lab.enroll`` through :func:`rpc.log_event` (never pass secrets)."""
    rpc.log_event(log, level, event, **fields)


def require_admin(peer: Any, method: str) -> None:
    """The gate of every operator method of the daemon: NotEntitled (logged as ``api.denied``)
    unless the peer's certificate carries the ``admin`` role."""
    if ADMIN_ROLE not in peer.roles:
        log_event(logging.WARNING, "api.denied", peer=getattr(peer, "address", None), name=peer.name, method=method)
        raise NotEntitled(f"{method} needs the {ADMIN_ROLE!r} role")


# ---------------------------------------------------------------------------------------------
# Files


def save_ca_public_key(path: str | os.PathLike[str], key: bytes) -> None:
    write_private_file(path, f"{CA_PUB_KIND} {base64.b64encode(key).decode()}\n".encode(), overwrite=True)
    os.chmod(path, 0o644)


def load_ca_public_key(path: str | os.PathLike[str]) -> bytes:
    try:
        kind, _, body = Path(path).read_text().strip().partition(" ")
        key = base64.b64decode(body, validate=True)
    except FileNotFoundError as exc:
        raise ConfigError("CA public key not found", file=str(path)) from exc
    except (OSError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"cannot read CA public key: {exc}", file=str(path)) from exc
    if kind != CA_PUB_KIND or len(key) != KEY_LEN:
        raise ConfigError(f"not a {CA_PUB_KIND} file", file=str(path))
    return key


def _write_cert(path: Path, cert: Certificate) -> None:
    write_private_file(path, cert.encode(), overwrite=True)
    os.chmod(path, 0o644)


def load_identity(home: str | os.PathLike[str], who: str, revocations: Any = None) -> rpc.Identity:
    """``<home>/<who>.key`` + ``<who>.cert`` + ``ca.pub`` as an :class:`rpc.Identity`."""
    home = Path(home)
    ca_pub = load_ca_public_key(home / "ca.pub")
    key = NodeKey.load(home / f"{who}.key")
    try:
        raw = (home / f"{who}.cert").read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate: {exc.strerror or exc}", file=str(home / f"{who}.cert")) from exc
    try:
        cert = verify_certificate(raw, ca_pub, time.time(), None, key.public_key)
    except LabError as exc:
        raise ConfigError(f"certificate unusable: {exc}", file=str(home / f"{who}.cert")) from exc
    return rpc.Identity(key, cert, ca_pub, revocations)


@dataclasses.dataclass(frozen=True)
class ClusterFiles:
    ca_fingerprint: str
    created: tuple[str, ...]


def _ensure_cert(ca: CertificateAuthority, home: Path, who: str, name: str, roles: tuple[str, ...], now: float) -> bool:
    key_path, cert_path = home / f"{who}.key", home / f"{who}.cert"
    key = NodeKey.load_or_generate(key_path)
    try:
        if cert_path.exists():
            cert = verify_certificate(cert_path.read_bytes(), ca.public_key, now, None, key.public_key)
            if cert.roles == roles and cert.not_after - now > RENEW_BEFORE:
                return False
        cert = ca.issue(name, f"{name}-{key.fingerprint[:12]}", key.public_key, roles, DEFAULT_CERT_LIFETIME, now)
        _write_cert(cert_path, cert)
        return True
    except LabError:  # damaged or foreign: issue a fresh one
        cert = ca.issue(name, f"{name}-{key.fingerprint[:12]}", key.public_key, roles, DEFAULT_CERT_LIFETIME, now)
        _write_cert(cert_path, cert)
        return True
    finally:
        key.close()


def ensure_cluster_identity(home: str | os.PathLike[str], *, now: float | None = None) -> ClusterFiles:
    """Create (idempotently) the CA, the coordinator's and the admin's keys and certificates."""
    home = Path(home)
    at = time.time() if now is None else now
    created: list[str] = []
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the lab home: {exc.strerror or exc}", str(home)) from exc
    ca_path = home / "ca.key"
    if ca_path.exists():
        ca = CertificateAuthority.load(ca_path)
    else:
        ca = CertificateAuthority.generate()
        ca.save(ca_path)
        created.append("ca.key")
    try:
        pub_path = home / "ca.pub"
        try:
            current = load_ca_public_key(pub_path)
        except ConfigError:
            current = b""
        if current != ca.public_key:
            save_ca_public_key(pub_path, ca.public_key)
            created.append("ca.pub")
        for who, name, roles in (("coordinator", COORDINATOR_NAME, (COORDINATOR_ROLE,)), ("admin", ADMIN_NAME, (ADMIN_ROLE,))):
            if _ensure_cert(ca, home, who, name, roles, at):
                created.append(f"{who}.cert")
        return ClusterFiles(ca.fingerprint, tuple(created))
    finally:
        ca.close()


def roles_for_labels(labels: Iterable[str]) -> tuple[str, ...]:
    roles = ["agent"]
    for label in labels:
        role = LABEL_ROLES.get(label)
        if role is not None and role not in roles:
            roles.append(role)
    return tuple(roles)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Request bodies (untrusted)


def _opt_str(body: Mapping[str, Any], key: str, max_len: int = 253) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > max_len or not v.isprintable():
        raise UsageError(f"{key} must be printable text of 1..{max_len} characters")
    return v


def _addresses(body: Mapping[str, Any]) -> list[str] | None:
    v = body.get("addresses")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > 64 or not all(isinstance(a, str) and 0 < len(a) <= 64 for a in v):
        raise UsageError("addresses must be a list of at most 64 address strings")
    return list(v)


def _endpoints(body: Mapping[str, Any]) -> dict[str, str] | None:
    v = body.get("endpoints")
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) > 8 or not all(
        isinstance(k, str) and isinstance(x, str) and 0 < len(k) <= 32 and 0 < len(x) <= 262 for k, x in v.items()
    ):
        raise UsageError("endpoints must map up to 8 role names to host:port strings")
    return dict(v)


# ---------------------------------------------------------------------------------------------
# The service


class EnrollmentService:
    """``enroll`` (sessions without a certificate) and ``checkin`` (enrolled agents).

    ``state`` is used from the trio thread (SQLite calls are short); ``dns`` is a DnsManager
    (disabled when no ``dns:`` section is configured).
    """

    identity_ops: Any = None  # [identity] lab.coordinator.identity_ops.IdentityService (set by the daemon)
    after_enroll: Any = None  # () -> None: the daemon republishes the secret policy (coordinator/republish.py)
    on_issued: Any = None  # [identity] called with each certificate issued (kept in certs/NAME.cert)
    migration: Any = None  # [migrate] lab.coordinator.migrate.MigrationService (set by the daemon)

    def __init__(
        self,
        state: StateDB,
        ca: CertificateAuthority,
        *,
        endpoint: str,
        dns: Any = None,
        clock: Any = time.time,
        cert_lifetime: int = DEFAULT_CERT_LIFETIME,
    ) -> None:
        self.state = state
        self.ca = ca
        self.ca_fingerprint = ca.fingerprint
        self.endpoint = endpoint
        self.dns = dns
        self.clock = clock
        self.cert_lifetime = cert_lifetime

    def store_endpoints(self) -> list[str]:
        """Endpoints of the enrolled nodes labelled secret-store (reported, or first address:7444)."""
        reported = self.state.endpoints()
        out = []
        for s in self.state.list_servers():
            if "secret-store" not in s.labels or not s.enrolled_at:
                continue
            ep = reported.get(s.name, {}).get("store")
            if ep is None and isinstance(s.addresses, list) and s.addresses:
                ep = _host_port(str(s.addresses[0]), STORE_PORT)
            if ep:
                out.append(ep)
        return out

    async def enroll(self, peer: rpc.EnrollingPeer, req: wire.Request) -> dict[str, Any]:
        body = req.body
        key_fpr = peer.fingerprint
        now = self.clock()
        try:
            token = tokens.parse_presented(body.get("token"))
            noise_pub = body.get("noise_pub")
            if not isinstance(noise_pub, bytes) or not hmac.compare_digest(noise_pub, peer.noise_pub):
                raise tokens.TokenRejected("malformed", "noise_pub is not the key of this session")
            facts = body.get("facts")
            if facts is not None and (not isinstance(facts, dict) or len(wire.packb(facts)) > MAX_FACTS):
                raise tokens.TokenRejected("malformed", "facts must be a map under 1 MiB")
            name = _opt_str(body, "name")
            addresses = _addresses(body)
            endpoints = _endpoints(body)
        except UsageError as exc:
            self._refused(peer, "malformed", str(exc), None)
            raise tokens.EnrollmentRejected() from None
        except tokens.TokenRejected as exc:
            self._refused(peer, exc.reason, str(exc), exc.name)
            raise tokens.EnrollmentRejected() from None

        try:
            with self.state.transaction():
                record = tokens.redeem(self.state, token, self.ca_fingerprint, key_fpr, now=now, name=name)
                server, cert = self._register(record, peer, facts, addresses, endpoints, now)
                self.state.audit(
                    "node.enroll", record.name,
                    {"key": key_fpr, "serial": cert.serial, "not_after": cert.not_after,
                     "labels": list(server.labels), "roles": list(cert.roles),
                     "addresses": addresses or [], "peer": peer.address},
                    actor=f"key:{key_fpr[:16]}",
                )  # fmt: skip
        except tokens.TokenRejected as exc:
            self._refused(peer, exc.reason, str(exc), exc.name)
            raise tokens.EnrollmentRejected() from None
        self.state.maybe_snapshot()
        if self.on_issued is not None:  # [identity]
            try:
                self.on_issued(cert)
            except (LabError, OSError) as exc:
                log_event(logging.WARNING, "enroll.cert_not_kept", name=server.name, reason=str(exc))
        log_event(logging.INFO, "enroll.accepted", peer=peer.address, name=server.name, key=key_fpr, serial=cert.serial)
        if self.after_enroll is not None:
            self.after_enroll()
        if self.dns is not None and addresses:
            try:
                await self.dns.node_enrolled(server.name, addresses)
            except LabError as exc:  # DNS trouble must not undo an enrollment; the audit has it
                log_event(logging.WARNING, "enroll.dns_failed", name=server.name, reason=str(exc))
        return {
            "certificate": cert.encode(),
            "ca_public_key": self.ca.public_key,
            "name": server.name,
            "node_id": cert.node_id,
            "labels": list(server.labels),
            "roles": list(cert.roles),
            "environment": server.environment,
            "region": server.region,
            "stores": self.store_endpoints(),
            "coordinator": self.endpoint,
        }

    def _register(self, record: tokens.Token, peer: rpc.EnrollingPeer, facts: Any, addresses: Any, endpoints: Any, now: float):
        name = validate_server_name(record.name)
        try:
            existing = self.state.get_server(name)
        except LabError:
            existing = None
        if existing is None:
            self.state.add_server(name, "manual", record.labels, environment=record.environment, region=record.region)
            labels = record.labels
        else:
            labels = record.labels or existing.labels
            changes: dict[str, Any] = {"labels": labels}
            if record.environment:
                changes["environment"] = record.environment
            if record.region:
                changes["region"] = record.region
            self.state.update_server(name, **changes)
        cert = self.ca.issue(
            name, f"n-{fingerprint(peer.noise_pub)[:24]}", peer.noise_pub, roles_for_labels(labels), self.cert_lifetime, now
        )
        fields: dict[str, Any] = {"enrolled_at": now, "cert_serial": str(cert.serial), "last_checkin": now}
        if facts is not None:
            fields["facts"] = facts
        if addresses is not None:
            fields["addresses"] = addresses
        server = self.state.update_server(name, **fields)
        if endpoints:
            self.state.set_endpoints(name, endpoints)
        return server, cert

    def _refused(self, peer: rpc.EnrollingPeer, reason: str, detail: str, name: str | None) -> None:
        log_event(logging.WARNING, "enroll.rejected", peer=peer.address, key=peer.fingerprint, reason=reason, detail=detail, name=name)
        try:
            self.state.audit(
                "node.enroll_rejected", name or "-", {"reason": reason, "detail": detail, "key": peer.fingerprint, "peer": peer.address},
                actor=f"key:{peer.fingerprint[:16]}",
            )
        except LabError as exc:
            log_event(logging.ERROR, "enroll.audit_failed", reason=str(exc))

    async def checkin(self, peer: rpc.PeerInfo, req: wire.Request) -> dict[str, Any]:
        """An enrolled agent reports in: last_checkin, addresses (DNS follows a change), endpoints."""
        body = req.body
        addresses = _addresses(body)
        endpoints = _endpoints(body)
        name = peer.name
        extra: dict[str, Any] = {}
        if self.identity_ops is not None:  # [identity] confirm a renewal / hand over a renewed certificate
            extra = self.identity_ops.on_checkin(peer.certificate)
        before = self.state.get_server(name)
        if before.cert_serial is not None and before.cert_serial != str(peer.certificate.serial):
            raise AuthError(f"certificate {peer.certificate.serial} is not the current one for {name!r}")
        fields: dict[str, Any] = {"last_checkin": self.clock()}
        changed = addresses is not None and sorted(addresses) != sorted(before.addresses or [])
        if changed:
            fields["addresses"] = addresses
        with self.state.transaction():
            server = self.state.update_server(name, **fields)
            if endpoints:
                self.state.set_endpoints(name, endpoints)
            if changed:
                self.state.audit("node.addresses", name, {"before": before.addresses, "after": addresses}, actor=f"node:{name}")
            if body.get("report") is not None:  # agent reporters: Puppet runs (coordinator/reports.py)
                record_report(self.state, name, body["report"], self.clock())
        if changed and self.dns is not None:
            try:
                await self.dns.address_changed(name, before.addresses or [], addresses or [])
            except LabError as exc:
                log_event(logging.WARNING, "checkin.dns_failed", name=name, reason=str(exc))
        if self.identity_ops is not None:  # [identity] publish the old serial's revocation after a renewal
            await self.identity_ops.after_checkin()
        if self.migration is not None:  # [migrate] the migrate instruction for the target; the redirect after a move
            extra = {**extra, **self.migration.on_checkin(name)}
        return {"labels": list(server.labels), "stores": self.store_endpoints(), "coordinator": self.endpoint, **extra}
