"""The coordinator's state database: ``state.db`` (SQLite, WAL mode) in LAB_HOME.

Availability first: stale data is acceptable, no data is not. So :meth:`StateDB.open`

* checks the file (``PRAGMA quick_check``, and SQLite's own "file is not a database" /
  "malformed" errors) before writing anything to it;
* if it is damaged, or missing/empty while snapshots exist, moves it (and its ``-wal``/``-shm``)
  aside to ``state.db.corrupt-<UTC time>``, restores the newest snapshot that passes
  ``PRAGMA integrity_check``, and records a warning in :attr:`StateDB.warnings` and the log;
* if no snapshot is usable, starts with an empty database and says so. It never refuses to
  start because of damage. (Environmental failures — permission denied, disk full, another
  process holding a lock, a schema newer than this lab — are *not* damage: moving a healthy file
  aside would hide data, so those raise :class:`StateError`.)

Snapshots are consistent copies made with SQLite's backup API, written to a temporary name,
checked, fsynced and renamed to ``snapshots/state-<UTC time>.db``; the newest
``snapshot_keep`` are kept. :meth:`StateDB.open` and :meth:`StateDB.maybe_snapshot` take one
when the newest is older than ``snapshot_interval`` and the database holds any data.

Damage that SQLite cannot see (bytes flipped inside a record) surfaces as a :class:`StateError`
naming the row when it is read; it is not repaired automatically.

Threading: a :class:`StateDB` owns one connection and must be used from the thread that opened
it (SQLite's ``check_same_thread`` enforces this). Several *processes* may open the same home at
once: WAL lets readers run beside one writer, writers wait up to ``busy_timeout``, and recovery
and snapshot rotation are serialised by an ``flock`` on ``state.lock``.

The audit log records who did what to which subject. Never put secret values (secret
contents, tokens, passwords, keys) in ``detail``; as a last line of defence, values under
secret-sounding keys are replaced by ``"<redacted>"``.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.common.errors import NotFound, StateError, UsageError
from lab.common.fsutil import fsync_dir

log = logging.getLogger(__name__)

DB_NAME = "state.db"
SNAPSHOT_DIR = "snapshots"
LOCK_NAME = "state.lock"
DEFAULT_SNAPSHOT_INTERVAL = 3600.0  # seconds
DEFAULT_SNAPSHOT_KEEP = 10
DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a writer waits for another process's write lock

# Schema migrations: MIGRATIONS[i] takes the schema from version i to i + 1 (PRAGMA
# user_version). Append only; never edit a step that has shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE servers (
            name         TEXT PRIMARY KEY,
            provider     TEXT NOT NULL,
            environment  TEXT,
            region       TEXT,
            size         TEXT,
            labels       TEXT NOT NULL DEFAULT '[]',  -- JSON array of label names
            enrolled_at  REAL,
            cert_serial  TEXT,
            last_checkin REAL,
            addresses    TEXT,                        -- JSON
            facts        TEXT,                        -- JSON
            puppet       TEXT,                        -- JSON
            created_at   REAL NOT NULL,
            updated_at   REAL NOT NULL
        )""",
        """CREATE TABLE audit (
            id      INTEGER PRIMARY KEY,
            at      REAL NOT NULL,
            actor   TEXT NOT NULL,
            action  TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail  TEXT                                  -- JSON object, never secret values
        )""",
    ),
    (  # enrollment: one-time join tokens (only a hash of the secret; see coordinator/tokens.py)
        """CREATE TABLE tokens (
            id             INTEGER PRIMARY KEY,
            name           TEXT NOT NULL,              -- the server this token enrolls
            secret_hash    BLOB NOT NULL UNIQUE,       -- BLAKE2b-256 of the secret, never the secret
            ca_fingerprint TEXT NOT NULL,
            labels         TEXT NOT NULL DEFAULT '[]', -- JSON array
            environment    TEXT,
            region         TEXT,
            created_at     REAL NOT NULL,
            expires_at     REAL NOT NULL,
            used_at        REAL,
            used_by        TEXT,                       -- fingerprint of the key that enrolled
            revoked_at     REAL
        )""",
        "CREATE INDEX tokens_name ON tokens (name)",
        "ALTER TABLE servers ADD COLUMN endpoints TEXT",  # JSON {role: "host:port"} the node serves
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
_REQUIRED_TABLES = frozenset({"servers", "audit", "tokens"})

_DNS_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_SERVER_NAME_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")  # same rule as common/config/loader.NAME_RE
_SNAPSHOT_RE = re.compile(r"state-(\d{8}T\d{6})\.(\d{6})Z\.db")
_SECRET_KEYS = frozenset(
    {"value", "password", "passphrase", "secret", "token", "private_key", "plaintext", "key_material"}
)
_DAMAGE_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB (primary result codes)

_TEXT_FIELDS = ("provider", "environment", "region", "size", "cert_serial")
_TIME_FIELDS = ("enrolled_at", "last_checkin")
_JSON_FIELDS = ("addresses", "facts", "puppet")
_UPDATABLE = frozenset({*_TEXT_FIELDS, *_TIME_FIELDS, *_JSON_FIELDS, "labels"})
_SERVER_COLUMNS = (
    "name, provider, environment, region, size, labels, enrolled_at, cert_serial, "
    "last_checkin, addresses, facts, puppet, created_at, updated_at"
)
# The facts a listing needs, as one JSON object without the members a server lacks
# (json_patch onto {} drops nulls, RFC 7396).
_FACTS_SUMMARY = (
    "CASE WHEN facts IS NULL THEN NULL ELSE json_patch('{}', json_object("
    "'cpu', json(json_extract(facts, '$.cpu')), 'memory_bytes', json_extract(facts, '$.memory_bytes'), "
    "'disks', json(json_extract(facts, '$.disks')), 'onboarding', json(json_extract(facts, '$.onboarding')))) END"
)


@dataclass(frozen=True)
class StateConfig:
    """Tunables of the state database; one frozen object passed to :meth:`StateDB.open`."""

    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL
    snapshot_keep: int = DEFAULT_SNAPSHOT_KEEP
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT

    def __post_init__(self) -> None:
        if self.snapshot_keep < 1:
            raise UsageError(f"snapshot_keep must be at least 1, got {self.snapshot_keep}")
        if self.snapshot_interval < 0 or self.busy_timeout < 0:
            raise UsageError("snapshot_interval and busy_timeout must not be negative")


@dataclass(frozen=True)
class Server:
    """One inventory record. JSON fields (addresses, facts, puppet) are plain data: treat as read-only."""

    name: str
    provider: str
    labels: tuple[str, ...] = ()
    environment: str | None = None
    region: str | None = None
    size: str | None = None
    enrolled_at: float | None = None
    cert_serial: str | None = None
    last_checkin: float | None = None
    addresses: Any = dataclasses.field(default=None, hash=False)
    facts: Any = dataclasses.field(default=None, hash=False)
    puppet: Any = dataclasses.field(default=None, hash=False)
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``-o json``)."""
        out = dataclasses.asdict(self)
        out["labels"] = list(self.labels)
        return out


@dataclass(frozen=True)
class AuditEntry:
    """One audit log row."""

    id: int
    at: float
    actor: str
    action: str
    subject: str
    detail: Any = dataclasses.field(default=None, hash=False)


@dataclass(frozen=True)
class Token:
    """One join-token record (no secret and no hash: only metadata)."""

    id: int
    name: str
    ca_fingerprint: str
    labels: tuple[str, ...]
    environment: str | None
    region: str | None
    created_at: float
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None
    revoked_at: float | None = None

    def status(self, now: float) -> str:
        """used, revoked, expired or valid."""
        if self.used_at is not None:
            return "used"
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "valid"


class _Damaged(Exception):
    """Internal: state.db is unusable as a lab database and must be recovered."""


# ---------------------------------------------------------------------------------------------
# validation


def validate_server_name(name: object) -> str:
    """Return ``name`` if it is a DNS name (lowercase labels of 1-63 chars, ≤ 253 in all)."""
    if not isinstance(name, str) or len(name) > 253 or not _SERVER_NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid server name {name!r}: use lowercase letters, digits and '-', dot-separated "
            "parts of 1-63 characters not starting or ending with '-', at most 253 in all"
        )
    return name


def _validate_labels(labels: object) -> tuple[str, ...]:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise UsageError(f"labels must be a list of label names, not {labels!r}")
    out: dict[str, None] = {}  # dict keeps order and drops duplicates
    for label in labels:
        if not isinstance(label, str) or not _NAME_RE.fullmatch(label):
            raise UsageError(
                f"invalid label {label!r}: use lowercase letters, digits, '_', '.', '-' "
                "(1-63 characters, starting with a letter or digit)"
            )
        out[label] = None
    return tuple(out)


def _check_text(field: str, value: object, *, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 255 or not value.isprintable():
        raise UsageError(f"invalid {field} {value!r}: expected non-empty printable text")
    return value


def _check_time(field: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"invalid {field} {value!r}: expected a Unix time in seconds")
    return float(value)


def _dumps(field: str, value: object) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{field} is not JSON-serialisable: {exc}") from exc


def _redact(value: Any) -> Any:
    """Replace values under secret-sounding keys; the audit log must never hold secrets."""
    if isinstance(value, Mapping):
        return {
            k: "<redacted>" if str(k).lower() in _SECRET_KEYS else _redact(v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_redact(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# files, names and locks


def _utc(us: int, fmt: str = "%Y%m%dT%H%M%S") -> str:
    return time.strftime(fmt, time.gmtime(us // 1_000_000))


def _snapshot_name(us: int) -> str:
    return f"state-{_utc(us)}.{us % 1_000_000:06d}Z.db"


def _snapshot_time_us(path: Path) -> int | None:
    m = _SNAPSHOT_RE.fullmatch(path.name)
    if m is None:
        return None
    secs = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S"))
    return secs * 1_000_000 + int(m.group(2))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive flock on ``path``; yields False if it could not be had in time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _is_damage(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _DAMAGE_CODES
    text = str(exc)
    return "malformed" in text or "not a database" in text


def _state_error(path: Path, what: str, exc: BaseException) -> StateError:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    msg = f"{path}: {what} failed: {detail}"
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "")
        if _is_damage(exc):
            msg += " (the file is damaged; restart lab to restore the latest snapshot)"
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            msg += " (another lab process is holding the database; try again)"
    return StateError(msg)


def _connect(path: Path, config: StateConfig) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE/COMMIT ourselves (see StateDB.transaction).
    conn = sqlite3.connect(str(path), timeout=config.busy_timeout, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows if not r[0].startswith("sqlite_")}


def _migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state.db has schema version {version}, newer than this lab understands "
            f"({SCHEMA_VERSION}); upgrade lab"
        )
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in range(version, SCHEMA_VERSION):
            for sql in MIGRATIONS[step]:
                conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {max(version, SCHEMA_VERSION)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _open_failure(path: Path, exc: sqlite3.Error) -> Exception:
    """Damage means recover; anything else (locked, permissions, disk full) must not touch the file."""
    return _Damaged(f"is damaged ({exc})") if _is_damage(exc) else _state_error(path, "opening", exc)


def _inspect(path: Path, config: StateConfig, *, full: bool = False, immutable: bool = False) -> tuple[int, set[str]]:
    """Check ``path`` through a read-only connection; return (schema version, tables).

    Read-only on purpose: closing the last read-write connection of a damaged WAL database
    checkpoints and deletes its -wal, which may hold the newest committed data.
    """
    check = "integrity_check" if full else "quick_check"
    uri = path.resolve().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=config.busy_timeout)
        try:
            rows = conn.execute(f"PRAGMA {check}").fetchall()
            if rows != [("ok",)]:
                problems = "; ".join(str(r[0]) for r in rows[:3]).replace("\n", " ")
                raise _Damaged(f"failed {check}: {problems[:300]}")
            return conn.execute("PRAGMA user_version").fetchone()[0], _tables(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _open_failure(path, exc) from exc


def _open_checked(path: Path, config: StateConfig, *, have_snapshots: bool) -> sqlite3.Connection:
    """Check, open and migrate ``path``; raise _Damaged if it needs recovery, StateError if stuck."""
    if not path.exists():
        if have_snapshots:
            raise _Damaged("was missing")
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # so -wal/-shm inherit 0600 too
    elif path.stat().st_size == 0:
        wal = Path(f"{path}-wal")
        if have_snapshots or (wal.exists() and wal.stat().st_size > 0):
            # SQLite deletes the -wal of a 0-byte database when opening it: move both aside first.
            raise _Damaged("was empty (0 bytes)")
    version, tables = _inspect(path, config)  # before anything writes to the file
    if version == 0 and tables:
        raise _Damaged("is not a lab state database (unknown tables, no schema version)")
    if version == 0 and have_snapshots:
        raise _Damaged("held no lab data")
    try:
        conn = _connect(path, config)
    except sqlite3.Error as exc:
        raise _open_failure(path, exc) from exc
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":  # e.g. a filesystem without shared memory; still usable, just slower
            log.warning("event=state_no_wal path=%s journal_mode=%s", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")  # durable across app crashes in WAL mode
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn)
        missing = _REQUIRED_TABLES - _tables(conn)
        if missing:
            raise _Damaged(f"is missing table(s) {', '.join(sorted(missing))}")
        return conn
    except sqlite3.Error as exc:
        conn.close()
        raise _open_failure(path, exc) from exc
    except BaseException:
        conn.close()
        raise


def _verify_snapshot(path: Path, config: StateConfig) -> str | None:
    """None if ``path`` is a usable lab snapshot, else why not."""
    try:  # immutable: never lock or touch a snapshot
        version, tables = _inspect(path, config, full=True, immutable=True)
    except (_Damaged, StateError) as exc:
        return str(exc)
    if not 1 <= version <= SCHEMA_VERSION or "servers" not in tables:
        return f"not a usable lab state database (schema version {version})"
    return None


def _move_aside(path: Path, stamp: str) -> list[Path]:
    """Rename state.db and its -wal/-shm to state.db.corrupt-<stamp>[-wal|-shm]."""
    suffixes = ("", "-wal", "-shm")
    base, n = f"{path}.corrupt-{stamp}", 0
    while any(os.path.lexists(base + s) for s in suffixes):
        n += 1
        base = f"{path}.corrupt-{stamp}.{n}"
    moved = []
    for s in suffixes:  # keeping SQLite's -wal naming lets the moved file be opened with its WAL
        src = Path(f"{path}{s}")
        if os.path.lexists(src):
            os.replace(src, base + s)
            moved.append(Path(base + s))
    fsync_dir(path.parent)
    return moved


def _install(snapshot: Path, path: Path) -> None:
    """Copy a snapshot into place as state.db: temp file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=".state.db.restore-", dir=path.parent)  # mode 0600
    os.close(fd)
    try:
        shutil.copyfile(snapshot, tmp)
        _fsync_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------


