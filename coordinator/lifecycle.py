"""Server lifecycle: declared spec vs what the agent reported (diff, SYNC pillar), plan, apply, sync.

The same pipeline serves every provider (docs/LIFECYCLE.md):

* :func:`declared` — a server's spec from definitions + inventory: labels, effective size
  (abstract cores/memory/disk), Puppet classes, entitled secrets, alerts;
* :func:`compare` — that spec against ``servers.facts`` (enrollment) and ``servers.puppet``
  (reports): a list of items ``{key, declared, actual, status: ok|drift|unknown, note}``;
* :func:`sync_pillar` / :class:`SpecIndex` — the SYNC pillar of ``lab get servers`` from the same
  comparison, with definitions indexed once per call (cheap dictionary work per server);
* :func:`make_plan`, :func:`save_plan`, :func:`load_plan`, :func:`check_plan` — ``lab plan server``
  writes ``$LAB_HOME/plans/NAME.json`` (atomically); ``lab apply server`` applies exactly that
  plan and refuses it when the definitions or the inventory record changed since.

Everything here is pure except the plan files; the CLI (coordinator/cli/lifecycle_cmd.py) does
the I/O (inventory writes, onboarding, policy publication).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lab.common.config import Definitions
from lab.common.errors import ConfigError, LabError, UsageError
from lab.common.fsutil import atomic_write

STATUSES = ("ok", "drift", "unknown")
PLAN_VERSION = 1
PLANS_DIR = "plans"
PROVIDERS_IMPLEMENTED = ("ssh", "manual")
NOT_IMPLEMENTED_ISSUE = {"baremetal": "issue 6 (baremetal provider, PXE: docs/PXE.md)", "aws": "the cloud providers issue",
                         "xcpng": "the cloud providers issue", "gcp": "the cloud providers issue"}  # fmt: skip
GIB = 1024**3
NOMINAL_MEMORY_SLACK = 0.10  # as lab.agent.facts._rules: MemTotal is a little below what was installed
DISK_SLACK = 0.05  # "500GB" disks hold 465.8 GiB; sold sizes vary by a few percent
_DISK_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(TB|GB|MB|TiB|GiB|MiB|T|G|M)\b\s*(nvme|ssd|hdd)?\s*$", re.IGNORECASE)
_UNIT = {"tb": 10**12, "gb": 10**9, "mb": 10**6, "t": 10**12, "g": 10**9, "m": 10**6, "tib": 1024**4, "gib": GIB, "mib": 1024**2}
_MODULE_RE = re.compile(r"/modules/([a-z][a-z0-9_]*)/")


# -- declared spec ------------------------------------------------------------------------------


def parse_disk(text: str | None) -> tuple[int | None, str | None]:
    """'500GB NVMe' → (500_000_000_000, 'nvme'); unknown forms → (None, None)."""
    if not text:
        return None, None
    m = _DISK_RE.match(text)
    if not m:
        return None, None
    return int(float(m.group(1)) * _UNIT[m.group(2).lower()]), (m.group(3) or "").lower() or None


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 10**12:.3g}TB" if n >= 10**12 else f"{n / 10**9:.3g}GB"


def fmt_memory_mb(mb: int) -> str:
    return f"{mb // 1024}GB" if mb % 1024 == 0 else f"{mb}MB"


def nominal_gb(size_bytes: int) -> int:
    """The memory size people would name (same rule as lab.agent.facts.nominal_gb)."""
    gib = size_bytes / GIB
    k = 1
    while k < gib * 2:
        for candidate in (k, 3 * k):
            if candidate >= gib >= candidate * (1 - NOMINAL_MEMORY_SLACK):
                return candidate
        k *= 2
    return round(gib)


class SpecIndex:
    """Definitions indexed for per-server work: label → classes / size / secrets / alerts, sizes.
    Built once per `lab get servers`; :meth:`spec` then costs a few dictionary look-ups."""

    __slots__ = ("defs", "label_classes", "label_size", "label_secrets", "label_alerts", "_cache")

    def __init__(self, defs: Definitions) -> None:
        self.defs = defs
        self.label_classes = {n: lb.puppet_classes for n, lb in defs.labels.items()}
        self.label_size = {n: lb.size for n, lb in defs.labels.items() if lb.size}
        self.label_secrets = {n: lb.secrets for n, lb in defs.labels.items()}
        self.label_alerts = {n: lb.alerts for n, lb in defs.labels.items()}
        self._cache: dict[tuple[Any, ...], dict[str, Any]] = {}

    def spec(self, record: Any) -> dict[str, Any]:
        """The declared spec of one inventory record (shared between records with the same labels,
        size and environment: treat as read-only)."""
        key = (record.labels, record.size, record.environment, record.region)
        found = self._cache.get(key)
        if found is not None:
            return found
        labels = list(record.labels)
        defined = [x for x in labels if x in self.label_classes]
        size, size_source = record.size, ("server" if record.size else None)
        classes: list[str] = []
        secrets: list[str] = []
        alerts: list[str] = []
        for x in defined:
            for c in self.label_classes[x]:
                if c not in classes:
                    classes.append(c)
            for p in self.label_secrets[x]:
                if p not in secrets:
                    secrets.append(p)
            for a in self.label_alerts[x]:
                if a not in alerts:
                    alerts.append(a)
            if size is None and x in self.label_size:
                size, size_source = self.label_size[x], f"label:{x}"
        sz = self.defs.sizes.get(size) if size else None
        disk_bytes, disk_kind = parse_disk(sz.disk if sz else None)
        out = {
            "labels": labels,
            "undefined_labels": [x for x in labels if x not in self.label_classes],
            "environment": record.environment,
            "region": record.region,
            "size": size,
            "size_source": size_source,
            "size_defined": sz is not None,
            "cores": sz.cores if sz else None,
            "memory_mb": sz.memory_mb if sz else None,
            "disk": sz.disk if sz else None,
            "disk_bytes": disk_bytes,
            "disk_kind": disk_kind,
            "classes": classes,
            "secrets": secrets,
            "alerts": alerts,
        }
        self._cache[key] = out
        return out


def declared(defs: Definitions, record: Any) -> dict[str, Any]:
    """The declared spec of one server (labels, size, classes, secrets, alerts)."""
    return SpecIndex(defs).spec(record)


# -- actual state -------------------------------------------------------------------------------


def hardware(facts: Any) -> dict[str, Any] | None:
    """cores (logical CPUs), memory_bytes and fixed disks from stored (parsed) facts; None without."""
    if not isinstance(facts, Mapping) or not ({"cpu", "memory_bytes", "disks"} & facts.keys()):
        return None  # none reported (baremetal onboarding keeps only its stage in facts)
    cpu = facts.get("cpu") if isinstance(facts.get("cpu"), Mapping) else {}
    cores = cpu.get("threads") or cpu.get("cores")
    disks = []
    for d in facts.get("disks") or ():
        if isinstance(d, Mapping) and not d.get("removable") and isinstance(d.get("size_bytes"), int):
            disks.append((d["size_bytes"], str(d.get("kind") or "unknown"), str(d.get("name") or "?")))
    return {
        "cores": cores if isinstance(cores, int) else None,
        "memory_bytes": facts.get("memory_bytes") if isinstance(facts.get("memory_bytes"), int) else None,
        "disks": None if facts.get("disks") is None else sorted(disks, reverse=True),
    }


def _item(key: str, declared: Any, actual: Any, status: str, note: str = "") -> dict[str, Any]:
    return {"key": key, "declared": declared, "actual": actual, "status": status, "note": note}


def _modules(run: Mapping[str, Any]) -> set[str]:
    """Puppet modules whose manifests hold a failed resource (…/modules/<module>/manifests/…)."""
    out = set()
    for f in run.get("failed_resources") or ():
        m = _MODULE_RE.search(str(f.get("file") or ""))
        if m:
            out.add(m.group(1))
    return out


def compare(spec: Mapping[str, Any], record: Any, now: float | None = None) -> list[dict[str, Any]]:
    """Declared ``spec`` (from :class:`SpecIndex`) vs the agent's reports in ``record``.

    Hardware meets the spec when it is at least as large (more cores, memory or disk is fine);
    classes are applied when the last Puppet run succeeded (or, when the agent reports the run's
    class list, when they are in it); a failed run drifts the classes whose module failed, or
    every class when the catalog itself failed; no report yet is ``unknown``."""
    from lab.coordinator.reports import puppet_pillar

    now = time.time() if now is None else now
    items: list[dict[str, Any]] = []
    hw = hardware(getattr(record, "facts", None))
    no_facts = "no hardware facts from the agent yet"

    items.append(_item("labels", ",".join(spec["labels"]) or "—", ",".join(spec["labels"]) or "—", "ok"))
    for x in spec["undefined_labels"]:
        items.append(_item(f"label {x}", None, x, "drift", "not defined in the definitions"))

    size = spec["size"]
    if size is not None:
        hw_items: list[dict[str, Any]] = []
        if spec["cores"] is not None:
            got = hw["cores"] if hw else None
            st = "unknown" if got is None else ("ok" if got >= spec["cores"] else "drift")
            hw_items.append(_item("cores", spec["cores"], got, st, no_facts if hw is None else "smaller than declared" if st == "drift" else ""))
        if spec["memory_mb"] is not None:
            mem = hw["memory_bytes"] if hw else None
            got_gb = nominal_gb(mem) if mem else None
            st = "unknown" if got_gb is None else ("ok" if got_gb * 1024 >= spec["memory_mb"] else "drift")
            hw_items.append(_item("memory", fmt_memory_mb(spec["memory_mb"]), f"{got_gb}GB" if got_gb else None, st,
                                  no_facts if hw is None else "smaller than declared" if st == "drift" else ""))
        if spec["disk"]:
            want, kind = spec["disk_bytes"], spec["disk_kind"]
            disks = hw["disks"] if hw else None
            if want is None:
                hw_items.append(_item("disk", spec["disk"], None, "unknown", f"cannot read the declared disk {spec['disk']!r}"))
            elif disks is None:
                hw_items.append(_item("disk", spec["disk"], None, "unknown", no_facts if hw is None else "disks not reported"))
            else:
                fit = [d for d in disks if d[0] >= want * (1 - DISK_SLACK) and (kind is None or d[1] == kind)]
                best = fit[0] if fit else (disks[0] if disks else None)
                actual = f"{fmt_bytes(best[0])} {best[1]}" if best else "none"
                hw_items.append(_item("disk", spec["disk"], actual, "ok" if fit else "drift", "" if fit else "no fixed disk that large" + (f" of kind {kind}" if kind else "")))
        statuses = {i["status"] for i in hw_items}
        st = "drift" if "drift" in statuses else "unknown" if ("unknown" in statuses or not spec["size_defined"]) else "ok"
        note = f"size {size!r} is not defined" if not spec["size_defined"] else no_facts if hw is None else "the machine is smaller" if st == "drift" else ""
        items.append(_item("size", size, size if st == "ok" else None, st, note))
        items.extend(hw_items)

    run = getattr(record, "puppet", None)
    run = run if isinstance(run, Mapping) and run.get("status") else None
    pillar = puppet_pillar(run, now) if run else "unknown"
    env = spec["environment"]
    if env is not None:
        got = run.get("environment") if run else None
        st = "unknown" if got is None else ("ok" if got == env else "drift")
        items.append(_item("environment", env, got, st, "no Puppet report yet" if run is None else ""))

    classes = spec["classes"]
    if classes:
        if run is None or pillar == "stale":
            why = "no Puppet report yet" if run is None else "the last Puppet run is stale"
            items.extend(_item(f"class {c}", c, None, "unknown", why) for c in classes)
        else:
            reported = run.get("classes")
            failed_mods = _modules(run) if run["status"] == "failed" else set()
            catalog_failed = run["status"] == "failed" and not run.get("failed_resources")
            for c in classes:
                if isinstance(reported, list):
                    ok = c in reported
                    why = "" if ok else "not in the last Puppet run"
                elif catalog_failed:
                    ok, why = False, "the last Puppet run failed before applying (catalog)"
                else:
                    ok = c.split("::", 1)[0] not in failed_mods
                    why = "" if ok else "resources failed in the last Puppet run"
                items.append(_item(f"class {c}", c, c if ok else None, "ok" if ok else "drift", why))
            if isinstance(reported, list):
                items.extend(_item(f"class {c}", None, c, "drift", "applied, not declared") for c in reported if c not in classes)
    if run is not None and run["status"] == "failed":
        failed = [f.get("resource") for f in run.get("failed_resources") or ()]
        items.append(_item("puppet_run", "ok", "failed", "drift", ", ".join(map(str, failed[:5])) or "catalog failed"))
    return items


def summarise(items: Sequence[Mapping[str, Any]]) -> str:
    """SYNC pillar from items: "drift" if anything drifted, "sync" if everything is ok, else "unknown"."""
    st = {i["status"] for i in items}
    if "drift" in st:
        return "drift"
    return "unknown" if "unknown" in st else "sync"


def sync_pillar(index: SpecIndex | None, record: Any, now: float | None = None) -> str:
    """The SYNC pillar of one record: "sync" | "drift" | "unknown" (no index, or nothing reported).

    Equal to ``summarise(compare(index.spec(record), record, now))`` (a unit test holds them to
    that), without building the items: `lab get servers` runs it for every server."""
    if index is None:
        return "unknown"
    hw = hardware(getattr(record, "facts", None))
    run = getattr(record, "puppet", None)
    run = run if isinstance(run, Mapping) and run.get("status") else None
    if hw is None and run is None:
        return "unknown"  # nothing reported
    spec = index.spec(record)
    if spec["undefined_labels"] or (run is not None and run["status"] == "failed"):
        return "drift"
    unknown = False
    if spec["size"] is not None:
        unknown = not spec["size_defined"]
        if spec["cores"] is not None:
            got = hw["cores"] if hw else None
            if got is None:
                unknown = True
            elif got < spec["cores"]:
                return "drift"
        if spec["memory_mb"] is not None:
            mem = hw["memory_bytes"] if hw else None
            if not mem:
                unknown = True
            elif nominal_gb(mem) * 1024 < spec["memory_mb"]:
                return "drift"
        if spec["disk"]:
            want, kind = spec["disk_bytes"], spec["disk_kind"]
            disks = hw["disks"] if hw else None
            if want is None or disks is None:
                unknown = True
            elif not any(d[0] >= want * (1 - DISK_SLACK) and (kind is None or d[1] == kind) for d in disks):
                return "drift"
    if spec["environment"] is not None:
        got_env = run.get("environment") if run else None
        if got_env is None:
            unknown = True
        elif got_env != spec["environment"]:
            return "drift"
    classes = spec["classes"]
    if classes:
        from lab.coordinator.reports import puppet_pillar

        if run is None or puppet_pillar(run, time.time() if now is None else now) == "stale":
            unknown = True
        else:
            reported = run.get("classes")
            if isinstance(reported, list) and (set(classes) != set(reported)):
                return "drift"
    return "unknown" if unknown else "sync"


def spec_index(engine: Any) -> SpecIndex | None:
    """A SpecIndex for the engine's definitions; None (pillar "unknown") when they are broken."""
    try:
        return SpecIndex(engine.definitions)
    except ConfigError as exc:
        engine.state.warnings.append(f"SYNC not computed: {exc}")
        return None


