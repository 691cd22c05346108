"""Load a directory of YAML definitions into one validated :class:`Definitions`.

Any file may hold any of the top-level sections ``labels``, ``groups``, ``alerts``, ``sizes`` and
``secrets``; a name defined twice (in one file or across files) is an error. All problems are
collected and reported as ``file:line: what was expected``; nothing is returned unless the whole
directory is valid, so a caller never applies half a change.
"""

from __future__ import annotations

import difflib
import pathlib
import re
from collections.abc import Callable, Iterable
from typing import Any

from lab.common.config import _yaml
from lab.common.config._yaml import LMap, LSeq
from lab.common.config.model import (
    SECRET_TYPES,
    SEVERITIES,
    Alert,
    Definitions,
    Exclude,
    Group,
    Label,
    Location,
    Secret,
    Selector,
    Size,
)
from lab.common.errors import ConfigError

SECTIONS = ("labels", "groups", "alerts", "sizes", "secrets")
NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62})$")
SERVER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,252})$")
SECRET_PATH_RE = re.compile(r"^[a-z0-9_][a-z0-9_.-]*(?:/[a-z0-9_][a-z0-9_.-]*)*$")
PUPPET_CLASS_RE = re.compile(r"^(?:::)?[a-z][a-z0-9_]*(?:::[a-z][a-z0-9_]*)*$")
DURATION_RE = re.compile(r"^(\d+)(s|m|h|d|w)$")
MEMORY_RE = re.compile(r"^(\d+)\s*(MB|GB|TB|MiB|GiB|TiB)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MEMORY_MB = {"MB": 1, "MiB": 1, "GB": 1024, "GiB": 1024, "TB": 1024 * 1024, "TiB": 1024 * 1024}
MAX_PROBLEMS = 50


def parse_duration(text: str) -> int:
    """``90d``, ``24h``, ``5m``, ``30s``, ``2w`` → seconds; ValueError otherwise."""
    m = DURATION_RE.match(text.strip()) if isinstance(text, str) else None
    if not m or int(m.group(1)) == 0:
        raise ValueError(text)
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(seconds: int) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds % _DURATION_UNITS[unit] == 0:
            return f"{seconds // _DURATION_UNITS[unit]}{unit}"
    return f"{seconds}s"


def load_definitions(root: str | pathlib.Path) -> Definitions:
    """Read every ``*.yaml``/``*.yml`` below ``root`` (sorted, hidden files skipped)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ConfigError("definitions directory does not exist (run `lab init --local` or pass --definitions DIR)", str(root))
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix in (".yaml", ".yml")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    docs: list[tuple[str, Any]] = []
    problems: list[ConfigError] = []
    for path in files:
        try:
            docs.append((str(path), _yaml.load_file(path)))
        except ConfigError as exc:
            problems.append(exc)
    return _build(docs, root, problems)


def load_texts(texts: Iterable[tuple[str, str]]) -> Definitions:
    """Validate in-memory YAML documents given as (name, text); used by tests and tools."""
    docs: list[tuple[str, Any]] = []
    problems: list[ConfigError] = []
    for name, text in texts:
        try:
            docs.append((name, _yaml.load_text(text, name)))
        except ConfigError as exc:
            problems.append(exc)
    return _build(docs, None, problems)


def _raise_problems(problems: list[ConfigError]) -> None:
    first = problems[0]
    if len(problems) > 1:
        more = len(problems) - 1
        err = ConfigError(f"{first.message} (and {more} more problem{'s' if more > 1 else ''})", first.file, first.line)
    else:
        err = ConfigError(first.message, first.file, first.line)
    err.problems = problems  # type: ignore[attr-defined]
    raise err


class _Checker:
    """Collects problems for one file while the sections are read."""

    def __init__(self, file: str, problems: list[ConfigError]) -> None:
        self.file = file
        self.problems = problems

    def fail(self, line: int | None, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(ConfigError(message, self.file, line))

    def loc(self, line: int) -> Location:
        return Location(self.file, line)

    def mapping(self, value: Any, line: int, what: str) -> LMap | None:
        if isinstance(value, LMap):
            return value
        self.fail(line, f"{what}: expected a mapping, got {_kind(value)}")
        return None

    def keys(self, m: LMap, allowed: Iterable[str], what: str) -> None:
        allowed = tuple(allowed)
        for key in m:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else f" (expected one of: {', '.join(allowed)})"
                self.fail(m.line_of(key), f"{what}: unknown key '{key}'{tip}")

    def string(self, m: LMap, key: str, what: str, pattern: re.Pattern[str] | None = None) -> str | None:
        if key not in m or m[key] is None:
            return None
        value = m[key]
        if not isinstance(value, str) or not value.strip():
            self.fail(m.line_of(key), f"{what}: '{key}' must be text, got {_kind(value)}")
            return None
        if pattern is not None and not pattern.match(value):
            self.fail(m.line_of(key), f"{what}: '{key}' has an invalid value '{value}'")
            return None
        return value

    def integer(self, m: LMap, key: str, what: str, lo: int, hi: int) -> int | None:
        if key not in m:
            return None
        value = m[key]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.fail(m.line_of(key), f"{what}: '{key}' must be a whole number from {lo} to {hi}, got {value!r}")
            return None
        return value

    def boolean(self, m: LMap, key: str, what: str) -> bool | None:
        if key not in m:
            return None
        if not isinstance(m[key], bool):
            self.fail(m.line_of(key), f"{what}: '{key}' must be true or false, got {m[key]!r}")
            return None
        return m[key]

    def duration(self, m: LMap, key: str, what: str) -> int | None:
        if key not in m or m[key] is None:
            return None
        try:
            return parse_duration(m[key])
        except ValueError:
            self.fail(m.line_of(key), f"{what}: '{key}' must be a duration like 30s, 5m, 24h, 90d or 2w, got {m[key]!r}")
            return None

    def names(
        self, m: LMap, key: str, what: str, pattern: re.Pattern[str], scalar_ok: bool = False
    ) -> tuple[str, ...]:
        """A list of names (or one name where ``scalar_ok``); duplicates are an error."""
        if key not in m or m[key] is None:
            return ()
        value = m[key]
        line = m.line_of(key)
        if isinstance(value, str) and scalar_ok:
            items, lines = [value], [line]
        elif isinstance(value, LSeq):
            items, lines = list(value), [value.line_of(i) for i in range(len(value))]
        else:
            expected = "a name or a list of names" if scalar_ok else "a list"
            self.fail(line, f"{what}: '{key}' must be {expected}, got {_kind(value)}")
            return ()
        out: list[str] = []
        for item, item_line in zip(items, lines):
            if not isinstance(item, str):
                self.fail(item_line, f"{what}: '{key}' entries must be text, got {_kind(item)}")
            elif not pattern.match(item):
                self.fail(item_line, f"{what}: '{key}' has an invalid entry '{item}'")
            elif item in out:
                self.fail(item_line, f"{what}: '{key}' lists '{item}' twice")
            else:
                out.append(item)
        return tuple(out)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    return {LMap: "a mapping", LSeq: "a list", str: f"text '{value}'", int: f"the number {value}", float: f"the number {value}"}.get(
        type(value), type(value).__name__
    )


# Reference checks run after all files are read; each entry: (kind, name, file, line, context).
_Ref = tuple[str, str, str, int, str]


class _Builder:
    def __init__(self, problems: list[ConfigError]) -> None:
        self.problems = problems
        self.labels: dict[str, Label] = {}
        self.groups: dict[str, Group] = {}
        self.alerts: dict[str, Alert] = {}
        self.sizes: dict[str, Size] = {}
        self.secrets: dict[str, Secret] = {}
        self.refs: list[_Ref] = []
        self.group_edges: dict[str, list[tuple[str, int, str]]] = {}

    # -- sections ---------------------------------------------------------------------------

    def document(self, file: str, data: Any) -> None:
        c = _Checker(file, self.problems)
        if data is None:
            return
        top = c.mapping(data, 1, "file")
        if top is None:
            return
        c.keys(top, SECTIONS, "top level")
        readers: dict[str, Callable[[_Checker, Any, int], None]] = {
            "labels": self.read_labels,
            "groups": self.read_groups,
            "alerts": self.read_alerts,
            "sizes": self.read_sizes,
            "secrets": self.read_secrets,
        }
        for section, reader in readers.items():
            if section in top and top[section] is not None:
                reader(c, top[section], top.line_of(section))

    def _named_entries(self, c: _Checker, data: Any, line: int, section: str, pattern: re.Pattern[str], seen: dict[str, Any]):
        m = c.mapping(data, line, section)
        if m is None:
            return
        for name, body in m.items():
            where = m.line_of(name)
            if not pattern.match(name):
                c.fail(where, f"{section}: invalid name '{name}'")
                continue
            if name in seen:
                prev = seen[name].location
                c.fail(where, f"{section}: '{name}' is already defined at {prev}")
                continue
            if body is None:
                body = LMap()
                body.line, body.key_lines = where, {}
            entry = c.mapping(body, where, f"{section[:-1]} '{name}'")
            if entry is not None:
                yield name, entry, where

    def read_labels(self, c: _Checker, data: Any, line: int) -> None:
        for name, m, where in self._named_entries(c, data, line, "labels", NAME_RE, self.labels):
            what = f"label '{name}'"
            c.keys(m, ("puppet_classes", "ports", "size", "alerts", "secrets", "description"), what)
            ports = self._ports(c, m, what)
            label = Label(
                name=name,
                puppet_classes=c.names(m, "puppet_classes", what, PUPPET_CLASS_RE),
                ports=ports,
                size=c.string(m, "size", what, NAME_RE),
                alerts=c.names(m, "alerts", what, NAME_RE),
                secrets=c.names(m, "secrets", what, SECRET_PATH_RE),
                description=c.string(m, "description", what) or "",
                location=c.loc(where),
            )
            if label.size:
                self.refs.append(("size", label.size, c.file, m.line_of("size"), what))
            for i, path in enumerate(label.secrets):
                self.refs.append(("secret", path, c.file, _item_line(m, "secrets", i), what))
            self.labels[name] = label

    def _ports(self, c: _Checker, m: LMap, what: str) -> tuple[int, ...]:
        if "ports" not in m:
            return ()
        value = m["ports"]
        if not isinstance(value, LSeq):
            c.fail(m.line_of("ports"), f"{what}: 'ports' must be a list of port numbers, got {_kind(value)}")
            return ()
        out: list[int] = []
        for i, port in enumerate(value):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                c.fail(value.line_of(i), f"{what}: ports must be numbers from 1 to 65535, got {port!r}")
            elif port not in out:
                out.append(port)
        return tuple(out)

    def read_groups(self, c: _Checker, data: Any, line: int) -> None:
        for name, m, where in self._named_entries(c, data, line, "groups", NAME_RE, self.groups):
            what = f"group '{name}'"
            c.keys(m, ("match", "groups", "servers", "exclude", "description"), what)
            match = None
            if "match" in m:
                match = self._selector(c, m["match"], m.line_of("match"), f"{what} match", ("labels", "environment", "region"))
            subgroups = c.names(m, "groups", what, NAME_RE)
            servers = c.names(m, "servers", what, SERVER_RE)
            exclude = self._exclude(c, m, what)
            if match is None and not subgroups and not servers and "match" not in m:
                c.fail(where, f"{what}: selects nothing; give 'match', 'groups' or 'servers'")
            for i, sub in enumerate(subgroups):
                sub_line = _item_line(m, "groups", i)
                self.refs.append(("group", sub, c.file, sub_line, what))
                self.group_edges.setdefault(name, []).append((sub, sub_line, c.file))
            if exclude is not None:
                for sub in sorted(exclude.groups):
                    self.group_edges.setdefault(name, []).append((sub, m.line_of("exclude"), c.file))
            self.groups[name] = Group(
                name=name,
                match=match,
                groups=subgroups,
                servers=servers,
                exclude=exclude,
                description=c.string(m, "description", what) or "",
                location=c.loc(where),
            )

    def _selector(self, c: _Checker, data: Any, line: int, what: str, keys: tuple[str, ...]) -> Selector | None:
        m = c.mapping(data, line, what)
        if m is None:
            return None
        c.keys(m, keys, what)
        sel = Selector(
            labels=frozenset(c.names(m, "labels", what, NAME_RE, scalar_ok=True)) if "labels" in keys else frozenset(),
            groups=frozenset(c.names(m, "groups", what, NAME_RE, scalar_ok=True)) if "groups" in keys else frozenset(),
            environments=frozenset(c.names(m, "environment", what, NAME_RE, scalar_ok=True)),
            regions=frozenset(c.names(m, "region", what, NAME_RE, scalar_ok=True)),
            servers=frozenset(c.names(m, "servers", what, SERVER_RE, scalar_ok=True)) if "servers" in keys else frozenset(),
        )
        for key, kind in (("labels", "label"), ("groups", "group")):
            if key in m:
                for value in sorted(getattr(sel, key)):
                    self.refs.append((kind, value, c.file, m.line_of(key), what))
        if sel.is_empty():
            c.fail(line, f"{what}: selects nothing; give at least one of {', '.join(keys)}")
            return None
        return sel

    def _exclude(self, c: _Checker, m: LMap, what: str) -> Exclude | None:
        if "exclude" not in m or m["exclude"] is None:
            return None
        line = m.line_of("exclude")
        ex = c.mapping(m["exclude"], line, f"{what} exclude")
        if ex is None:
            return None
        where = f"{what} exclude"
        c.keys(ex, ("servers", "groups", "labels", "environment", "region"), where)
        groups = frozenset(c.names(ex, "groups", where, NAME_RE, scalar_ok=True))
        for g in sorted(groups):
            self.refs.append(("group", g, c.file, ex.line_of("groups"), where))
        attrs = Selector(
            labels=frozenset(c.names(ex, "labels", where, NAME_RE, scalar_ok=True)),
            environments=frozenset(c.names(ex, "environment", where, NAME_RE, scalar_ok=True)),
            regions=frozenset(c.names(ex, "region", where, NAME_RE, scalar_ok=True)),
        )
        for label in sorted(attrs.labels):
            self.refs.append(("label", label, c.file, ex.line_of("labels"), where))
        result = Exclude(
            servers=frozenset(c.names(ex, "servers", where, SERVER_RE, scalar_ok=True)),
            groups=groups,
            attributes=None if attrs.is_empty() else attrs,
        )
        if not result.servers and not result.groups and result.attributes is None:
            c.fail(line, f"{where}: excludes nothing; give servers, groups, labels, environment or region")
            return None
        return result

    def read_alerts(self, c: _Checker, data: Any, line: int) -> None:
        if not isinstance(data, LSeq):
            c.fail(line, f"alerts: expected a list of alerts (- name: ...), got {_kind(data)}")
            return
        for i, body in enumerate(data):
            where = data.line_of(i)
            m = c.mapping(body, where, f"alerts entry {i + 1}")
            if m is None:
                continue
            name = c.string(m, "name", f"alerts entry {i + 1}", NAME_RE)
            if name is None:
                if "name" not in m:
                    c.fail(where, f"alerts entry {i + 1}: 'name' is required")
                continue
            what = f"alert '{name}'"
            if name in self.alerts:
                c.fail(where, f"alerts: '{name}' is already defined at {self.alerts[name].location}")
                continue
            c.keys(m, ("name", "target", "condition", "severity", "for", "description"), what)
            condition = c.string(m, "condition", what)
            if condition is None and "condition" not in m:
                c.fail(where, f"{what}: 'condition' is required (e.g. disk_usage_percent > 85)")
            severity = c.string(m, "severity", what) or "warning"
            if severity not in SEVERITIES:
                c.fail(m.line_of("severity"), f"{what}: 'severity' must be one of {', '.join(SEVERITIES)}, got '{severity}'")
            target = exclude = None
            if "target" not in m:
                c.fail(where, f"{what}: 'target' is required (labels, groups, environment, region or servers)")
            else:
                tline = m.line_of("target")
                tm = c.mapping(m["target"], tline, f"{what} target")
                if tm is not None:
                    keys = ("labels", "groups", "environment", "region", "servers")
                    plain = LMap((k, v) for k, v in tm.items() if k != "exclude")
                    plain.line, plain.key_lines = tm.line, tm.key_lines
                    target = self._selector(c, plain, tline, f"{what} target", keys)
                    exclude = self._exclude(c, tm, f"{what} target")
            if target is None or condition is None:
                continue
            self.alerts[name] = Alert(
                name=name,
                target=target,
                condition=condition,
                severity=severity,
                for_seconds=c.duration(m, "for", what),
                exclude=exclude,
                description=c.string(m, "description", what) or "",
                location=c.loc(where),
            )

    def read_sizes(self, c: _Checker, data: Any, line: int) -> None:
        for name, m, where in self._named_entries(c, data, line, "sizes", NAME_RE, self.sizes):
            what = f"size '{name}'"
            c.keys(m, ("abstract", "providers", "description"), what)
            cores = memory = disk = None
            if "abstract" in m:
                a = c.mapping(m["abstract"], m.line_of("abstract"), f"{what} abstract")
                if a is not None:
                    c.keys(a, ("cores", "memory", "disk"), f"{what} abstract")
                    cores = c.integer(a, "cores", f"{what} abstract", 1, 100_000)
                    memory = self._memory(c, a, "memory", f"{what} abstract")
                    disk = c.string(a, "disk", f"{what} abstract")
            providers: dict[str, dict[str, Any]] = {}
            if "providers" in m:
                p = c.mapping(m["providers"], m.line_of("providers"), f"{what} providers")
                for provider, mapping in (p or {}).items():
                    pm = c.mapping(mapping, p.line_of(provider), f"{what} provider '{provider}'")
                    if pm is None:
                        continue
                    for k, v in pm.items():
                        if not isinstance(v, (str, int, float, bool)):
                            c.fail(pm.line_of(k), f"{what} provider '{provider}': '{k}' must be a plain value, got {_kind(v)}")
                    providers[provider] = dict(pm)
            self.sizes[name] = Size(name, cores, memory, disk, providers, c.loc(where))

    def _memory(self, c: _Checker, m: LMap, key: str, what: str) -> int | None:
        if key not in m:
            return None
        mm = MEMORY_RE.match(str(m[key])) if isinstance(m[key], str) else None
        if not mm:
            c.fail(m.line_of(key), f"{what}: '{key}' must look like 8GB or 8192MB, got {m[key]!r}")
            return None
        return int(mm.group(1)) * _MEMORY_MB[mm.group(2)]

    def read_secrets(self, c: _Checker, data: Any, line: int) -> None:
        for path, m, where in self._named_entries(c, data, line, "secrets", SECRET_PATH_RE, self.secrets):
            what = f"secret '{path}'"
            c.keys(
                m,
                ("type", "generator", "rotate_every", "per_machine", "owner", "group", "mode", "set_by", "ttl", "description"),
                what,
            )
            kind = c.string(m, "type", what) or "static"
            if kind not in SECRET_TYPES:
                c.fail(m.line_of("type"), f"{what}: 'type' must be static or dynamic, got '{kind}'")
            generator = c.string(m, "generator", what, NAME_RE)
            if kind == "dynamic" and generator is None and "generator" not in m:
                c.fail(where, f"{what}: a dynamic secret needs a 'generator' (e.g. ca, acme, random, kubernetes)")
            if kind == "static" and generator is not None:
                c.fail(m.line_of("generator"), f"{what}: 'generator' only applies to type: dynamic")
            self.secrets[path] = Secret(
                path=path,
                type=kind,
                generator=generator,
                rotate_every=c.duration(m, "rotate_every", what),
                per_machine=bool(c.boolean(m, "per_machine", what)),
                owner=c.string(m, "owner", what, NAME_RE) or "root",
                group=c.string(m, "group", what, NAME_RE) or "root",
                mode=self._mode(c, m, what),
                set_by=c.string(m, "set_by", what),
                ttl=c.duration(m, "ttl", what),
                description=c.string(m, "description", what) or "",
                location=c.loc(where),
            )

    def _mode(self, c: _Checker, m: LMap, what: str) -> int:
        if "mode" not in m:
            return 0o400
        value = m["mode"]
        # YAML reads 0600 as octal int 384 (YAML 1.1) and '0600' as text; accept both.
        if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
            return int(value, 8)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
            return value
        c.fail(m.line_of("mode"), f"{what}: 'mode' must be an octal file mode like '0600', got {value!r}")
        return 0o400

    # -- cross references --------------------------------------------------------------------

    def check_references(self) -> None:
        known = {"label": self.labels, "group": self.groups, "secret": self.secrets, "size": self.sizes}
        for kind, name, file, line, context in self.refs:
            table = known[kind]
            if name not in table:
                hint = difflib.get_close_matches(name, list(table), n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.problems.append(ConfigError(f"{context}: references undefined {kind} '{name}'{tip}", file, line))
        # A label's `alerts` may name a defined alert or a named check: both are valid.
        self._check_cycles()

    def _check_cycles(self) -> None:
        """Depth-first search without recursion, so no nesting depth can crash the loader."""
        done: set[str] = set()
        for start in self.groups:
            if start in done:
                continue
            stack: list[tuple[str, int]] = [(start, 0)]
            on_path: list[str] = [start]
            while stack:
                name, index = stack[-1]
                edges = self.group_edges.get(name, ())
                if index == len(edges):
                    stack.pop()
                    on_path.pop()
                    done.add(name)
                    continue
                stack[-1] = (name, index + 1)
                sub, line, file = edges[index]
                if sub not in self.groups or sub in done:
                    continue
                if sub in on_path:
                    cycle = on_path[on_path.index(sub) :] + [sub]
                    self.problems.append(ConfigError(f"group nesting forms a cycle: {' → '.join(cycle)}", file, line))
                    continue
                stack.append((sub, 0))
                on_path.append(sub)


def _item_line(m: LMap, key: str, index: int) -> int:
    value = m.get(key)
    return value.line_of(index) if isinstance(value, LSeq) else m.line_of(key)


def _build(docs: list[tuple[str, Any]], root: pathlib.Path | None, problems: list[ConfigError]) -> Definitions:
    builder = _Builder(problems)
    for file, data in docs:
        builder.document(file, data)
    if not problems:
        builder.check_references()
    if problems:
        _raise_problems(problems)
    return Definitions(
        root=root,
        labels=builder.labels,
        groups=builder.groups,
        alerts=builder.alerts,
        sizes=builder.sizes,
        secrets=builder.secrets,
        files=tuple(name for name, _ in docs),
    )
