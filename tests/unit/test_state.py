"""coordinator/state.py: the state database, its snapshots and its recovery from damage."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lab.common.errors import NotFound, StateError, UsageError
from lab.coordinator.state import (
    LOCK_NAME,
    SCHEMA_VERSION,
    AuditEntry,
    Server,
    StateConfig,
    StateDB,
    validate_server_name,
)

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class Clock:
    """A hand-driven clock for ``now=``."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "lab-home"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection, for looking behind StateDB's back (close it!)."""
    return sqlite3.connect(path, isolation_level=None)


# -- opening --------------------------------------------------------------------------------------


def test_open_creates_private_home_and_db(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        assert db.warnings == []
        assert db.path == home / "state.db"
    assert mode(home) == 0o700
    assert mode(home / "state.db") == 0o600


def test_reopen_keeps_data_and_schema_version(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh", ["web"])
    with StateDB.open(home, now=clock) as db:
        assert db.get_server("web-1").labels == ("web",)
        assert db.warnings == []
    conn = raw(home / "state.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_wal_mode_is_on(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        assert db.journal_mode == "wal"
        db.add_server("web-1", "ssh")
        assert (home / "state.db-wal").exists()
    header = (home / "state.db").read_bytes()[:100]
    assert (header[18], header[19]) == (2, 2)  # file format: WAL


def test_home_that_is_a_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="creating the state directory"):
        StateDB.open(tmp_path / "file")


def test_newer_schema_is_refused_and_left_alone(home: Path, clock: Clock) -> None:
    StateDB.open(home, now=clock).close()
    conn = raw(home / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(StateError, match="newer than this lab"):
        StateDB.open(home, now=clock)
    assert sorted(p.name for p in home.iterdir() if "corrupt" in p.name) == []


def test_lock_held_by_another_process_is_not_damage(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh")
    other = raw(home / "state.db")
    try:
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StateError, match="another lab process"):
            StateDB.open(home, now=clock, config=StateConfig(busy_timeout=0.05))
    finally:
        other.close()
    assert not any("corrupt" in p.name for p in home.iterdir())
    with StateDB.open(home, now=clock) as db:
        assert [s.name for s in db.list_servers()] == ["web-1"]


# -- inventory ------------------------------------------------------------------------------------


def test_crud(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        added = db.add_server("web-1", "ssh", ["web", "prod"], environment="prod", region="eu", size="s")
        assert added == Server(
            "web-1", "ssh", ("web", "prod"), "prod", "eu", "s", created_at=T0, updated_at=T0
        )
        db.add_server("db-1.example.org", "baremetal")
        assert [s.name for s in db.list_servers()] == ["db-1.example.org", "web-1"]
        clock.advance(5)
        updated = db.update_server("web-1", region="us", size=None)
        assert (updated.region, updated.size, updated.updated_at, updated.created_at) == ("us", None, T0 + 5, T0)
        assert db.set_labels("web-1", ["gpu", "web", "gpu"]).labels == ("gpu", "web")
        db.remove_server("web-1")
        assert [s.name for s in db.list_servers()] == ["db-1.example.org"]


def test_status_fields_round_trip(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh")
        facts = {"cpu": {"cores": 8}, "gpus": ["a100"]}
        db.update_server(
            "web-1", enrolled_at=T0, cert_serial="00ff", last_checkin=T0 + 1,
            addresses=["10.0.0.5"], facts=facts, puppet={"status": "ok"},
        )  # fmt: skip
    with StateDB.open(home, now=clock) as db:
        s = db.get_server("web-1")
        assert (s.enrolled_at, s.cert_serial, s.last_checkin) == (T0, "00ff", T0 + 1)
        assert (s.addresses, s.facts, s.puppet) == (["10.0.0.5"], facts, {"status": "ok"})
        json.dumps(s.to_dict())  # ready for -o json
        hash(s)  # frozen and hashable despite the JSON fields
        with pytest.raises(AttributeError):
            s.name = "x"  # type: ignore[misc]


def test_errors_are_one_line_and_typed(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh")
        with pytest.raises(UsageError, match="server 'web-1' already exists") as exc:
            db.add_server("web-1", "ssh")
        assert "\n" not in str(exc.value)
        for call in (
            lambda: db.get_server("nope"),
            lambda: db.update_server("nope", region="x"),
            lambda: db.set_labels("nope", []),
            lambda: db.remove_server("nope"),
        ):
            with pytest.raises(NotFound, match="no server named 'nope'"):
                call()
        with pytest.raises(UsageError, match="cannot update server field"):
            db.update_server("web-1", name="other")
        with pytest.raises(UsageError, match="invalid label"):
            db.set_labels("web-1", ["Bad Label"])
        with pytest.raises(UsageError, match="list of label names"):
            db.set_labels("web-1", "web,db")
        with pytest.raises(UsageError, match="invalid provider"):
            db.add_server("web-2", "")
        with pytest.raises(UsageError, match="not JSON-serialisable"):
            db.update_server("web-1", facts={"x": object()})
        with pytest.raises(UsageError, match="invalid enrolled_at"):
            db.update_server("web-1", enrolled_at="yesterday")
        assert db.get_server("web-1").labels == ()  # the failed calls changed nothing


@pytest.mark.parametrize(
    "name", ["a", "web-1", "0", "a" * 63, "db-1.example.org", ".".join(["a" * 63] * 3) + "." + "b" * 61]
)
def test_valid_names(name: str) -> None:
    assert validate_server_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-a", "a-", "Web-1", "web_1", "a" * 64, "a..b", ".a", "a.", "a.-b", "a b", "wéb", "a\n",
     ".".join(["a" * 63] * 4), 7, None],
)  # fmt: skip
def test_invalid_names_name_the_value(home: Path, clock: Clock, name: object) -> None:
    with pytest.raises(UsageError) as exc:
        validate_server_name(name)
    assert repr(name) in str(exc.value)
    with StateDB.open(home, now=clock) as db:
        with pytest.raises(UsageError, match="invalid server name"):
            db.add_server(name, "ssh")  # type: ignore[arg-type]
        assert db.list_servers() == []


def test_unreadable_record_is_a_state_error_naming_the_row(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh", ["web"])
        conn = raw(db.path)
        conn.execute("UPDATE servers SET labels = '[\"we' WHERE name = 'web-1'")
        conn.close()
        with pytest.raises(StateError, match="'web-1' has an unreadable record"):
            db.list_servers()


# -- bulk and scale -------------------------------------------------------------------------------


def test_bulk_add_is_all_or_nothing(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("srv-5", "ssh")
        with pytest.raises(UsageError, match="'srv-5' already exists"):
            db.add_servers_bulk({"name": f"srv-{i}", "provider": "ssh"} for i in range(10))
        with pytest.raises(UsageError, match="'x' appears twice"):
            db.add_servers_bulk([{"name": "x", "provider": "ssh"}] * 2)
        with pytest.raises(UsageError, match="unknown server field"):
            db.add_servers_bulk([{"name": "y", "provider": "ssh", "colour": "red"}])
        assert [s.name for s in db.list_servers()] == ["srv-5"]


def test_ten_thousand_servers(home: Path, clock: Clock) -> None:
    # Timing is a benchmark's job; this checks it works at scale and is not absurdly slow.
    with StateDB.open(home, now=clock) as db:
        start = time.perf_counter()
        n = db.add_servers_bulk(
            {"name": f"srv-{i:05d}", "provider": "ssh", "labels": ["web", f"rack-{i % 40}"]}
            for i in range(10_000)
        )
        listed = db.list_servers()
        assert time.perf_counter() - start < 5
        assert n == len(listed) == 10_000
        assert listed[1234] == Server(
            "srv-01234", "ssh", ("web", "rack-34"), created_at=T0, updated_at=T0
        )


# -- transactions ---------------------------------------------------------------------------------


def test_exception_inside_transaction_leaves_nothing_half_applied(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("keep", "ssh", ["a"])
        with pytest.raises(RuntimeError), db.transaction():
            db.add_server("web-1", "ssh")
            db.set_labels("keep", ["b"])
            db.audit("server.add", "web-1")
            db.remove_server("keep")
            raise RuntimeError("crash in the middle")
        assert [(s.name, s.labels) for s in db.list_servers()] == [("keep", ("a",))]
        assert db.audit_log() == []
        assert not db.in_transaction
        db.add_server("web-1", "ssh")  # the connection is usable afterwards


def test_nested_transaction_failure_undoes_only_itself(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        with db.transaction():
            db.add_server("outer", "ssh")
            with pytest.raises(UsageError), db.transaction():
                db.add_server("inner", "ssh")
                db.add_server("outer", "ssh")  # duplicate: fails the inner block
            db.add_server("after", "ssh")
        assert [s.name for s in db.list_servers()] == ["after", "outer"]


def test_crash_image_mid_transaction_has_no_partial_batch(home: Path, clock: Clock, tmp_path: Path) -> None:
    """Copy the files while a big batch is uncommitted (what a power cut leaves) and open the copy."""
    crash_home = tmp_path / "crash"
    with StateDB.open(home, now=clock) as db:
        db.add_server("before", "ssh")
        with db.transaction():
            db.add_servers_bulk({"name": f"srv-{i:05d}", "provider": "ssh"} for i in range(5000))
            crash_home.mkdir()
            for name in ("state.db", "state.db-wal"):
                if (home / name).exists():
                    shutil.copyfile(home / name, crash_home / name)
    with StateDB.open(crash_home, now=clock) as crashed:
        assert crashed.warnings == []
        assert [s.name for s in crashed.list_servers()] == ["before"]


def test_busy_database_is_a_clear_state_error(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock, config=StateConfig(busy_timeout=0.05)) as db:
        other = raw(db.path)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StateError, match="another lab process") as exc:
                db.add_server("web-1", "ssh")
            assert str(db.path) in str(exc.value)
        finally:
            other.close()
        db.add_server("web-1", "ssh")


def test_use_from_another_thread_is_a_state_error(home: Path, clock: Clock) -> None:
    errors: list[BaseException] = []
    with StateDB.open(home, now=clock) as db:
        worker = threading.Thread(target=lambda: _capture(errors, db.list_servers))
        worker.start()
        worker.join()
    assert len(errors) == 1 and isinstance(errors[0], StateError)
    assert "thread" in str(errors[0])


def _capture(errors: list[BaseException], call) -> None:
    try:
        call()
    except BaseException as exc:  # handed back to the test's thread
        errors.append(exc)


def test_damage_found_while_running_says_how_to_recover(home: Path, clock: Clock) -> None:
    from lab.coordinator.state import _state_error

    exc = sqlite3.DatabaseError("database disk image is malformed")
    exc.sqlite_errorcode = 11  # type: ignore[attr-defined]
    exc.sqlite_errorname = "SQLITE_CORRUPT"  # type: ignore[attr-defined]
    message = str(_state_error(home / "state.db", "reading servers", exc))
    assert message.startswith(f"{home / 'state.db'}: reading servers failed: database disk image is malformed")
    assert "restart lab to restore the latest snapshot" in message


def test_closed_db(home: Path, clock: Clock) -> None:
    db = StateDB.open(home, now=clock)
    db.close()
    db.close()
    with pytest.raises(StateError, match="closed"):
        db.list_servers()


# -- audit ----------------------------------------------------------------------------------------


def test_audit_log(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        first = db.audit("server.add", "web-1", {"labels": ["web"]})
        clock.advance(1)
        db.audit("label.set", "web-1", actor="alice")
        clock.advance(1)
        db.audit("secret.set", "db/password", {"version": 3, "value": "hunter2", "nested": {"Token": "t"}})
        log = db.audit_log()
        assert [e.action for e in log] == ["secret.set", "label.set", "server.add"]
        assert log[2] == first == AuditEntry(first.id, T0, "local", "server.add", "web-1", {"labels": ["web"]})
        assert log[1].actor == "alice" and log[1].detail is None
        assert log[0].detail == {"version": 3, "value": "<redacted>", "nested": {"Token": "<redacted>"}}
        assert [e.action for e in db.audit_log(limit=1)] == ["secret.set"]
        with pytest.raises(UsageError):
            db.audit_log(limit=0)
        with pytest.raises(UsageError, match="not JSON-serialisable"):
            db.audit("x", "y", {"when": object()})
        with pytest.raises(UsageError, match="invalid action"):
            db.audit("", "y")
    assert b"hunter2" not in (home / "state.db").read_bytes()


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshot_is_a_private_self_contained_file(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh", ["web"])
        snap = db.snapshot()
    assert snap == home / "snapshots" / "state-20231114T221320.000000Z.db"
    assert sorted(p.name for p in snap.parent.iterdir()) == [snap.name]  # no temp, -wal or -journal
    assert mode(snap) == 0o600 and mode(snap.parent) == 0o700
    assert snap.read_bytes()[18:20] == b"\x01\x01"  # rollback mode: no -wal needed to read it
    conn = sqlite3.connect(snap.as_uri() + "?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT name FROM servers").fetchall() == [("web-1",)]
    finally:
        conn.close()


def test_snapshot_rotation_keeps_newest(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock, config=StateConfig(snapshot_keep=3)) as db:
        db.add_server("web-1", "ssh")
        taken = []
        for _ in range(5):
            taken.append(db.snapshot())
            clock.advance(10)
        (db.snapshot_dir / ".tmp-crashed.db").write_bytes(b"half a snapshot")
        assert db.list_snapshots() == taken[:1:-1]
        taken.append(db.snapshot())
        assert db.list_snapshots() == taken[:2:-1]
        assert not (db.snapshot_dir / ".tmp-crashed.db").exists()


def test_snapshot_names_stay_ordered_when_the_clock_stalls_or_goes_back(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh")
        a = db.snapshot()
        b = db.snapshot()
        clock.advance(-3600)
        c = db.snapshot()
        assert db.list_snapshots() == [c, b, a]
        assert a.name < b.name < c.name


def test_automatic_snapshots_follow_the_interval(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        assert db.list_snapshots() == []  # an empty db is not worth a snapshot
        assert db.maybe_snapshot() is None
        db.add_server("web-1", "ssh")
        first = db.maybe_snapshot()  # first data: no snapshot yet, so take one
        assert first is not None
        clock.advance(1800)
        db.add_server("web-2", "ssh")
        assert db.maybe_snapshot() is None
    clock.advance(1799)
    with StateDB.open(home, now=clock) as db:
        assert db.list_snapshots() == [first]
    clock.advance(1)
    with StateDB.open(home, now=clock) as db:
        assert len(db.list_snapshots()) == 2  # taken at open: the newest was an hour old
        with db.transaction():
            assert db.maybe_snapshot() is None  # never inside a batch
            with pytest.raises(StateError, match="inside a transaction"):
                db.snapshot()


def test_failed_automatic_snapshot_is_a_warning_not_a_crash(
    home: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh")
        db.snapshot_dir.write_text("in the way")  # a file where the directory should be
        with caplog.at_level(logging.WARNING, logger="lab.coordinator.state"):
            assert db.maybe_snapshot() is None
        assert len(db.warnings) == 1 and "automatic snapshot failed" in db.warnings[0]
        assert "snapshot_failed" in caplog.text
        with pytest.raises(StateError, match="writing a snapshot"):
            db.snapshot()


# -- recovery -------------------------------------------------------------------------------------


def populate(home: Path, clock: Clock) -> Path:
    """300 servers and an audit entry, snapshotted; then one more server the snapshot lacks."""
    with StateDB.open(home, now=clock) as db:
        db.add_servers_bulk({"name": f"srv-{i:03d}", "provider": "ssh", "labels": ["web"]} for i in range(300))
        db.audit("server.add", "srv-000")
        snap = db.snapshot()
        clock.advance(60)
        db.add_server("late", "ssh")
    assert (home / "state.db").stat().st_size > 5 * 4096
    assert not (home / "state.db-wal").exists()  # closing checkpointed everything into state.db
    return snap


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


NOISE = random.Random(1234).randbytes(8192)
DAMAGE = {
    "header": lambda p: overwrite(p, 0, b"this is not sqlite" * 4),
    "page-2": lambda p: overwrite(p, 4096, NOISE[:4096]),
    "page-3": lambda p: overwrite(p, 2 * 4096, NOISE[:4096]),
    "middle-pages": lambda p: overwrite(p, p.stat().st_size // 2, NOISE),
    "truncated-half": lambda p: os.truncate(p, p.stat().st_size // 2),
    "truncated-to-zero": lambda p: os.truncate(p, 0),
    "garbage": lambda p: p.write_bytes(NOISE),
    "deleted": lambda p: p.unlink(),
    "other-app-db": lambda p: (p.unlink(), _foreign_db(p)),
}


def _foreign_db(path: Path) -> None:
    conn = raw(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_db_is_restored_from_the_snapshot(
    home: Path, clock: Clock, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    snap = populate(home, clock)
    db_path = home / "state.db"
    DAMAGE[damage](db_path)
    clock.advance(60)
    with caplog.at_level(logging.WARNING, logger="lab.coordinator.state"):
        db = StateDB.open(home, now=clock)
    with db:
        assert len(db.warnings) == 1
        warning = db.warnings[0]
        assert f"restored snapshot {snap}" in warning
        assert "2023-11-14 22:13:20 UTC" in warning
        aside = home / "state.db.corrupt-20231114T221520Z"
        if damage == "deleted":
            assert "was missing" in warning and not aside.exists()
        else:
            assert f"moved it aside to {aside}" in warning and aside.exists()
        assert warning in caplog.text
        servers = db.list_servers()
        assert len(servers) == 300 and "late" not in {s.name for s in servers}
        assert [e.subject for e in db.audit_log()] == ["srv-000"]
        db.add_server("after-recovery", "ssh")  # healthy and writable
    assert mode(db_path) == 0o600
    with StateDB.open(home, now=clock) as again:
        assert again.warnings == []
        assert len(again.list_servers()) == 301


def test_damaged_db_without_snapshots_starts_empty_with_a_warning(home: Path, clock: Clock) -> None:
    with StateDB.open(home, now=clock) as db:
        db.add_server("web-1", "ssh")
        assert db.list_snapshots() == []  # nobody called maybe_snapshot()
    overwrite(home / "state.db", 0, b"\0" * 100)
    with StateDB.open(home, now=clock) as db:
        assert db.list_servers() == []
        (warning,) = db.warnings
        assert "no usable snapshot" in warning and "EMPTY" in warning
        assert str(home / "state.db.corrupt-20231114T221320Z") in warning
        db.add_server("web-1", "ssh")


def test_wal_and_shm_are_moved_aside_with_the_db(home: Path, clock: Clock) -> None:
    populate(home, clock)
    for suffix in ("", "-wal", "-shm"):
        (home / f"state.db{suffix}").write_bytes(NOISE)
    with StateDB.open(home, now=clock) as db:
        assert len(db.list_servers()) == 300
        for suffix in ("", "-wal", "-shm"):
            aside = home / f"state.db.corrupt-20231114T221420Z{suffix}"
            assert str(aside) in db.warnings[0]
            if suffix != "-shm":  # -shm is a rebuildable index SQLite may rewrite; the rest is kept as found
                assert aside.read_bytes() == NOISE


def test_garbage_wal_next_to_a_healthy_db_is_harmless(home: Path, clock: Clock) -> None:
    populate(home, clock)
    (home / "state.db-wal").write_bytes(NOISE)
    with StateDB.open(home, now=clock) as db:
        assert db.warnings == []
        assert len(db.list_servers()) == 301


def test_unusable_newest_snapshot_is_skipped(home: Path, clock: Clock) -> None:
    good = populate(home, clock)
    with StateDB.open(home, now=clock) as db:
        bad = db.snapshot()
    overwrite(bad, 4096, NOISE[:4096])
    (home / "state.db").write_bytes(NOISE)
    with StateDB.open(home, now=clock) as db:
        (warning,) = db.warnings
        assert f"restored snapshot {good}" in warning
        assert f"skipped unusable snapshot(s): {bad.name}" in warning
        assert len(db.list_servers()) == 300
        assert db.list_snapshots()[-1] == good
    assert bad.with_name(bad.name + ".corrupt").exists()  # kept for a post-mortem, never picked again


def test_no_usable_snapshot_at_all(home: Path, clock: Clock) -> None:
    snap = populate(home, clock)
    snap.write_bytes(NOISE)
    (home / "state.db").unlink()
    with StateDB.open(home, now=clock) as db:
        (warning,) = db.warnings
        assert "was missing" in warning and "EMPTY" in warning and snap.name in warning
        assert db.list_servers() == []


def test_empty_db_file_with_a_wal_keeps_the_wal(home: Path, clock: Clock) -> None:
    home.mkdir()
    (home / "state.db").write_bytes(b"")
    (home / "state.db-wal").write_bytes(NOISE)  # SQLite would delete this on open
    with StateDB.open(home, now=clock) as db:
        (warning,) = db.warnings
        assert "was empty" in warning and "EMPTY" in warning
    assert (home / "state.db.corrupt-20231114T221320Z-wal").read_bytes() == NOISE


def test_recovery_goes_ahead_when_the_lock_is_stuck(
    home: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    import fcntl

    populate(home, clock)
    (home / "state.db").write_bytes(NOISE)
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a hung process holding the lock
        with caplog.at_level(logging.WARNING, logger="lab.coordinator.state"):
            db = StateDB.open(home, now=clock, config=StateConfig(busy_timeout=0.1))
        with db:
            assert len(db.list_servers()) == 300
            assert "recovering anyway" in caplog.text
    finally:
        os.close(fd)


def test_repeated_damage_in_one_second_keeps_every_file(home: Path, clock: Clock) -> None:
    populate(home, clock)
    for _ in range(3):
        (home / "state.db").write_bytes(NOISE)
        StateDB.open(home, now=clock).close()
    aside = sorted(p.name for p in home.iterdir() if "corrupt" in p.name)
    assert aside == [
        "state.db.corrupt-20231114T221420Z",
        "state.db.corrupt-20231114T221420Z.1",
        "state.db.corrupt-20231114T221420Z.2",
    ]


# -- model check ----------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "web-1", "db.example.org"])
LABELS = st.lists(st.sampled_from(["web", "db", "gpu", "x_1"]), max_size=4)
SIMPLE_OPS = st.one_of(
    st.tuples(st.just("add"), NAMES, LABELS),
    st.tuples(st.just("set_labels"), NAMES, LABELS),
    st.tuples(st.just("remove"), NAMES, st.none()),
)
OPS = st.lists(
    st.one_of(SIMPLE_OPS, st.tuples(st.just("batch"), st.lists(SIMPLE_OPS, max_size=5), st.booleans())),
    max_size=25,
)


def apply_to_model(model: dict[str, tuple[str, ...]], op: tuple) -> None:
    """The specification: what each operation does to a dict, raising what the db raises."""
    kind, name, arg = op
    if kind == "add":
        if name in model:
            raise UsageError(name)
        model[name] = tuple(dict.fromkeys(arg))
    elif kind == "set_labels":
        if name not in model:
            raise NotFound(name)
        model[name] = tuple(dict.fromkeys(arg))
    elif kind == "remove":
        if name not in model:
            raise NotFound(name)
        del model[name]


class Abort(Exception):
    pass


def apply_to_db(db: StateDB, op: tuple) -> None:
    kind, name, arg = op
    if kind == "add":
        db.add_server(name, "ssh", arg)
    elif kind == "set_labels":
        db.set_labels(name, arg)
    else:
        db.remove_server(name)


def test_random_operations_match_a_dict_model(home: Path, clock: Clock) -> None:
    db = StateDB.open(home, now=clock)

    @given(OPS)
    def run(ops: list) -> None:
        for server in db.list_servers():
            db.remove_server(server.name)
        model: dict[str, tuple[str, ...]] = {}
        for op in ops:
            if op[0] == "batch":
                _, inner, commit = op
                staged = dict(model)
                try:
                    with db.transaction():
                        for sub in inner:
                            apply_to_db(db, sub)
                            apply_to_model(staged, sub)
                        if not commit:
                            raise Abort
                    model = staged
                except (UsageError, NotFound, Abort):
                    pass  # the whole batch is undone, so the model stays as it was
            else:
                expected: type[Exception] | None = None
                try:
                    apply_to_model(model, op)
                except (UsageError, NotFound) as exc:
                    expected = type(exc)
                if expected is None:
                    apply_to_db(db, op)
                else:
                    with pytest.raises(expected):
                        apply_to_db(db, op)
            assert {s.name: s.labels for s in db.list_servers()} == model

    try:
        run()
    finally:
        db.close()


def test_list_servers_facts_summary_keeps_only_what_listings_use(tmp_path: Path) -> None:
    facts = {
        "cpu": {"model": "EPYC", "cores": 64, "threads": 128},
        "memory_bytes": 256 * 2**30,
        "disks": [{"name": "nvme0n1", "size_bytes": 1920 * 10**9, "kind": "nvme"}],
        "nics": [{"name": "eth0", "speed_mbps": 25000}],
        "gpus": [{"model": "A100"}],
        "notes": ["n"],
    }
    with StateDB.open(tmp_path) as db:
        db.add_server("full", "ssh", [])
        db.add_server("none", "ssh", [])
        db.add_server("stage", "baremetal", [])
        db.update_server("full", facts=facts)
        db.update_server("stage", facts={"onboarding": {"stage": "dhcp"}})
        summary = {s.name: s.facts for s in db.list_servers(facts="summary")}
        assert summary["full"] == {k: facts[k] for k in ("cpu", "memory_bytes", "disks")}
        assert summary["none"] is None
        assert summary["stage"] == {"onboarding": {"stage": "dhcp"}}
        assert {s.name: s.facts for s in db.list_servers()}["full"] == facts
        with pytest.raises(UsageError):
            db.list_servers(facts="some")
