"""The HTTP side of network boot: per-MAC iPXE scripts, install configs, kernels and initrds.

``BootService.route`` decides every response (pure apart from reading image files); ``serve_http``
is the trio edge, a strict HTTP/1.1 server on h11 (GET/HEAD only, bounded request size and time).

Rules: a script or config is served only for a MAC on the allowlist (onboarding, not expired),
and, where the DHCP lease of that MAC is known, only to that lease's IP address. Kernels and
initrds are public installer images and are served to anyone who can reach the service.
Tokens never reach the logs: only method, path, status and peer are logged.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import pathlib
import re
import time
from collections.abc import Callable

import h11
import trio

from lab.common.errors import ConfigError, LabError, NotFound
from lab.coordinator.pxe import boot
from lab.coordinator.pxe.images import ImageStore
from lab.coordinator.pxe.registry import Allowlist, normalize_mac

__all__ = ["BootService", "Response", "serve_http"]

log = logging.getLogger("lab.pxe.http")

MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT = 30.0
CHUNK = 256 * 1024
_MAC = r"([0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2}){5}|[0-9a-fA-F]{12})"
_SCRIPT_RE = re.compile(rf"^/boot/{_MAC}\.ipxe$")
_CONFIG_RE = re.compile(rf"^/autoinstall/{_MAC}/(user-data|meta-data|vendor-data|preseed\.cfg|ks\.cfg)$")
_IMAGE_RE = re.compile(r"^/images/([a-z0-9][a-z0-9._-]{0,62})/(vmlinuz|initrd|image\.iso)$")
_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
_AGENT_SCRIPT_RE = re.compile(rf"^/agent/(?:{_MAC}/)?install\.sh$")
AGENT_UNIT_PATH = "/agent/" + boot.AGENT_UNIT
_REPO = pathlib.Path(__file__).resolve().parents[2]  # the source tree (editable install)


def default_agent_dir() -> pathlib.Path:
    """Where the agent wheel is looked for: $LAB_PXE_AGENT_DIR, else the source tree's dist/."""
    return pathlib.Path(os.environ.get("LAB_PXE_AGENT_DIR") or _REPO / "dist")


def default_agent_unit() -> pathlib.Path:
    """The agent's systemd unit: $LAB_PXE_AGENT_UNIT, else packaging/systemd/lab-agent.service."""
    return pathlib.Path(os.environ.get("LAB_PXE_AGENT_UNIT") or _REPO / "packaging" / "systemd" / boot.AGENT_UNIT)


def _own_version() -> str:
    try:
        return importlib.metadata.version("lab")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    file: pathlib.Path | None = None  # streamed instead of body
    content_type: str = "text/plain; charset=utf-8"
    event: tuple[str, str] | None = None  # (mac, stage) for progress tracking


def _text(status: int, msg: str) -> Response:
    return Response(status, (msg + "\n").encode())


