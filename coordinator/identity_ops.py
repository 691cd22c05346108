"""Node identities after enrollment: `lab identity revoke|renew|show` (docs/ENROLLMENT.md, "Identity").

The coordinator daemon is the CA, so revoke and renew are daemon methods (``identity.revoke``,
``identity.renew``; certificates with the ``admin`` role only); the CLI only asks for them.

Files in the coordinator home (``$LAB_HOME``)::

    revocations.crl        the current CA-signed RevocationList (serials and keys), 0644
    certs/NAME.cert        the certificate last issued to NAME (written at enrollment, or learned
                           from its first check-in): what revoke/renew need to know its key
    certs/NAME.next.cert   a renewed certificate the agent has not confirmed yet
    coordinator.endpoint   HOST:PORT the daemon of this home listens on (written when it is ready)

Revoke: the node's serial(s) and key go into a new, higher-version list (version = max(previous
+ 1, milliseconds since the epoch)), written to ``revocations.crl`` (the daemon's own sessions
consult it at every handshake and request), published to every store (config.yaml ``stores:``
and the enrolled stores) with ``store.publish``, together with a policy compiled without the
node; the inventory marks it (``cert_serial = "revoked:<serial>"``, ``enrolled_at`` cleared →
identity pillar ``revoked``); DNS records removed; audited ``node.revoke``.

Renew: a fresh certificate for the same key (new serial, new validity) kept as
``certs/NAME.next.cert``; the agent gets it in its next ``checkin`` reply, writes it to
``node.cert``, reconnects, and checks in with it: the daemon then makes it current and revokes
the old serial (serial only, the key stays valid).

The pure parts (list bookkeeping, markers, CLI decisions) are unit-tested in
tests/unit/test_identity_ops.py; the rest by tests/integration/test_identity_revoke.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

from lab.common.errors import ConfigError, LabError, NotFound, RemoteProtocolError, StateError, UsageError
from lab.common.identity import (
    Certificate,
    CertificateAuthority,
    RevocationList,
    fingerprint,
    write_private_file,
)

__all__ = [
    "CERTS_DIR", "CRL_FILE", "ENDPOINT_FILE", "REVOKED_PREFIX", "IdentityService", "RevocationBook",
    "confirm_decision", "daemon_endpoint", "is_revoked_marker", "load_crl", "load_node_cert", "next_version",
    "revoked_marker", "revocation_with", "save_crl", "save_node_cert",
]

CRL_FILE: Final = "revocations.crl"
CERTS_DIR: Final = "certs"
ENDPOINT_FILE: Final = "coordinator.endpoint"
REVOKED_PREFIX: Final = "revoked:"
PUBLISH_TIMEOUT: Final = 5.0

log = logging.getLogger("lab.identity")


# ---------------------------------------------------------------------------------------------
# Pure bookkeeping


def next_version(current: RevocationList | None, now: float) -> int:
    """Strictly above the current list, and above any list published earlier from another home
    (milliseconds since the epoch, as policies use)."""
    return max((current.version + 1) if current is not None else 1, int(now * 1000))


def revocation_with(
    ca: CertificateAuthority, current: RevocationList | None, now: float, serials: Iterable[int] = (), keys: Iterable[bytes] = ()
) -> RevocationList:
    """A new signed list: everything ``current`` lists plus ``serials`` and ``keys``."""
    all_serials = set(current.serials if current is not None else ()) | {int(s) for s in serials}
    all_keys = set(current.keys if current is not None else ()) | {bytes(k) for k in keys}
    return ca.revocation_list(next_version(current, now), now, all_serials, all_keys)


def revoked_marker(serial: str | int | None) -> str:
    """The inventory's ``cert_serial`` of a revoked node (the identity pillar reads ``revoked``)."""
    return f"{REVOKED_PREFIX}{serial if serial is not None else '-'}"


def is_revoked_marker(cert_serial: object) -> bool:
    return isinstance(cert_serial, str) and cert_serial.startswith(REVOKED_PREFIX)


def confirm_decision(assume_yes: bool, interactive: bool) -> str:
    """``go`` (--yes), ``ask`` (a terminal to ask on) or ``refuse`` (neither)."""
    if assume_yes:
        return "go"
    return "ask" if interactive else "refuse"


def serials_to_revoke(cert_serial: str | None, certs: Sequence[Certificate]) -> tuple[set[int], set[bytes]]:
    """The serials (inventory's current one, plus the known certificates') and keys to list."""
    serials = {c.serial for c in certs}
    if cert_serial and cert_serial.isdigit():
        serials.add(int(cert_serial))
    return serials, {c.noise_pub for c in certs}


# ---------------------------------------------------------------------------------------------
# Files


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(path, data, overwrite=True)
    os.chmod(path, 0o644)


