"""The signed policy a store enforces, and the enforcement itself.

**Policy document** (compiled by the coordinator, :mod:`lab.coordinator.policy`): for each node
name, the sorted list of secret paths it is entitled to; the nodes that run the store role; the
paths that are per-machine. ``msgpack([body, signature])`` with the CA's Ed25519 signature over
``"lab.policy.v1\\0" + body``, in one canonical encoding (node names and paths sorted), exactly like
the certificates and revocation lists of :mod:`lab.common.identity`. A higher ``version`` replaces
a lower one.

Both the policy and the CA's :class:`~lab.common.identity.RevocationList` are records of the dataset
(``_lab/policy`` and ``_lab/revocations``), so they replicate by gossip like secrets and reach every
store while the coordinator is down. A store verifies the CA signature before it merges either
(:meth:`Enforcer.system_checker`) and before it applies either.

**Enforcement**: the requester is the *verified certificate* of its Noise session, never a name it
sends. A revoked certificate (serial or key listed) is refused with ``AuthError``. A path outside
the node's current entitlement is refused with ``NotEntitled`` whose message depends only on the
requested path, and the decision is made from the policy alone, before the dataset is consulted,
so neither the error nor the work done reveals whether the path exists.

**Coordinator announcement** (``_lab/coordinator``, :class:`CoordinatorAnnouncement`): where the
coordinator answers now, CA-signed, a higher ``version`` replacing a lower one. The coordinator
publishes it when it starts serving and when it moves (`lab server migrate`); an agent that lost
its coordinator reads it from any store (``store.coordinator``), so a move reaches agents that were
offline during it (coordinator/migrate/announce.py).

**Per-machine secrets**: the policy lists the logical path (``tls/node-cert``); the store serves
each node the value stored at ``tls/node-cert@<node name>`` under the logical path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final

from lab.common import wire
from lab.common.errors import AuthError, NotEntitled, RemoteProtocolError
from lab.common.identity import (  # the shared signed-record machinery of certificates and CRLs
    Certificate,
    CertificateAuthority,
    RevocationList,
    _Signed,
    _verify_sig,
    matches_fingerprint,
    verify_certificate,
)
from lab.store.records import NODE_PATTERN, PATH_PATTERN, SYSTEM_PREFIX, Meta, SecretRecord, machine_path

__all__ = [
    "COORDINATOR_PATH", "POLICY_PATH", "REVOCATIONS_PATH", "STORES_PATH", "STORE_LABEL", "CoordinatorAnnouncement", "Enforcer",
    "PolicyDocument", "StoreDirectory", "publish", "sign_announcement", "sign_directory", "sign_policy",
]

POLICY_PATH: Final = SYSTEM_PREFIX + "policy"
STORES_PATH: Final = SYSTEM_PREFIX + "stores"
REVOCATIONS_PATH: Final = SYSTEM_PREFIX + "revocations"
COORDINATOR_PATH: Final = SYSTEM_PREFIX + "coordinator"
STORE_LABEL: Final = "secret-store"
MAX_POLICY_SIZE: Final = 16 * 1024 * 1024
_POLICY_DOMAIN: Final = b"lab.policy.v1\x00"
_DIRECTORY_DOMAIN: Final = b"lab.stores.v1\x00"
_ANNOUNCEMENT_DOMAIN: Final = b"lab.coordinator.v1\x00"
ENDPOINT_PATTERN: Final = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}"
_SIG_LEN: Final = 64

_Node = wire.Str(max_len=253, min_len=1, pattern=NODE_PATTERN)
_Path = wire.Str(max_len=256, min_len=1, pattern=PATH_PATTERN)


@wire.record
@dataclasses.dataclass(frozen=True)
class PolicyDocument(_Signed):
    """``node name → entitled paths``, the store nodes and the per-machine paths; CA-signed."""

    v: Annotated[int, wire.Int(1, 1)]
    version: Annotated[int, wire.UInt()]
    issued_at: Annotated[int, wire.UInt()]
    grants: Annotated[dict[str, tuple[str, ...]], wire.Dict(_Node, wire.List(_Path, max_items=65536), max_items=1 << 20)]
    stores: Annotated[tuple[str, ...], wire.List(_Node, max_items=4096)]
    per_machine: Annotated[tuple[str, ...], wire.List(_Path, max_items=65536)]
    signature: Annotated[bytes, wire.Bytes(min_len=_SIG_LEN, max_len=_SIG_LEN)] = dataclasses.field(repr=False)

    _WHAT = "policy"

    def _check(self) -> None:
        def ascending(xs: Any, what: str) -> None:
            if any(a >= b for a, b in zip(xs, xs[1:])):
                raise wire.Invalid(f"{what} must be strictly ascending")

        ascending(list(self.grants), "grant node names")
        for node, paths in self.grants.items():
            ascending(paths, f"paths of {node}")
            if any(p.startswith(SYSTEM_PREFIX) or "@" in p for p in paths):
                raise wire.Invalid(f"{node}: system and per-machine paths cannot be granted")
        ascending(self.stores, "stores")
        ascending(self.per_machine, "per_machine")

    @classmethod
    def decode_untrusted(cls, data: bytes | bytearray | memoryview) -> PolicyDocument:
        return cls._decode(data, MAX_POLICY_SIZE, 1 << 22)  # type: ignore[no-any-return]

    def verify(self, ca_public_key: bytes) -> None:
        if self.__dict__.get("_verified_by") == bytes(ca_public_key):
            return
        if not _verify_sig(_POLICY_DOMAIN, self.body_bytes(), self.signature, ca_public_key):
            raise AuthError(f"policy v{self.version} is not signed by this cluster CA")
        object.__setattr__(self, "_verified_by", bytes(ca_public_key))

    def __hash__(self) -> int:  # dict field: hash the signature (unique per document)
        return hash(self.signature)


def sign_policy(
    ca: CertificateAuthority, grants: Mapping[str, Iterable[str]], stores: Iterable[str], per_machine: Iterable[str],
    *, version: int, now: float,
) -> PolicyDocument:
    """Build and sign a policy document (sorting everything into its canonical form)."""
    unsigned = PolicyDocument(
        v=1, version=version, issued_at=int(now),
        grants={n: tuple(sorted(set(grants[n]))) for n in sorted(grants)},
        stores=tuple(sorted(set(stores))), per_machine=tuple(sorted(set(per_machine))), signature=bytes(_SIG_LEN),
    )
    sig = ca._sign(_POLICY_DOMAIN, unsigned.body_bytes())  # noqa: SLF001 (the CA's one signing primitive)
    return dataclasses.replace(unsigned, signature=sig)


@wire.record
@dataclasses.dataclass(frozen=True)
class StoreDirectory(_Signed):
    """``store node name → HOST:PORT`` (the endpoints the stores reported at enrollment), CA-signed:
    the record ``_lab/stores`` that tells every store where the others listen, so a store added
    later is linked to without restarting the others. Only names the policy's ``stores`` lists
    are used (:attr:`Enforcer.endpoints`)."""

    v: Annotated[int, wire.Int(1, 1)]
    version: Annotated[int, wire.UInt()]
    issued_at: Annotated[int, wire.UInt()]
    endpoints: Annotated[dict[str, str], wire.Dict(_Node, wire.Str(max_len=300, min_len=3, pattern=ENDPOINT_PATTERN), max_items=4096)]
    signature: Annotated[bytes, wire.Bytes(min_len=_SIG_LEN, max_len=_SIG_LEN)] = dataclasses.field(repr=False)

    _WHAT = "store directory"

    def _check(self) -> None:
        names = list(self.endpoints)
        if any(a >= b for a, b in zip(names, names[1:])):
            raise wire.Invalid("store names must be strictly ascending")

    @classmethod
    def decode_untrusted(cls, data: bytes | bytearray | memoryview) -> StoreDirectory:
        return cls._decode(data, 1 << 20, 1 << 14)  # type: ignore[no-any-return]

    def verify(self, ca_public_key: bytes) -> None:
        if not _verify_sig(_DIRECTORY_DOMAIN, self.body_bytes(), self.signature, ca_public_key):
            raise AuthError(f"store directory v{self.version} is not signed by this cluster CA")

    def __hash__(self) -> int:
        return hash(self.signature)


def sign_directory(ca: CertificateAuthority, endpoints: Mapping[str, str], *, version: int, now: float) -> StoreDirectory:
    """Build and sign the store directory (names sorted)."""
    unsigned = StoreDirectory(v=1, version=version, issued_at=int(now), endpoints={n: endpoints[n] for n in sorted(endpoints)},
                              signature=bytes(_SIG_LEN))
    sig = ca._sign(_DIRECTORY_DOMAIN, unsigned.body_bytes())  # noqa: SLF001 (the CA's one signing primitive)
    return dataclasses.replace(unsigned, signature=sig)


@wire.record
@dataclasses.dataclass(frozen=True)
class CoordinatorAnnouncement(_Signed):
    """Where the coordinator of this CA answers (``HOST:PORT``), CA-signed: the record
    ``_lab/coordinator``. ``version`` only grows (milliseconds, and above any held one); ``ca`` is
    the CA's fingerprint, checked against the verifying key too."""

    v: Annotated[int, wire.Int(1, 1)]
    version: Annotated[int, wire.UInt()]
    issued_at: Annotated[int, wire.UInt()]
    endpoint: Annotated[str, wire.Str(max_len=300, min_len=3, pattern=ENDPOINT_PATTERN)]
    ca: Annotated[str, wire.Str(max_len=64, min_len=16)]
    signature: Annotated[bytes, wire.Bytes(min_len=_SIG_LEN, max_len=_SIG_LEN)] = dataclasses.field(repr=False)

    _WHAT = "coordinator announcement"

    @classmethod
    def decode_untrusted(cls, data: bytes | bytearray | memoryview) -> CoordinatorAnnouncement:
        return cls._decode(data, 4096, 16)  # type: ignore[no-any-return]

    def verify(self, ca_public_key: bytes) -> None:
        if not _verify_sig(_ANNOUNCEMENT_DOMAIN, self.body_bytes(), self.signature, ca_public_key) \
                or not matches_fingerprint(ca_public_key, self.ca):
            raise AuthError(f"coordinator announcement v{self.version} is not signed by this cluster CA")

    def __hash__(self) -> int:
        return hash(self.signature)