def diff(engine: Any, name: str, now: float | None = None) -> dict[str, Any]:
    """`lab diff server NAME` as data: {server, in_sync, sync, items, reported}."""
    record = engine.state.get_server(name)
    items = compare(declared(engine.definitions, record), record, now)
    pillar = summarise(items)
    return {
        "server": name,
        "in_sync": pillar == "sync",
        "sync": pillar,
        "reported": {"facts": record.facts is not None, "puppet": isinstance(record.puppet, Mapping)},
        "items": items,
    }


def diff_lines(result: Mapping[str, Any]) -> list[str]:
    """The spec's +/- rendering: unchanged lines indented, "- declared ← declared, missing",
    "+ actual ← not in spec", "? key ← unknown: why"."""
    lines: list[str] = []
    rows: list[tuple[str, str]] = []
    for i in result["items"]:
        key, d, a, st, note = i["key"], i["declared"], i["actual"], i["status"], i["note"]
        if key.startswith(("class ", "label ")):  # "class nginx" → "class: nginx"
            key, d, a = key.split(" ", 1)[0], d and key.split(" ", 1)[1], a and key.split(" ", 1)[1]
        if st == "ok":
            shown = d if d is not None else a
            rows.append((f"  {key}: {shown}", "" if a == d or a is None else f"(actual {a})"))
        elif st == "unknown":
            rows.append((f"? {key}: {d}", f"← unknown: {note or 'not reported'}"))
        else:
            if d is not None:
                rows.append((f"- {key}: {d}", "← declared, missing" + (f" ({note})" if note else "")))
            if a is not None:
                rows.append((f"+ {key}: {a}", "← not in spec" + (f" ({note})" if note and d is None else "")))
    w = max((len(a) for a, _ in rows), default=0)
    for a, b in rows:
        lines.append(f"{a}{' ' * (w - len(a))}    {b}".rstrip() if b else a)
    return lines


