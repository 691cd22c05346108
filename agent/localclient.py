"""Lean client of the agent's local socket: the hot path of `lab secret get` and `lab secret exec`.

Imported by the fast path of ``lab``'s ``main()`` before anything else, so it imports only the
standard library's ``socket`` and ``msgpack``: no typer, no trio, no engine, no lab modules.
The protocol is described in :mod:`lab.agent.delivery`.

Socket: ``$LAB_RUNTIME_DIR/agent.sock``, default ``/run/lab/agent.sock`` (or ``$LAB_HOME/run/agent.sock``
when $LAB_RUNTIME_DIR is unset and that socket exists: see :func:`socket_path`).
"""

from __future__ import annotations

import os
import sys
import time

# `_socket`, not `socket`: the wrapper module pulls in selectors and enum machinery, a few ms that
# this path pays on every call.
import _socket
import msgpack

DEFAULT_RUNTIME_DIR = "/run/lab"
SOCKET_NAME = "agent.sock"
MAX_REPLY = 64 * 1024 * 1024
TIMEOUT_S = 10.0
EXIT_NOT_ENTITLED = 4
EXIT_NO_AGENT = 69  # EX_UNAVAILABLE
EXIT_ERROR = 1


class AgentError(Exception):
    """One line for stderr, and an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, code: str = "error") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code


HOME_RUNTIME_SUBDIR = "run"  # see socket_path


def socket_path(environ: dict[str, str] | None = None) -> str:
    """``$LAB_RUNTIME_DIR/agent.sock``; with $LAB_RUNTIME_DIR unset, ``$LAB_HOME/run/agent.sock``
    when that socket exists (an agent of a local cluster, docs/CLUSTER.md); else /run/lab/agent.sock."""
    env = os.environ if environ is None else environ
    runtime = env.get("LAB_RUNTIME_DIR")
    if not runtime:
        # [cluster] local-cluster rule: LAB_HOME=DIR/<node> acts as that node
        home = env.get("LAB_HOME")
        if home:
            candidate = os.path.join(home, HOME_RUNTIME_SUBDIR, SOCKET_NAME)
            if os.path.exists(candidate):
                return candidate
        runtime = DEFAULT_RUNTIME_DIR
    return os.path.join(runtime, SOCKET_NAME)


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            raise AgentError("agent closed the connection mid-reply")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def request(message: dict, path: str | None = None, timeout: float = TIMEOUT_S) -> dict:
    """Send one request, return the reply map (``ok`` true or false). AgentError if no agent."""
    path = path or socket_path()
    body = msgpack.packb(message, use_bin_type=True)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, NotADirectoryError):
            raise AgentError(f"agent not running (no socket at {path})", EXIT_NO_AGENT, "no_agent") from None
        except ConnectionRefusedError:
            raise AgentError(f"agent not running (connection refused at {path})", EXIT_NO_AGENT, "no_agent") from None
        except PermissionError:
            raise AgentError(f"cannot reach the agent (permission denied on {path})", EXIT_NO_AGENT, "no_agent") from None
        sock.sendall(len(body).to_bytes(4, "big") + body)
        n = int.from_bytes(_recv_exact(sock, 4), "big")
        if not 0 < n <= MAX_REPLY:
            raise AgentError(f"bad reply length {n} from the agent")
        data = _recv_exact(sock, n)
    except TimeoutError:
        raise AgentError(f"agent did not answer within {timeout:g}s ({path})", EXIT_NO_AGENT, "timeout") from None
    except OSError as exc:
        raise AgentError(f"agent connection failed: {exc.strerror or exc}", EXIT_NO_AGENT, "no_agent") from None
    finally:
        sock.close()
    try:
        reply = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        raise AgentError(f"malformed reply from the agent: {type(exc).__name__}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise AgentError("malformed reply from the agent")
    return reply


def call(message: dict, path: str | None = None) -> dict:
    """Like :func:`request`, but an ``ok: false`` reply raises AgentError."""
    reply = request(message, path)
    if not reply["ok"]:
        code = str(reply.get("error", "error"))
        raise AgentError(str(reply.get("message", code)), EXIT_NOT_ENTITLED if code == "not_entitled" else EXIT_ERROR, code)
    return reply


def _when(ts: object) -> str:
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def get(path: str, sock: str | None = None) -> tuple[bytes, str, str | None]:
    """(value, status, warning): warning is the stderr line for a stale/expired value."""
    reply = call({"t": "agent.get", "path": path}, sock)
    value, status = reply.get("value"), reply.get("status")
    if not isinstance(value, bytes) or not isinstance(status, str):
        raise AgentError("malformed reply from the agent")
    warning = None
    if status == "stale":
        warning = f"{path} is stale (store unreachable since {_when(reply.get('since'))}), served from cache"
    elif status == "expired":
        warning = f"{path} expired at {_when(reply.get('expiry'))} (store unreachable since {_when(reply.get('since'))}), served from cache"
    return value, status, warning


def secret_env(sock: str | None = None) -> tuple[dict[bytes, bytes], list[str]]:
    """The ``LAB_SECRET_*`` variables the caller may read, and warnings."""
    reply = call({"t": "agent.env"}, sock)
    env = reply.get("env")
    if not isinstance(env, dict):
        raise AgentError("malformed reply from the agent")
    out = {k.encode(): v for k, v in env.items() if isinstance(k, str) and isinstance(v, bytes)}
    warnings = [f"{p} is stale, served from cache" for p in reply.get("stale") or () if isinstance(p, str)]
    warnings += [f"{p} holds a NUL byte; not passed as a variable" for p in reply.get("skipped") or () if isinstance(p, str)]
    return out, warnings


def _exec(args: list[str]) -> int:
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        sys.stderr.write("lab: secret exec needs a command: lab secret exec -- CMD ARGS\n")
        return 2
    env, warnings = secret_env()
    for w in warnings:
        sys.stderr.write(f"lab: warning: {w}\n")
    full = dict(os.environb)
    full.update(env)
    try:
        os.execvpe(args[0], args, full)  # type: ignore[arg-type]
    except OSError as exc:
        sys.stderr.write(f"lab: cannot run {args[0]}: {exc.strerror or exc}\n")
        return 127
    return 0  # not reached


def fast_main(argv: list[str]) -> int | None:
    """Handle ``get PATH`` / ``exec [--] CMD ...`` (argv after ``secret``); None → let typer do it."""
    if not argv:
        return None
    try:
        if argv[0] == "get":
            if len(argv) != 2 or argv[1].startswith("-"):
                return None  # --help, options, mistakes: the full CLI explains
            value, _status, warning = get(argv[1])
            if warning:
                sys.stderr.write(f"lab: {warning}\n")
            sys.stdout.buffer.write(value)
            sys.stdout.buffer.flush()
            return 0
        if argv[0] == "exec":
            if len(argv) > 1 and argv[1] in ("-h", "--help"):
                return None
            return _exec(argv[1:])
    except AgentError as exc:
        sys.stderr.write(f"lab: {exc}\n")
        return exc.exit_code
    except BrokenPipeError:
        return 0
    return None
