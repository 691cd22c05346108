"""Secret delivery: the local API on ``agent.sock``, files under ``/run/secrets``, env variables.

**Local protocol** (unix stream socket, one request → one reply, repeatable on one connection)::

    frame   = u32 big-endian length (1..MAX_FRAME) + msgpack map
    request = {"t": "agent.get", "path": P} | {"t": "agent.env"} | {"t": "agent.list"}
              | {"t": "agent.status"} | {"t": "agent.reload"}
    reply   = {"ok": true, ...} | {"ok": false, "error": CODE, "message": TEXT}

Requests are decoded strictly (:mod:`lab.common.wire`: exact fields, capped sizes, one error
type); a malformed request gets an ``error: protocol`` reply and the connection closes.

**Authorisation** (SO_PEERCRED): uid 0 may read every cached secret; any other caller only a secret
whose definition names the caller's uid as owner, or one of the caller's groups as group. Anything
else — including a path that is not cached at all — gets the same ``not entitled`` reply, so a
non-root caller cannot probe which paths exist. The decision is :func:`may_read`, a pure function.

**Files**: ``SECRETS_DIR/PATH`` with the record's owner/group/mode, written to a temp file in the same
directory (created 0600, chowned and chmodded before any byte is visible under the final name),
fsynced and renamed; removed at once when the secret is removed. Directories are 0755 root.
``SECRETS_DIR/.lab-managed`` lists what the agent wrote, so a sync removes only its own files.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import logging
import os
import pwd
import re
import secrets as _random
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import trio

from lab.agent.cache import CacheRecord, Freshness, SecretCache, check_path
from lab.common import wire
from lab.common.errors import RemoteProtocolError, StoreError
from lab.common.fsutil import atomic_write

__all__ = [
    "AgentService", "FileDelivery", "FrameBuffer", "IdResolver", "Peer", "REQUESTS", "encode_frame", "env_name",
    "may_read", "mount_fstype", "parse_proc_groups", "serve", "serve_stream",
]

log = logging.getLogger("lab.agent.delivery")

MAX_FRAME: Final = 8 * 1024 * 1024
_LEN: Final = struct.Struct(">I")
_PEERCRED: Final = struct.Struct("3i")
MANIFEST: Final = ".lab-managed"
CONNECTION_TIMEOUT_S: Final = 30.0

# ---------------------------------------------------------------------------------------------
# Protocol (sans-IO)

REQUESTS: Final = wire.Registry()
_Path = Annotated[str, wire.Str(max_len=256, min_len=1)]


@wire.message("agent.get", registry=REQUESTS)
@dataclasses.dataclass(frozen=True)
class GetRequest(wire.Message):
    path: _Path


@wire.message("agent.env", registry=REQUESTS)
@dataclasses.dataclass(frozen=True)
class EnvRequest(wire.Message):
    pass


@wire.message("agent.list", registry=REQUESTS)
@dataclasses.dataclass(frozen=True)
class ListRequest(wire.Message):
    pass


@wire.message("agent.status", registry=REQUESTS)
@dataclasses.dataclass(frozen=True)
class StatusRequest(wire.Message):
    pass


@wire.message("agent.reload", registry=REQUESTS)
@dataclasses.dataclass(frozen=True)
class ReloadRequest(wire.Message):
    pass


def encode_frame(obj: Mapping[str, Any]) -> bytes:
    body = wire.packb(dict(obj))
    if len(body) > MAX_FRAME:
        body = wire.packb({"ok": False, "error": "too_large", "message": "reply too large"})
    return _LEN.pack(len(body)) + body


def decode_request_untrusted(frame: bytes) -> wire.Message:
    """One request frame body → a request message, or RemoteProtocolError."""
    return REQUESTS.decode_untrusted(frame, max_size=MAX_FRAME, max_items=16)


class FrameBuffer:
    """Stream bytes → complete frame bodies. Refuses a length of 0 or over ``max_frame`` at once."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n == 0 or n > self.max_frame:
                self._buf.clear()
                raise RemoteProtocolError(f"frame length {n} outside 1..{self.max_frame}")
            if len(self._buf) < _LEN.size + n:
                break
            out.append(bytes(self._buf[_LEN.size : _LEN.size + n]))
            del self._buf[: _LEN.size + n]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