class BootService:
    """Routes of the boot HTTP service.

    ``agent_dir`` holds the agent wheel ``lab-<version>-py3-none-any.whl`` (default
    ``default_agent_dir()``), served at ``/agent/<wheel>``; ``agent_unit`` is the systemd unit
    served at ``/agent/lab-agent.service`` when the file exists (default ``default_agent_unit()``);
    ``agent_version`` defaults to this package's version.
    """

    def __init__(self, allowlist: Allowlist, images: ImageStore, http_base: str,
                 lease_lookup: Callable[[str], str | None] = lambda mac: None, *,
                 agent_dir: pathlib.Path | None = None, agent_unit: pathlib.Path | None = None,
                 agent_version: str | None = None) -> None:
        self.allowlist = allowlist
        self.images = images
        self.http_base = http_base.rstrip("/")
        self.lease_lookup = lease_lookup
        self.agent_dir = agent_dir if agent_dir is not None else default_agent_dir()
        self.agent_unit = agent_unit if agent_unit is not None else default_agent_unit()
        self.agent_version = agent_version or _own_version()
        self.agent_wheel = boot.agent_wheel_name(self.agent_version)

    def _agent(self, method: str, path: str, peer_ip: str, now: float) -> Response:
        if m := _AGENT_SCRIPT_RE.match(path):
            node = None
            if m[1] is not None:  # per machine: the same rules as its install config
                node = self._node(m[1], peer_ip, now)
                if isinstance(node, Response):
                    return node
            script = boot.agent_install_script(node, self.http_base, self.agent_version,
                                               unit_served=self.agent_unit.is_file())
            return Response(200, script.encode(), content_type="text/x-shellscript; charset=utf-8",
                            event=(node.mac, "agent-script-fetched") if node is not None else None)
        if path == "/agent/" + self.agent_wheel:
            wheel = self.agent_dir / self.agent_wheel
            if not wheel.is_file():
                log.error("event=agent-wheel-missing path=%s", wheel)
                return _text(404, f"no agent wheel {self.agent_wheel} on this server")
            return Response(200, file=wheel, content_type="application/octet-stream")
        if path == AGENT_UNIT_PATH and self.agent_unit.is_file():
            return Response(200, file=self.agent_unit)
        return _text(404, "not found")

    def _node(self, mac_text: str, peer_ip: str, now: float):  # -> OnboardingNode | Response
        mac = normalize_mac(mac_text)
        node = self.allowlist.lookup(mac, now)
        if node is None:
            return _text(404, "not found")
        leased = self.lease_lookup(mac)
        if leased is not None and leased != peer_ip:
            log.warning("event=http-wrong-peer mac=%s peer=%s lease=%s", mac, peer_ip, leased)
            return _text(403, "forbidden")
        return node

    def route(self, method: str, path: str, peer_ip: str, now: float) -> Response:
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed")
        if m := _SCRIPT_RE.match(path):
            node = self._node(m[1], peer_ip, now)
            if isinstance(node, Response):
                return node
            try:
                image = self.images.get(node.image)
            except (NotFound, ConfigError) as exc:
                log.error("event=image-missing mac=%s image=%s error=%s", node.mac, node.image, exc)
                return _text(404, "not found")
            body = boot.ipxe_script(node, image, self.http_base).encode()
            return Response(200, body, event=(node.mac, "script-fetched"))
        if m := _CONFIG_RE.match(path):
            node = self._node(m[1], peer_ip, now)
            if isinstance(node, Response):
                return node
            if m[2] == "vendor-data":
                return Response(200, b"", event=None)
            try:
                image = self.images.get(node.image)
                text = boot.render_config(m[2], node, image, self.http_base)
            except LabError as exc:
                log.error("event=config-failed mac=%s error=%s", node.mac, exc)
                return _text(404, "not found")
            if text is None:
                return _text(404, "not found")
            return Response(200, text.encode(), event=(node.mac, f"config-fetched:{m[2]}"))
        if path.startswith("/agent/"):
            return self._agent(method, path, peer_ip, now)
        if m := _IMAGE_RE.match(path):
            try:
                image = self.images.get(m[1])
            except (NotFound, ConfigError):
                return _text(404, "not found")
            if m[2] == "image.iso":
                if image.iso is None or not image.iso.is_file():
                    return _text(404, "not found")
                return Response(200, file=image.iso, content_type="application/octet-stream")
            f = image.kernel if m[2] == "vmlinuz" else image.initrd
            return Response(200, file=f, content_type="application/octet-stream")
        return _text(404, "not found")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """One ``Range: bytes=a-b`` (or ``a-``, ``-n``) over a file of ``size`` bytes → (first, last)
    inclusive; None: serve the whole file (no header, or one we do not handle, e.g. several ranges);
    False: unsatisfiable (416)."""
    if header is None:
        return None
    m = _RANGE_RE.match(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # the last n bytes
        n = int(m[2])
        return (max(0, size - n), size - 1) if n and size else False
    first = int(m[1])
    if m[2] and int(m[2]) < first:
        return None  # syntactically invalid: ignored (RFC 9110 14.2)
    if first >= size:
        return False
    return first, min(int(m[2]), size - 1) if m[2] else size - 1


async def _send_response(conn: h11.Connection, stream: trio.abc.Stream, resp: Response, head_only: bool,
                         range_header: str | None = None) -> None:
    size = resp.file.stat().st_size if resp.file is not None else len(resp.body)
    status, first, length = resp.status, 0, size
    headers = [("content-type", resp.content_type), ("server", "lab-pxe")]
    if resp.file is not None and resp.status == 200:
        headers.append(("accept-ranges", "bytes"))
        want = byte_range(range_header, size)
        if want is False:
            resp = _text(416, "range not satisfiable")
            status, length, headers = 416, len(resp.body), [*headers, ("content-range", f"bytes */{size}")]
        elif want is not None:
            first, last = want
            status, length = 206, last - first + 1
            headers.append(("content-range", f"bytes {first}-{last}/{size}"))
    headers.append(("content-length", str(length)))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    if not head_only:
        if resp.file is not None:
            async with await trio.open_file(resp.file, "rb") as f:
                await f.seek(first)
                left = length
                while left > 0 and (chunk := await f.read(min(CHUNK, left))):
                    left -= len(chunk)
                    await stream.send_all(conn.send(h11.Data(data=chunk)))
        elif resp.body:
            await stream.send_all(conn.send(h11.Data(data=resp.body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def handle_connection(service: BootService, stream: trio.abc.Stream, peer_ip: str,
                            on_event: Callable[[str, str], None] | None = None,
                            clock: Callable[[], float] = time.time) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    try:
        while True:
            request = None
            with trio.move_on_after(REQUEST_TIMEOUT):
                while request is None:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(MAX_REQUEST_BYTES)
                        conn.receive_data(data)
                        if not data and conn.their_state is h11.IDLE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.ConnectionClosed):
                        return
            if request is None:
                return  # idle or slow client
            # drain a request body (GET has none; up to MAX_REQUEST_BYTES is tolerated and ignored)
            body = 0
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
                elif isinstance(ev, h11.Data):
                    body += len(ev.data)
                    if body > MAX_REQUEST_BYTES:
                        raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            method = request.method.decode("ascii", "replace")
            path = request.target.decode("ascii", "replace").split("?", 1)[0]
            resp = service.route(method, path, peer_ip, clock())
            log.info("event=http method=%s path=%s status=%d peer=%s", method, path, resp.status, peer_ip)
            if resp.event is not None and on_event is not None:
                on_event(*resp.event)
            rng = next((v.decode("latin-1") for k, v in request.headers if k == b"range"), None)
            await _send_response(conn, stream, resp, method == "HEAD", rng)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        log.info("event=http-bad-request peer=%s error=%s", peer_ip, exc)
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await _send_response(conn, stream, _text(status, "bad request"), False)
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("event=http-connection-lost peer=%s error=%s", peer_ip, exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_http(service: BootService, *, address: str = "0.0.0.0", port: int = 8080,
                     on_event: Callable[[str, str], None] | None = None,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the boot HTTP endpoints until cancelled; ``task_status.started(port)`` once listening."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=address)
    except OSError as exc:
        raise ConfigError(f"cannot listen for HTTP on {address}:{port}: {exc}") from exc

    async def handler(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        await handle_connection(service, stream, peer, on_event)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])
