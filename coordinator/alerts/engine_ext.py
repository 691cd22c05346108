"""Engine operations for alerts and health, mixed into :class:`lab.coordinator.engine.Engine`.

Kept apart so engine.py only gains a few calls: ``render_alerts``/``diff_alerts`` for the CLI,
``with_health`` (the HEALTH pillar of ``get servers``), ``server_health`` (``show server``) and
``with_alert_values`` (current values in ``show alert``). Health never fails a command: a source
that is down reads "unknown (source down)".
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lab.common.errors import ConfigError
from lab.coordinator.alerts.output import diff_tree, write_tree
from lab.coordinator.alerts.render import NAEMON_PROVIDERS, Rule, collect_rules, env_file, render_all
from lab.coordinator.health.base import SourceDown, check_all, pillar, summary
from lab.coordinator.health.config import HealthConfig
from lab.coordinator.health.prometheus import PrometheusSource


class AlertsMixin:
    """Needs ``self.paths``, ``self.state``, ``self.fleet()`` (all of Engine's)."""

    health_transport: Any = None  # tests put an httpx.MockTransport here

    # -- render ----------------------------------------------------------------------------------

    def render_alerts(self, out: str | os.PathLike[str]) -> dict[str, Any]:
        rendered = render_all(self.fleet())  # type: ignore[attr-defined]
        files = write_tree(out, rendered.files)
        return {
            "out": os.fspath(out),
            "files": files,
            "rules": len(rendered.rules),
            "skipped": [{"alert": a, "reason": r} for a, r in rendered.skipped],
        }

    def diff_alerts(self, out: str | os.PathLike[str]) -> dict[str, Any]:
        rendered = render_all(self.fleet())  # type: ignore[attr-defined]
        changes = diff_tree(out, rendered.files)
        return {"out": os.fspath(out), "changes": changes, "changed": len(changes)}

    # -- health ----------------------------------------------------------------------------------

    def health_config(self) -> HealthConfig:
        from lab.coordinator.engine import SETTINGS_FILE, _read_settings

        home = self.paths.home  # type: ignore[attr-defined]
        return HealthConfig.from_settings(_read_settings(home), str(home / SETTINGS_FILE))

    def _health(self, servers: Sequence[str]) -> tuple[HealthConfig, dict[str, list[Any]]]:
        config = self.health_config()
        if not config.configured or not servers:
            return config, {s: [] for s in servers}
        sources = config.sources(self.health_transport)
        try:
            return config, check_all(sources, servers)
        finally:
            for s in sources:
                getattr(s, "close", lambda: None)()

    def with_health(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fill the HEALTH pillar of server records (``get servers``)."""
        config, results = self._health([r["name"] for r in rows])
        if config.configured:
            for r in rows:
                r["health"] = pillar(results[r["name"]])
        return rows

    def server_health(self, name: str) -> dict[str, Any]:
        config, results = self._health([name])
        if not config.configured:
            return {"status": "unknown", "alerts": [], "sources": [], "detail": "no health sources configured (health: in config.yaml)"}
        return summary(results[name])

    # -- show alert --------------------------------------------------------------------------------

    def with_alert_values(self, view: dict[str, Any]) -> dict[str, Any]:
        """Add where an alert is rendered and, with Prometheus configured, each server's current value."""
        fleet = self.fleet()  # type: ignore[attr-defined]
        try:
            rules = [r for r in collect_rules(fleet)[0] if r.alert == view["name"]]
        except ConfigError as exc:
            self.state.warnings.append(f"alert conditions not evaluated: {exc}")  # type: ignore[attr-defined]
            return view
        by_server: dict[str, Rule] = {}
        for rule in rules:
            for s in rule.servers:
                by_server.setdefault(s, rule)
        files = sorted({env_file(fleet.servers[s].environment) for s in by_server})
        naemon = sorted(s for s in by_server if getattr(fleet.servers[s], "provider", None) in NAEMON_PROVIDERS)
        view["rendered_to"] = {
            "prometheus": files,
            "naemon_hosts": naemon,
            "conditions": sorted({r.condition.text for r in rules}),
        }
        config = self.health_config()
        values: dict[str, float] = {}
        source_state = "no source" if not config.prometheus_url else "ok"
        if config.prometheus_url and by_server:
            prom = PrometheusSource(config.prometheus_url, config.prometheus_timeout, self.health_transport)
            try:
                groups: dict[tuple[str, str], list[str]] = defaultdict(list)
                for s, rule in by_server.items():
                    groups[(rule.condition.text, rule.source)].append(s)
                for (_text, _src), servers in sorted(groups.items()):
                    cond = by_server[servers[0]].condition
                    expr = cond.expr(servers) if cond.raw else cond.value_expr(servers)
                    values.update(prom.values(expr, "min" if cond.op in ("<", "<=") else "max"))
            except SourceDown as exc:
                source_state = f"source down: {exc}"
            finally:
                prom.close()
        if source_state == "no source":
            return view  # without Prometheus, server entries stay as targeting made them
        for entry in view.get("servers", []):
            rule = by_server.get(entry["name"])
            if rule is None:
                entry["current"], entry["status"] = None, "not rendered"
            elif source_state != "ok":
                entry["current"], entry["status"] = None, "unknown (source down)"
            else:
                value = values.get(entry["name"])
                entry["current"] = value
                entry["status"] = rule.condition.status(value)
                if rule.condition.raw and value is None:
                    entry["status"] = "ok"
        if source_state not in ("ok", "no source"):
            view["health_source"] = source_state
        return view
