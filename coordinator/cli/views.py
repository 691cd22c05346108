"""Human renderings of the engine's plain data: one function per view, ``(data, out) -> None``.

The commands in app.py fetch; these only print. ``-o json|yaml`` bypasses them entirely, so
nothing here may decide content.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, TextIO

from lab.common.render import aligned, pillar, table, tree

View = dict[str, Any]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


# -- lists (lab get) ---------------------------------------------------------------------------


def servers_table(rows: list[View], out: TextIO) -> None:
    if not rows:
        out.write("No servers.\n")
        return
    table(
        ["NAME", "PROVIDER", "LABELS", "SIZE", "SYNC", "PUPPET", "HEALTH", "IDENTITY"],
        [
            [r["name"], r["provider"], ",".join(r["labels"]), r["size"] or "—", *(pillar(r[p]) for p in ("sync", "puppet", "health", "identity"))]
            for r in rows
        ],
        out,
    )


def labels_table(rows: list[View], out: TextIO) -> None:
    table(
        ["LABEL", "PUPPET CLASSES", "SECRETS", "PORTS", "SIZE", "SERVERS"],
        [
            [r["name"], ", ".join(r["puppet_classes"]) or "—", ", ".join(r["secrets"]) or "—", ",".join(map(str, r["ports"])) or "—", r["size"] or "—", r["servers"]]
            for r in rows
        ],
        out,
    )


def groups_table(rows: list[View], out: TextIO) -> None:
    def selects(r: View) -> str:
        if r["match"]:
            return r["match"]
        return "servers: " + ", ".join(r["explicit_servers"]) if r["explicit_servers"] else "—"

    table(
        ["GROUP", "SERVERS", "EXCLUDED", "SUBGROUPS", "MATCH"],
        [[r["name"], r["servers"], r["excluded"], ", ".join(r["subgroups"]) or "—", selects(r)] for r in rows],
        out,
    )


def alerts_table(rows: list[View], out: TextIO) -> None:
    table(
        ["ALERT", "SEVERITY", "TARGET", "CONDITION", "FOR", "SERVERS"],
        [
            [r["name"], r["severity"], r["target"] + ("; excluding " + ", ".join(r["excludes"]) if r["excludes"] else ""), r["condition"], r["for"] or "—", r["servers"]]
            for r in rows
        ],
        out,
    )


def secrets_table(rows: list[View], out: TextIO) -> None:
    def used_by(r: View) -> str:
        if not r["used_by"]:
            return "— (not referenced)"
        return ", ".join(f"{u['label']} ({u['servers']} srv)" for u in r["used_by"])

    def rotated(r: View) -> str:  # [secret-store] from the store's metadata (never values)
        when = r.get("last_rotated")
        if not when:
            return "— (never set)" if r.get("stored") == 0 else "—"
        return when + (f" ({r['stored']} nodes)" if r.get("per_machine") and r.get("stored") else "")

    table(
        ["SECRET", "TYPE", "USED BY", "LAST ROTATED", "SET BY", "ROTATE", "PER-MACHINE"],
        [[r["path"], r["type"], used_by(r), rotated(r), r.get("set_by") or "—", r["rotate_every"] or "—",
          "yes" if r["per_machine"] else "no"] for r in rows],
        out,
    )


# -- one server ----------------------------------------------------------------------------------


def _by_source(items: list[View]) -> dict[str, list[View]]:
    grouped: dict[str, list[View]] = defaultdict(list)
    for i in items:
        grouped[i["source"]].append(i)
    return grouped


def _source_heading(source: str) -> str:
    kind, _, name = source.partition(":")
    return "AUTO-GENERATED" if kind == "auto" else f"FROM {kind.upper()} {name}"


def _auto_note(source: str) -> str:
    kind, _, detail = source.split(":", 1)[1].partition(":")
    return f"(from {kind}: {detail})" if detail else f"(from {kind})"


def _exclusion(e: View) -> str:
    if e["reason"] == "by name":
        return f'{e["kind"]} "{e["name"]}" (explicitly excluded: by name)'
    if "explicitly" in e["reason"]:
        return f'{e["kind"]} "{e["name"]}" (explicitly excluded)'
    return f'{e["kind"]} "{e["name"]}" ({e["reason"]})'


_HEALTH_MARK = {"ok": "✓", "alerts": "⚠", "unknown": "?"}


def health(h: View, out: TextIO) -> None:
    out.write("\nHealth:\n")
    if not h["sources"]:
        out.write(f"  {h.get('detail') or 'unknown'}\n")
        return
    for s in h["sources"]:
        out.write(f"  {s['source'].capitalize() + ':':<14}{_HEALTH_MARK.get(s['status'], '?')} {s['detail'] or s['status']}\n")
    out.write(f"  {'Alerts:':<14}{', '.join(h['alerts']) if h['alerts'] else 'none active'}\n")


def server(v: View, out: TextIO) -> None:
    where = ", ".join(x for x in (v["provider"], v["region"]) if x)
    out.write(f"Server: {v['name']} ({where})\n")
    out.write(f"Labels:   [{', '.join(v['labels'])}]\n")
    out.write(f"Groups:   [{', '.join(v['groups'])}]\n")
    out.write(f"Environment: {v['environment'] or '—'}\n")
    if v["size"]:
        detail = f" ({v['size_detail']})" if v["size_detail"] else ""
        out.write(f"Size:     {v['size']}{detail}\n")
    if v["undefined_labels"]:
        out.write(f"⚠ Undefined labels (they give nothing): {', '.join(v['undefined_labels'])}\n")
    for title, items, key in (("Puppet Classes", v["puppet_classes"], "name"), ("Alerts", v["alerts"], "name"), ("Secrets", v["secrets"], "path")):
        out.write(f"\n{title} ({len(items)}):\n")
        groups = _by_source(items)
        for source, lst in groups.items():
            if not source.startswith("auto:"):
                out.write(f"  {_source_heading(source)}:\n")
                tree([f"{i[key]}" + (f" ({i['type']})" if i.get("type") else "") for i in lst], out, "    ")
        auto = [i for s, lst in groups.items() if s.startswith("auto:") for i in lst]
        if auto:
            out.write("  AUTO-GENERATED:\n")
            tree([f"{i[key]} {_auto_note(i['source'])}" for i in auto], out, "    ")
    if v["excluded_from"]:
        out.write("\nExcluded From:\n")
        tree([_exclusion(e) for e in v["excluded_from"]], out)
    if "health" in v:
        health(v["health"], out)


def _from(source: str) -> str:
    kind, _, name = source.partition(":")
    return f"(auto-generated: {name})" if kind == "auto" else f"(from {kind}: {name})"


def targets(v: View, out: TextIO) -> None:
    out.write(f"Everything targeting {v['name']}:\n")
    out.write(f"  Labels:     [{', '.join(v['labels'])}]\n")
    out.write(f"  Groups:     [{', '.join(v['groups'])}]\n")
    out.write(f"  Environment: {v['environment'] or '—'}\n")
    for title, items, key in (("Alerts", v["alerts"], "name"), ("Puppet Classes", v["puppet_classes"], "name"), ("Secrets", v["secrets"], "path")):
        out.write(f"\n  {title} ({len(items)}):\n")
        aligned([(i[key], _from(i["source"])) for i in items], out, "    ")
    if v["excluded_from"]:
        out.write("\n  Excluded from:\n")
        aligned([(f"{e['kind']} {e['name']}", f"({e['reason']})") for e in v["excluded_from"]], out, "    ")


# -- labels, groups, alerts, secrets ---------------------------------------------------------------


def _server_line(s: View) -> tuple[str, str]:
    meta = ", ".join(x for x in (s["provider"], s["environment"]) if x)
    return f"{s['name']} ({meta})", "  ".join(pillar(s[p]) for p in ("sync", "puppet", "health", "identity"))


def label(v: View, out: TextIO) -> None:
    out.write(f"Label: {v['name']}\n")
    if v["description"]:
        out.write(f"{v['description']}\n")
    out.write(f"Applied to: {_plural(len(v['servers']), 'server')}\n")
    if v["servers"]:
        out.write("\nServers:\n")
        aligned([_server_line(s) for s in v["servers"]], out)
    out.write("\nProvides:\n")
    out.write(f"  Puppet Classes: {', '.join(v['puppet_classes']) or '—'}\n")
    out.write(f"  Alerts: {', '.join(v['alerts']) or '—'}\n")
    out.write(f"  Secrets: {', '.join(v['secrets']) or '—'}\n")
    out.write(f"  Ports: {', '.join(map(str, v['ports'])) or '—'}\n")
    out.write(f"  Size: {v['size'] or '—'}{' (' + v['size_detail'] + ')' if v['size_detail'] else ''}\n")
    if v["groups_matching"]:
        out.write(f"\nGroups matching this label: {', '.join(v['groups_matching'])}\n")


def group(v: View, out: TextIO) -> None:
    out.write(f"Group: {v['name']}\n")
    subs, n, ex = len(v["subgroups"]), len(v["members"]), len(v["excluded"])
    parts = [_plural(subs, "subgroup")] if subs else []
    parts.append(_plural(n, "server") + (f" ({ex} excluded)" if ex else ""))
    out.write(f"Contains: {', '.join(parts)}\n")
    if v["match"]:
        out.write(f"Match: {v['match']}\n")
    if v["parents"]:
        out.write(f"Part of: {', '.join(v['parents'])}\n")
    if v["subgroups"]:
        out.write("\nSubgroups:\n")
        aligned([(s["name"], f"({_plural(s['servers'], 'server')})") for s in v["subgroups"]], out)
    if v["members"]:
        out.write("\nServers:\n")
        aligned([_server_line(s) for s in v["members"]], out)
    if v["explicit_servers"]:
        out.write(f"\nListed by name: {', '.join(v['explicit_servers'])}\n")
    if v["missing_servers"]:
        out.write(f"⚠ Not in the inventory: {', '.join(v['missing_servers'])}\n")
    if v["exclusion_rules"]:
        out.write("\nExcluded:\n")
        lines = []
        for rule in v["exclusion_rules"]:
            hit = len(rule["servers"])
            if rule["rule"].endswith("(by name)"):
                lines.append(rule["rule"] + ("" if hit else " — not a member anyway"))
            else:
                names = f": {', '.join(rule['servers'])}" if hit else ""
                lines.append(f"{_plural(hit, 'server')} {rule['rule']}{names}")
        tree(lines, out)
    if v["alerts"]:
        out.write("\nAlerts targeting this group:\n")
        tree([f"{a['name']} ({a['severity']})" for a in v["alerts"]], out)


def _value(value: float | None, condition: str) -> str:
    if value is None:
        return "no data"
    return f"{value:.0f}%" if "_percent" in condition.split(" ", 1)[0] else f"{value:.4g}"


_VALUE_STATUS = {"ok": "✓", "approaching": "⚠ approaching", "over": "✗ over", "no data": "? no data"}


def _current(s: View, conditions: list[str]) -> str:
    status = s.get("status")
    if status is None or status == "unknown":
        return ""
    if status == "not rendered":
        return "not rendered"
    if status.startswith("unknown"):
        return f"? {status}"
    return f"currently: {_value(s['current'], conditions[0] if conditions else '')}  {_VALUE_STATUS.get(status, status)}"


def alert(v: View, out: TextIO) -> None:
    out.write(f"Alert: {v['name']}\n")
    if v["kind"] == "defined":
        out.write(f"Severity: {v['severity']}\nCondition: {v['condition']}\n")
        if v["for"]:
            out.write(f"For: {v['for']}\n")
        out.write(f"Target: {v['target']}\nExcludes: {', '.join(v['excludes']) or 'none'}\n")
    else:
        out.write(f"Kind: {v['kind']}\n")
    if v["labels"]:
        out.write(f"Named by labels: {', '.join(v['labels'])}\n")
    rendered = v.get("rendered_to", {})
    conditions = rendered.get("conditions", [])
    out.write(f"\nApplies to {_plural(len(v['servers']), 'server')}:\n")
    rows = []
    for s in v["servers"]:
        via = "" if s["source"] == "target" else f"via {s['source']}"
        rows.append((f"{s['name']} ({s['provider']})", "  ".join(x for x in (_current(s, conditions), via) if x)))
    aligned(rows, out)
    if v.get("health_source"):
        out.write(f"⚠ values unknown: {v['health_source']}\n")
    if v["excluded"]:
        out.write("\nExcluded:\n")
        tree([f"{e['server']} ({e['reason']})" for e in v["excluded"]], out)
    if rendered:
        lines = [f"Prometheus: rule \"{v['name']}\" in {', '.join(rendered['prometheus'])}"] if rendered["prometheus"] else []
        hosts = len(rendered["naemon_hosts"])
        if hosts:
            lines.append(f"Naemon: service check on {_plural(hosts, 'bare-metal host')}")
        if lines:
            out.write("\nRendered to:\n")
            tree(lines, out)


def _grant_line(g: View, path: str) -> str:
    """``Label "mailserver" → puppet class "postfix" → lab::secret('PATH') at FILE:LINE``."""
    origin = f'Label "{g["label"]}"' if g.get("label") else g.get("origin", "?")
    if not g.get("classes") and not g.get("call"):
        return f"{origin} → secrets: {path}"
    steps = [origin]
    for i, c in enumerate(g.get("classes") or []):
        kind = "puppet class" if i == 0 else "class"
        steps.append(f'{kind} "{c["name"]}"' + (f" (declared at {c['declared_at']})" if c.get("declared_at") else ""))
    if g.get("call"):
        steps.append(f"lab::secret('{path}') at {g['call']}")
    return " → ".join(steps)


def secret(v: View, out: TextIO) -> None:
    out.write(f"Secret: {v['path']}\nType: {v['type']}" + (f" (generator: {v['generator']})" if v["generator"] else "") + "\n")
    if v.get("last_set"):  # [secret-store] from the store
        out.write(f"Last set: {v['last_set']} UTC by {v.get('last_set_by') or '?'}\n")
    elif v.get("store_known"):
        out.write("Last set: never (no value in the store)\n")
    if v["rotate_every"]:
        out.write(f"Rotate every: {v['rotate_every']}\n")
    if v["per_machine"]:
        out.write("Per machine: each server gets its own value\n")
    out.write(f"Delivered as: owner {v['owner']}, group {v['group']}, mode {v['mode']}\n")
    if "grants" not in v:  # an engine without the policy data: the definitions' view only
        out.write("\nAccessible by (derived from definitions):\n")
        if not v["accessible_by"]:
            out.write("  nothing references it — orphaned?\n")
        for a in v["accessible_by"]:
            out.write(f'  Label "{a["label"]}"\n')
            tree([f"{s['name']} ({s['provider']})" for s in a["servers"]] or ["(no servers carry it yet)"], out, "    ")
        return
    out.write("\nAccessible by (derived from code):\n")
    if not v["grants"] and not v.get("unapplied"):
        out.write("  nothing references it — orphaned?\n")
    own = {p["server"]: p["set"] for p in v.get("per_machine_set") or []}
    for g in v["grants"]:
        out.write(f"  {_grant_line(g, v['path'])}\n")
        lines = []
        for s in g["servers"]:
            note = ""
            if s["name"] in own:
                note = {True: "    own value set", False: "    own value NOT set", None: ""}[own[s["name"]]]
            lines.append(f"{s['name']} ({s['provider']}){note}")
        tree(lines, out, "    ")
    for u in v.get("unapplied") or []:
        g = {"label": u["label"], "classes": [{"name": u["class"]}] if u["class"] else [], "call": u["call"]}
        out.write(f"  {_grant_line(g, v['path'])}\n")
        tree(["(no servers carry it yet)"], out, "    ")
    if v["grants"]:
        out.write(f"\n  {_plural(len(v['entitled']), 'server')} entitled; no other references found in any applied code.\n")
    if not v.get("modules"):
        out.write("  (no Puppet modules directory: lab::secret calls not scanned; --modules / $LAB_PUPPET_MODULES / <definitions>/modules)\n")
    for w in v.get("policy_warnings") or []:
        out.write(f"  ⚠ {w}\n")