def sign_announcement(ca: CertificateAuthority, endpoint: str, *, version: int, now: float) -> CoordinatorAnnouncement:
    """Build and sign the coordinator announcement for ``endpoint``."""
    unsigned = CoordinatorAnnouncement(v=1, version=version, issued_at=int(now), endpoint=endpoint, ca=ca.fingerprint,
                                       signature=bytes(_SIG_LEN))
    sig = ca._sign(_ANNOUNCEMENT_DOMAIN, unsigned.body_bytes())  # noqa: SLF001 (the CA's one signing primitive)
    return dataclasses.replace(unsigned, signature=sig)


class Enforcer:
    """What one store knows of policy and revocations, and the decisions made from them."""

    def __init__(self, ca_public_key: bytes) -> None:
        self.ca_public_key = bytes(ca_public_key)
        self.policy: PolicyDocument | None = None
        self.revocations: RevocationList | None = None
        self.directory: StoreDirectory | None = None
        self.announcement: CoordinatorAnnouncement | None = None
        self._grants: dict[str, frozenset[str]] = {}

    # -- loading ---------------------------------------------------------------------------------

    def load_policy(self, doc: PolicyDocument) -> bool:
        """Verify and apply a policy; False (ignored) unless it is newer than the current one."""
        doc.verify(self.ca_public_key)
        if self.policy is not None and doc.version <= self.policy.version:
            return False
        self.policy = doc
        self._grants = {n: frozenset(p) for n, p in doc.grants.items()}
        return True

    def load_revocations(self, crl: RevocationList) -> bool:
        crl.verify(self.ca_public_key)
        if not crl.replaces(self.revocations):
            return False
        self.revocations = crl
        return True

    def load_directory(self, doc: StoreDirectory) -> bool:
        doc.verify(self.ca_public_key)
        if self.directory is not None and doc.version <= self.directory.version:
            return False
        self.directory = doc
        return True

    def load_announcement(self, doc: CoordinatorAnnouncement) -> bool:
        doc.verify(self.ca_public_key)
        if self.announcement is not None and doc.version <= self.announcement.version:
            return False
        self.announcement = doc
        return True

    def system_checker(self, record: SecretRecord, value: bytes) -> None:
        """Dataset hook: refuse an unsigned or forged system record before it is merged, and apply it."""
        if record.path == POLICY_PATH:
            self.load_policy(PolicyDocument.decode_untrusted(value))
        elif record.path == REVOCATIONS_PATH:
            self.load_revocations(RevocationList.decode_untrusted(value))
        elif record.path == STORES_PATH:
            self.load_directory(StoreDirectory.decode_untrusted(value))
        elif record.path == COORDINATOR_PATH:
            self.load_announcement(CoordinatorAnnouncement.decode_untrusted(value))
        else:
            raise RemoteProtocolError(f"unknown system record {record.path!r}")

    def load_from(self, reveal: Any, records: Iterable[SecretRecord]) -> None:
        """Apply the system records already held (at start): ``reveal(record) -> bytes``."""
        for rec in records:
            if rec.is_system and not rec.deleted:
                self.system_checker(rec, reveal(rec))

    # -- decisions -------------------------------------------------------------------------------

    @property
    def stores(self) -> tuple[str, ...]:
        return self.policy.stores if self.policy is not None else ()

    @property
    def endpoints(self) -> dict[str, str]:
        """``name → HOST:PORT`` of the stores of the current policy, from the signed directory."""
        if self.directory is None or self.policy is None:
            return {}
        members = set(self.policy.stores)
        return {n: ep for n, ep in self.directory.endpoints.items() if n in members}

    def authenticate(self, cert: Certificate | bytes, now: float, expected_noise_pub: bytes | None = None) -> Certificate:
        """The certificate if signed by our CA, valid now and not revoked; AuthError otherwise."""
        return verify_certificate(cert, self.ca_public_key, now, self.revocations, expected_noise_pub)

    def is_revoked(self, cert: Certificate) -> bool:
        return self.revocations is not None and self.revocations.revoked_reason(cert) is not None

    def entitlement(self, cert: Certificate) -> dict[str, str]:
        """``logical path → stored path`` for a verified certificate (empty when revoked)."""
        if self.is_revoked(cert) or self.policy is None:
            return {}
        per_machine = self.policy.per_machine
        out = {}
        for p in self._grants.get(cert.name, ()):
            out[p] = machine_path(p, cert.name) if p in per_machine else p
        return out

    def check(self, cert: Certificate, path: str) -> str:
        """The stored path ``cert`` may read as ``path``; AuthError when revoked, NotEntitled
        when not granted. Decided from policy alone: the dataset is never consulted first."""
        if self.is_revoked(cert):
            raise AuthError(f"certificate {cert.serial} is revoked")
        granted = self._grants.get(cert.name, frozenset())
        if path not in granted or self.policy is None:
            raise NotEntitled(f"not entitled to {path[:256]!r}")
        return machine_path(path, cert.name) if path in self.policy.per_machine else path


def publish(dataset: Any, signed: PolicyDocument | RevocationList | StoreDirectory | CoordinatorAnnouncement, now_ms: int, *,
            by: str = "coordinator") -> SecretRecord:
    """Write a signed policy, revocation list, store directory or coordinator announcement into
    the dataset, as the record that replicates it."""
    path = {PolicyDocument: POLICY_PATH, StoreDirectory: STORES_PATH,
            CoordinatorAnnouncement: COORDINATOR_PATH}.get(type(signed), REVOCATIONS_PATH)
    meta = Meta(type="system", set_by=by, set_at=now_ms, rotate_every=None, ttl=None, owner="root", group="root", mode=0o400)
    rec: SecretRecord = dataset.write(path, signed.encode(), meta, now_ms)
    return rec
