"""The store's side of the coordinator announcement (``_lab/coordinator``, store/policy.py):
``store.coordinator`` hands the newest verified one to any enrolled, unrevoked certificate, and
``store.publish {"coordinator": …}`` takes a newer CA-signed one from a writer. Stores keep it
because they outlive any coordinator: an agent that missed a move finds the new one here."""

from __future__ import annotations

import logging
import time
from typing import Any

from lab.common import rpc
from lab.common.errors import AuthError
from lab.store.policy import COORDINATOR_PATH, CoordinatorAnnouncement, publish

log = logging.getLogger("lab.store")


def read(node: Any, peer: rpc.PeerInfo) -> dict[str, Any]:
    """``{"announcement": bytes | None}``; the session's certificate is checked again (revoked
    since the handshake: refused)."""
    node.enforcer.authenticate(peer.certificate, time.time())
    held: CoordinatorAnnouncement | None = node.enforcer.announcement
    return {"announcement": held.encode() if held is not None else None}


def accept(node: Any, peer: rpc.PeerInfo, raw: object) -> dict[str, Any]:
    """Verify and keep a newer announcement (gossiped like the policy); an older or equal one is
    skipped, a forged one refused with AuthError."""
    if not isinstance(raw, bytes):
        raise AuthError("coordinator: must be a signed announcement")
    doc = CoordinatorAnnouncement.decode_untrusted(raw)
    doc.verify(node.enforcer.ca_public_key)
    held = node.enforcer.announcement
    if held is not None and doc.version <= held.version:
        return {"path": COORDINATOR_PATH, "version": held.version, "published": False}
    rec = publish(node.dataset, doc, int(time.time() * 1000), by=peer.name)
    node._push(node.gossip.local_write([rec]))  # noqa: SLF001 (the node's eager push, as for the policy)
    rpc.log_event(log, logging.INFO, "store.published", path=rec.path, version=doc.version, endpoint=doc.endpoint, by=peer.name)
    return {"path": COORDINATOR_PATH, "version": doc.version, "published": True}
