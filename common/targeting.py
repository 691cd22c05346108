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
from lab.common import _bitset
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
class LabelItems:
    """What a server gets from its labels and recorded size alone, whatever its groups and the
    alerts that target it: the part of its :class:`ServerView` that every server with the same
    labels and size shares (see :meth:`Fleet.label_items`)."""

    puppet_classes: tuple[Item, ...]
    secrets: tuple[Item, ...]
    label_alerts: tuple[tuple[str, str], ...]  # (alert, "label:NAME") in the order the labels name them
    auto_alerts: tuple[tuple[str, str], ...]  # (alert, "auto:REASON"): size, ports, classes, identity, enrollment
    ports: tuple[int, ...]
    size: str | None
    size_source: str | None


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
    """Definitions applied to an inventory.

    Every server has a slot number; label, environment, region, group and alert memberships are
    bitsets over those slots (Python ints), so the set algebra of a whole fleet costs
    milliseconds. ``compile()`` adds per-server reverse indexes; ``relabel()`` re-evaluates one
    server alone and patches only the sets it joins or leaves."""

    def __init__(self, definitions: Definitions, servers: Iterable[ServerLike]) -> None:
        self.definitions = definitions
        self.servers: dict[str, ServerLike] = {}
        self._slot: dict[str, int] = {}
        self._names: list[str | None] = []
        slots_by: dict[str, dict[object, list[int]]] = {"label": {}, "env": {}, "region": {}}
        for s in servers:
            if s.name in self._slot:
                raise ValueError(f"server {s.name!r} listed twice")
            i = len(self._names)
            self._slot[s.name] = i
            self._names.append(s.name)
            self.servers[s.name] = s
            for label in s.labels:
                slots_by["label"].setdefault(label, []).append(i)
            slots_by["env"].setdefault(s.environment, []).append(i)
            slots_by["region"].setdefault(s.region, []).append(i)
        size = len(self._names)
        self._by_label: dict[object, int] = {k: _bitset.from_indices(v, size) for k, v in slots_by["label"].items()}
        self._by_env: dict[object, int] = {k: _bitset.from_indices(v, size) for k, v in slots_by["env"].items()}
        self._by_region: dict[object, int] = {k: _bitset.from_indices(v, size) for k, v in slots_by["region"].items()}
        self._all = (1 << size) - 1
        self._order = group_order(definitions)
        self._members: dict[str, int] | None = None
        self._group_excluded: dict[str, int] = {}
        self._alert_members: dict[str, int] | None = None
        self._alert_excluded: dict[str, int] = {}
        self._server_groups: list[list[str]] | None = None
        self._server_alerts: list[list[str]] | None = None
        self._server_excl: dict[int, tuple[list[str], list[str]]] = {}  # slot → (groups, alerts) excluding it

    # -- slots -------------------------------------------------------------------------------

    def _names_of(self, bits: int) -> list[str]:
        names = self._names
        return sorted(names[i] for i in _bitset.indices(bits))  # type: ignore[misc]

    def _bit(self, name: str) -> int:
        return 1 << self._slot[name]

    def _move(self, table: dict[object, int], old: object, new: object, bit: int) -> None:
        if old in table:
            table[old] &= ~bit
        table[new] = table.get(new, 0) | bit

    # -- whole-fleet sets --------------------------------------------------------------------

    def _select(self, sel: Selector, members: Mapping[str, int]) -> int:
        """The slots a selector holds for: each key a union, keys intersected."""
        out = self._all
        if sel.servers:
            bits = 0
            for n in sel.servers:
                if n in self._slot:
                    bits |= self._bit(n)
            out &= bits
        for values, table in ((sel.labels, self._by_label), (sel.environments, self._by_env), (sel.regions, self._by_region)):
            if values and out:
                bits = 0
                for v in values:
                    bits |= table.get(v, 0)
                out &= bits
        if sel.groups and out:
            bits = 0
            for g in sel.groups:
                bits |= members[g]
            out &= bits
        return out

    def _excluded(self, ex: Exclude | None, candidates: int, members: Mapping[str, int]) -> int:
        """The candidates ``ex`` removes."""
        if ex is None or not candidates:
            return 0
        bits = 0
        for n in ex.servers:
            if n in self._slot:
                bits |= self._bit(n)
        for g in ex.groups:
            bits |= members[g]
        if ex.attributes is not None:
            bits |= self._select(ex.attributes, members)
        return bits & candidates

    def _group_sets(self) -> dict[str, int]:
        if self._members is None:
            members: dict[str, int] = {}
            for name in self._order:
                g = self.definitions.groups[name]
                cand = self._select(g.match, members) if g.match is not None else 0
                for n in g.servers:
                    if n in self._slot:
                        cand |= self._bit(n)
                for sub in g.groups:
                    cand |= members[sub]
                excluded = self._excluded(g.exclude, cand, members)
                if excluded:
                    self._group_excluded[name] = excluded
                members[name] = cand & ~excluded
            self._members = members
        return self._members

    def _alert_sets(self) -> dict[str, int]:
        if self._alert_members is None:
            groups = self._group_sets()
            out: dict[str, int] = {}
            for name, alert in self.definitions.alerts.items():
                cand = self._select(alert.target, groups)
                excluded = self._excluded(alert.exclude, cand, groups)
                if excluded:
                    self._alert_excluded[name] = excluded
                out[name] = cand & ~excluded
            self._alert_members = out
        return self._alert_members

    def _reverse(self, sets: Mapping[str, int]) -> list[list[str]]:
        """slot → names of the sets it belongs to, in the order ``sets`` gives them."""
        per_slot: list[list[str]] = [[] for _ in self._names]
        for name, bits in sets.items():
            for i in _bitset.indices(bits):
                per_slot[i].append(name)
        return per_slot

    def compile(self) -> None:
        """Every group and alert set, and for every server the groups and alerts it is in."""
        groups = self._group_sets()
        alerts = self._alert_sets()
        self._server_groups = self._reverse({g: groups[g] for g in self.definitions.groups})
        self._server_alerts = self._reverse(alerts)
        excl: dict[int, tuple[list[str], list[str]]] = {}
        for g in self.definitions.groups:
            for i in _bitset.indices(self._group_excluded.get(g, 0)):
                excl.setdefault(i, ([], []))[0].append(g)
        for a in self.definitions.alerts:
            for i in _bitset.indices(self._alert_excluded.get(a, 0)):
                excl.setdefault(i, ([], []))[1].append(a)
        self._server_excl = excl

    def compile_all(self) -> dict[str, ServerView]:
        """Every server's complete view (compile, then assemble each view)."""
        self.compile()
        return {name: self.server(name) for name in self.servers}

    # -- one server --------------------------------------------------------------------------

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

    def _exclusions_of(self, name: str, groups: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Which groups and alerts exclude a compiled server, with the reason of each."""
        excl_groups, excl_alerts = self._server_excl.get(self._slot[name], ((), ()))
        if not excl_groups and not excl_alerts:
            return {}, {}
        s, d, in_group = self.servers[name], self.definitions, _Membership(groups)
        g_excl = {g: _exclude_reason(d.groups[g].exclude, s, in_group) or "excluded" for g in excl_groups}  # type: ignore[arg-type]
        a_excl = {a: _exclude_reason(d.alerts[a].exclude, s, in_group) or "excluded" for a in excl_alerts}  # type: ignore[arg-type]
        return g_excl, a_excl

    def server(self, name: str) -> ServerView:
        """What ``name`` gets: from the compiled indexes when present, else evaluated alone."""
        s = self.servers.get(name)
        if s is None:
            raise NotFound(f"no server named '{name}'")
        if self._server_groups is not None and self._server_alerts is not None:
            slot = self._slot[name]
            groups = self._server_groups[slot]
            alerts = self._server_alerts[slot]
            g_excl, a_excl = self._exclusions_of(name, groups)
        else:
            flags, g_excl, alerts, a_excl = self.evaluate_one(s)
            groups = [g for g in self.definitions.groups if flags[g]]
        return self._view(s, groups, _Membership(groups), alerts, g_excl, a_excl)

    def relabel(self, name: str, server: ServerLike) -> ServerView:
        """Replace one server's record (labels, environment, ...) and update every set it is in."""
        old = self.servers.get(name)
        if old is None:
            raise NotFound(f"no server named '{name}'")
        if server.name != name:
            raise ValueError("relabel cannot rename a server")
        bit = self._bit(name)
        for label in set(old.labels) - set(server.labels):
            self._by_label[label] &= ~bit
        for label in set(server.labels) - set(old.labels):
            self._by_label[label] = self._by_label.get(label, 0) | bit
        self._move(self._by_env, old.environment, server.environment, bit)
        self._move(self._by_region, old.region, server.region, bit)
        self.servers[name] = server
        if self._members is None:
            return self.server(name)
        flags, g_excl, alerts, a_excl = self.evaluate_one(server)
        if self._server_groups is None or self._server_alerts is None:
            self.compile()  # from the sets as they were, so the patch below brings them up to date
        assert self._server_groups is not None and self._server_alerts is not None
        slot = self._slot[name]
        new_groups = [g for g in self.definitions.groups if flags[g]]
        old_excl = self._server_excl.pop(slot, ((), ()))
        # Touch only the sets this server joins or leaves: each big-int operation costs microseconds.
        _patch(self._members, self._server_groups[slot], new_groups, bit)
        _patch(self._group_excluded, old_excl[0], list(g_excl), bit)
        if self._alert_members is not None:
            _patch(self._alert_members, self._server_alerts[slot], alerts, bit)
            _patch(self._alert_excluded, old_excl[1], list(a_excl), bit)
        if g_excl or a_excl:
            self._server_excl[slot] = (list(g_excl), list(a_excl))
        self._server_groups[slot] = new_groups
        self._server_alerts[slot] = alerts
        return self.server(name)

    def label_items(self, labels: Sequence[str], size: str | None) -> LabelItems:
        """What ``labels`` and a recorded ``size`` give any server: its classes, secrets, ports and
        size (recorded, else the first label's), the alerts its labels name and the auto-generated
        alerts, each with its source. Labels that are not defined give nothing."""
        d = self.definitions
        classes = _Collector()
        secrets = _Collector()
        label_alerts: dict[tuple[str, str], None] = {}
        ports: list[int] = []
        size_source = "server" if size else None
        for label in [d.labels[x] for x in labels if x in d.labels]:
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
                label_alerts[(a, src)] = None
            for p in label.ports:
                if p not in ports:
                    ports.append(p)
            if size is None and label.size:
                size, size_source = label.size, src
        auto: dict[tuple[str, str], None] = {}
        if size is not None:
            for a in SIZE_ALERTS:
                auto[(a, f"auto:size:{size}")] = None
        for p in ports:
            if p in PORT_ALERTS:
                auto[(PORT_ALERTS[p], f"auto:port:{p}")] = None
        for c in classes.names():
            for a in CLASS_ALERTS.get(c, ()):
                auto[(a, f"auto:class:{c}")] = None
        for a in IDENTITY_ALERTS:
            auto[(a, "auto:identity")] = None
        for a in ENROLLMENT_ALERTS:
            auto[(a, "auto:enrollment")] = None
        return LabelItems(
            puppet_classes=classes.items(),
            secrets=secrets.items(),
            label_alerts=tuple(label_alerts),
            auto_alerts=tuple(auto),
            ports=tuple(ports),
            size=size,
            size_source=size_source,
        )

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
        base = self.label_items(s.labels, s.size)
        alerts = _Collector()
        for a, src in base.label_alerts:
            alerts.add(a, src)
        for a in alert_names:
            alerts.add(a, _target_source(d.alerts[a], s, in_group))
        for a, src in base.auto_alerts:
            alerts.add(a, src)
        excluded = [Exclusion("group", g, why) for g, why in g_excl.items()]
        excluded += [Exclusion("alert", a, why) for a, why in a_excl.items()]
        return ServerView(
            name=s.name,
            labels=tuple(s.labels),
            environment=s.environment,
            region=s.region,
            size=base.size,
            size_source=base.size_source,
            groups=tuple(groups),
            puppet_classes=base.puppet_classes,
            alerts=alerts.items(),
            secrets=base.secrets,
            ports=base.ports,
            excluded_from=tuple(excluded),
            undefined_labels=tuple(x for x in s.labels if x not in d.labels),
        )

    # -- reverse direction -------------------------------------------------------------------

    def select(self, selector: Selector, exclude: Exclude | None = None) -> list[str]:
        """Servers a selector (with optional exclusions) picks, sorted by name."""
        groups = self._group_sets() if selector.groups or (exclude and exclude.groups) else {}
        cand = self._select(selector, groups) if not selector.is_empty() else self._all
        return self._names_of(cand & ~self._excluded(exclude, cand, groups))

    def label_servers(self, label: str) -> list[str]:
        if label not in self.definitions.labels:
            raise NotFound(f"no label named '{label}'")
        return self._names_of(self._by_label.get(label, 0))

    def group_members(self, group: str) -> list[str]:
        if group not in self.definitions.groups:
            raise NotFound(f"no group named '{group}'")
        return self._names_of(self._group_sets()[group])

    def _excluded_with_reasons(self, bits: int, ex: Exclude | None) -> list[tuple[str, str]]:
        if not bits or ex is None:
            return []
        out = []
        for n in self._names_of(bits):
            flags = _Membership(g for g in ex.groups if self._group_sets()[g] & self._bit(n))
            out.append((n, _exclude_reason(ex, self.servers[n], flags) or "excluded"))
        return out

    def group(self, name: str) -> GroupView:
        members = self.group_members(name)
        sets = self._group_sets()
        g: Group = self.definitions.groups[name]
        return GroupView(
            name=name,
            members=tuple(members),
            subgroups=tuple((sub, sets[sub].bit_count()) for sub in g.groups),
            excluded=tuple(sorted(self._excluded_with_reasons(self._group_excluded.get(name, 0), g.exclude))),
            missing_servers=tuple(s for s in g.servers if s not in self.servers),
            alerts=tuple(a.name for a in self.definitions.alerts.values() if name in a.target.groups),
            parents=tuple(p.name for p in self.definitions.groups.values() if name in p.groups),
        )

    def alert_servers(self, alert: str) -> tuple[list[str], list[tuple[str, str]]]:
        """(servers a user-defined alert applies to, [(excluded server, reason)])."""
        if alert not in self.definitions.alerts:
            raise NotFound(f"no alert named '{alert}'")
        members = self._alert_sets()[alert]
        excluded = self._excluded_with_reasons(self._alert_excluded.get(alert, 0), self.definitions.alerts[alert].exclude)
        return self._names_of(members), sorted(excluded)

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
            (label.name, self._names_of(self._by_label.get(label.name, 0)))
            for label in self.definitions.labels.values()
            if path in label.secrets
        ]


def _patch(sets: dict[str, int], before: Iterable[str], after: Iterable[str], bit: int) -> None:
    """Move one server (``bit``) from the sets named in ``before`` to those in ``after``."""
    old, new = set(before), set(after)
    for name in old - new:
        sets[name] &= ~bit
    for name in new - old:
        sets[name] = sets.get(name, 0) | bit


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