# ---------------------------------------------------------------------------------------------
# Authorisation


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is on the other end of the socket (SO_PEERCRED, plus supplementary groups if known)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class IdResolver:
    """Names → ids. Defaults to the system databases; tests pass plain dicts."""

    users: Mapping[str, int] | None = None
    groups: Mapping[str, int] | None = None

    def uid(self, name: str) -> int | None:
        if name.isdigit():
            return int(name)
        if self.users is not None:
            return self.users.get(name)
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def gid(self, name: str) -> int | None:
        if name.isdigit():
            return int(name)
        if self.groups is not None:
            return self.groups.get(name)
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None


def may_read(peer: Peer, owner: str, group: str, ids: IdResolver) -> bool:
    """Root reads everything; others need owner == their uid, or group among their groups."""
    if peer.uid == 0:
        return True
    uid = ids.uid(owner)
    if uid is not None and uid == peer.uid:
        return True
    gid = ids.gid(group)
    return gid is not None and gid != 0 and (gid == peer.gid or gid in peer.groups)


def parse_proc_groups(status_text: str) -> frozenset[int]:
    """The ``Groups:`` line of /proc/PID/status → supplementary gids."""
    for line in status_text.splitlines():
        if line.startswith("Groups:"):
            return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    return frozenset()


def peer_of(sock: socket.socket | trio.socket.SocketType) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            groups = parse_proc_groups(f.read())
    except OSError:
        groups = frozenset()
    return Peer(pid, uid, gid, groups)


_ENV_RE: Final = re.compile(r"[^A-Za-z0-9]")


def env_name(path: str) -> str:
    """``db/main-password`` → ``LAB_SECRET_DB_MAIN_PASSWORD``."""
    return "LAB_SECRET_" + _ENV_RE.sub("_", path).upper()


# ---------------------------------------------------------------------------------------------
# Files under /run/secrets


def mount_fstype(mounts_text: str, path: str) -> str | None:
    """Filesystem type of the mount holding ``path``, from /proc/self/mounts text."""
    best, best_len = None, -1
    path = os.path.normpath(path)
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/") or mnt == "/") and len(mnt) > best_len:
            best, best_len = parts[2], len(mnt)
    return best