# -- plan / apply ---------------------------------------------------------------------------------


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()


def definitions_hash(defs: Definitions, record: Any | None) -> str:
    """sha256 over every definition file's bytes and the inventory record (labels, size,
    environment, region, provider, enrolled): what a plan was computed from."""
    h = hashlib.sha256()
    root = pathlib.Path(defs.root) if defs.root else None
    for f in sorted(defs.files):
        p = pathlib.Path(f)
        p = p if p.is_absolute() or root is None else root / p
        h.update(str(f).encode() + b"\0")
        try:
            h.update(p.read_bytes())
        except OSError:
            h.update(b"<unreadable>")
        h.update(b"\0")
    if record is not None:
        h.update(_canonical({"labels": list(record.labels), "size": record.size, "environment": record.environment,
                             "region": record.region, "provider": record.provider, "enrolled": bool(record.enrolled_at)}))  # fmt: skip
    return h.hexdigest()


class _Proposed:
    """A record-like object for a server as it would be after the plan."""

    def __init__(self, name: str, provider: str, labels: Sequence[str], environment: str | None, region: str | None, size: str | None) -> None:
        self.name, self.provider, self.labels = name, provider, tuple(labels)
        self.environment, self.region, self.size = environment, region, size
        self.facts = self.puppet = self.enrolled_at = None


