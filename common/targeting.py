"""The one selection engine: which servers a group, alert or query selects, and what a server gets.

Meaning (the property tests check the engine against a literal reading of these rules):

* A **selector** (a group's ``match``, an alert's ``target``, a CLI query) holds for a server when
  every key it gives holds; a key holds when any of its items does (``labels: [a, b]`` = has a or b).
* An **exclude** removes a server named in its ``servers``, a member of any group in its ``groups``,
  and — when it gives labels/environment/region — a server for which all of those hold.
* A **group** contains the servers its ``match`` selects, its explicit ``servers`` (those in the
  inventory), and the members of its subgroups; its ``exclude`` then removes from all of that.
* An **alert** applies where its ``target`` holds and its ``exclude`` does not.

Every item a server receives carries its source: ``label:NAME``, ``group:NAME``,
``environment:NAME``, ``region:NAME``, ``server:NAME`` or ``auto:REASON``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from lab.common.config.model import Alert, Definitions, Exclude, Group, Selector
from lab.common.errors import NotFound

# Auto-generated alerts. Ports and Puppet classes known to need a check:
PORT_ALERTS: Mapping[int, str] = {
    443: "https_check",
    25: "smtp_check",
    587: "smtp_check",
    465: "smtp_check",
    993: "imap_check",
    22: "ssh_check",
    5432: "postgres_port_check",
    6443: "kube_apiserver_check",
}
CLASS_ALERTS: Mapping[str, tuple[str, ...]] = {
    "postgresql::server": ("postgres_process", "postgres_replication_lag"),
    "kubernetes::worker": ("kubelet_process",),
    "postfix": ("postfix_process",),
    "dovecot": ("dovecot_process",),
    "nginx": ("nginx_process",),
}
SIZE_ALERTS = ("cpu_threshold", "memory_threshold")
IDENTITY_ALERTS = ("cert_expiry",)
ENROLLMENT_ALERTS = ("puppet_run_failed", "agent_checkin_missed")


class ServerLike(Protocol):
    """What targeting needs to know of a server; the inventory's records satisfy it."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def environment(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def size(self) -> str | None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One thing a server receives, and where from (``sources[0]`` is the one shown first)."""

    name: str
    sources: tuple[str, ...]
    detail: str = ""

    @property
    def source(self) -> str:
        return self.sources[0]


@dataclasses.dataclass(frozen=True, slots=True)
class Exclusion:
    kind: str  # "group" | "alert"
    name: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class ServerView:
    """Everything one server gets, each item with its source."""

    name: str
    labels: tuple[str, ...]
    environment: str | None
    region: str | None
    size: str | None
    size_source: str | None
    groups: tuple[str, ...]
    puppet_classes: tuple[Item, ...]
    alerts: tuple[Item, ...]
    secrets: tuple[Item, ...]
    ports: tuple[int, ...]
    excluded_from: tuple[Exclusion, ...]
    undefined_labels: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class GroupView:
    name: str
    members: tuple[str, ...]
    subgroups: tuple[tuple[str, int], ...]  # (name, member count)
    excluded: tuple[tuple[str, str], ...]  # (server, reason)
    missing_servers: tuple[str, ...]  # listed explicitly but not in the inventory
    alerts: tuple[str, ...]  # alerts whose target names this group
    parents: tuple[str, ...]  # groups that nest this one


def _exclude_reason(ex: Exclude, server: ServerLike, in_group: Mapping[str, bool]) -> str | None:
    """Why ``ex`` removes ``server``, or None. ``in_group`` answers group membership."""
    if server.name in ex.servers:
        return "by name"
    for g in sorted(ex.groups):
        if in_group[g]:
            return f'member of group "{g}"'
    attrs = ex.attributes
    if attrs is not None and _holds(attrs, server, in_group):
        return f"{attrs.describe()} (explicitly excluded)"
    return None