class FileDelivery:
    """Writes secrets to ``root/PATH`` with their declared owner/group/mode."""

    def __init__(self, root: Path, ids: IdResolver | None = None) -> None:
        self.root = Path(root)
        self.ids = ids or IdResolver()

    def prepare(self) -> str | None:
        """Create the root (0755); return its filesystem type (warn when it is not tmpfs)."""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
                fstype = mount_fstype(f.read(), str(self.root.resolve()))
        except OSError:
            fstype = None
        if fstype not in ("tmpfs", "ramfs"):
            log.warning("event=secrets_dir_not_tmpfs dir=%s fstype=%s", self.root, fstype)
        return fstype

    def _target(self, path: str) -> Path:
        check_path(path)
        return self.root.joinpath(*path.split("/"))

    def _mkdirs(self, target: Path) -> None:
        d = self.root
        for part in target.relative_to(self.root).parts[:-1]:
            d = d / part
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(d).st_mode):
                    raise StoreError(f"{d} exists and is not a directory") from None

    def _owner(self, record: CacheRecord) -> tuple[int, int]:
        uid, gid = self.ids.uid(record.owner), self.ids.gid(record.group)
        if uid is None or gid is None:
            log.warning("event=unknown_owner path=%s owner=%s group=%s using=root", record.path, record.owner, record.group)
        return (0 if uid is None else uid), (0 if gid is None else gid)

    def write(self, record: CacheRecord) -> Path:
        target = self._target(record.path)
        self._mkdirs(target)
        uid, gid = self._owner(record)
        tmp = target.with_name(f".{target.name}.{_random.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(record.value)
                while view:
                    view = view[os.write(fd, view) :]
                try:
                    os.fchown(fd, uid, gid)
                except PermissionError:
                    if os.geteuid() == 0:
                        raise
                os.fchmod(fd, record.mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target

    def remove(self, path: str) -> bool:
        target = self._target(path)
        try:
            os.unlink(target)
        except FileNotFoundError:
            return False
        d = target.parent
        while d != self.root:  # drop now-empty directories
            try:
                os.rmdir(d)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    break
                raise
            d = d.parent
        return True

    def _manifest(self) -> set[str]:
        try:
            text = (self.root / MANIFEST).read_text(encoding="utf-8")
        except OSError:
            return set()
        out = set()
        for line in text.splitlines():
            try:
                out.add(check_path(line.strip()))
            except StoreError:
                continue
        return out

    def _write_manifest(self, paths: Iterable[str]) -> None:
        atomic_write(self.root / MANIFEST, "".join(p + "\n" for p in sorted(paths)).encode("utf-8"), mode=0o600)

    def sync(self, records: Iterable[CacheRecord]) -> tuple[int, int]:
        """Write every record; remove files we wrote earlier whose secret is gone. (written, removed)."""
        wanted = {}
        for r in records:
            wanted[r.path] = r
        written = removed = 0
        for rec in wanted.values():
            try:
                self.write(rec)
                written += 1
            except (OSError, StoreError) as exc:
                log.error("event=deliver_failed path=%s error=%s", rec.path, exc)
        for path in self._manifest() - wanted.keys():
            removed += self.remove(path)
        self._write_manifest(wanted.keys())
        return written, removed


# ---------------------------------------------------------------------------------------------
# The service: requests → replies (no I/O of its own beyond the cache)


def _not_entitled(path: str) -> dict[str, Any]:
    return {"ok": False, "error": "not_entitled", "message": f"not entitled to {path}"}


@dataclasses.dataclass
class AgentService:
    """Answers local API requests from the cache, for one peer at a time."""

    cache: SecretCache
    ids: IdResolver = dataclasses.field(default_factory=IdResolver)
    status: Callable[[], dict[str, Any]] = dict
    on_reload: Callable[[], Any] | None = None
    clock: Callable[[], float] = time.time

    def handle(self, request: wire.Message, peer: Peer) -> dict[str, Any]:
        try:
            if isinstance(request, GetRequest):
                return self._get(request.path, peer)
            if isinstance(request, EnvRequest):
                return self._env(peer)
            if isinstance(request, ListRequest):
                return {"ok": True, "entries": self._visible(peer)}
            if isinstance(request, StatusRequest):
                return {"ok": True, "status": self._status(peer)}
            if isinstance(request, ReloadRequest):
                if peer.uid != 0:
                    return {"ok": False, "error": "not_entitled", "message": "reload needs root"}
                if self.on_reload is not None:
                    self.on_reload()
                return {"ok": True}
        except StoreError as exc:
            log.error("event=cache_error peer_uid=%s error=%s", peer.uid, exc)
            return {"ok": False, "error": "cache", "message": str(exc)}
        return {"ok": False, "error": "protocol", "message": "unsupported request"}

    def _get(self, path: str, peer: Peer) -> dict[str, Any]:
        try:
            check_path(path)
        except StoreError:
            return _not_entitled(path) if peer.uid != 0 else {"ok": False, "error": "invalid", "message": f"invalid secret path {path[:80]!r}"}
        rec = self.cache.get_record(path)
        if rec is None or not may_read(peer, rec.owner, rec.group, self.ids):
            if rec is None and peer.uid == 0:
                return {"ok": False, "error": "not_cached", "message": f"{path} is not in the local cache"}
            log.info("event=refused path=%s peer_uid=%s peer_pid=%s", path, peer.uid, peer.pid)
            return _not_entitled(path)
        status, confirmed = self.cache.freshness(rec, self.clock(), self.cache.last_sync())
        log.info("event=served path=%s peer_uid=%s peer_pid=%s status=%s", path, peer.uid, peer.pid, status.value)
        return {"ok": True, "value": rec.value, "status": status.value, "since": confirmed, "expiry": rec.expiry}

    def _visible(self, peer: Peer) -> list[dict[str, Any]]:
        return [m for m in self.cache.list(self.clock()) if m.get("owner") and may_read(peer, m["owner"], m["group"], self.ids)]

    def _env(self, peer: Peer) -> dict[str, Any]:
        env: dict[str, bytes] = {}
        skipped: list[str] = []
        stale: list[str] = []
        for meta in self._visible(peer):
            rec = self.cache.get_record(meta["path"])
            if rec is None:
                continue
            if b"\x00" in rec.value:
                skipped.append(rec.path)
                continue
            env[env_name(rec.path)] = rec.value
            if meta["status"] != Freshness.FRESH.value:
                stale.append(rec.path)
        log.info("event=env peer_uid=%s peer_pid=%s count=%d", peer.uid, peer.pid, len(env))
        return {"ok": True, "env": env, "skipped": skipped, "stale": stale}

    def _status(self, peer: Peer) -> dict[str, Any]:
        entries = self._visible(peer)
        counts: dict[str, int] = {}
        for e in entries:
            counts[e["status"]] = counts.get(e["status"], 0) + 1
        oldest = min((e.get("confirmed_at") or 0.0 for e in entries), default=None)
        return {
            **self.status(),
            "cached": len(entries),
            "by_status": counts,
            "oldest_confirmed": oldest,
            "last_sync": self.cache.last_sync(),
            "key_protection": self.cache.key_protection,
            "stale_after": self.cache.stale_after,
        }

    def reply_to_frame(self, frame: bytes, peer: Peer) -> tuple[dict[str, Any], bool]:
        """(reply, keep_open): a malformed request gets an error reply and closes the connection."""
        try:
            request = decode_request_untrusted(frame)
        except RemoteProtocolError as exc:
            log.warning("event=bad_request peer_uid=%s peer_pid=%s error=%s", peer.uid, peer.pid, str(exc)[:120])
            return {"ok": False, "error": "protocol", "message": str(exc)[:200]}, False
        return self.handle(request, peer), True


# ---------------------------------------------------------------------------------------------
# trio edge


async def _handle_connection(stream: trio.SocketStream, service: AgentService) -> None:
    try:
        peer = peer_of(stream.socket)
    except OSError as exc:
        log.warning("event=peercred_failed error=%s", exc)
        await stream.aclose()
        return
    await serve_stream(stream, service, peer)


async def serve_stream(stream: trio.abc.Stream, service: AgentService, peer: Peer) -> None:
    """Answer requests on one connection from ``peer`` until it closes, misbehaves or times out."""
    buf = FrameBuffer()
    try:
        with trio.move_on_after(CONNECTION_TIMEOUT_S):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                try:
                    frames = buf.feed(data)
                except RemoteProtocolError as exc:
                    await stream.send_all(encode_frame({"ok": False, "error": "protocol", "message": str(exc)}))
                    return
                for frame in frames:
                    reply, keep = service.reply_to_frame(frame, peer)
                    await stream.send_all(encode_frame(reply))
                    if not keep:
                        return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve(sock_path: Path, service: AgentService, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``sock_path`` (mode 0666: every local user may ask; SO_PEERCRED decides)."""
    sock_path = Path(sock_path)
    sock_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(sock_path).st_mode):
            os.unlink(sock_path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = sock_path.with_name(f".{sock_path.name}.{_random.token_hex(4)}")
    await sock.bind(str(tmp))
    os.chmod(tmp, 0o666)
    os.replace(tmp, sock_path)  # appears atomically, already with its final mode
    sock.listen(128)
    listener = trio.SocketListener(sock)
    try:
        task_status.started(sock_path)
        await trio.serve_listeners(lambda s: _handle_connection(s, service), [listener])  # type: ignore[arg-type]
    finally:
        try:
            os.unlink(sock_path)
        except OSError:
            pass
