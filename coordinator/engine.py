"""The coordinator engine: state + definitions + targeting, behind the operations the CLI uses.

Every public method returns plain data (dicts, lists, strings) — exactly what ``-o json`` prints —
so the same calls can later be served over the RPC API to a remote ``lab`` or ``lab dash``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time  # PUPPET pillar staleness (coordinator/reports.py)
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from lab.common.config import Definitions, Exclude, Selector, format_duration, load_definitions
from lab.common.errors import ConfigError, NotFound, UsageError
from lab.common.targeting import Fleet, Item, ServerView
from lab.coordinator.alerts.engine_ext import AlertsMixin  # alerts + health: render, HEALTH pillar, values
from lab.coordinator.state import StateDB
from lab.coordinator.reports import describe_server as _describe_server, puppet_pillar  # agent reports: PUPPET pillar, describe
from lab.coordinator.lifecycle import spec_index as _spec_index, sync_pillar as _sync_pillar  # SYNC pillar: coordinator/lifecycle.py

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "common" / "config" / "examples"
if not EXAMPLES.is_dir():  # installed as a wheel: package data sits beside the module
    import lab.common.config as _cfg

    EXAMPLES = pathlib.Path(_cfg.__file__).parent / "examples"

DEFAULT_HOME = "~/.lab"
SETTINGS_FILE = "config.yaml"


@dataclasses.dataclass(frozen=True, slots=True)
class Paths:
    """Where one coordinator keeps its things; resolved once from flags, environment and defaults."""

    home: pathlib.Path
    definitions: pathlib.Path
    definitions_origin: str  # "flag" | "LAB_DEFINITIONS" | "config.yaml" | "default"

    @classmethod
    def resolve(cls, definitions: str | os.PathLike[str] | None = None, home: str | None = None) -> Paths:
        home_path = pathlib.Path(home or os.environ.get("LAB_HOME") or DEFAULT_HOME).expanduser()
        if definitions is not None:
            return cls(home_path, pathlib.Path(definitions).expanduser().resolve(), "flag")
        if os.environ.get("LAB_DEFINITIONS"):
            return cls(home_path, pathlib.Path(os.environ["LAB_DEFINITIONS"]).expanduser().resolve(), "LAB_DEFINITIONS")
        saved = _read_settings(home_path).get("definitions")
        if saved:
            return cls(home_path, pathlib.Path(saved), "config.yaml")
        return cls(home_path, home_path / "definitions", "default")


def _read_settings(home: pathlib.Path) -> dict[str, Any]:
    path = home / SETTINGS_FILE
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read lab settings: {exc}", str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("lab settings must be a mapping", str(path))
    return data


def _split(values: Iterable[str] | None) -> list[str]:
    """`--label a,b --label c` → [a, b, c]."""
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class ServerFilter:
    """A CLI query: the selector syntax of definitions, plus servers to leave out."""

    labels: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    environments: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, label=None, group=None, environment=None, region=None, exclude=None) -> ServerFilter:
        return cls(*(tuple(_split(v)) for v in (label, group, environment, region, exclude)))

    def selector(self) -> Selector:
        return Selector(frozenset(self.labels), frozenset(self.groups), frozenset(self.environments), frozenset(self.regions))

    def is_empty(self) -> bool:
        return not (self.labels or self.groups or self.environments or self.regions or self.exclude)


class Engine(AlertsMixin):
    """One coordinator's view of the world. Opening it never fails because of a corrupt state.db
    (the state layer restores a snapshot and says so in ``warnings``)."""

    def __init__(self, paths: Paths, state: StateDB) -> None:
        self.paths = paths
        self.state = state
        self._definitions: Definitions | None = None
        self._fleet: Fleet | None = None

    @classmethod
    def open(cls, paths: Paths) -> Engine:
        return cls(paths, StateDB.open(paths.home))

    def close(self) -> None:
        self.state.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def warnings(self) -> list[str]:
        return list(self.state.warnings)

    # -- setup -------------------------------------------------------------------------------

    @staticmethod
    def init_local(paths: Paths) -> dict[str, Any]:
        """Create LAB_HOME, state.db and (when missing) an example definitions directory."""
        paths.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        created_definitions = False
        if not paths.definitions.exists():
            shutil.copytree(EXAMPLES, paths.definitions)
            created_definitions = True
        definitions = load_definitions(paths.definitions)  # validate before recording anything
        if paths.definitions_origin == "flag":
            settings = _read_settings(paths.home)
            settings["definitions"] = str(paths.definitions)
            tmp = paths.home / (SETTINGS_FILE + ".tmp")
            tmp.write_text(yaml.safe_dump(settings, sort_keys=True))
            os.replace(tmp, paths.home / SETTINGS_FILE)
        state = StateDB.open(paths.home)
        try:
            state.snapshot()
            warnings = list(state.warnings)
        finally:
            state.close()
        from lab.coordinator.enrollment import ensure_cluster_identity  # CA, coordinator and admin identities

        cluster = ensure_cluster_identity(paths.home)
        return {
            "ca_fingerprint": cluster.ca_fingerprint,
            "home": str(paths.home),
            "state": str(paths.home / "state.db"),
            "definitions": str(paths.definitions),
            "definitions_created": created_definitions,
            "counts": {k: len(getattr(definitions, k)) for k in ("labels", "groups", "alerts", "sizes", "secrets")},
            "warnings": warnings,
        }

    # -- definitions and fleet -----------------------------------------------------------------

    @property
    def definitions(self) -> Definitions:
        if self._definitions is None:
            self._definitions = load_definitions(self.paths.definitions)
        return self._definitions

    def fleet(self) -> Fleet:
        if self._fleet is None:
            self._fleet = Fleet(self.definitions, self.state.list_servers())
        return self._fleet

    def validate(self) -> dict[str, Any]:
        d = self.definitions
        return {
            "definitions": str(self.paths.definitions),
            "files": len(d.files),
            "counts": {k: len(getattr(d, k)) for k in ("labels", "groups", "alerts", "sizes", "secrets")},
        }

    # -- inventory -----------------------------------------------------------------------------

    def add_server(
        self,
        name: str,
        provider: str,
        labels: Sequence[str],
        environment: str | None = None,
        region: str | None = None,
        size: str | None = None,
    ) -> dict[str, Any]:
        labels = _split(labels)
        self._check_labels(labels)
        if size is not None and size not in self.definitions.sizes:
            raise UsageError(f"size '{size}' is not defined (defined: {', '.join(sorted(self.definitions.sizes)) or 'none'})")
        with self.state.transaction():  # the record and its audit entry land together or not at all
            server = self.state.add_server(name, provider, labels, environment=environment, region=region, size=size)
            detail = {"provider": provider, "labels": labels, "environment": environment, "region": region, "size": size}
            self.state.audit("server.add", name, detail)
        self.state.maybe_snapshot()
        self._fleet = None
        return _server_record(server)

    def set_labels(self, name: str, labels: Sequence[str]) -> dict[str, Any]:
        labels = _split(labels)
        self._check_labels(labels)
        with self.state.transaction():
            before = self.state.get_server(name)
            self.state.set_labels(name, labels)
            self.state.audit("server.labels", name, {"before": list(before.labels), "after": labels})
        self.state.maybe_snapshot()
        self._fleet = None
        return self.show_server(name)

    def remove_server(self, name: str) -> None:
        with self.state.transaction():
            self.state.remove_server(name)
            self.state.audit("server.remove", name)
        self.state.maybe_snapshot()
        self._fleet = None

    def _check_labels(self, labels: Sequence[str]) -> None:
        undefined = [x for x in labels if x not in self.definitions.labels]
        if undefined:
            raise UsageError(
                f"label{'s' if len(undefined) > 1 else ''} not defined in {self.paths.definitions}: {', '.join(undefined)}"
            )

    # -- lab get -------------------------------------------------------------------------------

    def _selected(self, flt: ServerFilter) -> set[str] | None:
        """Names the filter selects, or None when it selects everything."""
        if flt.is_empty():
            return None
        for g in flt.groups:
            if g not in self.definitions.groups:
                raise NotFound(f"no group named '{g}'")
        return set(self.fleet().select(flt.selector(), Exclude(servers=frozenset(flt.exclude)) if flt.exclude else None))

    def get_servers(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        servers = self.state.list_servers(facts="summary")  # the pillars need only a few facts
        if not flt.is_empty():
            if flt.groups:
                chosen = self._selected(flt) or set()
                servers = [s for s in servers if s.name in chosen]
            else:  # without groups no definitions are needed: filter the records directly
                servers = [s for s in servers if _plain_match(s, flt)]
        sizes = self._label_sizes()
        sync = _spec_index(self)  # SYNC pillar: coordinator/lifecycle.py
        return self.with_health([_server_record(s, sizes, sync) for s in servers])  # HEALTH pillar: alerts/engine_ext.py

    def _label_sizes(self) -> dict[str, str]:
        """label → size, to show a server's effective size; broken definitions only cost that."""
        try:
            return {name: label.size for name, label in self.definitions.labels.items() if label.size}
        except ConfigError as exc:
            self.state.warnings.append(f"sizes not shown: {exc}")
            return {}

    def get_labels(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        d = self.definitions
        fleet = self.fleet()
        chosen = self._selected(flt)
        out = []
        for label in d.labels.values():
            servers = fleet.label_servers(label.name)
            if chosen is not None and not chosen.intersection(servers):
                continue
            out.append(
                {
                    "name": label.name,
                    "puppet_classes": list(label.puppet_classes),
                    "servers": len(servers),
                    "ports": list(label.ports),
                    "size": label.size,
                    "alerts": list(label.alerts),
                    "secrets": list(label.secrets),
                    "description": label.description,
                }
            )
        return out

    def get_groups(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        fleet = self.fleet()
        chosen = self._selected(flt)
        out = []
        for g in self.definitions.groups.values():
            view = fleet.group(g.name)
            if chosen is not None and not chosen.intersection(view.members):
                continue
            out.append(
                {
                    "name": g.name,
                    "servers": len(view.members),
                    "subgroups": list(g.groups),
                    "match": g.match.describe() if g.match else None,
                    "explicit_servers": list(g.servers),
                    "excludes": g.exclude.describe() if g.exclude else [],
                    "excluded": len(view.excluded),
                }
            )
        return out

    def get_alerts(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        fleet = self.fleet()
        chosen = self._selected(flt)
        out = []
        for a in self.definitions.alerts.values():
            servers, excluded = fleet.alert_servers(a.name)
            if chosen is not None and not chosen.intersection(servers):
                continue
            out.append(
                {
                    "name": a.name,
                    "severity": a.severity,
                    "target": a.target.describe(),
                    "excludes": a.exclude.describe() if a.exclude else [],
                    "condition": a.condition,
                    "for": format_duration(a.for_seconds) if a.for_seconds else None,
                    "servers": len(servers),
                    "excluded": len(excluded),
                }
            )
        return out

    def get_secrets(self, flt: ServerFilter = ServerFilter()) -> list[dict[str, Any]]:
        fleet = self.fleet()
        chosen = self._selected(flt)
        out = []
        for s in self.definitions.secrets.values():
            consumers = fleet.secret_consumers(s.path)
            servers = {n for _, names in consumers for n in names}
            if chosen is not None and not chosen.intersection(servers):
                continue
            out.append(
                {
                    "path": s.path,
                    "type": s.type,
                    "generator": s.generator,
                    "per_machine": s.per_machine,
                    "rotate_every": format_duration(s.rotate_every) if s.rotate_every else None,
                    "used_by": [{"label": label, "servers": len(names)} for label, names in consumers],
                    "servers": len(servers),
                }
            )
        # [secret-store] LAST ROTATED / SET BY from the store (coordinator/cli/secret_cmd.py; never values)
        from lab.coordinator.cli.secret_cmd import annotate_rotation

        annotate_rotation(self.paths.home, out, self.state.warnings)
        return out

    # -- lab show / targets ----------------------------------------------------------------------

    def show_server(self, name: str) -> dict[str, Any]:
        record = self.state.get_server(name)
        view = self.fleet().server(name)
        out = _server_view(record, view, self.definitions)
        out["health"] = self.server_health(name)  # alerts/engine_ext.py
        return out

    def show_label(self, name: str) -> dict[str, Any]:
        d = self.definitions
        if name not in d.labels:
            raise NotFound(f"no label named '{name}'")
        label = d.labels[name]
        fleet = self.fleet()
        servers = [_server_record(fleet.servers[n]) for n in fleet.label_servers(name)]
        size = d.sizes.get(label.size) if label.size else None
        return {
            "name": name,
            "description": label.description,
            "servers": servers,
            "puppet_classes": list(label.puppet_classes),
            "alerts": list(label.alerts),
            "secrets": list(label.secrets),
            "ports": list(label.ports),
            "size": label.size,
            "size_detail": size.describe() if size else None,
            "groups_matching": [g.name for g in d.groups.values() if g.match and name in g.match.labels],
            "defined_at": str(label.location) if label.location else None,
        }

    def show_group(self, name: str) -> dict[str, Any]:
        fleet = self.fleet()
        view = fleet.group(name)
        g = self.definitions.groups[name]
        return {
            "name": name,
            "description": g.description,
            "match": g.match.describe() if g.match else None,
            "members": [_server_record(fleet.servers[n]) for n in view.members],
            "subgroups": [{"name": s, "servers": n} for s, n in view.subgroups],
            "parents": list(view.parents),
            "explicit_servers": list(g.servers),
            "missing_servers": list(view.missing_servers),
            "excludes": g.exclude.describe() if g.exclude else [],
            "excluded": [{"server": s, "reason": r} for s, r in view.excluded],
            "exclusion_rules": _exclusion_rules(g.exclude, view.excluded) if g.exclude else [],
            "alerts": [{"name": a, "severity": self.definitions.alerts[a].severity} for a in view.alerts],
            "defined_at": str(g.location) if g.location else None,
        }

    def show_alert(self, name: str) -> dict[str, Any]:
        d = self.definitions
        fleet = self.fleet()
        if name in d.alerts:
            a = d.alerts[name]
            servers, excluded = fleet.alert_servers(name)
            via_labels = [lb.name for lb in d.labels.values() if name in lb.alerts]
            extra = [(s, src) for s, src in fleet.alert_servers_any(name) if s not in servers] if via_labels else []
            return self.with_alert_values({  # current values: alerts/engine_ext.py
                "name": name,
                "kind": "defined",
                "severity": a.severity,
                "condition": a.condition,
                "for": format_duration(a.for_seconds) if a.for_seconds else None,
                "target": a.target.describe(),
                "excludes": a.exclude.describe() if a.exclude else [],
                "servers": [{"name": s, "provider": _provider(fleet, s), "source": "target"} for s in servers]
                + [{"name": s, "provider": _provider(fleet, s), "source": src} for s, src in extra],
                "excluded": [{"server": s, "reason": r} for s, r in excluded],
                "labels": via_labels,
                "defined_at": str(a.location) if a.location else None,
            })
        holders = fleet.alert_servers_any(name)
        via_labels = [lb.name for lb in d.labels.values() if name in lb.alerts]
        if not holders and not via_labels:
            raise NotFound(f"no alert named '{name}' (not defined, not named by a label, not auto-generated for any server)")
        return self.with_alert_values({  # current values: alerts/engine_ext.py
            "name": name,
            "kind": "auto" if all(src.startswith("auto:") for _, src in holders) and not via_labels else "named check",
            "labels": via_labels,
            "servers": [{"name": s, "provider": _provider(fleet, s), "source": src} for s, src in holders],
            "excluded": [],
        })

    def show_secret(self, path: str) -> dict[str, Any]:
        from lab.coordinator.cli.secret_cmd import secret_reasons as _secret_reasons  # [secret-store]

        d = self.definitions
        if path not in d.secrets:
            raise NotFound(f"no secret named '{path}'")
        s = d.secrets[path]
        fleet = self.fleet()
        return {
            "path": path,
            "type": s.type,
            "generator": s.generator,
            "rotate_every": format_duration(s.rotate_every) if s.rotate_every else None,
            "per_machine": s.per_machine,
            "owner": s.owner,
            "group": s.group,
            "mode": f"{s.mode:04o}",
            "set_by": s.set_by,
            "accessible_by": [
                {"label": label, "servers": [{"name": n, "provider": _provider(fleet, n)} for n in names]}
                for label, names in fleet.secret_consumers(path)
            ],
            "defined_at": str(s.location) if s.location else None,
            # [secret-store] who is entitled and why (label → class → lab::secret call), store metadata
            **_secret_reasons(self, path),
        }

    def targets_server(self, name: str) -> dict[str, Any]:
        """Everything that targets a server, grouped by kind (the reverse query)."""
        return self.show_server(name)

    # -- live views (lab dash) -------------------------------------------------------------------

    def server_status(self, name: str) -> dict[str, Any]:
        """One server's inventory record with its four pillars (a row of `get_servers`)."""
        return _server_record(self.state.get_server(name), self._label_sizes(), _spec_index(self))  # SYNC: lifecycle.py

    def describe_server(self, name: str) -> dict[str, Any]:
        """`lab describe server NAME`: the four pillars in detail (built in coordinator/reports.py)."""
        return _describe_server(self, name, time.time())

    # -- lifecycle actions (lab dash streams what they say; the CLI has its own commands) -------

    def plan(self, name: str) -> list[str]:
        """What `lab sync server` would reconcile: the current diff, as lines."""
        from lab.coordinator import lifecycle

        return lifecycle.diff_lines(lifecycle.diff(self, name))

    def sync(self, name: str) -> list[str]:
        """`lab sync server NAME`, as lines."""
        from lab.coordinator import lifecycle

        r = lifecycle.sync(self, name)
        return [*r["done"], *(f"by hand: {m}" for m in r["by_hand"]), *lifecycle.diff_lines(r)]

    def reload(self) -> None:
        """Forget cached definitions and fleet, so the next call sees edits made elsewhere
        (definition files, other `lab` processes writing state.db)."""
        self._definitions = None
        self._fleet = None


def _exclusion_rules(ex: Exclude, excluded: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Each rule of an exclude with the servers it actually removed."""
    rules = [{"rule": f"{s} (by name)", "servers": [x for x, r in excluded if x == s and r == "by name"]} for s in sorted(ex.servers)]
    for g in sorted(ex.groups):
        why = f'member of group "{g}"'
        rules.append({"rule": f'members of group "{g}"', "servers": [x for x, r in excluded if r == why]})
    if ex.attributes is not None:
        why = f"{ex.attributes.describe()} (explicitly excluded)"
        rules.append({"rule": f"with {ex.attributes.describe()}", "servers": [x for x, r in excluded if r == why]})
    return rules


def _provider(fleet: Fleet, name: str) -> str | None:
    return getattr(fleet.servers[name], "provider", None)


def _plain_match(s: Any, flt: ServerFilter) -> bool:
    if flt.exclude and s.name in flt.exclude:
        return False
    if flt.labels and not set(flt.labels).intersection(s.labels):
        return False
    if flt.environments and s.environment not in flt.environments:
        return False
    if flt.regions and s.region not in flt.regions:
        return False
    return True


def _server_record(s: Any, label_sizes: dict[str, str] | None = None, sync: Any = None) -> dict[str, Any]:
    size = s.size
    if size is None and label_sizes:
        size = next((label_sizes[x] for x in s.labels if x in label_sizes), None)
    return {
        "name": s.name,
        "provider": s.provider,
        "labels": list(s.labels),
        "environment": s.environment,
        "region": s.region,
        "size": size,
        "sync": _sync_pillar(sync, s),  # SYNC pillar: coordinator/lifecycle.py ("unknown" without an index)
        "puppet": puppet_pillar(getattr(s, "puppet", None), time.time()),  # reports: coordinator/reports.py
        "health": "unknown",
        "identity": "revoked" if str(getattr(s, "cert_serial", None) or "").startswith("revoked:")  # [identity] identity_ops
        else "enrolled" if getattr(s, "enrolled_at", None) else (_onboarding_stage(s) or "not enrolled"),
    }


def _onboarding_stage(s: Any) -> str | None:  # baremetal onboarding stage: coordinator/providers/baremetal.py
    facts = getattr(s, "facts", None)
    if not isinstance(facts, dict) or "onboarding" not in facts:
        return None
    from lab.coordinator.providers.baremetal import identity_pillar

    return identity_pillar(facts)


def _items(items: Sequence[Item], key: str = "name") -> list[dict[str, Any]]:
    out = []
    for i in items:
        entry = {key: i.name, "source": i.source}
        if len(i.sources) > 1:
            entry["also_from"] = list(i.sources[1:])
        if i.detail:
            entry["type"] = i.detail
        out.append(entry)
    return out


def _server_view(record: Any, view: ServerView, d: Definitions) -> dict[str, Any]:
    size = d.sizes.get(view.size) if view.size else None
    alerts = _items(view.alerts)
    for a in alerts:
        if a["name"] in d.alerts:
            a["severity"] = d.alerts[a["name"]].severity
    return {
        "name": view.name,
        "provider": record.provider,
        "labels": list(view.labels),
        "groups": list(view.groups),
        "environment": view.environment,
        "region": view.region,
        "size": view.size,
        "size_source": view.size_source,
        "size_detail": size.describe() if size else None,
        "ports": list(view.ports),
        "puppet_classes": _items(view.puppet_classes),
        "alerts": alerts,
        "secrets": _items(view.secrets, key="path"),
        "excluded_from": [{"kind": e.kind, "name": e.name, "reason": e.reason} for e in view.excluded_from],
        "undefined_labels": list(view.undefined_labels),
    }
