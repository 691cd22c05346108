"""What each screen of `lab dash` shows, computed from the Engine's plain data.

Pure: no urwid, no I/O. A list screen is a :class:`Table` (columns, rows, each row with the thing
Enter drills into); a detail screen is a :class:`Detail` (a title, facts, and sections of lines in
a left and a right column, each line optionally cross-linked to another thing). The widgets in
:mod:`lab.coordinator.tui.widgets` only draw these.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SERVERS, LABELS, GROUPS, ALERTS, SECRETS = "servers", "labels", "groups", "alerts", "secrets"
VIEWS = (SERVERS, LABELS, GROUPS, ALERTS, SECRETS)
KIND_OF_VIEW = {SERVERS: "server", LABELS: "label", GROUPS: "group", ALERTS: "alert", SECRETS: "secret"}
VIEW_OF_KIND = {k: v for v, k in KIND_OF_VIEW.items()}
PILLARS = ("sync", "puppet", "health", "identity")
MAX_NATURAL = 48  # a column never asks for more cells than this; the rest is clipped

# pillar value → state (the palette has one style per state)
_PILLAR_STATE = {
    "sync": "ok",
    "ok": "ok",
    "applied": "ok",
    "healthy": "ok",
    "enrolled": "ok",
    "drift": "warn",
    "pending": "warn",
    "expiring": "warn",
    "failed": "fail",
    "firing": "fail",
    "error": "fail",
    "expired": "fail",
    "revoked": "fail",
    "not enrolled": "off",
    "unknown": "unknown",
}
SYMBOLS: Mapping[str, str] = {"ok": "✓", "warn": "⚠", "fail": "✗", "unknown": "?", "off": "–"}
ASCII_SYMBOLS: Mapping[str, str] = {"ok": "+", "warn": "!", "fail": "x", "unknown": "?", "off": "-"}
SEVERITY_STYLE = {"critical": "fail", "warning": "warn", "info": "info"}
_STATE_STYLE = {"ok": "ok", "warn": "warn", "fail": "fail", "unknown": "unknown", "off": "off"}


def cells(text: str) -> int:
    """Terminal cells a string takes (wide East Asian characters count twice)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` cells, ending in … when cut, padded with spaces to ``width``."""
    if width <= 0:
        return ""
    n = cells(text)
    if n <= width:
        return text + " " * (width - n)
    out, used = [], 0
    for ch in text:
        w = cells(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…" + " " * (width - 1 - used)


def pillar_state(value: str | None) -> str:
    """ok, warn, fail, unknown or off for a pillar value (``2 alerts`` and the like are warn)."""
    value = value or "unknown"
    if value.startswith("unknown"):  # "unknown (source down)"
        return "unknown"
    return _PILLAR_STATE.get(value, "warn")


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Something a line links to: ``kind`` is server, label, group, alert or secret."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


# -- tables (list screens) ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Cell:
    text: str
    style: str = ""  # palette entry; "" = the row's own
    short: str = ""  # shown instead of ``text`` when the column is too narrow for it


@dataclasses.dataclass(frozen=True, slots=True)
class Column:
    title: str
    min: int  # narrowest width worth showing
    priority: int = 0  # 0 = never dropped; higher numbers are dropped first on narrow screens
    short: str = ""  # title when narrower than ``title``
    grow: bool = False  # takes the width left over
    group: str = ""  # columns of one group widen together or not at all (the four pillars)


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    key: str
    cells: tuple[Cell, ...]
    target: Target | None
    haystack: str  # lower-cased text that the filter searches


@dataclasses.dataclass(frozen=True, slots=True)
class Table:
    view: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    natural: tuple[int, ...] = ()  # widest cell per column (capped), computed once

    @classmethod
    def build(cls, view: str, title: str, columns: Sequence[Column], rows: Sequence[Row]) -> Table:
        natural = [cells(c.title) for c in columns]
        for row in rows:
            for i, c in enumerate(row.cells):
                t = c.text
                n = len(t) if t.isascii() else cells(t)
                if n > natural[i]:
                    natural[i] = min(n, MAX_NATURAL)
        return cls(view, title, tuple(columns), tuple(rows), tuple(natural))

    def filtered(self, query: str) -> tuple[Row, ...]:
        return filter_rows(self.rows, query)


def layout(columns: Sequence[Column], natural: Sequence[int], width: int, gap: int = 1) -> list[int]:
    """Width of each column for a screen ``width`` cells wide; 0 = column hidden.

    Columns are dropped (highest ``priority`` number first) until their minimum widths fit, then
    widened towards their natural widths in column order; a ``grow`` column takes what is left."""
    shown = list(range(len(columns)))
    mins = {i: max(1, min(columns[i].min, natural[i])) for i in shown}

    def need() -> int:
        return sum(mins[i] for i in shown) + gap * (len(shown) - 1)

    while len(shown) > 1 and need() > width:
        droppable = [i for i in shown if columns[i].priority > 0] or shown[1:]  # tiny screens: the first column wins
        shown.remove(max(droppable, key=lambda i: (columns[i].priority, i)))
    widths = [0] * len(columns)
    for i in shown:
        widths[i] = mins[i]
    spare = width - need()
    done: set[str] = set()
    for i in shown:
        group = columns[i].group
        if group:
            if group in done:
                continue
            done.add(group)
            members = [j for j in shown if columns[j].group == group]
            extra = sum(natural[j] - widths[j] for j in members)
            if 0 < extra <= spare:
                for j in members:
                    widths[j] = natural[j]
                spare -= extra
            continue
        extra = min(spare, natural[i] - widths[i])
        if extra > 0:
            widths[i] += extra
            spare -= extra
    growers = [i for i in shown if columns[i].grow]
    if spare > 0 and growers:
        widths[growers[0]] += spare
    if len(shown) == 1:
        widths[shown[0]] = max(0, width)
    return widths


def cell_text(cell: Cell, width: int) -> str:
    text = cell.short if cell.short and cells(cell.text) > width else cell.text
    return clip(text, width)


def title_text(column: Column, width: int) -> str:
    text = column.short if column.short and cells(column.title) > width else column.title
    return clip(text, width)


def matches(haystack: str, query: str) -> bool:
    """Every whitespace-separated term of ``query`` occurs in ``haystack``; ``!term`` must not."""
    for term in query.lower().split():
        if term.startswith("!") and len(term) > 1:
            if term[1:] in haystack:
                return False
        elif term not in haystack:
            return False
    return True


def filter_rows(rows: Sequence[Row], query: str) -> tuple[Row, ...]:
    if not query.strip():
        return tuple(rows)
    return tuple(r for r in rows if matches(r.haystack, query))


def _pillar_cell(value: str, symbols: Mapping[str, str], cache: dict[str, Cell]) -> Cell:
    cell = cache.get(value)
    if cell is None:  # cells are immutable: one per distinct value, shared by every row
        state = pillar_state(value)
        cell = cache[value] = Cell(f"{symbols[state]} {value}", state, symbols[state])
    return cell


def _hay(*parts: Any) -> str:
    return " ".join(str(p) for p in parts if p not in (None, "")).lower()


def servers_table(rows: Iterable[Mapping[str, Any]], symbols: Mapping[str, str] = SYMBOLS) -> Table:
    columns = (
        Column("NAME", 12),
        Column("PROVIDER", 5, 3, "PROV"),
        Column("ENV", 4, 4),
        Column("LABELS", 10, 2, grow=True),
        Column("SIZE", 4, 5),
        Column("SYNC", 1, 1, "S", group="pillars"),
        Column("PUPPET", 1, 1, "P", group="pillars"),
        Column("HEALTH", 1, 1, "H", group="pillars"),
        Column("IDENTITY", 1, 1, "I", group="pillars"),
    )
    cache: dict[str, Cell] = {}
    plain: dict[str, Cell] = {}
    none = Cell("—", "dim")
    out = []
    for r in rows:
        name = r["name"]
        labels = ",".join(r.get("labels") or ())
        provider, env, size = r.get("provider") or "", r.get("environment") or "", r.get("size") or ""
        sync, puppet, health, identity = (r.get(p) or "unknown" for p in PILLARS)
        out.append(
            Row(
                name,
                (
                    Cell(name),
                    plain.get(provider) or plain.setdefault(provider, Cell(provider or "—")),
                    plain.get(env) or plain.setdefault(env, Cell(env or "—")),
                    Cell(labels) if labels else none,
                    plain.get(size) or plain.setdefault(size, Cell(size or "—")),
                    _pillar_cell(sync, symbols, cache),
                    _pillar_cell(puppet, symbols, cache),
                    _pillar_cell(health, symbols, cache),
                    _pillar_cell(identity, symbols, cache),
                ),
                Target("server", name),
                f"{name} {provider} {env} {r.get('region') or ''} {labels} {size} sync:{sync} puppet:{puppet} health:{health} identity:{identity}".lower(),
            )
        )
    return Table.build(SERVERS, "Servers", columns, out)


def _joined(values: Sequence[Any]) -> str:
    return ", ".join(map(str, values)) or "—"


def labels_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    columns = (
        Column("LABEL", 12),
        Column("SERVERS", 4, 0, "SRV"),
        Column("PUPPET CLASSES", 10, 1, "PUPPET", grow=True),
        Column("ALERTS", 8, 3),
        Column("SECRETS", 8, 2),
        Column("PORTS", 5, 4),
        Column("SIZE", 4, 5),
    )
    out = [
        Row(
            r["name"],
            (
                Cell(r["name"]),
                Cell(str(r["servers"]), "dim" if not r["servers"] else ""),
                Cell(_joined(r["puppet_classes"])),
                Cell(_joined(r["alerts"])),
                Cell(_joined(r["secrets"])),
                Cell(_joined(r["ports"])),
                Cell(r.get("size") or "—"),
            ),
            Target("label", r["name"]),
            _hay(r["name"], *r["puppet_classes"], *r["alerts"], *r["secrets"], *r["ports"], r.get("size"), r.get("description")),
        )
        for r in rows
    ]
    return Table.build(LABELS, "Labels", columns, out)


def groups_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    columns = (
        Column("GROUP", 12),
        Column("SERVERS", 4, 0, "SRV"),
        Column("EXCLUDED", 4, 3, "EXCL"),
        Column("SUBGROUPS", 10, 2, "SUBGRP"),
        Column("MATCH", 10, 1, grow=True),
    )
    out = []
    for r in rows:
        match = r.get("match") or ("servers: " + ", ".join(r["explicit_servers"]) if r.get("explicit_servers") else "—")
        out.append(
            Row(
                r["name"],
                (Cell(r["name"]), Cell(str(r["servers"])), Cell(str(r["excluded"]), "warn" if r["excluded"] else "dim"), Cell(_joined(r["subgroups"])), Cell(match)),
                Target("group", r["name"]),
                _hay(r["name"], match, *r["subgroups"], *r.get("excludes", ())),
            )
        )
    return Table.build(GROUPS, "Groups", columns, out)


def alerts_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    columns = (
        Column("ALERT", 12),
        Column("SEVERITY", 4, 3, "SEV"),
        Column("SERVERS", 4, 0, "SRV"),
        Column("TARGET", 10, 1, grow=True),
        Column("CONDITION", 10, 2, "COND"),
    )
    out = []
    for r in rows:
        target = r["target"] + ("; excluding " + ", ".join(r["excludes"]) if r.get("excludes") else "")
        out.append(
            Row(
                r["name"],
                (Cell(r["name"]), Cell(r["severity"], SEVERITY_STYLE.get(r["severity"], "")), Cell(str(r["servers"])), Cell(target), Cell(r.get("condition") or "—")),
                Target("alert", r["name"]),
                _hay(r["name"], r["severity"], target, r.get("condition")),
            )
        )
    return Table.build(ALERTS, "Alerts", columns, out)


def secrets_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    """Secret metadata: the Engine never hands out values, and neither does this."""
    columns = (
        Column("SECRET", 14),
        Column("TYPE", 4, 3),
        Column("SERVERS", 4, 0, "SRV"),
        Column("USED BY", 10, 1, grow=True),
        Column("ROTATE", 4, 2, "ROT"),
    )
    out = []
    for r in rows:
        used = ", ".join(f"{u['label']} ({u['servers']})" for u in r["used_by"]) or "— (not referenced)"
        out.append(
            Row(
                r["path"],
                (Cell(r["path"]), Cell(r["type"]), Cell(str(r["servers"])), Cell(used, "" if r["used_by"] else "warn"), Cell(r.get("rotate_every") or "—")),
                Target("secret", r["path"]),
                _hay(r["path"], r["type"], used, r.get("generator")),
            )
        )
    return Table.build(SECRETS, "Secrets", columns, out)


TABLES = {SERVERS: servers_table, LABELS: labels_table, GROUPS: groups_table, ALERTS: alerts_table, SECRETS: secrets_table}


def table_for(view: str, rows: Iterable[Mapping[str, Any]], symbols: Mapping[str, str] = SYMBOLS) -> Table:
    if view == SERVERS:
        return servers_table(rows, symbols)
    return TABLES[view](rows)


# -- details (drill-down screens) --------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    text: str
    target: Target | None = None
    note: str = ""  # dimmed, after the text: where it comes from, severity, …
    style: str = ""
    depth: int = 0  # tree indentation
    note_style: str = "dim"

    @property
    def haystack(self) -> str:
        return f"{self.text} {self.note}".lower()


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    key: str  # hotkey that jumps here (l, a, p, s, g, …)
    title: str
    lines: tuple[Line, ...]
    empty: str = "none"


@dataclasses.dataclass(frozen=True, slots=True)
class Fact:
    name: str
    value: str
    style: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Detail:
    target: Target
    title: str
    facts: tuple[Fact, ...]
    left: tuple[Section, ...]
    right: tuple[Section, ...]

    @property
    def sections(self) -> tuple[Section, ...]:
        return self.left + self.right

    def links(self) -> list[Target]:
        return [ln.target for s in self.sections for ln in s.lines if ln.target is not None]

    def section(self, title: str) -> Section:
        return next(s for s in self.sections if s.title.split(" (")[0] == title)


def filter_detail(detail: Detail, query: str) -> Detail:
    if not query.strip():
        return detail

    def keep(sections: tuple[Section, ...]) -> tuple[Section, ...]:
        return tuple(dataclasses.replace(s, lines=tuple(ln for ln in s.lines if matches(ln.haystack, query)), empty="no match") for s in sections)

    return dataclasses.replace(detail, left=keep(detail.left), right=keep(detail.right))


def _source_note(source: str) -> str:
    kind, _, name = source.partition(":")
    if kind == "auto":
        return f"auto: {name}"
    return f"from {kind} {name}"


def _source_target(source: str) -> Target | None:
    kind, _, name = source.partition(":")
    return Target(kind, name) if kind in ("label", "group") and name else None


def _server_line(s: Mapping[str, Any], symbols: Mapping[str, str], note: str = "") -> Line:
    meta = ", ".join(x for x in (s.get("provider"), s.get("environment")) if x)
    if all(p in s for p in PILLARS):
        note = (note + "  " if note else "") + " ".join(symbols[pillar_state(s[p])] for p in PILLARS)
    return Line(f"{s['name']} ({meta})" if meta else s["name"], Target("server", s["name"]), note)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def server_detail(view: Mapping[str, Any], status: Mapping[str, Any] | None = None, symbols: Mapping[str, str] = SYMBOLS) -> Detail:
    """Server → its labels, groups, alerts, Puppet classes and secrets, each with its source."""
    status = dict(status or {})
    health = view.get("health") if isinstance(view.get("health"), Mapping) else None
    if health and health.get("status"):
        status["health"] = health["status"]  # show_server asks the health sources itself
    facts = [
        Fact("Provider", view.get("provider") or "—"),
        Fact("Env", view.get("environment") or "—"),
        Fact("Region", view.get("region") or "—"),
        Fact("Size", (view.get("size") or "—") + (f" ({view['size_detail']})" if view.get("size_detail") else "")),
    ]
    for p in PILLARS:
        value = status.get(p) or "unknown"
        state = pillar_state(value)
        facts.append(Fact(p.capitalize(), f"{symbols[state]} {value}", state))
    if view.get("ports"):
        facts.append(Fact("Ports", ", ".join(map(str, view["ports"]))))
    undefined = set(view.get("undefined_labels") or ())
    labels = tuple(
        Line(x, None if x in undefined else Target("label", x), "undefined: gives nothing" if x in undefined else "", "warn" if x in undefined else "")
        for x in view.get("labels") or ()
    )
    groups = tuple(Line(g, Target("group", g)) for g in view.get("groups") or ())
    secrets = tuple(
        Line(s["path"], Target("secret", s["path"]), f"({s['type']}) {_source_note(s['source'])}" if s.get("type") else _source_note(s["source"]))
        for s in view.get("secrets") or ()
    )
    alerts = tuple(
        Line(a["name"], Target("alert", a["name"]), ((a["severity"] + " ") if a.get("severity") else "") + _source_note(a["source"]), SEVERITY_STYLE.get(a.get("severity", ""), ""))
        for a in view.get("alerts") or ()
    )
    puppet = tuple(Line(c["name"], _source_target(c["source"]), _source_note(c["source"])) for c in view.get("puppet_classes") or ())
    excluded = tuple(
        Line(f"{e['kind']} {e['name']}", Target(e["kind"], e["name"]) if e["kind"] in ("group", "alert") else None, e["reason"], "warn")
        for e in view.get("excluded_from") or ()
    )
    left = [Section("l", f"Labels ({len(labels)})", labels), Section("g", f"Groups ({len(groups)})", groups), Section("s", f"Secrets ({len(secrets)})", secrets)]
    right = [Section("a", f"Alerts ({len(alerts)})", alerts), Section("p", f"Puppet Classes ({len(puppet)})", puppet)]
    if excluded:
        right.append(Section("x", f"Excluded From ({len(excluded)})", excluded))
    if health:
        firing = [Line(a, Target("alert", a), "firing", "fail") for a in health.get("alerts") or ()]
        sources = [
            Line(f"{src.get('source')}: {src.get('status')}", None, src.get("detail") or "", _STATE_STYLE[pillar_state(src.get("status"))])
            for src in health.get("sources") or ()
        ]
        if health.get("detail") and not sources:
            sources.append(Line(health["detail"], None, "", "dim"))
        left.append(Section("h", f"Health ({len(firing)} firing)", tuple(firing + sources)))
    return Detail(Target("server", view["name"]), f"Server: {view['name']}", tuple(facts), tuple(left), tuple(right))


def label_detail(view: Mapping[str, Any], symbols: Mapping[str, str] = SYMBOLS) -> Detail:
    """Label → the servers carrying it, and what it provides."""
    servers = tuple(_server_line(s, symbols) for s in view.get("servers") or ())
    facts = [Fact("Applied to", _count(len(servers), "server")), Fact("Size", (view.get("size") or "—") + (f" ({view['size_detail']})" if view.get("size_detail") else ""))]
    facts.append(Fact("Ports", ", ".join(map(str, view.get("ports") or ())) or "—"))
    if view.get("description"):
        facts.append(Fact("About", view["description"]))
    puppet = tuple(Line(c) for c in view.get("puppet_classes") or ())
    alerts = tuple(Line(a, Target("alert", a)) for a in view.get("alerts") or ())
    secrets = tuple(Line(s, Target("secret", s)) for s in view.get("secrets") or ())
    groups = tuple(Line(g, Target("group", g), "matches this label") for g in view.get("groups_matching") or ())
    right = [
        Section("p", f"Puppet Classes ({len(puppet)})", puppet),
        Section("a", f"Alerts ({len(alerts)})", alerts),
        Section("s", f"Secrets ({len(secrets)})", secrets),
        Section("g", f"Groups ({len(groups)})", groups),
    ]
    return Detail(Target("label", view["name"]), f"Label: {view['name']}", tuple(facts), (Section("v", f"Servers ({len(servers)})", servers),), tuple(right))


def subgroup_tree(name: str, subgroups: Mapping[str, Sequence[str]], counts: Mapping[str, int], depth: int = 0, seen: frozenset[str] = frozenset()) -> list[Line]:
    """The nested subgroups of ``name``, depth first, each with its member count."""
    out: list[Line] = []
    for sub in subgroups.get(name, ()):
        if sub in seen:  # definitions reject cycles; never loop on one anyway
            continue
        n = counts.get(sub)
        out.append(Line(sub, Target("group", sub), _count(n, "server") if n is not None else "", depth=depth))
        out.extend(subgroup_tree(sub, subgroups, counts, depth + 1, seen | {name, sub}))
    return out


def group_detail(view: Mapping[str, Any], all_groups: Sequence[Mapping[str, Any]] = (), symbols: Mapping[str, str] = SYMBOLS) -> Detail:
    """Group → its subgroup tree, members and exclusions."""
    members = tuple(_server_line(s, symbols) for s in view.get("members") or ())
    facts = [Fact("Members", _count(len(members), "server")), Fact("Excluded", str(len(view.get("excluded") or ())))]
    if view.get("match"):
        facts.append(Fact("Match", view["match"]))
    if view.get("description"):
        facts.append(Fact("About", view["description"]))
    if all_groups:
        tree = subgroup_tree(view["name"], {g["name"]: g["subgroups"] for g in all_groups}, {g["name"]: g["servers"] for g in all_groups})
    else:
        tree = [Line(s["name"], Target("group", s["name"]), _count(s["servers"], "server")) for s in view.get("subgroups") or ()]
    parents = tuple(Line(p, Target("group", p), "nests this group") for p in view.get("parents") or ())
    excluded = [Line(e["server"], Target("server", e["server"]), e["reason"], "warn") for e in view.get("excluded") or ()]
    rules = [Line(r["rule"], None, _count(len(r["servers"]), "server"), depth=0) for r in view.get("exclusion_rules") or ()]
    alerts = tuple(Line(a["name"], Target("alert", a["name"]), a["severity"], SEVERITY_STYLE.get(a["severity"], "")) for a in view.get("alerts") or ())
    missing = set(view.get("missing_servers") or ())
    listed = [
        Line(s, None, "not in the inventory", "warn") if s in missing else Line(s, Target("server", s), "listed by name")
        for s in view.get("explicit_servers") or ()
    ]
    right = [
        Section("t", f"Subgroups ({len(tree)})", tuple(tree)),
        Section("u", f"Part Of ({len(parents)})", parents),
        Section("x", f"Excluded ({len(excluded)})", tuple(rules + excluded)),
        Section("a", f"Alerts ({len(alerts)})", alerts),
    ]
    if listed:
        right.append(Section("n", f"Listed By Name ({len(listed)})", tuple(listed)))
    return Detail(Target("group", view["name"]), f"Group: {view['name']}", tuple(facts), (Section("v", f"Members ({len(members)})", members),), tuple(right))


def alert_detail(view: Mapping[str, Any], symbols: Mapping[str, str] = SYMBOLS) -> Detail:
    """Alert → the servers it applies to (and those excluded)."""
    def server(s: Mapping[str, Any]) -> Line:
        note = "" if s.get("source") == "target" else _source_note(s.get("source") or "")
        style = ""
        if "status" in s:  # Prometheus configured: the current value and its state
            current = s.get("current")
            shown = "—" if current is None else f"{current:g}" if isinstance(current, (int, float)) else str(current)
            state = s.get("status") or "unknown"
            note = f"currently: {shown}  {symbols[pillar_state(state)]} {state}" + (f"  {note}" if note else "")
            style = _STATE_STYLE[pillar_state(state)] if pillar_state(state) != "ok" else ""
        return Line(f"{s['name']} ({s['provider']})" if s.get("provider") else s["name"], Target("server", s["name"]), note, note_style=style or "dim")

    servers = tuple(server(s) for s in view.get("servers") or ())
    facts = [Fact("Kind", view.get("kind") or "—")]
    if view.get("kind") == "defined":
        facts += [
            Fact("Severity", view["severity"], SEVERITY_STYLE.get(view["severity"], "")),
            Fact("Condition", view.get("condition") or "—"),
            Fact("For", view.get("for") or "—"),
            Fact("Target", view.get("target") or "—"),
            Fact("Excludes", ", ".join(view.get("excludes") or ()) or "none"),
        ]
    facts.append(Fact("Applies to", _count(len(servers), "server")))
    if view.get("health_source"):
        facts.append(Fact("Values", view["health_source"], "warn"))
    excluded = tuple(Line(e["server"], Target("server", e["server"]), e["reason"], "warn") for e in view.get("excluded") or ())
    labels = tuple(Line(x, Target("label", x), "names this alert") for x in view.get("labels") or ())
    right = [Section("x", f"Excluded ({len(excluded)})", excluded), Section("l", f"Labels ({len(labels)})", labels)]
    rendered = view.get("rendered_to")
    if isinstance(rendered, Mapping):
        lines = [Line(f"Prometheus: {f}") for f in rendered.get("prometheus") or ()]
        hosts = rendered.get("naemon_hosts") or ()
        if hosts:
            lines.append(Line(f"Naemon: service check on {_count(len(hosts), 'host')}"))
        lines += [Line(c, None, "condition") for c in rendered.get("conditions") or ()]
        right.append(Section("r", f"Rendered To ({len(lines)})", tuple(lines)))
    right = tuple(right)
    return Detail(Target("alert", view["name"]), f"Alert: {view['name']}", tuple(facts), (Section("v", f"Servers ({len(servers)})", servers),), right)


def secret_detail(view: Mapping[str, Any], symbols: Mapping[str, str] = SYMBOLS) -> Detail:
    """Secret → who may read it, label by label. Metadata only: there is no value to show."""
    facts = [
        Fact("Type", view["type"] + (f" (generator: {view['generator']})" if view.get("generator") else "")),
        Fact("Rotate", view.get("rotate_every") or "—"),
        Fact("Per machine", "yes" if view.get("per_machine") else "no"),
        Fact("Delivered", f"{view.get('owner')}:{view.get('group')} {view.get('mode')}"),
    ]
    lines: list[Line] = []
    labels: list[Line] = []
    servers: set[str] = set()
    for a in view.get("accessible_by") or ():
        labels.append(Line(a["label"], Target("label", a["label"]), _count(len(a["servers"]), "server")))
        for s in a["servers"]:
            if s["name"] not in servers:
                servers.add(s["name"])
                lines.append(Line(f"{s['name']} ({s['provider']})" if s.get("provider") else s["name"], Target("server", s["name"]), f"via label {a['label']}"))
    facts.append(Fact("Readable by", _count(len(servers), "server")))
    return Detail(
        Target("secret", view["path"]),
        f"Secret: {view['path']}",
        tuple(facts),
        (Section("v", f"Servers ({len(lines)})", tuple(lines), "nothing references it — orphaned?"),),
        (Section("l", f"Granted By Labels ({len(labels)})", tuple(labels)),),
    )