def make_plan(
    defs: Definitions, name: str, current: Any | None, *, labels: Sequence[str] | None, provider: str | None,
    environment: str | None = None, region: str | None = None, size: str | None = None,
    hosts: Sequence[str] = (), ssh: Mapping[str, Any] | None = None, dns_zone: str | None = None, now: float | None = None,
) -> dict[str, Any]:
    """What `lab apply server NAME` would do, as data (nothing is written here).

    ``labels``/``environment``/``region``/``size`` None keep the current value (a new server:
    none). Changes are lines ``{op: + | ~ | -, what, value, from?}``."""
    undefined = [x for x in labels or () if x not in defs.labels]
    if undefined:
        raise UsageError(f"label{'s' if len(undefined) > 1 else ''} not defined: {', '.join(undefined)}")
    if size is not None and size not in defs.sizes:
        raise UsageError(f"size '{size}' is not defined (defined: {', '.join(sorted(defs.sizes)) or 'none'})")
    if current is None and provider is None:
        raise UsageError(f"server {name!r} is new: pass --provider (ssh, manual, baremetal, aws, xcpng, …)")
    if current is not None and provider is not None and provider != current.provider:
        raise UsageError(f"server {name!r} exists with provider {current.provider!r}; a provider change is a new server")
    prov = provider or current.provider
    new_labels = list(dict.fromkeys(labels)) if labels is not None else list(current.labels if current else [])
    new = _Proposed(
        name, prov, new_labels,
        environment if environment is not None else (current.environment if current else None),
        region if region is not None else (current.region if current else None),
        size if size is not None else (current.size if current else None),
    )  # fmt: skip
    index = SpecIndex(defs)
    after = index.spec(new)
    before = index.spec(current) if current is not None else None
    changes: list[dict[str, Any]] = []
    if current is None:
        changes.append({"op": "+", "what": "server", "value": f"{name} (provider {prov})"})

    def diff_list(what: str, old: Sequence[str], new_: Sequence[str]) -> None:
        for x in new_:
            if x not in old:
                changes.append({"op": "+", "what": what, "value": x})
        for x in old:
            if x not in new_:
                changes.append({"op": "-", "what": what, "value": x})

    diff_list("label", list(current.labels) if current else [], new_labels)
    for field in ("environment", "region"):
        old_v = getattr(current, field) if current else None
        new_v = getattr(new, field)
        if new_v != old_v:
            changes.append({"op": "~" if old_v is not None else "+", "what": field, "value": new_v, "from": old_v})
    old_size = before["size"] if before else None
    if after["size"] != old_size:
        sz = defs.sizes.get(after["size"]) if after["size"] else None
        detail = f"{after['size']} ({sz.describe()})" if sz else after["size"]
        changes.append({"op": "~" if old_size else "+", "what": "size", "value": detail, "from": old_size})
    diff_list("class", before["classes"] if before else [], after["classes"])
    diff_list("secret granted", before["secrets"] if before else [], after["secrets"])
    diff_list("alert", before["alerts"] if before else [], after["alerts"])
    if dns_zone and current is None:
        changes.append({"op": "+", "what": "DNS name", "value": f"{name}.{dns_zone}"})
    enrolled = bool(current is not None and current.enrolled_at)
    if prov == "ssh" and not enrolled:
        action = "onboard" if hosts else "inventory"
    elif prov in PROVIDERS_IMPLEMENTED:
        action = "inventory"
    else:
        action = "not-implemented"
    return {
        "version": PLAN_VERSION,
        "server": name,
        "provider": prov,
        "new": current is None,
        "enrolled": enrolled,
        "action": action,
        "hosts": list(hosts),
        "ssh": dict(ssh or {}),
        "target": {"labels": new_labels, "environment": new.environment, "region": new.region, "size": size if size is not None else (current.size if current else None)},
        "effective_size": after["size"],
        "changes": changes,
        "definitions_hash": definitions_hash(defs, current),
        "created_at": now if now is not None else time.time(),
    }


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """Human lines of a plan: '+ label: app', '~ size: large (8 cores, 32GB) (was medium)'."""
    out = []
    for c in plan["changes"]:
        was = f" (was {c['from']})" if c.get("from") not in (None, "") else ""
        out.append(f"{c['op']} {c['what']}: {c['value']}{was}")
    return out


