"""Alerts: the condition language and rendering into Prometheus, file_sd and Naemon formats."""

from lab.coordinator.alerts.condition import METRICS, Condition, parse, parse_alert, scope_matcher
from lab.coordinator.alerts.output import diff_tree, write_tree
from lab.coordinator.alerts.render import Rendered, Rule, collect_rules, render_all

__all__ = [
    "METRICS",
    "Condition",
    "Rendered",
    "Rule",
    "collect_rules",
    "diff_tree",
    "parse",
    "parse_alert",
    "render_all",
    "scope_matcher",
    "write_tree",
]
