"""The secret-store role: encrypted LMDB dataset, signed policy enforcement, gossip, Git+age backup.

Modules (see docs/SECRETS.md):

* :mod:`lab.store.hlc` — hybrid logical clock versions
* :mod:`lab.store.records` — records, value encryption, store-protocol message registry
* :mod:`lab.store.keys` — the dataset key: sealing to a new store, wrapping under the machine key
* :mod:`lab.store.dataset` — the LMDB dataset, digest tree, acknowledgements, tombstone GC
* :mod:`lab.store.policy` — signed policy document and enforcement (NotEntitled, revocations)
* :mod:`lab.store.gossip` — eager push and anti-entropy between stores (sans-IO)
* :mod:`lab.store.serve` — the agent sync exchange and subscriptions (sans-IO)
* :mod:`lab.store.backup` — age-encrypted backup in Git, recovery
* :mod:`lab.store.simulate` — an in-memory network of stores for tests and tools
"""

from lab.store.dataset import Dataset
from lab.store.gossip import Gossip
from lab.store.hlc import HLC, Version
from lab.store.policy import Enforcer, PolicyDocument, publish, sign_policy
from lab.store.records import Meta, SecretRecord
from lab.store.serve import StoreService, Subscription, SyncRequest, SyncUpdate

__all__ = [
    "HLC", "Dataset", "Enforcer", "Gossip", "Meta", "PolicyDocument", "SecretRecord", "StoreService",
    "Subscription", "SyncRequest", "SyncUpdate", "Version", "publish", "sign_policy",
]
