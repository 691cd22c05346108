"""Hardware facts: the pure parser and the label rules on captured and hand-written raw data.

No host is needed: raw inputs are tests/fixtures/facts/*.json (see the README there). The only
collector code run here is NVML's, against a monkeypatched pynvml, and the file readers, against
a temporary root; tests/unit/conftest.py refuses real sockets and subprocesses.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pathlib
import shutil
import sys
import types

import pytest
import yaml

import lab.agent.facts as facts_pkg
from lab.agent import cli
from lab.agent.facts import (
    RULES,
    Disk,
    Facts,
    Gpu,
    Nic,
    collect_raw,
    hardware_lines,
    nominal_gb,
    normalise_arch,
    parse_facts,
    render_text,
    suggest_labels,
)
from lab.agent.facts._collect import parse_proc_cpuinfo
from lab.agent.facts._parse import clean_cpu_model

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "facts"
ALL = sorted(p.name for p in FIXTURES.glob("*.json"))
GIB = 2**30


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def labels(raw: dict) -> list[str]:
    return [s.label for s in suggest_labels(parse_facts(raw))]


# -- every fixture -----------------------------------------------------------------------------


def test_there_are_fixtures_and_a_readme() -> None:
    assert len(ALL) >= 5
    readme = (FIXTURES / "README.md").read_text()
    for name in ALL:
        assert name in readme, f"{name} is not described in tests/fixtures/facts/README.md"


@pytest.mark.parametrize("name", ALL)
def test_parser_reads_every_fixture(name: str) -> None:
    f = parse_facts(load(name))
    assert f.cpu.arch in ("x86_64", "aarch64")
    assert f.cpu.cores and f.cpu.threads and f.cpu.cores <= f.cpu.threads
    assert f.memory_bytes and f.memory_bytes > GIB
    assert f.disks and all(d.kind in ("nvme", "ssd", "hdd") and d.size_bytes for d in f.disks)
    assert f.nics and all(n.name != "lo" for n in f.nics)
    assert f.gpus is not None
    assert f.os is not None and f.os.id
    assert f.virtualization in ("none", "kvm")
    d = f.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    out = io.StringIO()
    render_text(f, suggest_labels(f), out)
    assert out.getvalue().startswith("Detected hardware:\n")


EXPECTED = {
    "epyc7763-a100-server.json": ["compute", "high-memory", "cuda", "ai-training", "storage", "high-bandwidth"],
    "dgx-spark-gb10.json": ["cuda", "ai-inference", "arm"],
    "kvm-epyc-2vcpu-vm.json": [],
    "kvm-epyc-2vcpu-vm-proc.json": [],
    "mac-mini-m2-asahi.json": ["arm"],
    "nuc12-homelab.json": [],
}


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED.items()))
def test_suggestions_per_fixture(name: str, expected: list[str]) -> None:
    assert labels(load(name)) == expected


def test_every_fixture_has_expectations() -> None:
    assert set(EXPECTED) == set(ALL)


# -- the spec's examples -----------------------------------------------------------------------


def test_spec_server_example_rules_and_evidence() -> None:
    got = [(s.label, s.rule, s.evidence) for s in suggest_labels(parse_facts(load("epyc7763-a100-server.json")))]
    assert got == [
        ("compute", "cpu-cores", "CPU: AMD EPYC 7763, 64 physical cores"),
        ("high-memory", "ram-size", "RAM: 256 GB"),
        ("cuda", "nvidia-gpu", "GPU: NVIDIA A100 80GB PCIe"),
        ("ai-training", "gpu-memory", "GPU: NVIDIA A100 80GB PCIe, 80 GB memory"),
        ("storage", "disk-count", "Disk: 5 data disks"),
        ("high-bandwidth", "nic-speed", "NIC: ens1f0np0 25GbE, ens1f1np1 25GbE"),
    ]


def test_spec_server_example_detected_hardware_block() -> None:
    f = parse_facts(load("epyc7763-a100-server.json"))
    assert hardware_lines(f, suggest_labels(f)) == [
        ("CPU", "AMD EPYC 7763 (x86_64, 64 cores)", ["compute"]),
        ("RAM", "256 GB", ["high-memory"]),
        ("GPU", "NVIDIA A100 80GB PCIe", ["cuda", "ai-training"]),
        ("Disk", "2x NVMe 1.92TB, 4x SSD 3.84TB", ["storage"]),
        ("NIC", "2x 25GbE, 1x 1GbE", ["high-bandwidth"]),
    ]
    out = io.StringIO()
    render_text(f, suggest_labels(f), out)
    text = out.getvalue()
    assert "  CPU:    AMD EPYC 7763 (x86_64, 64 cores)" in text
    assert "→ suggest: cuda, ai-training\n" in text
    assert text.endswith("  Suggested labels: [compute, high-memory, cuda, ai-training, storage, high-bandwidth]\n")


def test_spec_dgx_spark_example() -> None:
    f = parse_facts(load("dgx-spark-gb10.json"))
    assert f.gpus == (Gpu("NVIDIA", "NVIDIA GB10", None, "580.95.05", "13.0", unified_memory=True),)
    got = [(s.label, s.rule) for s in suggest_labels(f)]
    assert got == [("cuda", "nvidia-gpu"), ("ai-inference", "unified-memory"), ("arm", "arch")]
    lines = {title: labels for title, _, labels in hardware_lines(f, suggest_labels(f))}
    assert lines == {"CPU": ["arm"], "RAM": ["ai-inference"], "GPU": ["cuda"], "Disk": [], "NIC": []}


def test_this_vm_fixture_in_detail() -> None:
    f = parse_facts(load("kvm-epyc-2vcpu-vm.json"))
    assert (f.cpu.model, f.cpu.vendor, f.cpu.cores, f.cpu.threads) == ("AMD EPYC", "AMD", 2, 2)
    assert (f.virtualization, f.container) == ("kvm", "docker")
    assert f.disks == (Disk("vda", None, 536870912 * 512, "hdd", False, system=True),)
    eth0 = next(n for n in f.nics if n.name == "eth0")
    assert (eth0.mac, eth0.speed_mbps, eth0.up, eth0.virtual, eth0.driver) == ("02:fc:00:00:00:01", None, True, False, "virtio_net")
    assert "192.0.2.2" in eth0.addresses
    assert all(n.virtual for n in f.nics if n.name.startswith("ifb"))
    assert f.gpus == () and f.notes == ()
    assert (f.os.id, f.os.version) == ("debian", "12")


def test_nvidia_gpu_without_driver_is_found_on_the_pci_bus_and_not_twice() -> None:
    raw = load("epyc7763-a100-server.json")
    assert len(parse_facts(raw).gpus) == 1  # NVML and PCI agree on 41:00.0; the ASPEED BMC is no GPU
    raw["nvml"] = {"status": "absent", "reason": "NVMLError_LibraryNotFound"}
    f = parse_facts(raw)
    assert f.gpus == (Gpu("NVIDIA", "NVIDIA GA100 [A100 PCIe 80GB]", None, "nvidia", None),)
    assert labels(raw)[2:4] == ["cuda", "ai-inference"]  # memory unknown until the driver is there


# -- missing and garbled sources ---------------------------------------------------------------


def test_nothing_at_all_is_all_unknown_with_notes() -> None:
    f = parse_facts({})
    assert f.cpu.arch == "unknown" and f.cpu.cores is None
    assert (f.memory_bytes, f.disks, f.nics, f.gpus, f.os) == (None, None, None, None, None)
    assert f.virtualization == "unknown"
    assert any("memory" in n for n in f.notes) and any("disks" in n for n in f.notes)
    assert suggest_labels(f) == []
    out = io.StringIO()
    render_text(f, [], out)
    assert "RAM:    unknown" in out.getvalue()


@pytest.mark.parametrize("raw", [None, [], "garbage", 42])
def test_not_a_mapping_is_a_note(raw) -> None:
    f = parse_facts(raw)
    assert f.notes and "not a mapping" in f.notes[0]


def test_garbled_sources_become_notes() -> None:
    raw = load("epyc7763-a100-server.json")
    raw["cpuinfo"]["count"] = "many"
    raw["psutil"]["cpu_count_physical"] = -1
    raw["psutil"]["memory_total"] = "lots"
    raw["udev"]["block"] = [1, "x"]
    raw["psutil"]["net_if_stats"]["eno1"] = ["not", "a", "dict"]
    raw["nvml"]["devices"] = [None]
    raw["os_release"] = 42
    raw["schema"] = 99
    f = parse_facts(raw)
    assert f.memory_bytes is None and f.disks is None and f.gpus is None and f.os is None
    assert f.cpu.cores == 128  # falls back to the logical count
    text = "\n".join(f.notes)
    for section in ("schema 99", "memory", "disks:", "gpus:", "os:"):
        assert section in text
    assert "eno1" not in {n.name for n in f.nics}


def test_collector_notes_are_kept() -> None:
    raw = load("mac-mini-m2-asahi.json")
    assert parse_facts(raw).notes == ("nvml: ModuleNotFoundError: No module named 'pynvml'",)


def test_nvml_failure_means_gpus_unknown_unless_the_pci_bus_shows_one() -> None:
    raw = load("kvm-epyc-2vcpu-vm.json")
    raw["nvml"] = {"status": "error", "error": "NVMLError_Unknown: Unknown Error"}
    raw["notes"] = ["nvml: NVML failed, GPUs unknown: NVMLError_Unknown: Unknown Error"]
    f = parse_facts(raw)
    assert f.gpus is None and "GPUs unknown" in f.notes[0]
    raw["udev"]["pci_display"] = [{"slot": "0000:07:00.0", "class": "30200", "pci_id": "10DE:2330", "model": None, "driver": "nvidia"}]
    assert parse_facts(raw).gpus == (Gpu("NVIDIA", "NVIDIA GPU [10DE:2330]", None, "nvidia", None),)


# -- rules at their thresholds -----------------------------------------------------------------


def base() -> Facts:
    return parse_facts(load("nuc12-homelab.json"))


def rules_fired(f: Facts) -> list[tuple[str, str]]:
    return [(s.label, s.rule) for s in suggest_labels(f)]


def test_rules_are_a_table_with_unique_names() -> None:
    assert len({r.name for r in RULES}) == len(RULES)
    assert all(r.line in ("cpu", "ram", "gpu", "disk", "nic") and r.condition for r in RULES)


@pytest.mark.parametrize(("cores", "fired"), [(31, []), (32, [("compute", "cpu-cores")])])
def test_compute_threshold(cores: int, fired) -> None:
    f = base()
    assert rules_fired(dataclasses.replace(f, cpu=dataclasses.replace(f.cpu, cores=cores))) == fired


@pytest.mark.parametrize(
    ("gib", "fired"),
    [(160, []), (188.6, [("high-memory", "ram-size")]), (192, [("high-memory", "ram-size")]), (1024, [("high-memory", "ram-size")])],
)
def test_high_memory_threshold_reads_nominal_size(gib: float, fired) -> None:
    assert rules_fired(dataclasses.replace(base(), memory_bytes=int(gib * GIB))) == fired


@pytest.mark.parametrize(
    ("gib", "nominal"),
    [(0.95, 1), (3.8, 4), (7.7, 8), (15.4, 16), (23.5, 24), (62.5, 64), (119.7, 128), (100, 100), (188.6, 192), (251.8, 256), (79.6, 80), (40, 40)],
)
def test_nominal_memory(gib: float, nominal: int) -> None:
    assert nominal_gb(int(gib * GIB)) == nominal


def gpu(model: str, mem_gib: float | None, vendor: str = "NVIDIA", unified: bool = False) -> Gpu:
    return Gpu(vendor, model, None if mem_gib is None else int(mem_gib * GIB), "550.127.05", "12.4", unified)


@pytest.mark.parametrize(
    ("gpus", "fired"),
    [
        ((gpu("NVIDIA GeForce RTX 4090", 23.99),), [("cuda", "nvidia-gpu"), ("ai-inference", "gpu-present")]),
        ((gpu("NVIDIA A100-PCIE-40GB", 40),), [("cuda", "nvidia-gpu"), ("ai-training", "gpu-memory")]),
        ((gpu("NVIDIA L4", 22), gpu("NVIDIA H100 80GB HBM3", 79.6)), [("cuda", "nvidia-gpu"), ("ai-training", "gpu-memory")]),
        ((gpu("AMD Instinct MI210", 64, vendor="AMD"),), [("ai-training", "gpu-memory")]),
        ((gpu("NVIDIA GB10", None, unified=True),), [("cuda", "nvidia-gpu"), ("ai-inference", "gpu-present")]),  # 64 GB RAM: too small
    ],
)
def test_gpu_rules(gpus, fired) -> None:
    assert rules_fired(dataclasses.replace(base(), gpus=gpus)) == fired


def test_unified_memory_rule_needs_96_gb() -> None:
    f = dataclasses.replace(base(), gpus=(gpu("NVIDIA GB10", None, unified=True),), memory_bytes=119 * GIB)
    assert ("ai-inference", "unified-memory") in rules_fired(f)


def disks(n: int, size: int = 2 * 10**12, **kw) -> tuple[Disk, ...]:
    return tuple(Disk(f"sd{chr(97 + i)}", None, size, "ssd", False, **kw) for i in range(n))


@pytest.mark.parametrize(
    ("ds", "fired"),
    [
        (disks(3), []),
        (disks(4), [("storage", "disk-count")]),
        ((Disk("nvme0n1", None, 10**12, "nvme", False, system=True), *disks(3)), []),  # the system disk is not a data disk
        (disks(4, size=0), []),  # empty card readers
        (disks(2, size=4 * 10**12), [("storage", "disk-capacity")]),
        ((Disk("sdz", None, 20 * 10**12, "hdd", True),), []),  # removable does not count
    ],
)
def test_storage_rules(ds, fired) -> None:
    assert rules_fired(dataclasses.replace(base(), disks=ds)) == fired


@pytest.mark.parametrize(
    ("nic", "fired"),
    [
        (Nic("ens1", None, 10_000, True, False), []),
        (Nic("ens1", None, 25_000, True, False), [("high-bandwidth", "nic-speed")]),
        (Nic("ens1", None, 100_000, True, False), [("high-bandwidth", "nic-speed")]),
        (Nic("bond0", None, 50_000, True, True), []),  # software interfaces do not count
    ],
)
def test_bandwidth_rule(nic: Nic, fired) -> None:
    assert rules_fired(dataclasses.replace(base(), nics=(nic,))) == fired


def test_unknown_everything_suggests_nothing() -> None:
    f = dataclasses.replace(base(), disks=None, nics=None, gpus=None, memory_bytes=None)
    assert suggest_labels(f) == []


# -- small parsers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "arch"),
    [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("X86_64", "x86_64"), ("arm64", "aarch64"), ("ARM_8", "aarch64"), ("aarch64", "aarch64"), ("armv7l", "armv7l"), ("riscv64", "riscv64"), ("", None), (None, None), ("vax", None)],
)
def test_normalise_arch(name, arch) -> None:
    assert normalise_arch(name) == arch


def test_arch_falls_back_to_uname_then_cpuinfo() -> None:
    raw = load("dgx-spark-gb10.json")
    del raw["cpuinfo"]["arch_string_raw"]
    assert parse_facts(raw).cpu.arch == "aarch64"
    del raw["host"]
    assert parse_facts(raw).cpu.arch == "aarch64"
    del raw["cpuinfo"]
    raw["psutil"]["cpu_count_physical"] = None
    f = parse_facts(raw)
    assert f.cpu.arch == "unknown" and f.cpu.cores == 20 and "cpu: architecture unknown" in f.notes


@pytest.mark.parametrize(
    ("brand", "model"),
    [
        ("AMD EPYC 7763 64-Core Processor", "AMD EPYC 7763"),
        ("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "Intel Xeon Gold 6338"),
        ("12th Gen Intel(R) Core(TM) i5-1240P", "12th Gen Intel Core i5-1240P"),
        ("AMD Ryzen 9 7940HS w/ Radeon 780M Graphics", "AMD Ryzen 9 7940HS w/ Radeon 780M Graphics"),
        ("Neoverse-N1", "Neoverse-N1"),
    ],
)
def test_clean_cpu_model(brand: str, model: str) -> None:
    assert clean_cpu_model(brand) == model


def test_os_release_quoting_and_comments() -> None:
    raw = {"os_release": "# comment\nID='alpine'\nVERSION_ID=3.20.3\nPRETTY_NAME=\"Alpine Linux v3.20\"\n\n"}
    f = parse_facts(raw)
    assert (f.os.id, f.os.version, f.os.pretty) == ("alpine", "3.20.3", "Alpine Linux v3.20")
    assert parse_facts({"os_release": "nonsense"}).os is None


@pytest.mark.parametrize(
    ("virt", "expected"),
    [
        ({"dmi": {"product_name": "Standard PC (Q35 + ICH9, 2009)", "sys_vendor": "QEMU"}}, "kvm"),
        ({"dmi": {"product_name": "VMware Virtual Platform", "sys_vendor": "VMware, Inc."}}, "vmware"),
        ({"dmi": {"product_name": "Virtual Machine", "sys_vendor": "Microsoft Corporation"}}, "microsoft"),
        ({"dmi": {"product_name": "NUC12WSHi5", "sys_vendor": "Intel(R) Client Systems"}, "cpu_hypervisor_flag": False}, "none"),
        ({"cpu_hypervisor_flag": True}, "vm"),
        ({}, "unknown"),
        ({"systemd_detect_virt": {"vm": "microsoft", "container": "none"}}, "microsoft"),
    ],
)
def test_virtualization(virt: dict, expected: str) -> None:
    f = parse_facts({"virt": virt})
    assert f.virtualization == expected and f.container is None


# -- collection: the NVML path and the file readers, with no real host access --------------------


def test_nvml_library_not_found_is_no_gpus_and_no_error(monkeypatch) -> None:
    pynvml = pytest.importorskip("pynvml")

    def init() -> None:
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    raw = collect_raw(sources=["nvml"])
    assert raw["nvml"]["status"] == "absent" and raw["notes"] == []
    f = parse_facts(raw)
    assert f.gpus == () and not [n for n in f.notes if "nvml" in n or "gpu" in n.lower()]


def test_nvml_driver_not_loaded_is_no_gpus(monkeypatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(pynvml.NVMLError_DriverNotLoaded()))
    raw = collect_raw(sources=["nvml"])
    assert raw["nvml"]["status"] == "absent" and raw["notes"] == []


def test_other_nvml_errors_mean_gpus_unknown_with_a_note(monkeypatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)))
    raw = collect_raw(sources=["nvml"])
    assert raw["nvml"]["status"] == "error"
    f = parse_facts(raw)
    assert f.gpus is None and [n for n in f.notes if "nvml" in n] == ["nvml: NVML failed, GPUs unknown: NVMLError_Unknown: Unknown Error"]


def test_nvml_devices_are_read_and_unified_memory_recognised(monkeypatch) -> None:
    pynvml = pytest.importorskip("pynvml")
    shut = []

    class Mem:
        total = 80 * GIB

    class Pci:
        busId = b"00000000:41:00.0"

    def memory(h):
        if h == 1:
            raise pynvml.NVMLError_NotSupported()
        return Mem()

    fakes = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: shut.append(True),
        "nvmlSystemGetDriverVersion": lambda: "580.95.05",
        "nvmlSystemGetCudaDriverVersion": lambda: 13000,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: ["NVIDIA H100 80GB HBM3", "NVIDIA GB10"][h],
        "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetPciInfo": lambda h: Pci(),
    }
    for name, fn in fakes.items():
        monkeypatch.setattr(pynvml, name, fn)
    raw = collect_raw(sources=["nvml"])
    assert shut == [True] and raw["notes"] == []
    assert raw["nvml"]["devices"][1]["memory_total"] == "not supported"
    assert json.loads(json.dumps(raw)) == raw
    f = parse_facts(raw)
    assert f.gpus == (
        Gpu("NVIDIA", "NVIDIA H100 80GB HBM3", 80 * GIB, "580.95.05", "13.0", False),
        Gpu("NVIDIA", "NVIDIA GB10", None, "580.95.05", "13.0", True),
    )


def test_a_failing_source_is_a_note_not_an_exception(monkeypatch, tmp_path: pathlib.Path) -> None:
    # A stand-in module: importing the real py-cpuinfo runs `file` in a subprocess.
    def boom():
        raise RuntimeError("cpuid exploded")

    monkeypatch.setitem(sys.modules, "cpuinfo", types.SimpleNamespace(get_cpu_info=boom))
    raw = collect_raw(sources=["cpu"], root=tmp_path)  # no /proc/cpuinfo there: py-cpuinfo is asked
    assert "cpuinfo" not in raw and raw["notes"] == ["cpu: RuntimeError: cpuid exploded"]


def test_a_missing_library_is_a_note(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    monkeypatch.setitem(sys.modules, "pyudev", None)
    raw = collect_raw(sources=["nvml", "udev"])
    assert "nvml" not in raw and "udev" not in raw
    assert [n.split(":")[0] for n in raw["notes"]] == ["nvml", "udev"]
    f = parse_facts(raw)
    assert f.gpus is None and f.disks is None  # neither NVML nor the PCI bus could be asked


def test_files_read_under_a_root_and_dmi_fallback(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no systemd-detect-virt: no subprocess
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    dmi = tmp_path / "sys/class/dmi/id"
    dmi.mkdir(parents=True)
    (dmi / "product_name").write_text("KVM\n")
    (dmi / "sys_vendor").write_text("Red Hat\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n")
    raw = collect_raw(sources=["virt", "os"], root=tmp_path)
    assert raw["virt"] == {"dmi": {"product_name": "KVM", "sys_vendor": "Red Hat"}, "cpu_hypervisor_flag": True}
    f = parse_facts(raw)
    assert f.virtualization == "kvm" and f.os.id == "debian"


def test_missing_files_under_a_root(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    raw = collect_raw(sources=["virt", "os"], root=tmp_path)
    assert raw["virt"] == {} and "os_release" not in raw and raw["notes"] == ["os: no /etc/os-release"]
    assert parse_facts(raw).virtualization == "unknown"


def test_unknown_source_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="bogus"):
        collect_raw(sources=["bogus"])


# -- the CLI, on a fixture instead of this host ------------------------------------------------


@pytest.fixture()
def server(monkeypatch) -> dict:
    raw = load("epyc7763-a100-server.json")
    monkeypatch.setattr(facts_pkg, "collect_raw", lambda: copy.deepcopy(raw))
    return raw


def test_cli_table(server, capsys) -> None:
    assert cli.run(["facts"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Detected hardware:\n  CPU:    AMD EPYC 7763 (x86_64, 64 cores)")
    assert "Suggested labels: [compute, high-memory, cuda, ai-training, storage, high-bandwidth]" in out


@pytest.mark.parametrize(("fmt", "load_"), [("json", json.loads), ("yaml", yaml.safe_load)])
def test_cli_json_and_yaml(server, capsys, fmt, load_) -> None:
    assert cli.run(["facts", "-o", fmt]) == 0
    data = load_(capsys.readouterr().out)
    assert data["facts"]["cpu"]["model"] == "AMD EPYC 7763"
    assert [s["label"] for s in data["suggestions"]][:2] == ["compute", "high-memory"]
    assert data["suggestions"][0] == {"label": "compute", "rule": "cpu-cores", "evidence": "CPU: AMD EPYC 7763, 64 physical cores"}


def test_cli_raw_is_the_fixture_format(server, capsys) -> None:
    assert cli.run(["facts", "--raw", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == server


def test_cli_bad_format_exits_2(server, capsys) -> None:
    assert cli.run(["facts", "-o", "xml"]) == 2
    err = capsys.readouterr().err
    assert "xml" in err and "Traceback" not in err


# -- /proc/cpuinfo (the Linux CPU source; py-cpuinfo is the fallback) -------------------------

CPUINFO = FIXTURES / "cpuinfo"


def test_proc_cpuinfo_x86_captured() -> None:
    # Captured on the development VM (tests/fixtures/facts/cpuinfo/README.md).
    ci = parse_proc_cpuinfo((CPUINFO / "x86_64-kvm-epyc-2vcpu.txt").read_text(), "x86_64")
    assert ci == {
        "source": "/proc/cpuinfo",
        "arch_string_raw": "x86_64",
        "bits": 64,
        "count": 2,
        "brand_raw": "AMD EPYC",
        "vendor_id_raw": "AuthenticAMD",
    }
    # Same facts as the py-cpuinfo capture from the same machine.
    old = load("kvm-epyc-2vcpu-vm.json")
    new = dict(old, cpuinfo=ci)
    assert parse_facts(new).cpu == parse_facts(old).cpu


def test_proc_cpuinfo_aarch64_handwritten() -> None:
    # HAND-WRITTEN aarch64 layout (not a capture): no "model name", cores named by implementer/part.
    ci = parse_proc_cpuinfo((CPUINFO / "aarch64-handwritten-gb10-like.txt").read_text(), "aarch64")
    assert ci == {
        "source": "/proc/cpuinfo",
        "arch_string_raw": "aarch64",
        "bits": 64,
        "count": 4,
        "brand_raw": "Cortex-A725 + Cortex-X925",
        "vendor_id_raw": "ARM",
    }
    cpu = parse_facts({"cpuinfo": ci, "host": {"machine": "aarch64"}}).cpu
    assert (cpu.arch, cpu.vendor, cpu.model, cpu.threads) == ("aarch64", "ARM", "Cortex-A725 + Cortex-X925", 4)


@pytest.mark.parametrize(
    ("text", "machine", "brand", "vendor"),
    [
        ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n", "x86_64", "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "GenuineIntel"),
        ("processor\t: 0\nCPU implementer\t: 0x61\nCPU part\t: 0x033\n", "aarch64", "Avalanche-M2", "Apple"),
        ("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xfff\n", "aarch64", None, "ARM"),
        ("processor\t: 0\nCPU implementer\t: 0x99\nCPU part\t: 0x001\n", "aarch64", None, "0x99"),
        ("processor\t: 0\ncpu\t\t: POWER9 (architected), altivec supported\n", "ppc64le", "POWER9 (architected), altivec supported", None),
        ("processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nCPU implementer\t: 0x41\nCPU part\t: 0xd03\n", "armv7l", "ARMv7 Processor rev 4 (v7l)", "ARM"),
    ],
)
def test_proc_cpuinfo_variants(text: str, machine: str, brand, vendor) -> None:
    ci = parse_proc_cpuinfo(text, machine)
    assert (ci.get("brand_raw"), ci.get("vendor_id_raw"), ci["count"]) == (brand, vendor, 1)


@pytest.mark.parametrize("text", ["", "garbage\n\n\n", "processor : x\nCPU implementer : zz\n"])
def test_proc_cpuinfo_garbage_is_empty_not_an_error(text: str) -> None:
    ci = parse_proc_cpuinfo(text, "x86_64")
    assert "brand_raw" not in ci and "vendor_id_raw" not in ci


def test_cpu_source_reads_proc_cpuinfo_under_root_without_py_cpuinfo(tmp_path: pathlib.Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cpuinfo", None)  # importing py-cpuinfo would fail
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text((CPUINFO / "x86_64-kvm-epyc-2vcpu.txt").read_text())
    raw = collect_raw(sources=["cpu"], root=tmp_path)
    assert raw["notes"] == [] and raw["cpuinfo"]["brand_raw"] == "AMD EPYC" and raw["cpuinfo"]["source"] == "/proc/cpuinfo"


def test_cpu_source_falls_back_to_py_cpuinfo_when_proc_says_nothing(tmp_path: pathlib.Path, monkeypatch) -> None:
    info = {"brand_raw": "Apple M2", "arch": "ARM_8", "arch_string_raw": "arm64", "bits": 64, "count": 8, "vendor_id_raw": "Apple", "hz": 1}
    monkeypatch.setitem(sys.modules, "cpuinfo", types.SimpleNamespace(get_cpu_info=lambda: info))
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("garbage\n")
    raw = collect_raw(sources=["cpu"], root=tmp_path)
    assert raw["cpuinfo"] == {k: v for k, v in info.items() if k != "hz"}


def test_proc_cpuinfo_capture_parses_to_the_same_facts_as_the_py_cpuinfo_capture() -> None:
    # Both captured on the development VM, before and after the CPU source moved to /proc/cpuinfo.
    old, new = load("kvm-epyc-2vcpu-vm.json"), load("kvm-epyc-2vcpu-vm-proc.json")
    assert new["cpuinfo"]["source"] == "/proc/cpuinfo" and "source" not in old["cpuinfo"]
    assert parse_facts(new) == parse_facts(old)
