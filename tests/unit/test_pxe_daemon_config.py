"""The daemon's boot services, pure parts: the ``pxe:`` section of config.yaml (every error names
config.yaml:line), and the stage recorder that writes boot progress into the inventory for
`lab onboard --no-wait`."""

from __future__ import annotations

import pathlib
import textwrap

import pytest

from lab.common.errors import ConfigError
from lab.coordinator.providers import baremetal as bm
from lab.coordinator.pxe.config import load_pxe_config, parse_pxe_config
from lab.coordinator.pxe.registry import Allowlist
from lab.coordinator.pxe.service import StageRecorder
from lab.coordinator.state import StateDB

MAC = "52:54:00:12:34:56"


def write(home: pathlib.Path, text: str) -> pathlib.Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.yaml").write_text(textwrap.dedent(text))
    return home


def test_no_file_or_no_section_means_no_boot_services(tmp_path: pathlib.Path) -> None:
    assert load_pxe_config(tmp_path) is None
    assert load_pxe_config(write(tmp_path, "server: 10.0.0.1:7443\n")) is None


def test_proxy_dhcp_is_the_default_and_pool_means_full(tmp_path: pathlib.Path) -> None:
    cfg = load_pxe_config(write(tmp_path, """\
        server: x
        pxe:
          interface: enp3s0
          address: 10.9.0.1
          boot_dir: tftp
          ports: {http: 8081}
        """))
    assert cfg is not None and cfg.mode == "proxy" and cfg.pool is None
    opts = cfg.options()
    assert (opts.address, opts.interface, opts.mode, opts.http_port, opts.dhcp_port, opts.proxy_port) == \
        ("10.9.0.1", "enp3s0", "proxy", 8081, 67, 4011)
    assert opts.boot_dir == tmp_path / "tftp"  # relative to config.yaml
    full = parse_pxe_config({"address": "10.9.0.1", "pool": "10.9.0.100-10.9.0.150", "netmask": "255.255.0.0",
                             "router": "10.9.0.254"}).options()
    assert (full.mode, full.pool, full.netmask, full.router) == ("full", "10.9.0.100-10.9.0.150", "255.255.0.0", "10.9.0.254")


