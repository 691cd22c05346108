"""Data for `lab dash`, fetched off the UI loop.

The Engine (today in-process, later a remote client with the same methods) is used only from a
:class:`Worker` thread: the local Engine's SQLite connection belongs to the thread that opened it,
and a slow source must never freeze the screen. The worker runs jobs one at a time, coalesces
repeated requests for the same data, and hands results back through a ``wake`` callback (the
urwid loop's watch pipe); the UI thread then takes them with :meth:`Worker.results`.
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

from lab.common.errors import LabError, NotFound
from lab.coordinator.tui import models

log = logging.getLogger(__name__)

# action → (words shown to people, Engine methods tried in order)
ACTION_METHODS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "sync": ("sync", ("sync",)),
    "plan": ("plan", ("plan",)),
    "apply": ("apply", ("apply",)),
    "renew": ("identity renew", ("identity_renew", "renew_identity")),
}


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


def load(engine: Any, key: tuple[str, ...], symbols: Mapping[str, str] = models.SYMBOLS) -> models.Table | models.Detail:
    """The model for one screen key, from Engine calls only."""
    if key[0] == "list":
        view = key[1]
        return models.table_for(view, getattr(engine, f"get_{view}")(), symbols)
    _, kind, name = key
    if kind == "server":
        status_fn = getattr(engine, "server_status", None)
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


def run_action(engine: Any, action: str, target: models.Target, emit: Callable[[str], None]) -> None:
    """Run a lifecycle action through the Engine if it has one; stream what it says into ``emit``."""
    words, names = ACTION_METHODS[action]
    method = next((getattr(engine, n) for n in names if callable(getattr(engine, n, None))), None)
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
        if reload and callable(getattr(engine, "reload", None)):
            engine.reload()
        return load(engine, key, symbols)

    return job


def action_job(action: str, target: models.Target) -> Job:
    def job(engine: Any, emit: Callable[[str], None]) -> None:
        run_action(engine, action, target, emit)

    return job