def load_crl(home: Path, ca_public_key: bytes) -> RevocationList | None:
    path = Path(home) / CRL_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the revocation list: {exc.strerror or exc}", file=str(path)) from exc
    try:
        crl = RevocationList.decode_untrusted(raw)
        crl.verify(ca_public_key)
    except LabError as exc:
        raise ConfigError(f"revocation list unusable: {exc}", file=str(path)) from exc
    return crl


def save_crl(home: Path, crl: RevocationList) -> None:
    _write_public(Path(home) / CRL_FILE, crl.encode())


def _cert_path(home: Path, name: str, pending: bool = False) -> Path:
    if "/" in name or name.startswith("."):
        raise UsageError(f"bad node name {name!r}")
    return Path(home) / CERTS_DIR / (f"{name}.next.cert" if pending else f"{name}.cert")


def save_node_cert(home: Path, cert: Certificate, *, pending: bool = False) -> None:
    _write_public(_cert_path(home, cert.name, pending), cert.encode())


def load_node_cert(home: Path, name: str, *, pending: bool = False) -> Certificate | None:
    try:
        return Certificate.decode_untrusted(_cert_path(home, name, pending).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, RemoteProtocolError) as exc:
        log.warning("event=identity.cert_unreadable name=%s reason=%s", name, exc)
        return None


def keep_issued(home: Path, cert: Certificate) -> None:
    """A certificate issued at enrollment becomes the node's current one (a stale renewal goes)."""
    save_node_cert(home, cert)
    drop_node_cert(home, cert.name, pending=True)


def drop_node_cert(home: Path, name: str, *, pending: bool = False) -> None:
    _cert_path(home, name, pending).unlink(missing_ok=True)


class RevocationBook:
    """The coordinator's current list, re-read when ``revocations.crl`` changes: the daemon's
    ``rpc.Identity(revocations=book.current)``."""

    def __init__(self, home: Path, ca_public_key: bytes) -> None:
        self.home = Path(home)
        self.ca_public_key = bytes(ca_public_key)
        self._crl: RevocationList | None = None
        self._stamp: tuple[int, int] | None = None

    def current(self) -> RevocationList | None:
        try:
            st = (self.home / CRL_FILE).stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            try:
                crl = load_crl(self.home, self.ca_public_key)
            except ConfigError as exc:  # keep the last good list
                log.error("event=identity.crl_unusable reason=%s", exc)
                return self._crl
            if crl is None or self._crl is None or crl.version >= self._crl.version:
                self._crl = crl
            self._stamp = stamp
        return self._crl

    def replace(self, crl: RevocationList) -> None:
        save_crl(self.home, crl)
        self._crl, self._stamp = crl, None


# ---------------------------------------------------------------------------------------------
# Daemon side


def compile_policy_doc(engine: Any, ca: CertificateAuthority, now: float, exclude: Iterable[str] = ()) -> Any:
    """The signed policy of ``engine``'s definitions and inventory, without revoked nodes."""
    from lab.coordinator.policy import compile_policy

    skip = set(exclude)
    servers = [s for s in engine.state.list_servers() if s.name not in skip and not is_revoked_marker(s.cert_serial)]
    defs = engine.paths.definitions
    modules = defs / "modules" if (defs / "modules").is_dir() else None
    compiled = compile_policy(engine.definitions, servers, modules)
    return compiled.document(ca, version=int(now * 1000), now=now)


async def publish_everywhere(stores: Sequence[str], identity: Any, bodies: Sequence[dict[str, Any]]) -> dict[str, str]:
    """``store.publish`` each body to every store, concurrently: ``{endpoint: "ok" | why not}``."""
    import trio

    from lab.common import rpc

    out: dict[str, str] = {}

    async def one(ep: str) -> None:
        host, port = rpc.parse_endpoint(ep, 7444)
        problems = []
        try:
            with trio.fail_after(PUBLISH_TIMEOUT * 2):
                async with rpc.connect(host, port, identity=identity, timeout=PUBLISH_TIMEOUT) as conn:
                    for body in bodies:
                        try:
                            await conn.call("store.publish", body, timeout=PUBLISH_TIMEOUT)
                        except rpc.RemoteError as exc:
                            if "not newer" not in str(exc):
                                problems.append(str(exc)[:200])
        except (LabError, OSError, trio.TooSlowError) as exc:
            problems.append(f"unreachable: {str(exc)[:200] or type(exc).__name__}")
        out[ep] = "; ".join(problems) or "ok"

    async with trio.open_nursery() as nursery:
        for ep in dict.fromkeys(stores):
            nursery.start_soon(one, ep)
    return out