class StateDB:
    """The coordinator's state: inventory and audit log. Create with :meth:`open`."""

    def __init__(
        self,
        home: Path,
        conn: sqlite3.Connection,
        *,
        now: Callable[[], float],
        config: StateConfig,
        warnings: list[str],
    ) -> None:
        self.home = home
        self.path = home / DB_NAME
        self.snapshot_dir = home / SNAPSHOT_DIR
        self.config = config
        self.warnings = warnings  # human-readable; the CLI shows them
        self._conn: sqlite3.Connection | None = conn
        self._now = now
        self._depth = 0

    # -- opening and recovery ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        home: Path,
        *,
        now: Callable[[], float] = time.time,
        config: StateConfig | None = None,
    ) -> StateDB:
        """Open (creating if needed) ``home/state.db``, recovering it from a snapshot if damaged."""
        home = Path(home)
        config = config or StateConfig()
        try:
            if not home.is_dir():
                home.mkdir(mode=0o700, parents=True)
                os.chmod(home, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise _state_error(home, "creating the state directory", exc) from exc
        path = home / DB_NAME
        warnings: list[str] = []
        try:
            try:
                conn = _open_checked(path, config, have_snapshots=bool(cls._snapshots(home)))
            except _Damaged:
                with _file_lock(home / LOCK_NAME, config.busy_timeout) as locked:
                    if not locked:
                        log.warning("event=state_lock_timeout path=%s; recovering anyway", path)
                    try:  # another process may have recovered it while we waited for the lock
                        conn = _open_checked(path, config, have_snapshots=bool(cls._snapshots(home)))
                    except _Damaged as damage:
                        conn, warning = cls._recover(home, str(damage), now, config)
                        warnings.append(warning)
                        log.warning("event=state_recovered %s", warning)
        except OSError as exc:
            raise _state_error(path, "opening", exc) from exc
        db = cls(home, conn, now=now, config=config, warnings=warnings)
        db.maybe_snapshot()
        return db

    @classmethod
    def _recover(
        cls, home: Path, damage: str, now: Callable[[], float], config: StateConfig
    ) -> tuple[sqlite3.Connection, str]:
        path = home / DB_NAME
        for stale in home.glob(".state.db.restore-*"):  # left by a restore that crashed; we hold the lock
            stale.unlink(missing_ok=True)
        stamp = _utc(int(now() * 1_000_000)) + "Z"
        moved = _move_aside(path, stamp)
        what = f"{path} {damage}"
        if moved:
            what += f"; moved it aside to {', '.join(str(p) for p in moved)}"
        skipped: list[str] = []
        for snap in cls._snapshots(home):
            problem = _verify_snapshot(snap, config)
            if problem is None:
                _install(snap, path)
                try:
                    conn = _open_checked(path, config, have_snapshots=False)
                except _Damaged as exc:  # passed integrity_check, yet unusable: try an older one
                    problem = str(exc)
                    _move_aside(path, stamp + "-restore")
            if problem is not None:
                skipped.append(f"{snap.name} ({problem})")
                with contextlib.suppress(OSError):  # keep it for forensics, but never pick it again
                    os.replace(snap, snap.with_name(snap.name + ".corrupt"))
                continue
            taken = _utc(_snapshot_time_us(snap) or 0, "%Y-%m-%d %H:%M:%S UTC")
            msg = f"{what}; restored snapshot {snap} taken {taken} (changes made after it are lost)"
            if skipped:
                msg += f"; skipped unusable snapshot(s): {'; '.join(skipped)}"
            return conn, msg
        try:
            conn = _open_checked(path, config, have_snapshots=False)
        except _Damaged as exc:  # a brand-new file cannot be damaged; if it is, the disk is failing
            raise StateError(f"{path}: cannot create a new state database: it {exc}") from exc
        msg = f"{what}; no usable snapshot in {home / SNAPSHOT_DIR}: started with an EMPTY state database"
        if skipped:
            msg += f" (unusable: {'; '.join(skipped)})"
        return conn, msg

    # -- connection plumbing -----------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"{self.path}: the state database is closed")
        return self._conn

    @contextlib.contextmanager
    def _sql(self, what: str) -> Iterator[sqlite3.Connection]:
        """Run SQL, translating sqlite3 errors into StateError naming the file and the action."""
        conn = self._db
        try:
            yield conn
        except sqlite3.Error as exc:
            raise _state_error(self.path, what, exc) from exc

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateDB]:
        """All-or-nothing batch. Nested blocks become savepoints: an inner failure undoes only itself."""
        depth = self._depth
        with self._sql("starting a transaction") as conn:
            conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth = depth
            try:
                if depth == 0:
                    conn.execute("ROLLBACK")
                else:
                    conn.execute(f"ROLLBACK TO sp{depth}")
                    conn.execute(f"RELEASE sp{depth}")
            except sqlite3.Error:  # the original error matters more; SQLite rolls back on close
                log.exception("event=state_rollback_failed path=%s", self.path)
            raise
        self._depth = depth
        try:
            conn.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
        except sqlite3.Error as exc:
            if depth == 0 and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise _state_error(self.path, "committing", exc) from exc

    def close(self) -> None:
        """Close the connection (uncommitted work is rolled back). Safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not conn.in_transaction:
                conn.execute("PRAGMA optimize")  # cheap; keeps query plans good as tables grow
        except sqlite3.Error:
            log.warning("event=state_optimize_failed path=%s", self.path, exc_info=True)
        finally:
            conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def journal_mode(self) -> str:
        with self._sql("reading journal_mode") as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    # -- snapshots ---------------------------------------------------------------------------

    @staticmethod
    def _snapshots(home: Path) -> list[Path]:
        """Valid-named snapshots, newest first."""
        try:
            entries = list((home / SNAPSHOT_DIR).iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:  # unreadable snapshots must not stop lab from starting
            log.warning("event=state_snapshots_unreadable path=%s error=%s", home / SNAPSHOT_DIR, exc)
            return []
        named = [(us, p) for p in entries if (us := _snapshot_time_us(p)) is not None]
        return [p for _, p in sorted(named, reverse=True)]

    def list_snapshots(self) -> list[Path]:
        """Snapshot files, newest first."""
        return self._snapshots(self.home)

    def _has_data(self, conn: sqlite3.Connection) -> bool:
        return any(
            conn.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone() for t in sorted(_tables(conn))
        )

    def snapshot(self) -> Path:
        """Write a consistent snapshot now and rotate old ones; returns its path."""
        if self.in_transaction:
            raise StateError(f"{self.path}: cannot snapshot inside a transaction; snapshot after it")
        try:
            with _file_lock(self.home / LOCK_NAME, self.config.busy_timeout) as locked:
                if not locked:
                    raise StateError(f"{self.path}: another lab process is busy with snapshots; try again")
                return self._snapshot_locked()
        except OSError as exc:
            raise _state_error(self.snapshot_dir, "writing a snapshot", exc) from exc

    def _snapshot_locked(self) -> Path:
        snapdir = self.snapshot_dir
        snapdir.mkdir(mode=0o700, exist_ok=True)
        existing = self._snapshots(self.home)
        us = int(self._now() * 1_000_000)
        if existing:  # names must sort in the order snapshots were taken, whatever the clock does
            us = max(us, (_snapshot_time_us(existing[0]) or 0) + 1)
        final = snapdir / _snapshot_name(us)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".db", dir=snapdir)  # mode 0600
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with self._sql(f"writing snapshot {final}") as conn:
                dest = sqlite3.connect(tmp_name, isolation_level=None)
                try:
                    dest.execute("PRAGMA synchronous = OFF")  # we fsync the whole file below
                    conn.backup(dest)  # one step: a consistent copy; WAL readers keep going
                    # A self-contained single file: no -wal needed to read or restore it.
                    dest.execute("PRAGMA journal_mode = DELETE")
                    rows = dest.execute("PRAGMA quick_check").fetchall()
                finally:
                    dest.close()
            if rows != [("ok",)]:
                raise StateError(f"{final}: the new snapshot failed quick_check; state.db may be damaged")
            _fsync_file(tmp)
            os.replace(tmp, final)
            fsync_dir(snapdir)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._rotate()
        log.info("event=state_snapshot path=%s", final)
        return final

    def _rotate(self) -> None:
        """Keep the newest ``snapshot_keep`` snapshots; drop temp files of crashed snapshots."""
        for old in self._snapshots(self.home)[self.config.snapshot_keep :]:
            old.unlink(missing_ok=True)
        for tmp in self.snapshot_dir.glob(".tmp-*"):  # we hold the lock: nobody is writing these
            tmp.unlink(missing_ok=True)

    def snapshot_due(self) -> bool:
        """True if the db holds data and the newest snapshot is missing or older than the interval."""
        with self._sql("checking for data") as conn:
            if not self._has_data(conn):
                return False  # a snapshot of nothing protects nothing
        snaps = self._snapshots(self.home)
        if not snaps:
            return True
        age = self._now() - (_snapshot_time_us(snaps[0]) or 0) / 1_000_000
        return age >= self.config.snapshot_interval

    def maybe_snapshot(self) -> Path | None:
        """Snapshot if due (call after each mutating batch). Never raises: failures become warnings."""
        if self.in_transaction:
            return None
        try:
            return self.snapshot() if self.snapshot_due() else None
        except (StateError, OSError) as exc:
            msg = f"automatic snapshot failed: {exc}"
            self.warnings.append(msg)
            log.warning("event=state_snapshot_failed %s", msg)
            return None

    # -- inventory ---------------------------------------------------------------------------

    def _server_from_row(self, row: tuple[Any, ...], cache: dict[str, tuple[str, ...]]) -> Server:
        name, provider, env, region, size, labels, enrolled, serial, checkin, addr, facts, puppet, c, u = row
        try:
            parsed = cache.get(labels)
            if parsed is None:  # many servers share a label set: parse each distinct one once
                parsed = cache[labels] = tuple(json.loads(labels))
            return Server(
                name, provider, parsed, env, region, size, enrolled, serial, checkin,
                None if addr is None else json.loads(addr),
                None if facts is None else json.loads(facts),
                None if puppet is None else json.loads(puppet),
                c, u,
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise StateError(
                f"{self.path}: server {name!r} has an unreadable record ({exc}); "
                "the file may be damaged — restore a snapshot from "
                f"{self.snapshot_dir}"
            ) from exc

    def _select(self, where: str = "", params: tuple[Any, ...] = (), columns: str = _SERVER_COLUMNS) -> list[Server]:
        with self._sql("reading servers") as conn:
            rows = conn.execute(f"SELECT {columns} FROM servers {where} ORDER BY name", params)
            cache: dict[str, tuple[str, ...]] = {}
            return [self._server_from_row(r, cache) for r in rows]

    def _server_params(
        self, item: Mapping[str, Any], now: float
    ) -> tuple[str, str, str | None, str | None, str | None, str, float, float]:
        unknown = set(item) - {"name", "provider", "labels", "environment", "region", "size"}
        if unknown:
            raise UsageError(f"unknown server field(s): {', '.join(sorted(unknown))}")
        labels = _validate_labels(item.get("labels", ()))
        return (
            validate_server_name(item.get("name")),
            _check_text("provider", item.get("provider"), required=True) or "",
            _check_text("environment", item.get("environment")),
            _check_text("region", item.get("region")),
            _check_text("size", item.get("size")),
            json.dumps(list(labels), separators=(",", ":")),
            now,
            now,
        )

    _INSERT = (
        "INSERT INTO servers (name, provider, environment, region, size, labels, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def add_server(
        self,
        name: str,
        provider: str,
        labels: Iterable[str] = (),
        environment: str | None = None,
        region: str | None = None,
        size: str | None = None,
    ) -> Server:
        """Add a server; UsageError if the name is invalid or taken."""
        spec = {"name": name, "provider": provider, "labels": labels}
        spec |= {"environment": environment, "region": region, "size": size}
        params = self._server_params(spec, self._now())
        with self.transaction():
            try:
                self._db.execute(self._INSERT, params)
            except sqlite3.IntegrityError as exc:
                raise UsageError(f"server {name!r} already exists") from exc
            except sqlite3.Error as exc:
                raise _state_error(self.path, f"adding server {name!r}", exc) from exc
            return self.get_server(name)

    def add_servers_bulk(self, servers: Iterable[Mapping[str, Any]]) -> int:
        """Add many servers (dicts of add_server's arguments) all-or-nothing; returns the count."""
        now = self._now()
        rows = [self._server_params(s, now) for s in servers]
        seen: set[str] = set()
        for row in rows:
            if row[0] in seen:
                raise UsageError(f"server {row[0]!r} appears twice in the batch")
            seen.add(row[0])
        try:
            with self.transaction():
                self._db.executemany(self._INSERT, rows)
        except sqlite3.IntegrityError as exc:  # rolled back by now, so _exists sees the old state
            taken = next((row[0] for row in rows if self._exists(row[0])), "?")
            raise UsageError(f"server {taken!r} already exists") from exc
        except sqlite3.Error as exc:
            raise _state_error(self.path, f"adding {len(rows)} servers", exc) from exc
        return len(rows)

    def _exists(self, name: str) -> bool:
        with self._sql("reading servers") as conn:
            return conn.execute("SELECT 1 FROM servers WHERE name = ?", (name,)).fetchone() is not None

    def get_server(self, name: str) -> Server:
        """The server called ``name``; NotFound if there is none."""
        found = self._select("WHERE name = ?", (name,))
        if not found:
            raise NotFound(f"no server named {name!r}")
        return found[0]

    def list_servers(self, *, facts: str = "full") -> list[Server]:
        """Every server, sorted by name. ``facts="summary"`` keeps only the parts of the agent's
        facts that listings use (cpu, memory_bytes, disks, onboarding), cut out by SQLite, so that
        listing 10,000 servers does not decode every NIC, GPU and note in Python."""
        if facts == "full":
            return self._select()
        if facts != "summary":
            raise UsageError(f"facts must be 'full' or 'summary', not {facts!r}")
        return self._select(columns=_SERVER_COLUMNS.replace(" facts,", f" {_FACTS_SUMMARY},"))

    def update_server(self, name: str, /, **fields: Any) -> Server:
        """Change some fields (None clears an optional one); returns the updated server."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise UsageError(f"cannot update server field(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key, value in fields.items():
            if key == "labels":
                values[key] = json.dumps(list(_validate_labels(value)), separators=(",", ":"))
            elif key in _TIME_FIELDS:
                values[key] = _check_time(key, value)
            elif key in _JSON_FIELDS:
                values[key] = _dumps(key, value)
            else:
                values[key] = _check_text(key, value, required=key == "provider")
        values["updated_at"] = self._now()
        assignments = ", ".join(f"{k} = ?" for k in values)  # keys come from _UPDATABLE only
        with self.transaction(), self._sql(f"updating server {name!r}") as conn:
            sql = f"UPDATE servers SET {assignments} WHERE name = ?"
            cur = conn.execute(sql, (*values.values(), name))
            if cur.rowcount == 0:
                raise NotFound(f"no server named {name!r}")
            return self.get_server(name)

    def set_labels(self, name: str, labels: Iterable[str]) -> Server:
        """Replace a server's labels (order kept, duplicates dropped)."""
        return self.update_server(name, labels=labels)

    def remove_server(self, name: str) -> None:
        """Remove a server; NotFound if there is none."""
        with self.transaction(), self._sql(f"removing server {name!r}") as conn:
            if conn.execute("DELETE FROM servers WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no server named {name!r}")

    # -- join tokens (enrollment) ------------------------------------------------------------

    def add_token(
        self, name: str, secret_hash: bytes, ca_fingerprint: str, labels: Iterable[str], expires_at: float,
        *, environment: str | None = None, region: str | None = None,
    ) -> Token:
        """Record a new token (hash only). Minting and TTLs: :mod:`lab.coordinator.tokens`."""
        validate_server_name(name)
        labels_json = json.dumps(list(_validate_labels(labels)), separators=(",", ":"))
        if not isinstance(secret_hash, (bytes, bytearray)) or len(secret_hash) != 32:
            raise UsageError("token hash must be 32 bytes")
        now = self._now()
        with self.transaction(), self._sql(f"adding a token for {name!r}") as conn:
            cur = conn.execute(
                "INSERT INTO tokens (name, secret_hash, ca_fingerprint, labels, environment, region, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (name, bytes(secret_hash), _check_text("ca_fingerprint", ca_fingerprint, required=True), labels_json,
                 _check_text("environment", environment), _check_text("region", region), now, float(expires_at)),
            )  # fmt: skip
            return self._token_where("id = ?", (cur.lastrowid,))[0]

    _TOKEN_COLUMNS = "id, name, ca_fingerprint, labels, environment, region, created_at, expires_at, used_at, used_by, revoked_at"

    def _token_where(self, where: str, params: tuple[Any, ...]) -> list[Token]:
        with self._sql("reading tokens") as conn:
            rows = conn.execute(f"SELECT {self._TOKEN_COLUMNS} FROM tokens WHERE {where} ORDER BY id", params).fetchall()
        try:
            return [Token(i, n, f, tuple(json.loads(lb)), e, r, c, x, u, ub, rv) for i, n, f, lb, e, r, c, x, u, ub, rv in rows]
        except (TypeError, ValueError) as exc:
            raise StateError(f"{self.path}: a token record is unreadable ({exc})") from exc

    def consume_token(self, secret_hash: bytes, used_by: str, *, now: float | None = None) -> Token | None:
        """Mark the token with this hash used, atomically: of any number of concurrent callers
        (threads, processes) exactly one gets the Token; the others, and any call for a token
        that is unknown, used, revoked or expired at ``now``, get None (see :meth:`find_token`)."""
        at = self._now() if now is None else float(now)
        with self.transaction(), self._sql("consuming a token") as conn:
            cur = conn.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? "
                "WHERE secret_hash = ? AND used_at IS NULL AND revoked_at IS NULL AND expires_at > ?",
                (at, used_by, bytes(secret_hash), at),
            )
            if cur.rowcount != 1:
                return None
            return self._token_where("secret_hash = ?", (bytes(secret_hash),))[0]

    def find_token(self, secret_hash: bytes) -> Token | None:
        """The token with this hash, whatever its state (to say why it was refused)."""
        found = self._token_where("secret_hash = ?", (bytes(secret_hash),))
        return found[0] if found else None

    def list_tokens(self) -> list[Token]:
        """Every token record, oldest first (hashes are never returned)."""
        return self._token_where("1 = 1", ())

    def revoke_tokens(self, name: str, *, now: float | None = None) -> int:
        """Revoke every unused, unrevoked token for server ``name``; returns how many."""
        at = self._now() if now is None else float(now)
        with self.transaction(), self._sql(f"revoking tokens of {name!r}") as conn:
            cur = conn.execute(
                "UPDATE tokens SET revoked_at = ? WHERE name = ? AND used_at IS NULL AND revoked_at IS NULL", (at, name)
            )
            return cur.rowcount

    def set_endpoints(self, name: str, endpoints: Mapping[str, str]) -> None:
        """Record the services a node offers, ``{"store": "host:port"}`` (reported at enrollment/check-in)."""
        text = _dumps("endpoints", dict(endpoints))
        with self.transaction(), self._sql(f"updating endpoints of {name!r}") as conn:
            if conn.execute("UPDATE servers SET endpoints = ? WHERE name = ?", (text, name)).rowcount == 0:
                raise NotFound(f"no server named {name!r}")

    def endpoints(self) -> dict[str, dict[str, str]]:
        """``{server: {role: "host:port"}}`` for every server that reported endpoints."""
        with self._sql("reading endpoints") as conn:
            rows = conn.execute("SELECT name, endpoints FROM servers WHERE endpoints IS NOT NULL ORDER BY name").fetchall()
        out: dict[str, dict[str, str]] = {}
        for name, text in rows:
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                out[name] = {str(k): str(v) for k, v in value.items()}
        return out

    # -- audit log ---------------------------------------------------------------------------

    def audit(
        self, action: str, subject: str, detail: Mapping[str, Any] | None = None, actor: str = "local"
    ) -> AuditEntry:
        """Record that ``actor`` did ``action`` to ``subject``. Never pass secret values in ``detail``."""
        for field, value in (("action", action), ("subject", subject), ("actor", actor)):
            _check_text(field, value, required=True)
        if detail is not None and not isinstance(detail, Mapping):
            raise UsageError(f"audit detail must be a mapping, not {type(detail).__name__}")
        clean = None if detail is None else _redact(detail)
        text = _dumps("audit detail", clean)
        at = self._now()
        with self.transaction(), self._sql("writing the audit log") as conn:
            cur = conn.execute(
                "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
                (at, actor, action, subject, text),
            )
            entry_id = cur.lastrowid or 0
        return AuditEntry(entry_id, at, actor, action, subject, None if text is None else json.loads(text))

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` audit entries, newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise UsageError(f"limit must be a positive whole number, got {limit!r}")
        with self._sql("reading the audit log") as conn:
            rows = conn.execute(
                "SELECT id, at, actor, action, subject, detail FROM audit ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        try:
            return [
                AuditEntry(i, at, actor, action, subj, None if d is None else json.loads(d))
                for i, at, actor, action, subj, d in rows
            ]
        except ValueError as exc:
            raise StateError(f"{self.path}: the audit log has an unreadable entry ({exc})") from exc
