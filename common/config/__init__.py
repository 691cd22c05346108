"""Definitions: YAML files of labels, groups, alerts, sizes and secrets, validated as a whole."""

from lab.common.config.loader import format_duration, load_definitions, load_texts, parse_duration
from lab.common.config.model import Alert, Definitions, Exclude, Group, Label, Location, Secret, Selector, Size

__all__ = [
    "Alert",
    "Definitions",
    "Exclude",
    "Group",
    "Label",
    "Location",
    "Secret",
    "Selector",
    "Size",
    "format_duration",
    "load_definitions",
    "load_texts",
    "parse_duration",
]