@pytest.mark.parametrize(("body", "line", "message"), [
    ("pxe: [a]\n", 2, "must be a mapping"),
    ("pxe:\n  pool: 10.0.0.1-10.0.0.9\n", 2, "set 'interface'"),
    ("pxe:\n  address: 10.0.0.1\n  colour: blue\n", 4, "unknown key 'colour'"),
    ("pxe:\n  address: 10.0.0.300\n", 3, "address must be an IPv4 address"),
    ("pxe:\n  address: 10.0.0.1\n  pool: 10.0.0.9\n", 4, "pool wants FIRST-LAST"),
    ("pxe:\n  address: 10.0.0.1\n  pool: 10.0.0.9-10.0.0.2\n", 4, "first address is after the last"),
    ("pxe:\n  address: 10.0.0.5\n  pool: 10.0.0.1-10.0.0.9\n", 4, "contains the server's own address"),
    ("pxe:\n  address: 10.0.0.1\n  router: 10.0.0.254\n", 4, "set pool too"),
    ("pxe:\n  address: 10.0.0.1\n  netmask: 255.0.255.0\n", 4, "not a contiguous mask"),
    ("pxe:\n  interface: 'eth0; rm -rf /'\n", 3, "network interface name"),
    ("pxe:\n  address: 10.0.0.1\n  efi_file: grub.efi\n", 4, "efi_file must be one of"),
    ("pxe:\n  address: 10.0.0.1\n  ports:\n    tftp: 70000\n", 5, "ports.tftp must be a whole number"),
    ("pxe:\n  address: 10.0.0.1\n  ports:\n    gopher: 70\n", 5, "unknown port 'gopher'"),
    ("pxe:\n  address: 10.0.0.1\n  boot_dir: 7\n", 4, "boot_dir must be a path"),
])  # fmt: skip
def test_bad_sections_name_file_and_line(tmp_path: pathlib.Path, body: str, line: int, message: str) -> None:
    write(tmp_path, "# lab settings\n" + body)
    with pytest.raises(ConfigError) as e:
        load_pxe_config(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.yaml'}:{line}: ")
    assert message in str(e.value) and "\n" not in str(e.value)


# -- stages recorded by the boot services (lab onboard --no-wait) ------------------------------


def test_advance_onboarding_only_moves_forward_for_its_mac() -> None:
    facts = bm.onboarding_facts(MAC, "waiting", at=1.0)
    f2 = bm.advance_onboarding(facts, MAC.upper(), "boot-request", at=2.0)
    assert f2 is not None and f2["onboarding"]["stage"] == "boot-request" and f2["onboarding"]["history"] == ["boot-request"]
    assert bm.advance_onboarding(f2, MAC, "boot-request", at=3.0) is None
    f3 = bm.advance_onboarding(f2, MAC, "kernel", at=3.0)
    assert f3 is not None and f3["onboarding"]["history"] == ["boot-request", "kernel"] and f3["onboarding"]["at"] == 3.0
    assert bm.advance_onboarding(f3, MAC, "ipxe", at=4.0) is None  # iPXE DHCPs again: no step back
    assert bm.advance_onboarding(f3, "02:00:00:00:00:01", "config", at=4.0) is None
    assert bm.advance_onboarding({"cpu": {}}, MAC, "config", at=4.0) is None  # not onboarding (an agent's facts)
    assert bm.advance_onboarding(None, MAC, "config", at=4.0) is None


@pytest.fixture()
def state(tmp_path: pathlib.Path):
    db = StateDB.open(tmp_path / "home")
    yield db
    db.close()


def test_recorder_writes_the_stage_of_the_onboarding_server(state: StateDB) -> None:
    allow = Allowlist()
    allow.allow(MAC, "qemu-1", 1000.0)
    allow.allow("02:00:00:00:00:02", "other", 1000.0)
    state.add_server("qemu-1", "baremetal", [])
    state.update_server("qemu-1", facts=bm.onboarding_facts(MAC, "waiting", at=1.0))
    state.add_server("other", "ssh", [])  # not a baremetal onboarding: never touched
    rec = StageRecorder(state, allow, clock=lambda: 10.0)
    rec(MAC, "proxydhcp-discover", "arch=7")
    assert bm.identity_pillar(state.get_server("qemu-1").facts) == "pxe: boot request received"
    rec(MAC, "dhcp-release", "")  # not a stage
    rec("-", "tftp-done", "peer=10.0.0.9 file=ipxe.efi")  # unknown machine
    rec("02:00:00:00:00:99", "script-fetched", "")  # not onboarding
    rec("02:00:00:00:00:02", "script-fetched", "")
    assert state.get_server("other").facts is None
    rec(MAC, "script-fetched", "")
    rec(MAC, "kernel-fetched", "")
    rec(MAC, "dhcp-discover", "ipxe")  # no step back
    facts = state.get_server("qemu-1").facts
    assert facts["onboarding"]["stage"] == "kernel" and facts["onboarding"]["history"] == ["boot-request", "ipxe", "kernel"]
    assert bm.identity_pillar(facts) == "pxe: kernel + initrd"
    # onboarded again (a new record, stage reset to waiting by `lab onboard`): followed from the start
    allow.allow(MAC, "qemu-1", 2000.0)
    state.update_server("qemu-1", facts=bm.onboarding_facts(MAC, "waiting", at=11.0))
    rec(MAC, "dhcp-discover", "")
    assert state.get_server("qemu-1").facts["onboarding"]["stage"] == "boot-request"
    state.update_server("qemu-1", enrolled_at=20.0, facts={"cpu": {"model": "x"}})
    rec(MAC, "agent-script-fetched", "")  # enrolled: the agent's facts stay
    assert state.get_server("qemu-1").facts == {"cpu": {"model": "x"}}


def test_recorder_ignores_expired_onboardings_and_removed_servers(state: StateDB, caplog) -> None:
    allow = Allowlist()
    allow.allow(MAC, "qemu-1", 5.0)
    state.add_server("qemu-1", "baremetal", [])
    state.update_server("qemu-1", facts=bm.onboarding_facts(MAC, "waiting"))
    StageRecorder(state, allow, clock=lambda: 10.0)(MAC, "dhcp-discover", "")
    assert state.get_server("qemu-1").facts["onboarding"]["stage"] == "waiting"
    allow.allow(MAC, "gone", 1000.0)
    StageRecorder(state, allow, clock=lambda: 10.0)(MAC, "dhcp-discover", "")  # no such server: logged, no error
    assert "event=pxe-stage-not-recorded server=gone" in caplog.text
