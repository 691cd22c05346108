"""Data for `lab dash`, fetched off the UI loop.

The Engine (in-process, or :class:`~lab.coordinator.client.RemoteEngine` after `lab server
connect`: :func:`engine_opener`) is used only from a :class:`Worker` thread: the local Engine's
SQLite connection belongs to the thread that opened it, and a slow source must never freeze the
screen. The worker runs jobs one at a time, coalesces
repeated requests for the same data, and hands results back through a ``wake`` callback (the
urwid loop's watch pipe); the UI thread then takes them with :meth:`Worker.results`.

Actions (:func:`run_action`): sync, plan (the current diff), apply (the plan stored by `lab plan
server`) and identity renew, on lab's own engines the same operations as the command line
(coordinator/lifecycle_api.py, and the daemon's ``identity.renew`` as `lab identity renew` asks it);
other engine-like objects are asked for methods of the same names.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lab.common.errors import LabError, NotFound, StateError
from lab.coordinator.tui import models

log = logging.getLogger(__name__)

# action → (words shown to people, methods tried in order on engine-like objects that are not lab's)
ACTION_METHODS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "sync": ("sync", ("sync",)),
    "plan": ("plan", ("plan",)),
    "apply": ("apply", ("apply",)),
    "renew": ("identity renew", ("identity_renew", "renew_identity")),
}
DASH_ONBOARD = ("this plan onboards the server over SSH, which asks questions and takes minutes: "
                "run `lab apply server {name}` on the command line")  # fmt: skip
RENEW_NEEDS_DAEMON = ("identity renew needs the coordinator daemon (it is the CA): start `lab server run` "
                      "for this home, or `lab server connect HOST:PORT` (nothing was changed)")  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    key: tuple[str, ...]
    value: Any = None
    error: str | None = None
    log: str | None = None  # a line for the log pane (streamed action output, warnings)
    elapsed: float = 0.0
    final: bool = True


def describe_error(exc: BaseException) -> str:
    """One line for the status bar; never a traceback."""
    if isinstance(exc, LabError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    return f"internal error ({type(exc).__name__}): {text}"


def engine_opener(paths: Any) -> Callable[[], Any]:
    """How `lab dash` opens its engines: the daemon's (RemoteEngine) when $LAB_HOME/config.yaml
    names a `server:` (`lab server connect`), else this home's, in-process."""
    from lab.coordinator.engine import Engine, _read_settings

    if _read_settings(paths.home).get("server"):
        from lab.coordinator.client import RemoteEngine

        return lambda: RemoteEngine.open(paths)
    return lambda: Engine.open(paths)


def optional_method(engine: Any, name: str) -> Callable[..., Any] | None:
    """``engine.name`` when it has such a method, else None (RemoteEngine answers a method the
    daemon does not offer with a UsageError rather than AttributeError)."""
    try:
        value = getattr(engine, name, None)
    except LabError:
        return None
    return value if callable(value) else None


def load(engine: Any, key: tuple[str, ...], symbols: Mapping[str, str] = models.SYMBOLS) -> models.Table | models.Detail:
    """The model for one screen key, from Engine calls only."""
    if key[0] == "list":
        view = key[1]
        return models.table_for(view, getattr(engine, f"get_{view}")(), symbols)
    _, kind, name = key
    if kind == "server":
        status_fn = optional_method(engine, "server_status")
        return models.server_detail(engine.show_server(name), status_fn(name) if status_fn else None, symbols)
    if kind == "label":
        return models.label_detail(engine.show_label(name), symbols)
    if kind == "group":
        try:
            view = engine.show_group(name)
        except KeyError as exc:  # the local engine indexes its definitions directly
            raise NotFound(f"no group named '{name}'") from exc
        return models.group_detail(view, engine.get_groups(), symbols)
    if kind == "alert":
        return models.alert_detail(engine.show_alert(name), symbols)
    if kind == "secret":
        return models.secret_detail(engine.show_secret(name), symbols)
    raise LabError(f"nothing to show for a {kind}")


def is_lab_engine(engine: Any) -> bool:
    """The in-process Engine or the daemon's RemoteEngine: the actions lab itself implements."""
    from lab.coordinator.engine import Engine

    if isinstance(engine, Engine):
        return True
    from lab.coordinator.client import RemoteEngine

    return isinstance(engine, RemoteEngine)


def sync_lines(engine: Any, name: str) -> list[str]:
    """`lab sync server NAME` (reconcile, audit), as log lines: done, by hand, the diff."""
    from lab.coordinator import lifecycle, lifecycle_api

    r = lifecycle_api.ops(engine).sync(name)
    return [*r["done"], *(f"by hand: {m}" for m in r["by_hand"]), *lifecycle.diff_lines(r)]


def plan_lines(engine: Any, name: str) -> list[str]:
    """What sync would reconcile: the current diff (nothing is written; `lab plan server` makes plans)."""
    from lab.coordinator import lifecycle, lifecycle_api

    return lifecycle.diff_lines(lifecycle_api.ops(engine).diff(name))


def apply_lines(engine: Any, name: str) -> list[str]:
    """`lab apply server NAME`: the stored plan, refused when stale; never SSH onboarding here."""
    from lab.coordinator import lifecycle_api

    return list(lifecycle_api.ops(engine, onboard_refusal=DASH_ONBOARD).apply(name)["lines"])


