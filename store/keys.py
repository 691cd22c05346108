"""The dataset key and how it is kept.

* **Dataset key**: 32 random bytes, one per cluster, shared by every store. It encrypts every
  record value (see :mod:`lab.store.records`). In memory it lives in a
  :class:`~lab.common.securemem.SecretBuffer`; it never touches disk unwrapped.
* **Joining**: an existing store hands a new store the key sealed to the new store's X25519 node
  key (``crypto_box_seal``: ephemeral sender key, only the holder of the node's private key opens
  it). :func:`seal_for` / :func:`open_sealed`.
* **At rest**: each replica keeps the key wrapped by its *machine key*, a 32-byte local key in a
  file created 0600 through :func:`lab.common.identity.save_key_file` (default
  ``<store dir>/machine.key``; point it elsewhere, e.g. onto a TPM-sealed or removable location,
  with ``machine_key_path``). The wrapped form, stored in the LMDB ``meta`` table, is
  ``nonce(24) || XChaCha20-Poly1305(machine key, dataset key, AD = "lab.dskey.v1\\0" || dataset id)``.
  Copying ``data.mdb`` to another machine without the machine key file gives nothing.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Final

import nacl.bindings
import nacl.exceptions

from lab.common.errors import ConfigError, StoreError
from lab.common.identity import NodeKey, load_key_file, save_key_file
from lab.common.securemem import SecretBuffer

__all__ = ["MACHINE_KEY_KIND", "load_or_create_machine_key", "new_dataset_key", "open_sealed", "seal_for", "unwrap", "wrap"]

KEY_LEN: Final = 32
NONCE_LEN: Final = 24
MACHINE_KEY_KIND: Final = "lab-store-machine-key-v1"
_WRAP_DOMAIN: Final = b"lab.dskey.v1\x00"


def new_dataset_key() -> SecretBuffer:
    return SecretBuffer.from_bytes(secrets.token_bytes(KEY_LEN))


def load_or_create_machine_key(path: str | os.PathLike[str], *, create: bool = True) -> SecretBuffer:
    """Read the machine key file, creating it (0600, atomically) on first use when ``create``."""
    path = Path(path)
    if create and not path.exists():
        try:
            save_key_file(path, MACHINE_KEY_KIND, secrets.token_bytes(KEY_LEN))
        except ConfigError:
            if not path.exists():  # lost a race with another opener: theirs is as good
                raise
    return load_key_file(path, MACHINE_KEY_KIND)


def wrap(machine_key: SecretBuffer, dataset_key: SecretBuffer, dataset_id: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_LEN)
    with machine_key.view() as mk, dataset_key.view() as dk:
        ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(dk), _WRAP_DOMAIN + dataset_id, nonce, bytes(mk))
    return nonce + ct


def unwrap(machine_key: SecretBuffer, wrapped: bytes, dataset_id: bytes) -> SecretBuffer:
    try:
        with machine_key.view() as mk:
            key = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                wrapped[NONCE_LEN:], _WRAP_DOMAIN + dataset_id, wrapped[:NONCE_LEN], bytes(mk)
            )
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise StoreError("cannot unwrap the dataset key: wrong machine key file, or a damaged store") from exc
    return SecretBuffer.from_bytes(key)


def seal_for(dataset_key: SecretBuffer, recipient_public_key: bytes) -> bytes:
    """The dataset key sealed to a new store's X25519 node key."""
    if len(recipient_public_key) != KEY_LEN:
        raise StoreError("recipient key must be 32 bytes")
    with dataset_key.view() as dk:
        sealed: bytes = nacl.bindings.crypto_box_seal(bytes(dk), bytes(recipient_public_key))
    return sealed


def open_sealed(sealed: bytes, node_key: NodeKey) -> SecretBuffer:
    """Open a dataset key sealed to this node; StoreError if it was sealed to someone else."""
    try:
        with node_key.private_view() as sk:
            key = nacl.bindings.crypto_box_seal_open(bytes(sealed), node_key.public_key, bytes(sk))
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise StoreError("the sealed dataset key does not open with this node's key") from exc
    if len(key) != KEY_LEN:
        raise StoreError("sealed dataset key has the wrong length")
    return SecretBuffer.from_bytes(key)