class IdentityService:
    """``identity.revoke`` / ``identity.renew`` / ``identity.show`` in the daemon, and the
    check-in hooks (certificate learning, renewed certificate hand-over and confirmation)."""

    def __init__(self, engine: Any, ca: CertificateAuthority, identity: Any, book: RevocationBook, *,
                 dns: Any = None, store_endpoints: Any = None, clock: Any = time.time, cert_lifetime: int | None = None) -> None:
        from lab.common.identity import DEFAULT_CERT_LIFETIME

        self.engine = engine
        self.home = Path(engine.paths.home)
        self.ca = ca
        self.identity = identity
        self.book = book
        self.dns = dns
        self.store_endpoints = store_endpoints or (lambda: [])
        self.clock = clock
        self.cert_lifetime = cert_lifetime or DEFAULT_CERT_LIFETIME

    @property
    def state(self) -> Any:
        return self.engine.state

    def stores(self) -> list[str]:
        from lab.coordinator.cluster import configured_stores

        try:
            configured = configured_stores(self.home)
        except ConfigError:
            configured = []
        return list(dict.fromkeys([*configured, *self.store_endpoints()]))

    async def handle(self, peer: Any, method: str, body: dict[str, Any]) -> dict[str, Any]:
        from lab.coordinator.enrollment import require_admin

        require_admin(peer, method)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise UsageError("name must be a server name")
        if method == "identity.revoke":
            return await self.revoke(name, actor=f"cert:{peer.name}")
        if method == "identity.renew":
            return self.renew(name, actor=f"cert:{peer.name}")
        if method == "identity.show":
            return show(self.home, self.state, name, self.book.current())
        raise NotFound(f"no method {method!r}")

    # -- revoke ---------------------------------------------------------------------------------

    async def revoke(self, name: str, *, actor: str) -> dict[str, Any]:
        self.engine.reload()
        server = self.state.get_server(name)
        now = self.clock()
        certs = [c for c in (load_node_cert(self.home, name), load_node_cert(self.home, name, pending=True)) if c is not None]
        serial_text = server.cert_serial
        already = is_revoked_marker(serial_text)
        if already:
            serial_text = serial_text[len(REVOKED_PREFIX):]
        serials, keys = serials_to_revoke(serial_text, certs)
        if not serials and not keys:
            raise StateError(f"{name} has no certificate to revoke (never enrolled)")
        current = self.book.current()
        missing = [s for s in serials if current is None or s not in current.serials] + \
            [k for k in keys if current is None or k not in current.keys]
        crl = revocation_with(self.ca, current, now, serials, keys) if missing else current
        assert crl is not None
        if missing:
            self.book.replace(crl)  # from here on the daemon itself refuses the node
        with self.state.transaction():
            self.state.update_server(name, enrolled_at=None, cert_serial=revoked_marker(serial_text))
            try:
                self.state.revoke_tokens(name, now=now)
            except LabError:
                pass
            self.state.audit("node.revoke", name, {
                "serials": sorted(serials), "keys": sorted(fingerprint(k) for k in keys), "crl_version": crl.version,
            }, actor=actor)  # fmt: skip
        policy = compile_policy_doc(self.engine, self.ca, now, exclude=[name])
        stores = self.stores()
        published = await publish_everywhere(stores, self.identity, [{"revocations": crl.encode()}, {"policy": policy.encode()}])
        dns = "off"
        if self.dns is not None:
            try:
                await self.dns.node_revoked(name, server.addresses or [])
                dns = "removed"
            except LabError as exc:
                dns = f"failed: {exc}"
        log.info("event=identity.revoked name=%s serials=%s crl=%s stores=%s", name, sorted(serials), crl.version,
                 ",".join(f"{k}:{v}" for k, v in published.items()))
        return {
            "name": name, "serials": [str(s) for s in sorted(serials)], "keys": sorted(fingerprint(k) for k in keys),
            "crl_version": crl.version, "policy_version": policy.version, "stores": published, "dns": dns,
            "already_revoked": already,
        }

    # -- renew ----------------------------------------------------------------------------------

    def renew(self, name: str, *, actor: str) -> dict[str, Any]:
        from lab.coordinator.enrollment import roles_for_labels

        self.engine.reload()
        server = self.state.get_server(name)
        if is_revoked_marker(server.cert_serial) or not server.enrolled_at:
            raise StateError(f"{name} is not enrolled (revoked or never enrolled): enroll it again with a new token")
        cert = load_node_cert(self.home, name)
        if cert is None:
            raise StateError(f"no certificate of {name} on file yet; it is recorded at its next check-in, retry then")
        now = self.clock()
        new = self.ca.issue(name, cert.node_id, cert.noise_pub, roles_for_labels(server.labels), self.cert_lifetime, now)
        save_node_cert(self.home, new, pending=True)
        self.state.audit("node.renew", name, {"serial": new.serial, "not_after": new.not_after, "old_serial": cert.serial,
                                              "state": "issued"}, actor=actor)
        return {"name": name, "serial": str(new.serial), "old_serial": str(cert.serial), "not_before": new.not_before,
                "not_after": new.not_after, "state": "pending: handed to the agent at its next check-in"}

    # -- check-in hooks ---------------------------------------------------------------------------

    def on_checkin(self, cert: Certificate) -> dict[str, Any]:
        """Called by ``checkin`` *before* its serial check: confirms a renewal the agent now
        presents. Returns extra reply fields (a pending certificate to pick up)."""
        name = cert.name
        try:
            server = self.state.get_server(name)
        except LabError:
            return {}
        if is_revoked_marker(server.cert_serial):
            return {}
        current = load_node_cert(self.home, name)
        pending = load_node_cert(self.home, name, pending=True)
        if pending is not None and pending.serial == cert.serial:
            old = current.serial if current is not None else None
            save_node_cert(self.home, pending)
            drop_node_cert(self.home, name, pending=True)
            self.state.update_server(name, cert_serial=str(pending.serial))
            self.state.audit("node.renew", name, {"serial": pending.serial, "not_after": pending.not_after, "old_serial": old,
                                                  "state": "confirmed"}, actor=f"node:{name}")
            if old is not None and old != pending.serial:
                crl = revocation_with(self.ca, self.book.current(), self.clock(), [old])
                self.book.replace(crl)
                self._pending_publish = crl
            log.info("event=identity.renew_confirmed name=%s serial=%s old=%s", name, pending.serial, old)
            return {}
        if current is None and server.cert_serial == str(cert.serial):
            save_node_cert(self.home, cert)  # learned: nodes enrolled before certificates were kept
        if pending is not None and pending.noise_pub == cert.noise_pub and pending.serial != cert.serial:
            return {"certificate": pending.encode()}
        return {}

    _pending_publish: RevocationList | None = None

    async def after_checkin(self) -> None:
        crl, self._pending_publish = self._pending_publish, None
        if crl is not None:
            published = await publish_everywhere(self.stores(), self.identity, [{"revocations": crl.encode()}])
            log.info("event=identity.old_serial_revoked crl=%s stores=%s", crl.version, ",".join(f"{k}:{v}" for k, v in published.items()))