def plan_path(home: pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(home) / PLANS_DIR / f"{name}.json"


def save_plan(home: pathlib.Path, plan: Mapping[str, Any]) -> pathlib.Path:
    """Write the plan atomically (temp file in the same directory, fsync, rename)."""
    path = plan_path(home, plan["server"])
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, json.dumps(plan, indent=2, sort_keys=True).encode(), mode=0o600)
    return path


def load_plan(home: pathlib.Path, name: str) -> dict[str, Any]:
    path = plan_path(home, name)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no plan for {name!r}: run `lab plan server {name} …` first") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the plan: {exc}", str(path)) from exc
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION or plan.get("server") != name:
        raise ConfigError("not a plan of this lab version for this server", str(path))
    return plan


def check_plan(plan: Mapping[str, Any], defs: Definitions, current: Any | None) -> None:
    """Refuse a stale plan: definitions or the server's inventory record changed since `lab plan`."""
    if (current is None) != bool(plan["new"]) or definitions_hash(defs, current) != plan["definitions_hash"]:
        raise StalePlan(f"the plan for {plan['server']!r} is stale: definitions or the inventory changed since it was made; run `lab plan server {plan['server']} …` again")


def drop_plan(home: pathlib.Path, name: str) -> None:
    plan_path(home, name).unlink(missing_ok=True)