def renew_lines(engine: Any, name: str) -> list[str]:
    """`lab identity renew NAME`, asked of the coordinator daemon the same way (the CLI's RPC call)."""
    from pathlib import Path

    from lab.coordinator import identity_ops
    from lab.coordinator.cli.identity_cmd import renew_line

    home = Path(engine.paths.home)
    try:
        identity_ops.daemon_endpoint(home)
    except StateError:
        raise StateError(RENEW_NEEDS_DAEMON) from None
    return [renew_line(identity_ops.call_daemon(home, "identity.renew", {"name": name}))]


LAB_ACTIONS: Mapping[str, Callable[[Any, str], list[str]]] = {
    "sync": sync_lines, "plan": plan_lines, "apply": apply_lines, "renew": renew_lines,
}  # fmt: skip


def run_action(engine: Any, action: str, target: models.Target, emit: Callable[[str], None]) -> None:
    """Run a lifecycle action; stream what it says into ``emit``. Lab's own engines run
    :data:`LAB_ACTIONS`; other engine-like objects their method of that name, if any."""
    words, names = ACTION_METHODS[action]
    if is_lab_engine(engine):
        run = LAB_ACTIONS[action]
        method: Callable[[str], Any] | None = lambda name: run(engine, name)  # noqa: E731
    else:
        method = next((m for m in (optional_method(engine, n) for n in names) if m is not None), None)
    if method is None:
        emit(f"not available from the dashboard: {words} (use the lab command line)")
        return
    emit(f"{words} {target.name}: started")
    result = method(target.name)
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Iterable):
        if result is not None:
            emit(f"{words} {target.name}: {result}")
    else:
        for item in result:
            emit(str(item))
    emit(f"{words} {target.name}: done")


Job = Callable[[Any, Callable[[str], None]], Any]


class Worker:
    """One thread, one Engine, one job at a time."""

    REMEMBER = 64  # last result per screen key, to tell the UI "unchanged" for free

    def __init__(self, open_engine: Callable[[], Any], wake: Callable[[], None] = lambda: None, name: str = "lab-dash") -> None:
        self._open_engine = open_engine
        self._wake = wake
        self._jobs: queue.Queue[tuple[tuple[str, ...], Job] | None] = queue.Queue()
        self._results: collections.deque[Result] = collections.deque()
        self._pending: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()
        self._engine: Any = None
        self._warnings_seen: set[str] = set()
        self._last: dict[tuple[str, ...], Any] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: tuple[str, ...], job: Job) -> bool:
        """Queue ``job(engine, emit)``; False when the same key is still waiting (coalesced)."""
        with self._lock:
            if key in self._pending:
                return False
            self._pending.add(key)
        self._jobs.put((key, job))
        return True

    def busy(self, key: tuple[str, ...]) -> bool:
        with self._lock:
            return key in self._pending

    def results(self) -> list[Result]:
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def close(self, timeout: float = 2.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _post(self, result: Result) -> None:
        self._results.append(result)
        try:
            self._wake()
        except OSError:  # the UI has gone away
            pass

    def _run(self) -> None:
        try:
            while True:
                item = self._jobs.get()
                if item is None:
                    return
                key, job = item
                with self._lock:
                    self._pending.discard(key)
                self._one(key, job)
        finally:
            if self._engine is not None:
                try:
                    self._engine.close()
                except Exception:  # noqa: BLE001 — shutting down; nothing left to tell
                    log.debug("engine close failed", exc_info=True)

    def _one(self, key: tuple[str, ...], job: Job) -> None:
        t0 = time.perf_counter()

        def emit(line: str) -> None:
            self._post(Result(key, log=line, final=False))

        try:
            if self._engine is None:
                self._engine = self._open_engine()
            value = job(self._engine, emit)
        except Exception as exc:  # noqa: BLE001 — every failure becomes a status line
            log.debug("dash job %s failed", key, exc_info=True)
            self._post(Result(key, error=describe_error(exc), elapsed=time.perf_counter() - t0))
        else:
            previous = self._last.get(key)
            if previous is not None and previous == value:
                value = previous  # unchanged: the same object, so the UI can skip it with `is`
            elif key[0] in ("list", "detail"):
                self._last[key] = value
                while len(self._last) > self.REMEMBER:
                    self._last.pop(next(iter(self._last)))
            self._post(Result(key, value=value, elapsed=time.perf_counter() - t0))
        for w in getattr(self._engine, "warnings", None) or ():
            if w not in self._warnings_seen:  # each refresh may repeat one: say it once
                self._warnings_seen.add(w)
                self._post(Result(("warning",), log=f"warning: {w}", final=False))


def fetch_job(key: tuple[str, ...], symbols: Mapping[str, str], reload: bool = False) -> Job:
    def job(engine: Any, emit: Callable[[str], None]) -> Any:
        reload_fn = optional_method(engine, "reload") if reload else None
        if reload_fn is not None:
            reload_fn()
        return load(engine, key, symbols)

    return job


def action_job(action: str, target: models.Target) -> Job:
    def job(engine: Any, emit: Callable[[str], None]) -> None:
        run_action(engine, action, target, emit)

    return job
