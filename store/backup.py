"""Backup to a Git repository of age-encrypted files, and recovery from it.

Layout of the repository::

    index.yaml             plaintext: every path with its version and metadata, the policy
    dataset-key.age        the dataset key, so a recovered store can rejoin surviving replicas
    secrets/<path>.age     one file per live path: the value alone, age-encrypted

Every ``.age`` file is a standard age file (X25519 recipients ``age1...`` or SSH recipients),
written by pyrage, so ``age -d -i KEYFILE secrets/mail/dkim-key.age`` prints the secret with the
stock ``age`` binary. The index is plaintext on purpose (SOPS style: paths and policy readable,
values not). A file is re-encrypted only when its version (or the recipient set) changes, so the
Git history shows which secrets changed, and when. Deleted paths lose their file.

:func:`backup` writes the files and commits with the ``git`` CLI (``git init`` when the directory
is not a repository yet; ``git push`` when a remote is given). :func:`recover` builds a new
replica from the files: the dataset key from ``dataset-key.age``, every record with its original
version, so a recovered store merges cleanly with any replica that survived.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import pyrage
import yaml

from lab.common.errors import ConfigError, StoreError
from lab.common.identity import read_private_file
from lab.common.securemem import SecretBuffer
from lab.store.dataset import Dataset
from lab.store.hlc import Version
from lab.store.policy import POLICY_PATH, PolicyDocument
from lab.store.records import Meta, check_path, seal_value

__all__ = [
    "BackupResult", "backup", "commit_backup", "export_key", "export_page", "git_commit", "load_identities", "parse_recipients", "plan_backup",
    "read_backup", "recover", "write_backup", "write_files",
]

INDEX: Final = "index.yaml"
KEY_FILE: Final = "dataset-key.age"
SECRETS_DIR: Final = "secrets"
FORMAT: Final = 1
PAGE_BYTES: Final = 4 * 1024 * 1024  # encrypted bytes per page of a backup read over the store RPC
PAGE_ITEMS: Final = 2000


@dataclasses.dataclass(frozen=True)
class BackupResult:
    directory: Path
    written: int  # .age files (re)encrypted
    removed: int  # .age files of deleted paths
    total: int  # live paths in the backup
    commit: str | None  # the new commit, None when nothing changed or no git was used


def parse_recipients(recipients: Iterable[str]) -> list[Any]:
    out: list[Any] = []
    for r in recipients:
        r = r.strip()
        try:
            if r.startswith("age1"):
                out.append(pyrage.x25519.Recipient.from_str(r))
            elif r.startswith(("ssh-ed25519 ", "ssh-rsa ")):
                out.append(pyrage.ssh.Recipient.from_str(r))
            else:
                raise ValueError("unknown recipient type")
        except Exception as exc:
            raise ConfigError(f"not an age recipient: {r[:24]!r}... ({exc})") from exc
    if not out:
        raise ConfigError("a backup needs at least one age recipient (--recipient or configuration)")
    return out


def load_identities(path: str | os.PathLike[str]) -> list[Any]:
    """age X25519 identities (``AGE-SECRET-KEY-1...`` lines) from a 0600 identity file."""
    raw = read_private_file(path, max_size=1 << 20)
    try:
        ids = []
        for line in bytes(raw).decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line.startswith("AGE-SECRET-KEY-"):
                try:
                    ids.append(pyrage.x25519.Identity.from_str(line))
                except Exception as exc:
                    raise ConfigError(f"bad age identity: {exc}", file=str(path)) from exc
        if not ids:
            raise ConfigError("no AGE-SECRET-KEY- line in the identity file", file=str(path))
        return ids
    finally:
        raw[:] = bytes(len(raw))


def _file_for(root: Path, path: str) -> Path:
    check_path(path)
    return root / SECRETS_DIR / (path + ".age")


def _meta_dict(meta: Meta) -> dict[str, Any]:
    d = meta._to_wire()
    d["mode"] = f"{meta.mode:04o}"
    return d


def _read_index(root: Path) -> dict[str, Any]:
    p = root / INDEX
    if not p.exists():
        return {}
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StoreError(f"cannot read backup index {p}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def plan_backup(directory: str | os.PathLike[str], recipients: Sequence[str]) -> tuple[dict[str, str], bool]:
    """What a store may skip for a backup into ``directory``: ``({path: version} whose file is
    already there encrypted to the same recipients, whether dataset-key.age is already there)``."""
    root = Path(directory)
    old = _read_index(root)
    if sorted(old.get("recipients") or []) != sorted(r.strip() for r in recipients):
        return {}, False
    have = {p: str(e.get("version")) for p, e in (old.get("secrets") or {}).items()
            if isinstance(e, dict) and isinstance(p, str) and _file_for(root, p).exists()}
    return have, (root / KEY_FILE).exists()


def _policy_summary(value: bytes) -> dict[str, Any]:
    doc = PolicyDocument.decode_untrusted(value)
    return {"version": doc.version, "issued_at": doc.issued_at, "stores": list(doc.stores),
            "per_machine": list(doc.per_machine), "grants": {n: list(p) for n, p in doc.grants.items()}}


def export_page(dataset: Dataset, recipients: Sequence[Any], have: Mapping[str, str], *, after: str | None = None,
                max_bytes: int = PAGE_BYTES, max_items: int = PAGE_ITEMS) -> dict[str, Any]:
    """The store's side of a backup (runs where the dataset key is): index entries of the live
    records after ``after`` (path order), each with ``age`` — the value age-encrypted to the parsed
    ``recipients`` — unless ``have`` names the same version (``None``: keep the file). Plaintext
    never leaves this function. ``next``: the path to continue after, None on the last page."""
    entries: dict[str, Any] = {}
    policy: dict[str, Any] | None = None
    size = 0
    for rec in dataset.records(after=after):
        if entries and (size >= max_bytes or len(entries) >= max_items):
            return {"secrets": entries, "policy": policy, "next": list(entries)[-1]}
        assert rec.meta is not None
        entry: dict[str, Any] = {"version": str(rec.version), "file": _file_for(Path(), rec.path).as_posix(), **_meta_dict(rec.meta)}
        value = None
        if have.get(rec.path) != entry["version"]:
            value = dataset.reveal(rec)
            entry["age"] = pyrage.encrypt(value, list(recipients))
            size += len(entry["age"])
        else:
            entry["age"] = None
        if rec.path == POLICY_PATH:
            policy = _policy_summary(value if value is not None else dataset.reveal(rec))
        entries[rec.path] = entry
        size += 256
    return {"secrets": entries, "policy": policy, "next": None}


def export_key(dataset: Dataset, recipients: Sequence[Any]) -> bytes:
    """dataset-key.age: the dataset key age-encrypted to the parsed ``recipients``."""
    with dataset.export_key() as key:
        out: bytes = pyrage.encrypt(key.bytes(), list(recipients))
    return out


def write_files(directory: str | os.PathLike[str], recipients: Sequence[str], entries: Mapping[str, Mapping[str, Any]],
                policy: dict[str, Any] | None, key_age: bytes | None, *, now: float) -> BackupResult:
    """The client's side of a backup: write the ``.age`` files that came (``age`` not None),
    drop those of paths no longer live, write ``dataset-key.age`` when given, and the index."""
    root = Path(directory)
    (root / SECRETS_DIR).mkdir(parents=True, exist_ok=True)
    old = _read_index(root)
    written = 0
    index_entries: dict[str, Any] = {}
    for path, entry in entries.items():
        file = _file_for(root, path)
        age = entry.get("age")
        if age is not None:
            if not isinstance(age, bytes):
                raise StoreError(f"backup entry {path!r}: the encrypted value is not bytes")
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(file.name + ".tmp")
            tmp.write_bytes(age)
            os.replace(tmp, file)
            written += 1
        elif not file.exists():
            raise StoreError(f"backup entry {path!r} came without its file, and {file} is missing")
        index_entries[path] = {k: v for k, v in entry.items() if k != "age"}
        index_entries[path]["file"] = str(file.relative_to(root))
    removed = 0
    for f in sorted((root / SECRETS_DIR).rglob("*.age")):
        rel = f.relative_to(root / SECRETS_DIR).as_posix()[: -len(".age")]
        if rel not in index_entries:
            f.unlink()
            removed += 1
    for d in sorted((root / SECRETS_DIR).rglob("*"), reverse=True):  # drop emptied folders
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    if key_age is not None:
        tmp = root / (KEY_FILE + ".tmp")
        tmp.write_bytes(key_age)
        os.replace(tmp, root / KEY_FILE)
        written += 1
    index = {
        "format": FORMAT,
        "written_at": int(now),
        "recipients": sorted(r.strip() for r in recipients),
        "secrets": dict(sorted(index_entries.items())),
        "policy": policy,
    }
    unchanged = {k: v for k, v in old.items() if k != "written_at"} == {k: v for k, v in index.items() if k != "written_at"}
    if not unchanged or written or removed:  # a backup that changed nothing commits nothing
        text = "# lab secret backup: values are age-encrypted under secrets/; this index is plaintext.\n"
        (root / INDEX).write_text(text + yaml.safe_dump(index, sort_keys=False, allow_unicode=True))
    return BackupResult(root, written, removed, len(index_entries), None)


def write_backup(dataset: Dataset, directory: str | os.PathLike[str], recipients: Sequence[str], *, now: float) -> BackupResult:
    """Write (or bring up to date) the backup files in ``directory``; no Git involved."""
    parsed = parse_recipients(recipients)
    have, have_key = plan_backup(directory, recipients)
    page = export_page(dataset, parsed, have, max_bytes=1 << 62, max_items=1 << 62)
    key_age = None if have_key else export_key(dataset, parsed)
    return write_files(directory, recipients, page["secrets"], page["policy"], key_age, now=now)


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    cmd = ["git", "-C", str(root), "-c", "user.name=lab", "-c", "user.email=lab@localhost", "-c", "commit.gpgsign=false", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise StoreError("git is not installed (Debian: apt install git)") from exc
    except subprocess.TimeoutExpired as exc:
        raise StoreError(f"git {args[0]} timed out") from exc
    if done.returncode != 0:
        raise StoreError(f"git {args[0]} failed: {(done.stderr or done.stdout).strip()[:500]}")
    return done.stdout


def git_commit(root: Path, message: str, *, remote: str | None = None) -> str | None:
    """Commit everything in ``root`` (``git init`` first if needed); push when ``remote`` is set."""
    if not (root / ".git").exists():
        _git(root, "init", "-q")
        _git(root, "symbolic-ref", "HEAD", "refs/heads/main")
    _git(root, "add", "-A", ".")
    commit = None
    if _git(root, "status", "--porcelain").strip():
        _git(root, "commit", "-q", "-m", message)
        commit = _git(root, "rev-parse", "HEAD").strip()
    if remote is not None:
        _git(root, "push", "-q", remote, "HEAD:refs/heads/main")
    return commit


def backup(dataset: Dataset, directory: str | os.PathLike[str], recipients: Sequence[str], *, now: float,
           remote: str | None = None) -> BackupResult:
    """Write the backup into a Git repository (created when missing) and commit (and push)."""
    return commit_backup(write_backup(dataset, directory, recipients, now=now), remote=remote)


def commit_backup(result: BackupResult, *, remote: str | None = None) -> BackupResult:
    """Commit (and push) what :func:`write_files` wrote; the result with its commit."""
    msg = f"lab secret backup: {result.total} secrets, {result.written} written, {result.removed} removed"
    return dataclasses.replace(result, commit=git_commit(result.directory, msg, remote=remote))


def _decrypt(file: Path, identities: list[Any]) -> bytes:
    try:
        out: bytes = pyrage.decrypt(file.read_bytes(), identities)
    except OSError as exc:
        raise StoreError(f"cannot read {file}: {exc.strerror or exc}") from exc
    except Exception as exc:  # pyrage.DecryptError and friends
        raise StoreError(f"cannot decrypt {file}: not encrypted to this identity, or damaged ({exc})") from exc
    return out


def _load_index(root: Path) -> dict[str, Any]:
    index = _read_index(root)
    if index.get("format") != FORMAT or not isinstance(index.get("secrets"), dict):
        raise StoreError(f"{root} is not a lab secret backup (no valid {INDEX})")
    return index


def read_backup(backup_dir: str | os.PathLike[str], identities: list[Any]) -> Iterator[tuple[str, Version, Meta, bytes]]:
    """Every record of a backup, decrypted: ``(path, version, meta, value)`` in index order."""
    root = Path(backup_dir)
    index = _load_index(root)
    for path, entry in index["secrets"].items():
        try:
            check_path(path)
            meta = Meta(type=entry["type"], set_by=entry["set_by"], set_at=entry["set_at"], rotate_every=entry["rotate_every"],
                        ttl=entry["ttl"], owner=entry["owner"], group=entry["group"], mode=int(entry["mode"], 8))
            version = Version.parse(entry["version"])
            file = _file_for(root, path)  # never a path the index names: only files under secrets/
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"backup index entry {str(path)[:256]!r} is malformed: {exc}") from exc
        yield path, version, meta, _decrypt(file, identities)


def recover(backup_dir: str | os.PathLike[str], identity: str | os.PathLike[str] | list[Any], directory: str | os.PathLike[str],
            node: str, *, machine_key_path: str | os.PathLike[str] | None = None, durable: bool = True) -> Dataset:
    """A new replica in ``directory`` holding everything the backup holds, at the same versions."""
    root = Path(backup_dir)
    identities = identity if isinstance(identity, list) else load_identities(identity)
    _load_index(root)
    key = SecretBuffer.from_bytes(_decrypt(root / KEY_FILE, identities))
    ds = Dataset.with_key(directory, node, key, machine_key_path=machine_key_path, durable=durable)
    try:
        records = []
        with ds.export_key() as k, k.view() as kv:
            for path, version, meta, value in read_backup(root, identities):
                records.append(seal_value(kv, path, version, meta, value))
        ds.merge(records)
        if ds.rejected:
            raise StoreError(f"{len(ds.rejected)} records of the backup were refused: {ds.rejected[0][1]}")
    except BaseException:
        ds.close()
        raise
    return ds


# The name for it.
recover_from_git = recover