def show(home: Path, state: Any, name: str, crl: RevocationList | None) -> dict[str, Any]:
    """Serial, validity, roles, key fingerprint, revoked?, and a pending renewal."""
    server = state.get_server(name)
    cert = load_node_cert(home, name)
    pending = load_node_cert(home, name, pending=True)

    def describe(c: Certificate | None) -> dict[str, Any] | None:
        if c is None:
            return None
        return {"serial": str(c.serial), "node_id": c.node_id, "not_before": c.not_before, "not_after": c.not_after,
                "roles": list(c.roles), "fingerprint": fingerprint(c.noise_pub),
                "revoked": crl is not None and crl.revoked_reason(c) is not None}

    revoked = is_revoked_marker(server.cert_serial)
    return {
        "name": name, "status": "revoked" if revoked else ("enrolled" if server.enrolled_at else "not enrolled"),
        "inventory_serial": server.cert_serial, "certificate": describe(cert), "pending": describe(pending),
        "crl_version": crl.version if crl is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# CLI side


def daemon_endpoint(home: Path) -> str:
    """Where this home's coordinator daemon listens: config.yaml ``server:``, else the endpoint
    file the local daemon writes when it is ready."""
    from lab.coordinator.engine import _read_settings

    server = _read_settings(Path(home)).get("server")
    if isinstance(server, str) and server:
        return server
    try:
        text = (Path(home) / ENDPOINT_FILE).read_text().strip()
    except OSError:
        text = ""
    if not text:
        raise StateError(
            "the coordinator daemon is not running (no `lab server run` for this home): it is the CA, so "
            "certificates can only be revoked or renewed through it; start it and retry (nothing was changed)"
        )
    return text


def call_daemon(home: Path, method: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    import trio

    from lab.common import rpc
    from lab.common.errors import AuthError, TransportError
    from lab.coordinator.daemon import parse_endpoint
    from lab.coordinator.enrollment import load_identity

    endpoint = daemon_endpoint(home)
    host, port = parse_endpoint(endpoint)
    identity = load_identity(home, "admin")

    async def main() -> dict[str, Any]:
        async with rpc.connect(host, port, identity=identity, timeout=5) as conn:
            if "coordinator" not in conn.peer.roles:
                raise AuthError(f"{endpoint} is {conn.peer.name!r}, not a coordinator")
            reply: dict[str, Any] = await conn.call(method, body, timeout=timeout)
            return reply

    try:
        return trio.run(main)
    except (TransportError, OSError) as exc:
        raise StateError(
            f"cannot reach the coordinator daemon at {endpoint} ({exc}): it is the CA, so certificates can only be "
            "revoked or renewed through it; start it (`lab server run`) and retry (nothing was changed)"
        ) from None
