"""What moves: a coordinator home as one bundle (state.db through the sqlite backup API, CA,
CRL, issued certificates, config minus ``server:``, definitions), its strict decoder, and its
installation as a new home; the markers a move leaves (moved.json, migrated.json)."""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from lab.common.errors import ConfigError, NotEntitled, RemoteProtocolError, StateError, UsageError
from lab.coordinator.migrate._base import MOVED_FILE, ORIGIN_FILE

BUNDLE_KIND: Final = "lab-coordinator-bundle-v1"
MAX_BUNDLE: Final = 15 * 1024 * 1024  # under the RPC's 16 MiB message limit
MAX_DEFINITIONS: Final = 4 * 1024 * 1024
_ID_RE: Final = re.compile(r"^[a-z0-9]{8,32}$")
_PART_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")
_HOME_FILES: Final = ("ca.key", "ca.pub", "revocations.crl")
_REQUIRED: Final = ("state.db", "ca.key", "ca.pub")


def config_for_bundle(settings: Mapping[str, Any]) -> dict[str, Any]:
    """config.yaml for the new home: without ``server:`` (it *is* the server) and without
    ``definitions:`` (the definitions travel in the bundle and land in the default place)."""
    return {k: v for k, v in settings.items() if k not in ("server", "definitions")}


# ---------------------------------------------------------------------------------------------
# The bundle


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What a coordinator home needs elsewhere; ``files`` maps relative paths to contents."""

    id: str
    source: str  # the old coordinator's endpoint
    node: str  # the target
    ca_fingerprint: str
    created: float
    files: dict[str, bytes]

    def __repr__(self) -> str:  # never the CA key, not even in a traceback
        return f"Bundle(id={self.id!r}, node={self.node!r}, files={sorted(self.files)!r})"


def _safe_relpath(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 512:
        raise RemoteProtocolError("bundle: a file name must be text of 1..512 characters")
    parts = name.split("/")
    if not all(_PART_RE.match(p) and p not in (".", "..") for p in parts):
        raise RemoteProtocolError(f"bundle: unsafe file name {name!r}")
    return name


def _db_copy(db: Path) -> bytes:
    """A consistent single-file copy of a live WAL database (sqlite backup API)."""
    with tempfile.TemporaryDirectory(prefix="lab-migrate-") as tmp:
        out = Path(tmp) / "state.db"
        try:
            src = sqlite3.connect(str(db), isolation_level=None, timeout=10)
            try:
                dest = sqlite3.connect(str(out), isolation_level=None)
                try:
                    src.backup(dest)
                    dest.execute("PRAGMA journal_mode = DELETE")
                    if dest.execute("PRAGMA quick_check").fetchall() != [("ok",)]:
                        raise StateError(f"{db}: the copy failed quick_check; state.db may be damaged")
                finally:
                    dest.close()
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise StateError(f"{db}: cannot copy the state database: {exc}") from exc
        return out.read_bytes()


def count_rows(db: bytes | Path) -> dict[str, int]:
    """servers / tokens / audit rows of a state database (a file, or a bundle's bytes)."""
    with tempfile.TemporaryDirectory(prefix="lab-migrate-") as tmp:
        path = Path(db) if isinstance(db, Path) else Path(tmp) / "state.db"
        if not isinstance(db, Path):
            path.write_bytes(db)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                return {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in ("servers", "tokens", "audit")}
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state database: {exc}") from exc


def _definitions(defs: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not defs.is_dir():
        return out
    total = 0
    for p in sorted(defs.rglob("*")):
        rel = p.relative_to(defs)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.is_symlink():
            continue  # .git and editor files stay behind
        data = p.read_bytes()
        total += len(data)
        if total > MAX_DEFINITIONS:
            raise UsageError(f"the definitions in {defs} are over {MAX_DEFINITIONS >> 20} MiB: keep them in Git, "
                             "and set `definitions:` on the new coordinator")
        out["definitions/" + rel.as_posix()] = data
    return out


def build_bundle(home: Path, definitions: Path, *, id: str, source: str, node: str, ca_fingerprint: str,
                 now: float) -> Bundle:
    """Collect the coordinator home: state.db (backup API), CA, CRL, issued certificates,
    config (minus ``server:``), the definitions directory."""
    from lab.coordinator.engine import _read_settings

    home = Path(home)
    files: dict[str, bytes] = {"state.db": _db_copy(home / "state.db")}
    for name in _HOME_FILES:
        if (home / name).exists():
            files[name] = (home / name).read_bytes()
    certs = home / "certs"
    if certs.is_dir():
        for p in sorted(certs.glob("*.cert")):
            files[f"certs/{p.name}"] = p.read_bytes()
    cfg = config_for_bundle(_read_settings(home))
    if cfg:
        files["config.yaml"] = yaml.safe_dump(cfg, sort_keys=True).encode()
    files.update(_definitions(Path(definitions)))
    for name in files:
        _safe_relpath(name)
    return Bundle(id, source, node, ca_fingerprint, now, files)


def encode_bundle(bundle: Bundle) -> bytes:
    from lab.common import wire

    raw: bytes = wire.packb({"kind": BUNDLE_KIND, "id": bundle.id, "source": bundle.source, "node": bundle.node,
                             "ca": bundle.ca_fingerprint, "created": bundle.created, "files": bundle.files})
    if len(raw) > MAX_BUNDLE:
        raise StateError(f"the coordinator state is {len(raw) >> 20} MiB, over the {MAX_BUNDLE >> 20} MiB a migration carries")
    return raw


def decode_bundle_untrusted(raw: object, ca_public_key: bytes) -> Bundle:
    """A bundle from the wire, checked: its kind, safe relative names, the required files, and a
    CA whose public key is ``ca_public_key`` (the receiving node's own trust root)."""
    import msgpack

    from lab.coordinator.enrollment import CA_PUB_KIND

    if not isinstance(raw, bytes) or len(raw) > MAX_BUNDLE:
        raise RemoteProtocolError("bundle: must be bytes under the size limit")
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"bundle: not msgpack ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != BUNDLE_KIND:
        raise RemoteProtocolError(f"bundle: not a {BUNDLE_KIND}")
    for key in ("id", "source", "node", "ca"):
        if not isinstance(doc.get(key), str) or not doc[key] or len(doc[key]) > 262:
            raise RemoteProtocolError(f"bundle: {key} must be text")
    if not _ID_RE.match(doc["id"]) or not isinstance(doc.get("created"), (int, float)):
        raise RemoteProtocolError("bundle: bad id or creation time")
    files = doc.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, bytes) for v in files.values()):
        raise RemoteProtocolError("bundle: files must map names to bytes")
    files = {_safe_relpath(k): v for k, v in files.items()}
    missing = [f for f in _REQUIRED if f not in files]
    if missing:
        raise RemoteProtocolError(f"bundle: missing {', '.join(missing)}")
    import base64
    import binascii

    kind, _, body = files["ca.pub"].decode("ascii", "replace").strip().partition(" ")
    try:
        pub = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        pub = b""
    if kind != CA_PUB_KIND or not hmac.compare_digest(pub, bytes(ca_public_key)):
        raise NotEntitled("bundle: its CA is not this node's CA")
    from lab.common.identity import fingerprint

    if not hmac.compare_digest(doc["ca"], fingerprint(bytes(ca_public_key))):
        raise RemoteProtocolError("bundle: CA fingerprint does not match its ca.pub")
    return Bundle(doc["id"], doc["source"], doc["node"], doc["ca"], float(doc["created"]), files)