class StalePlan(LabError):
    exit_code = 3
    code = "stale-plan"  # the RPC error code: RemoteEngine raises StalePlan again (same exit status)


def not_implemented(provider: str) -> str:
    where = NOT_IMPLEMENTED_ISSUE.get(provider, "no issue yet")
    return f"provider {provider}: not implemented yet ({where})"


def split(values: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


# -- sync: what lab can reconcile itself, and what it cannot -------------------------------------


def republish(home: Any) -> str | None:
    """Republish the signed policy when the cluster config names stores; a line to print, or None."""
    from lab.coordinator import cluster

    stores = cluster.configured_stores(home)
    if not stores:
        return None
    try:
        r = cluster.publish_policy(home, stores)
    except LabError as exc:
        return f"! policy not republished: {exc} (run `lab cluster publish` once the stores answer)"
    missed = "".join(f"; ! {ep} unreachable (gossip catches it up)" for ep in r.get("unreachable") or ())
    return f"→ policy version {r['version']} published to {len(r['stores'])} store(s){missed}"


def by_hand(item: dict[str, Any], name: str) -> str | None:
    key, st = item["key"], item["status"]
    if st != "drift" or key == "size":  # size: its cores/memory/disk lines say what is short
        return None
    if key in ("cores", "memory", "disk", "size"):
        return f"{key}: the machine has {item['actual'] or 'less'} but {item['declared']} is declared — resize it, or declare a smaller size (`lab plan server {name} --size S`)"
    if key == "environment":
        return f"environment: Puppet ran in {item['actual']!r}, {item['declared']!r} is declared — set `environment = {item['declared']}` in the agent's puppet.conf, or `lab plan server {name} --environment {item['actual']}`"
    if key.startswith("class ") or key == "puppet_run":
        return f"{key}: {item['note'] or 'not applied'} — fix the failing resources and run Puppet on the host (`puppet agent -t`); lab does not trigger Puppet runs"
    if key.startswith("label "):
        return f"{key}: not defined — define it in the definitions or relabel (`lab server relabel {name} --labels …`)"
    return f"{key}: {item['note'] or 'drift'}"


def sync(engine: Any, name: str, *, actor: str = "local", publish: bool = True) -> dict[str, Any]:
    """Re-apply what lab controls (labels reach the agent at check-in; the signed secret policy is
    republished to the cluster's stores), audit it as ``actor``, and say what only a person can fix.
    ``publish=False`` leaves the policy to the caller (the daemon publishes from a worker thread and
    puts :func:`republish`'s line first in ``done``)."""
    before = diff(engine, name)
    record = engine.state.get_server(name)
    with engine.state.transaction():
        engine.state.audit("server.sync", name, {"sync": before["sync"], "drift": [i["key"] for i in before["items"] if i["status"] == "drift"]}, actor=actor)
    published = republish(engine.paths.home) if publish else None
    after = diff(engine, name)
    done = [published] if published else []
    if record.enrolled_at:
        done.append(f"→ labels {','.join(record.labels) or 'none'} are sent to the agent at its next check-in")
    manual = [m for m in (by_hand(i, name) for i in after["items"]) if m]
    return {**after, "before": before["sync"], "done": done, "by_hand": manual}
