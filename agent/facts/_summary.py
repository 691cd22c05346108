"""The spec's "Detected hardware:" block, as data and as text. Pure."""

from __future__ import annotations

from typing import TextIO

from lab.agent.facts._model import Facts, Suggestion
from lab.agent.facts._rules import RULES_BY_NAME, counted, format_bytes_decimal, format_speed, gpu_names, nominal_gb

LINES = (("cpu", "CPU"), ("ram", "RAM"), ("gpu", "GPU"), ("disk", "Disk"), ("nic", "NIC"))
DISK_KIND_NAMES = {"nvme": "NVMe", "ssd": "SSD", "hdd": "HDD", "unknown": "disk"}


def _cpu(f: Facts) -> str:
    cores = f"{f.cpu.cores} cores" if f.cpu.cores else "cores unknown"
    return f"{f.cpu.model or 'unknown CPU'} ({f.cpu.arch}, {cores})"


def _ram(f: Facts) -> str:
    return "unknown" if f.memory_bytes is None else f"{nominal_gb(f.memory_bytes)} GB"


def _gpu(f: Facts) -> str:
    if f.gpus is None:
        return "unknown"
    return gpu_names(f.gpus) if f.gpus else "none"


def _disk(f: Facts) -> str:
    if f.disks is None:
        return "unknown"
    fixed = [d for d in f.disks if not d.removable]
    if not fixed:
        return "none"
    return counted([f"{DISK_KIND_NAMES.get(d.kind, d.kind)} {format_bytes_decimal(d.size_bytes or 0)}" for d in fixed])


def _nic(f: Facts) -> str:
    if f.nics is None:
        return "unknown"
    physical = sorted((n for n in f.nics if not n.virtual), key=lambda n: -(n.speed_mbps or 0))
    if not physical:
        return "none"
    return counted([format_speed(n.speed_mbps) if n.speed_mbps or n.up is not False else "link down" for n in physical])


def hardware_lines(facts: Facts, suggestions: list[Suggestion]) -> list[tuple[str, str, list[str]]]:
    """``[(title, value, [suggested labels]), ...]`` for CPU, RAM, GPU, Disk, NIC."""
    by_line: dict[str, list[str]] = {}
    for s in suggestions:
        line = RULES_BY_NAME[s.rule].line if s.rule in RULES_BY_NAME else "cpu"
        by_line.setdefault(line, []).append(s.label)
    values = {"cpu": _cpu, "ram": _ram, "gpu": _gpu, "disk": _disk, "nic": _nic}
    return [(title, values[key](facts), by_line.get(key, [])) for key, title in LINES]


def render_text(facts: Facts, suggestions: list[Suggestion], out: TextIO) -> None:
    lines = hardware_lines(facts, suggestions)
    width = max(len(v) for _, v, _ in lines)
    out.write("Detected hardware:\n")
    for title, value, labels in lines:
        text = f"  {title + ':':<7} {value}"
        if labels:
            text = f"{text:<{width + 10}} → suggest: {', '.join(labels)}"
        out.write(text.rstrip() + "\n")
    extra = []
    if facts.os is not None:
        extra.append(("OS", facts.os.pretty or " ".join(filter(None, (facts.os.id, facts.os.version))) or "unknown"))
    virt = facts.virtualization if facts.virtualization != "none" else "bare metal"
    if facts.container:
        virt += f", in a {facts.container} container"
    extra.append(("Virt", virt))
    for title, value in extra:
        out.write(f"  {title + ':':<7} {value}\n")
    for note in facts.notes:
        out.write(f"  ⚠ {note}\n")
    out.write(f"\n  Suggested labels: [{', '.join(s.label for s in suggestions)}]\n")
