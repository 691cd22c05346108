"""agent/delivery.py: authorisation decisions, env names, files with modes, protocol strictness, service replies."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from lab.agent.cache import CacheRecord, SecretCache
from lab.agent.delivery import (
    MANIFEST,
    AgentService,
    FileDelivery,
    FrameBuffer,
    IdResolver,
    Peer,
    decode_request_untrusted,
    encode_frame,
    env_name,
    may_read,
    mount_fstype,
    parse_proc_groups,
    serve_stream,
)
from lab.common.errors import RemoteProtocolError, StoreError

IDS = IdResolver(users={"root": 0, "www-data": 33, "nobody": 65534, "alice": 1000}, groups={"root": 0, "www-data": 33, "nogroup": 65534, "ssl": 120})
ROOT = Peer(1, 0, 0)
ALICE = Peer(2, 1000, 1000)
WWW = Peer(3, 33, 33)
ALICE_SSL = Peer(4, 1000, 1000, frozenset({120}))
NOW = 1_800_000_000.0


# -- authorisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, owner, group, expected",
    [
        (ROOT, "root", "root", True),
        (ROOT, "www-data", "www-data", True),
        (ALICE, "root", "root", False),
        (WWW, "www-data", "root", True),  # owner match
        (WWW, "root", "www-data", True),  # primary group match
        (ALICE, "root", "ssl", False),
        (ALICE_SSL, "root", "ssl", True),  # supplementary group
        (ALICE, "unknown-user", "unknown-group", False),
        (Peer(5, 1000, 0), "root", "root", False),  # gid 0 never grants by group
        (ALICE, "1000", "root", True),  # numeric owner
    ],
)
def test_may_read(peer: Peer, owner: str, group: str, expected: bool) -> None:
    assert may_read(peer, owner, group, IDS) is expected


def test_parse_proc_groups() -> None:
    text = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 120 \nVmLck:\t0 kB\n"
    assert parse_proc_groups(text) == frozenset({4, 24, 27, 120})
    assert parse_proc_groups("Groups:\n") == frozenset()
    assert parse_proc_groups("") == frozenset()


@pytest.mark.parametrize(
    "path, name",
    [
        ("db/main-password", "LAB_SECRET_DB_MAIN_PASSWORD"),
        ("mail/tls.cert", "LAB_SECRET_MAIL_TLS_CERT"),
        ("k8s/join_token", "LAB_SECRET_K8S_JOIN_TOKEN"),
        ("A", "LAB_SECRET_A"),
    ],
)
def test_env_name(path: str, name: str) -> None:
    assert env_name(path) == name


def test_mount_fstype() -> None:
    mounts = "/dev/sda1 / ext4 rw 0 0\ntmpfs /run tmpfs rw 0 0\ntmpfs /run/user/1000 tmpfs rw 0 0\n/dev/sdb /srv\\040data xfs rw 0 0\n"
    assert mount_fstype(mounts, "/run/secrets") == "tmpfs"
    assert mount_fstype(mounts, "/var/lib/lab") == "ext4"
    assert mount_fstype(mounts, "/runner") == "ext4"
    assert mount_fstype(mounts, "/srv data/x") == "xfs"


# -- files ------------------------------------------------------------------------------------


def rec(path: str = "db/pw", value: bytes = b"s3cret", **kw: object) -> CacheRecord:
    kw.setdefault("version", (1, 0, "s"))
    kw.setdefault("fetched_at", NOW)
    return CacheRecord(path=path, value=value, **kw)  # type: ignore[arg-type]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other users needs root")


@needs_root
def test_file_delivery_modes(tmp_path: Path) -> None:
    fd = FileDelivery(tmp_path / "secrets", IDS)
    fd.root.mkdir()
    p = fd.write(rec("mail/tls/key", b"KEY", owner="www-data", group="ssl", mode=0o440))
    st_ = p.stat()
    assert p == tmp_path / "secrets/mail/tls/key" and p.read_bytes() == b"KEY"
    assert (st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode)) == (33, 120, 0o440)
    for d in (tmp_path / "secrets/mail", tmp_path / "secrets/mail/tls"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755 and d.stat().st_uid == 0
    assert not [f for f in p.parent.iterdir() if f.name.startswith(".")]  # no temp file left


@needs_root
def test_file_replaced_atomically_and_removed(tmp_path: Path) -> None:
    fd = FileDelivery(tmp_path, IDS)
    p = fd.write(rec())
    inode = p.stat().st_ino
    fd.write(rec(value=b"rotated", mode=0o400))
    assert p.read_bytes() == b"rotated" and p.stat().st_ino != inode  # a new file renamed over
    assert fd.remove("db/pw") is True and not p.exists() and not (tmp_path / "db").exists()
    assert fd.remove("db/pw") is False


@needs_root
def test_sync_removes_only_own_files(tmp_path: Path) -> None:
    fd = FileDelivery(tmp_path, IDS)
    (tmp_path / "foreign").write_text("not ours")
    assert fd.sync([rec("a/x"), rec("b")]) == (2, 0)
    assert sorted((tmp_path / MANIFEST).read_text().split()) == ["a/x", "b"]
    assert fd.sync([rec("b")]) == (1, 1)
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists() and (tmp_path / "foreign").exists()


def test_unknown_owner_falls_back_to_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fd = FileDelivery(tmp_path, IDS)
    p = fd.write(rec(owner="ghost", group="ghosts", value=b"v-123"))
    assert p.stat().st_uid == os.geteuid() and "unknown_owner" in caplog.text and "v-123" not in caplog.text


def test_file_path_cannot_escape(tmp_path: Path) -> None:
    fd = FileDelivery(tmp_path / "s", IDS)
    with pytest.raises(StoreError):
        fd.remove("../etc/passwd")


# -- protocol ---------------------------------------------------------------------------------


def test_request_decode() -> None:
    m = decode_request_untrusted(msgpack.packb({"t": "agent.get", "path": "db/pw"}))
    assert type(m).__name__ == "GetRequest" and m.path == "db/pw"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb({"t": "agent.get"}),
        msgpack.packb({"t": "agent.get", "path": "x", "extra": 1}),
        msgpack.packb({"t": "agent.get", "path": 5}),
        msgpack.packb({"t": "agent.get", "path": "x" * 300}),
        msgpack.packb({"t": "agent.nope"}),
        msgpack.packb({"path": "x"}),
        msgpack.packb(["agent.get", "x"]),
        msgpack.packb({1: 2}),
        b"\xc1",
        b"",
        msgpack.packb({"t": "agent.env"}) + b"\x00",
    ],
)
def test_request_decode_strict(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_request_untrusted(raw)


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        decode_request_untrusted(data)
    except RemoteProtocolError:
        pass


def test_frame_buffer() -> None:
    fb = FrameBuffer(max_frame=100)
    f1, f2 = encode_frame({"a": 1}), encode_frame({"b": 2})
    data = f1 + f2
    out = []
    for i in range(len(data)):  # byte by byte
        out += fb.feed(data[i : i + 1])
    assert [msgpack.unpackb(x) for x in out] == [{"a": 1}, {"b": 2}] and fb.pending == 0
    with pytest.raises(RemoteProtocolError):
        FrameBuffer(max_frame=100).feed(struct.pack(">I", 101))
    with pytest.raises(RemoteProtocolError):
        FrameBuffer().feed(struct.pack(">I", 0))


# -- the service ------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path):
    cache = SecretCache.open(tmp_path, protection="file")
    cache.put(rec("db/pw", b"root-only-secret"))
    cache.put(rec("web/key", b"www-secret", owner="www-data", group="www-data", mode=0o400))
    cache.put(rec("old/one", b"old-secret", owner="www-data"))
    cache.put(rec("nul/bytes", b"a\x00b"))
    svc = AgentService(cache, IDS, clock=lambda: NOW + 10)
    yield svc
    cache.close()


def ask(svc: AgentService, peer: Peer, msg: dict) -> dict:
    reply, keep = svc.reply_to_frame(msgpack.packb(msg), peer)
    assert keep
    return reply


def test_root_reads_anything(service: AgentService) -> None:
    r = ask(service, ROOT, {"t": "agent.get", "path": "web/key"})
    assert r["ok"] and r["value"] == b"www-secret" and r["status"] == "fresh"


def test_not_entitled_is_the_same_for_missing_and_forbidden(service: AgentService, caplog: pytest.LogCaptureFixture) -> None:
    forbidden = ask(service, ALICE, {"t": "agent.get", "path": "db/pw"})
    missing = ask(service, ALICE, {"t": "agent.get", "path": "db/nothing"})
    invalid = ask(service, ALICE, {"t": "agent.get", "path": "../x"})
    assert forbidden == {"ok": False, "error": "not_entitled", "message": "not entitled to db/pw"}
    assert missing == {"ok": False, "error": "not_entitled", "message": "not entitled to db/nothing"}
    assert invalid["error"] == "not_entitled"
    assert "root-only-secret" not in caplog.text


def test_owner_reads_own(service: AgentService) -> None:
    assert ask(service, WWW, {"t": "agent.get", "path": "web/key"})["value"] == b"www-secret"


def test_root_missing_says_not_cached(service: AgentService) -> None:
    assert ask(service, ROOT, {"t": "agent.get", "path": "db/nothing"})["error"] == "not_cached"


def test_env_only_entitled(service: AgentService) -> None:
    r = ask(service, WWW, {"t": "agent.env"})
    assert r["env"] == {"LAB_SECRET_OLD_ONE": b"old-secret", "LAB_SECRET_WEB_KEY": b"www-secret"}
    r = ask(service, ROOT, {"t": "agent.env"})
    assert set(r["env"]) == {"LAB_SECRET_DB_PW", "LAB_SECRET_WEB_KEY", "LAB_SECRET_OLD_ONE"} and r["skipped"] == ["nul/bytes"]


def test_list_and_status_filtered(service: AgentService) -> None:
    entries = ask(service, WWW, {"t": "agent.list"})["entries"]
    assert [e["path"] for e in entries] == ["old/one", "web/key"]
    assert all("value" not in e for e in entries)
    s = ask(service, ROOT, {"t": "agent.status"})["status"]
    assert s["cached"] == 4 and s["key_protection"] == "file" and s["by_status"] == {"fresh": 4}


def test_stale_status(service: AgentService) -> None:
    service.clock = lambda: NOW + 10_000
    r = ask(service, ROOT, {"t": "agent.get", "path": "db/pw"})
    assert r["ok"] and r["status"] == "stale" and r["since"] == NOW


def test_reload_needs_root(service: AgentService) -> None:
    calls = []
    service.on_reload = lambda: calls.append(1)
    assert ask(service, ALICE, {"t": "agent.reload"})["ok"] is False
    assert ask(service, ROOT, {"t": "agent.reload"})["ok"] is True and calls == [1]


def test_bad_request_closes(service: AgentService) -> None:
    reply, keep = service.reply_to_frame(b"\xc1", ROOT)
    assert reply["error"] == "protocol" and keep is False


def test_two_endpoints_over_memory_stream(service: AgentService) -> None:
    async def main() -> list[dict]:
        client, server = trio.testing.memory_stream_pair()
        replies = []
        async with trio.open_nursery() as n:
            n.start_soon(serve_stream, server, service, WWW)
            for msg in ({"t": "agent.get", "path": "web/key"}, {"t": "agent.get", "path": "db/pw"}):
                body = msgpack.packb(msg)
                await client.send_all(struct.pack(">I", len(body)) + body)
                fb = FrameBuffer()
                frames: list[bytes] = []
                while not frames:
                    frames = fb.feed(await client.receive_some())
                replies.append(msgpack.unpackb(frames[0]))
            await client.send_all(b"\x00\x00\x00\x00")  # bad frame: error reply, then close
            tail = b""
            while chunk := await client.receive_some():
                tail += chunk
            replies.append(msgpack.unpackb(tail[4:]))
            await client.aclose()
        return replies

    ok, refused, bad = trio.run(main)
    assert ok["value"] == b"www-secret"
    assert refused["error"] == "not_entitled"
    assert bad["error"] == "protocol"
