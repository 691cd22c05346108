"""Hardware facts: collect raw data (impure), parse it (pure), suggest labels (pure).

::

    raw = collect_raw()               # py-cpuinfo, psutil, pyudev, NVML, /sys, /etc/os-release
    facts = parse_facts(raw)          # frozen Facts; unknowns are None, problems are notes
    suggest_labels(facts)             # [Suggestion(label, rule, evidence), ...]

Raw data is plain JSON, so a host's ``lab-agent facts --raw -o json`` is a test fixture.
"""

from __future__ import annotations

from lab.agent.facts._collect import RAW_SCHEMA, SOURCES, collect_raw
from lab.agent.facts._model import Cpu, Disk, Facts, Gpu, Nic, OsInfo, Suggestion
from lab.agent.facts._parse import normalise_arch, parse_facts
from lab.agent.facts._rules import RULES, Rule, nominal_gb, suggest_labels
from lab.agent.facts._summary import hardware_lines, render_text

__all__ = [
    "RAW_SCHEMA",
    "RULES",
    "SOURCES",
    "Cpu",
    "Disk",
    "Facts",
    "Gpu",
    "Nic",
    "OsInfo",
    "Rule",
    "Suggestion",
    "collect_raw",
    "hardware_lines",
    "nominal_gb",
    "normalise_arch",
    "parse_facts",
    "render_text",
    "suggest_labels",
]