def _holds(sel: Selector, server: ServerLike, in_group: Mapping[str, bool]) -> bool:
    if sel.servers and server.name not in sel.servers:
        return False
    if sel.environments and server.environment not in sel.environments:
        return False
    if sel.regions and server.region not in sel.regions:
        return False
    if sel.labels and sel.labels.isdisjoint(server.labels):
        return False
    if sel.groups and not any(in_group[g] for g in sel.groups):
        return False
    return True


def group_order(definitions: Definitions) -> list[str]:
    """Groups so that every group comes after those it depends on (subgroups, excluded groups)."""
    deps = {
        name: list(g.groups) + (sorted(g.exclude.groups) if g.exclude else []) for name, g in definitions.groups.items()
    }
    order: list[str] = []
    done: set[str] = set()
    for start in definitions.groups:
        if start in done:
            continue
        stack = [(start, iter(deps[start]))]
        while stack:
            name, it = stack[-1]
            for dep in it:
                if dep not in done and dep in deps:
                    stack.append((dep, iter(deps[dep])))
                    break
            else:
                stack.pop()
                if name not in done:
                    done.add(name)
                    order.append(name)
    return order


class Fleet:
    """Definitions applied to an inventory. Sets are computed once; one server can be
    re-evaluated alone (``relabel``) without recomputing the fleet."""

    def __init__(self, definitions: Definitions, servers: Iterable[ServerLike]) -> None:
        self.definitions = definitions
        self.servers: dict[str, ServerLike] = {}
        self._by_label: dict[str, set[str]] = {}
        self._by_env: dict[str | None, set[str]] = {}
        self._by_region: dict[str | None, set[str]] = {}
        for s in servers:
            self._index(s)
        self._order = group_order(definitions)
        self._members: dict[str, set[str]] | None = None
        self._group_excluded: dict[str, dict[str, str]] = {}
        self._alert_members: dict[str, set[str]] | None = None
        self._alert_excluded: dict[str, dict[str, str]] = {}
        self._server_groups: dict[str, list[str]] | None = None
        self._server_alerts: dict[str, list[str]] | None = None

    # -- indexes ------------------------------------------------------------------------------

    def _index(self, s: ServerLike) -> None:
        self.servers[s.name] = s
        for label in s.labels:
            self._by_label.setdefault(label, set()).add(s.name)
        self._by_env.setdefault(s.environment, set()).add(s.name)
        self._by_region.setdefault(s.region, set()).add(s.name)

    def _unindex(self, s: ServerLike) -> None:
        del self.servers[s.name]
        for label in s.labels:
            self._by_label.get(label, set()).discard(s.name)
        self._by_env.get(s.environment, set()).discard(s.name)
        self._by_region.get(s.region, set()).discard(s.name)

    # -- whole-fleet sets ---------------------------------------------------------------------

    def _select(self, sel: Selector, members: Mapping[str, set[str]]) -> set[str]:
        """Servers a selector holds for, as a set; smallest key first keeps intersections cheap."""
        parts: list[set[str]] = []
        if sel.servers:
            parts.append({n for n in sel.servers if n in self.servers})
        if sel.labels:
            parts.append(_union(self._by_label.get(x, ()) for x in sel.labels))
        if sel.environments:
            parts.append(_union(self._by_env.get(x, ()) for x in sel.environments))
        if sel.regions:
            parts.append(_union(self._by_region.get(x, ()) for x in sel.regions))
        if sel.groups:
            parts.append(_union(members[g] for g in sel.groups))
        if not parts:
            return set()
        parts.sort(key=len)
        out = set(parts[0])
        for p in parts[1:]:
            out &= p
            if not out:
                break
        return out

    def _excluded(self, ex: Exclude | None, candidates: set[str], members: Mapping[str, set[str]]) -> dict[str, str]:
        """The candidates ``ex`` removes, each with its reason."""
        if ex is None or not candidates:
            return {}
        out: dict[str, str] = {}
        for name in ex.servers:
            if name in candidates:
                out[name] = "by name"
        for g in sorted(ex.groups):
            for name in members[g] & candidates:
                out.setdefault(name, f'member of group "{g}"')
        if ex.attributes is not None:
            why = f"{ex.attributes.describe()} (explicitly excluded)"
            for name in self._select(ex.attributes, members) & candidates:
                out.setdefault(name, why)
        return out

    def _group_sets(self) -> dict[str, set[str]]:
        if self._members is None:
            members: dict[str, set[str]] = {}
            for name in self._order:
                g = self.definitions.groups[name]
                cand = self._select(g.match, members) if g.match is not None else set()
                cand |= {s for s in g.servers if s in self.servers}
                for sub in g.groups:
                    cand |= members[sub]
                excluded = self._excluded(g.exclude, cand, members)
                if excluded:
                    cand.difference_update(excluded)
                    self._group_excluded[name] = excluded
                members[name] = cand
            self._members = members
        return self._members

    def _alert_sets(self) -> dict[str, set[str]]:
        if self._alert_members is None:
            groups = self._group_sets()
            out: dict[str, set[str]] = {}
            for name, alert in self.definitions.alerts.items():
                cand = self._select(alert.target, groups)
                excluded = self._excluded(alert.exclude, cand, groups)
                if excluded:
                    cand.difference_update(excluded)
                    self._alert_excluded[name] = excluded
                out[name] = cand
            self._alert_members = out
        return self._alert_members

    def compile(self) -> None:
        """Compute every group and alert set and the per-server reverse indexes."""
        groups = self._group_sets()
        alerts = self._alert_sets()
        server_groups: dict[str, list[str]] = {n: [] for n in self.servers}
        for g in self.definitions.groups:  # definition order, so listings are stable
            for n in groups[g]:
                server_groups[n].append(g)
        server_alerts: dict[str, list[str]] = {n: [] for n in self.servers}
        for a in self.definitions.alerts:
            for n in alerts[a]:
                server_alerts[n].append(a)
        self._server_groups, self._server_alerts = server_groups, server_alerts

    def compile_all(self) -> dict[str, ServerView]:
        """What every server gets (the full compile)."""
        self.compile()
        return {name: self.server(name) for name in self.servers}

    # -- one server ---------------------------------------------------------------------------

    def evaluate_one(self, server: ServerLike) -> tuple[dict[str, bool], dict[str, str], list[str], dict[str, str]]:
        """Group membership and alerts for one server alone, without whole-fleet sets.
        Returns (in_group, group exclusions, alerts, alert exclusions)."""
        in_group: dict[str, bool] = {}
        g_excl: dict[str, str] = {}
        for name in self._order:
            g = self.definitions.groups[name]
            cand = (
                (g.match is not None and _holds(g.match, server, in_group))
                or server.name in g.servers
                or any(in_group[sub] for sub in g.groups)
            )
            if cand and g.exclude is not None:
                why = _exclude_reason(g.exclude, server, in_group)
                if why is not None:
                    g_excl[name] = why
                    cand = False
            in_group[name] = cand
        alerts: list[str] = []
        a_excl: dict[str, str] = {}
        for name, alert in self.definitions.alerts.items():
            if _holds(alert.target, server, in_group):
                why = _exclude_reason(alert.exclude, server, in_group) if alert.exclude else None
                if why is None:
                    alerts.append(name)
                else:
                    a_excl[name] = why
        return in_group, g_excl, alerts, a_excl

    def server(self, name: str) -> ServerView:
        """What ``name`` gets. Uses the compiled indexes when present, else evaluates alone."""
        s = self.servers.get(name)
        if s is None:
            raise NotFound(f"no server named '{name}'")
        if self._server_groups is not None and self._server_alerts is not None:
            groups = self._server_groups[name]
            alerts = self._server_alerts[name]
            g_excl = {g: ex[name] for g, ex in self._group_excluded.items() if name in ex}
            a_excl = {a: ex[name] for a, ex in self._alert_excluded.items() if name in ex}
            in_group = _Membership(groups)
        else:
            flags, g_excl, alerts, a_excl = self.evaluate_one(s)
            groups = [g for g in self.definitions.groups if flags[g]]
            in_group = _Membership(groups)
        return self._view(s, groups, in_group, alerts, g_excl, a_excl)

    def relabel(self, name: str, server: ServerLike) -> ServerView:
        """Replace one server's record (labels, environment, ...) and update every set it is in."""
        old = self.servers.get(name)
        if old is None:
            raise NotFound(f"no server named '{name}'")
        self._unindex(old)
        self._index(server)
        if self._members is None:
            return self.server(name)
        flags, g_excl, alerts, a_excl = self.evaluate_one(server)
        for g, members in self._members.items():
            if flags[g]:
                members.add(name)
            else:
                members.discard(name)
            ex = self._group_excluded.get(g)
            if ex is not None:
                ex.pop(name, None)
            if g in g_excl:
                self._group_excluded.setdefault(g, {})[name] = g_excl[g]
        if self._alert_members is not None:
            alert_set = set(alerts)
            for a, members in self._alert_members.items():
                if a in alert_set:
                    members.add(name)
                else:
                    members.discard(name)
                ex = self._alert_excluded.get(a)
                if ex is not None:
                    ex.pop(name, None)
                if a in a_excl:
                    self._alert_excluded.setdefault(a, {})[name] = a_excl[a]
        if self._server_groups is not None and self._server_alerts is not None:
            self._server_groups[name] = [g for g in self.definitions.groups if flags[g]]
            self._server_alerts[name] = alerts
        return self.server(name)

    def _view(
        self,
        s: ServerLike,
        groups: Sequence[str],
        in_group: Mapping[str, bool],
        alert_names: Sequence[str],
        g_excl: Mapping[str, str],
        a_excl: Mapping[str, str],
    ) -> ServerView:
        d = self.definitions
        labels = [d.labels[x] for x in s.labels if x in d.labels]
        classes = _Collector()
        secrets = _Collector()
        alerts = _Collector()
        ports: list[int] = []
        size, size_source = s.size, ("server" if s.size else None)
        for label in labels:
            src = f"label:{label.name}"
            for c in label.puppet_classes:
                classes.add(c, src)
            for p in label.secrets:
                secret = d.secrets.get(p)
                kind = secret.type if secret is not None else ""
                if secret is not None and secret.per_machine:
                    kind += ", per-machine"
                secrets.add(p, src, kind)
            for a in label.alerts:
                alerts.add(a, src)
            for p in label.ports:
                if p not in ports:
                    ports.append(p)
            if size is None and label.size:
                size, size_source = label.size, src
        for a in alert_names:
            alerts.add(a, _target_source(d.alerts[a], s, in_group))
        if size is not None:
            for a in SIZE_ALERTS:
                alerts.add(a, f"auto:size:{size}")
        for p in ports:
            if p in PORT_ALERTS:
                alerts.add(PORT_ALERTS[p], f"auto:port:{p}")
        for c in classes.names():
            for a in CLASS_ALERTS.get(c, ()):
                alerts.add(a, f"auto:class:{c}")
        for a in IDENTITY_ALERTS:
            alerts.add(a, "auto:identity")
        for a in ENROLLMENT_ALERTS:
            alerts.add(a, "auto:enrollment")
        excluded = [Exclusion("group", g, why) for g, why in g_excl.items()]
        excluded += [Exclusion("alert", a, why) for a, why in a_excl.items()]
        return ServerView(
            name=s.name,
            labels=tuple(s.labels),
            environment=s.environment,
            region=s.region,
            size=size,
            size_source=size_source,
            groups=tuple(groups),
            puppet_classes=classes.items(),
            alerts=alerts.items(),
            secrets=secrets.items(),
            ports=tuple(ports),
            excluded_from=tuple(excluded),
            undefined_labels=tuple(x for x in s.labels if x not in d.labels),
        )

    # -- reverse direction --------------------------------------------------------------------

    def select(self, selector: Selector, exclude: Exclude | None = None) -> list[str]:
        """Servers a selector (with optional exclusions) picks, sorted by name."""
        groups = self._group_sets() if selector.groups or (exclude and exclude.groups) else {}
        cand = self._select(selector, groups) if not selector.is_empty() else set(self.servers)
        cand.difference_update(self._excluded(exclude, cand, groups))
        return sorted(cand)

    def label_servers(self, label: str) -> list[str]:
        if label not in self.definitions.labels:
            raise NotFound(f"no label named '{label}'")
        return sorted(self._by_label.get(label, ()))

    def group_members(self, group: str) -> list[str]:
        if group not in self.definitions.groups:
            raise NotFound(f"no group named '{group}'")
        return sorted(self._group_sets()[group])

    def group(self, name: str) -> GroupView:
        members = self.group_members(name)
        sets = self._group_sets()
        g: Group = self.definitions.groups[name]
        return GroupView(
            name=name,
            members=tuple(members),
            subgroups=tuple((sub, len(sets[sub])) for sub in g.groups),
            excluded=tuple(sorted(self._group_excluded.get(name, {}).items())),
            missing_servers=tuple(s for s in g.servers if s not in self.servers),
            alerts=tuple(a.name for a in self.definitions.alerts.values() if name in a.target.groups),
            parents=tuple(p.name for p in self.definitions.groups.values() if name in p.groups),
        )

    def alert_servers(self, alert: str) -> tuple[list[str], list[tuple[str, str]]]:
        """(servers a user-defined alert applies to, [(excluded server, reason)])."""
        if alert not in self.definitions.alerts:
            raise NotFound(f"no alert named '{alert}'")
        members = self._alert_sets()[alert]
        return sorted(members), sorted(self._alert_excluded.get(alert, {}).items())

    def alert_servers_any(self, alert: str) -> list[tuple[str, str]]:
        """Every (server, source) that receives an alert of this name, from any source,
        including label lists and auto-generated alerts."""
        out = []
        for name in sorted(self.servers):
            for item in self.server(name).alerts:
                if item.name == alert:
                    out.append((name, item.source))
        return out

    def secret_consumers(self, path: str) -> list[tuple[str, list[str]]]:
        """[(label that grants the secret, its servers)] for a defined secret."""
        if path not in self.definitions.secrets:
            raise NotFound(f"no secret named '{path}'")
        return [
            (label.name, sorted(self._by_label.get(label.name, ())))
            for label in self.definitions.labels.values()
            if path in label.secrets
        ]