def install_bundle(bundle: Bundle, target: Path) -> None:
    """Write the bundle as a coordinator home ``target`` (0700; files 0600, CA key checked
    against ca.pub, state.db checked), replacing what a previous attempt left there."""
    from lab.common.identity import CertificateAuthority, write_private_file
    from lab.coordinator.enrollment import load_ca_public_key

    target = Path(target)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    staging.mkdir(mode=0o700, parents=True)
    try:
        for name, data in bundle.files.items():
            path = staging / name
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private_file(path, data, overwrite=True)
        ca = CertificateAuthority.load(staging / "ca.key")
        try:
            if not hmac.compare_digest(ca.public_key, load_ca_public_key(staging / "ca.pub")):
                raise NotEntitled("bundle: ca.key does not belong to ca.pub")
        finally:
            ca.close()
        try:
            conn = sqlite3.connect(str(staging / "state.db"), isolation_level=None)
            try:
                ok = conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
            finally:
                conn.close()
        except sqlite3.Error:
            ok = False
        if not ok:
            raise RemoteProtocolError("bundle: state.db is damaged")
        origin = {"id": bundle.id, "node": bundle.node, "from": bundle.source, "at": bundle.created}
        write_private_file(staging / ORIGIN_FILE, json.dumps(origin).encode(), overwrite=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        os.chmod(target, 0o700)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_not_moved(home: Path) -> None:
    """`lab server run` refuses to start in a home whose coordinator moved away (two
    coordinators with one CA would split the fleet)."""
    path = Path(home) / MOVED_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        doc = {}
    to = doc.get("to") if isinstance(doc, dict) else None
    raise ConfigError(f"this coordinator moved to {to or 'another node'} (`lab server migrate`); it must not run here "
                      f"too. Remove {path} only if that one is gone for good", str(path))


def origin_node(home: Path) -> str | None:
    """The node a migration installed this coordinator home on (None: not installed by one)."""
    try:
        doc = json.loads((Path(home) / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None
    node = doc.get("node") if isinstance(doc, dict) else None
    return node if isinstance(node, str) else None

