"""Label suggestions from facts: the spec's rules as one table. Suggestions only; people confirm.

Each rule looks at :class:`Facts` and returns the evidence it saw, or ``None``. Suggestions come
out in table order, one per label (the first rule that fires names it), which reproduces the
spec's order: ``[compute, high-memory, cuda, ai-training, storage, high-bandwidth]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lab.agent.facts._model import Facts, Gpu, Suggestion

GIB = 2**30

COMPUTE_MIN_PHYSICAL_CORES = 32
HIGH_MEMORY_MIN_GB = 192
AI_TRAINING_MIN_GPU_MEMORY_GB = 40
AI_INFERENCE_MIN_UNIFIED_RAM_GB = 96
STORAGE_MIN_DATA_DISKS = 4
STORAGE_MIN_TOTAL_BYTES = 8 * 10**12  # drives are sold in decimal terabytes
HIGH_BANDWIDTH_MIN_MBPS = 25_000
ARM_ARCHES = ("aarch64",)

# The kernel keeps some memory for itself, so a 256 GB machine shows ~251 GiB. A size within this
# fraction below a usual module total (2^k or 3·2^k GiB) is read as that total.
NOMINAL_MEMORY_SLACK = 0.10


def nominal_gb(size_bytes: int) -> int:
    """The memory size people would name: 270_355_234_816 bytes (251.8 GiB) → 256."""
    gib = size_bytes / GIB
    k = 1
    while k < gib * 2:
        for candidate in (k, 3 * k):
            if candidate >= gib and gib >= candidate * (1 - NOMINAL_MEMORY_SLACK):
                return candidate
        k *= 2
    return round(gib)


def format_bytes_decimal(size_bytes: int) -> str:
    """Disk sizes as sold: 1_920_383_410_176 → ``1.92TB``."""
    if size_bytes >= 10**12:
        return f"{size_bytes / 10**12:.3g}TB"
    return f"{size_bytes / 10**9:.3g}GB"


def format_speed(mbps: int | None) -> str:
    if not mbps:
        return "speed unknown"
    if mbps >= 1000:
        return f"{mbps / 1000:g}GbE"
    return f"{mbps}Mb/s"


def counted(items: list[str]) -> str:
    """``["a", "a", "b"]`` → ``2x a, 1x b`` (first-seen order)."""
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return ", ".join(f"{n}x {i}" for i, n in out.items())


def gpu_names(gpus: tuple[Gpu, ...]) -> str:
    models = [g.model for g in gpus]
    return models[0] if len(models) == 1 else counted(models)


# -- the rules ---------------------------------------------------------------------------------


def _compute(f: Facts) -> str | None:
    if f.cpu.cores is not None and f.cpu.cores >= COMPUTE_MIN_PHYSICAL_CORES:
        return f"CPU: {f.cpu.model or 'unknown model'}, {f.cpu.cores} physical cores"
    return None


def _high_memory(f: Facts) -> str | None:
    if f.memory_bytes is not None and nominal_gb(f.memory_bytes) >= HIGH_MEMORY_MIN_GB:
        return f"RAM: {nominal_gb(f.memory_bytes)} GB"
    return None


def _nvidia(f: Facts) -> tuple[Gpu, ...]:
    return tuple(g for g in f.gpus or () if g.vendor == "NVIDIA")


def _cuda(f: Facts) -> str | None:
    gpus = _nvidia(f)
    return f"GPU: {gpu_names(gpus)}" if gpus else None


def _gpu_memory_gb(g: Gpu) -> int | None:
    return None if g.memory_bytes is None else nominal_gb(g.memory_bytes)


def _ai_training(f: Facts) -> str | None:
    big = [g for g in f.gpus or () if (_gpu_memory_gb(g) or 0) >= AI_TRAINING_MIN_GPU_MEMORY_GB]
    if big:
        return f"GPU: {gpu_names(tuple(big))}, {_gpu_memory_gb(big[0])} GB memory"
    return None


def _ai_unified(f: Facts) -> str | None:
    shared = [g for g in f.gpus or () if g.unified_memory]
    if shared and f.memory_bytes is not None and nominal_gb(f.memory_bytes) >= AI_INFERENCE_MIN_UNIFIED_RAM_GB:
        return f"RAM: {nominal_gb(f.memory_bytes)} GB unified with GPU {shared[0].model}"
    return None


def _ai_gpu(f: Facts) -> str | None:
    return f"GPU: {gpu_names(f.gpus)}" if f.gpus else None


def data_disks(f: Facts) -> list:
    """Fixed disks with a size, not counting the one the system boots from."""
    return [d for d in f.disks or () if not d.removable and d.size_bytes and not d.system]


def _storage_count(f: Facts) -> str | None:
    disks = data_disks(f)
    if len(disks) >= STORAGE_MIN_DATA_DISKS:
        return f"Disk: {len(disks)} data disks"
    return None


def _storage_capacity(f: Facts) -> str | None:
    total = sum(d.size_bytes or 0 for d in f.disks or () if not d.removable)
    if total >= STORAGE_MIN_TOTAL_BYTES:
        return f"Disk: {format_bytes_decimal(total)} in fixed disks"
    return None


def _high_bandwidth(f: Facts) -> str | None:
    fast = [n for n in f.nics or () if not n.virtual and (n.speed_mbps or 0) >= HIGH_BANDWIDTH_MIN_MBPS]
    if fast:
        return "NIC: " + ", ".join(f"{n.name} {format_speed(n.speed_mbps)}" for n in fast)
    return None


def _arm(f: Facts) -> str | None:
    return f"Arch: {f.cpu.arch}" if f.cpu.arch in ARM_ARCHES else None


@dataclasses.dataclass(frozen=True)
class Rule:
    label: str
    name: str
    line: str  # which "Detected hardware" line shows it: cpu, ram, gpu, disk, nic
    condition: str  # for people and docs
    test: Callable[[Facts], str | None]
    unless: tuple[str, ...] = ()  # labels that, once suggested, make this rule moot


RULES: tuple[Rule, ...] = (
    Rule("compute", "cpu-cores", "cpu", f"≥ {COMPUTE_MIN_PHYSICAL_CORES} physical CPU cores", _compute),
    Rule("high-memory", "ram-size", "ram", f"RAM ≥ {HIGH_MEMORY_MIN_GB} GB", _high_memory),
    Rule("cuda", "nvidia-gpu", "gpu", "an NVIDIA GPU", _cuda),
    Rule("ai-training", "gpu-memory", "gpu", f"a GPU with ≥ {AI_TRAINING_MIN_GPU_MEMORY_GB} GB memory", _ai_training),
    Rule(
        "ai-inference",
        "unified-memory",
        "ram",
        f"RAM ≥ {AI_INFERENCE_MIN_UNIFIED_RAM_GB} GB shared with a GPU (GB10-class)",
        _ai_unified,
        unless=("ai-training",),
    ),
    Rule("ai-inference", "gpu-present", "gpu", "any GPU (not already ai-training)", _ai_gpu, unless=("ai-training",)),
    Rule("storage", "disk-count", "disk", f"≥ {STORAGE_MIN_DATA_DISKS} data disks (fixed, not the system disk)", _storage_count),
    Rule("storage", "disk-capacity", "disk", f"≥ {STORAGE_MIN_TOTAL_BYTES // 10**12} TB in fixed disks", _storage_capacity),
    Rule("high-bandwidth", "nic-speed", "nic", f"a physical NIC at ≥ {HIGH_BANDWIDTH_MIN_MBPS // 1000} Gb/s", _high_bandwidth),
    Rule("arm", "arch", "cpu", f"CPU architecture {'/'.join(ARM_ARCHES)}", _arm),
)
RULES_BY_NAME = {r.name: r for r in RULES}


def suggest_labels(facts: Facts, rules: tuple[Rule, ...] = RULES) -> list[Suggestion]:
    out: list[Suggestion] = []
    labels: set[str] = set()
    for rule in rules:
        if rule.label in labels or labels.intersection(rule.unless):
            continue
        evidence = rule.test(facts)
        if evidence is not None:
            out.append(Suggestion(rule.label, rule.name, evidence))
            labels.add(rule.label)
    return out