class _Membership(dict):
    """in_group mapping built from a list of group names; unknown groups are False."""

    def __init__(self, groups: Iterable[str]) -> None:
        super().__init__((g, True) for g in groups)

    def __missing__(self, key: str) -> bool:
        return False


class _Collector:
    """Ordered, de-duplicated items; a repeated name adds a source instead of a second item."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[list[str], str]] = {}

    def add(self, name: str, source: str, detail: str = "") -> None:
        entry = self._items.get(name)
        if entry is None:
            self._items[name] = ([source], detail)
        elif source not in entry[0]:
            entry[0].append(source)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> tuple[Item, ...]:
        return tuple(Item(n, tuple(src), det) for n, (src, det) in self._items.items())


def _target_source(alert: Alert, s: ServerLike, in_group: Mapping[str, bool]) -> str:
    """Name the target key that brings this alert to this server (groups before labels ...)."""
    t = alert.target
    for g in sorted(t.groups):
        if in_group[g]:
            return f"group:{g}"
    for x in s.labels:
        if x in t.labels:
            return f"label:{x}"
    if t.environments:
        return f"environment:{s.environment}"
    if t.regions:
        return f"region:{s.region}"
    return f"server:{s.name}"


def _union(sets: Iterable[Iterable[str]]) -> set[str]:
    out: set[str] = set()
    for s in sets:
        out |= s if isinstance(s, set) else set(s)
    return out
