"""Bare-metal onboarding, pure parts: render table and plan, the step list, boot events → stages →
IDENTITY pillar text, the inventory record, BMC password sources (never argv)."""

from __future__ import annotations

import pathlib
import types

import pytest

from lab.common.errors import UsageError
from lab.coordinator.engine import _server_record
from lab.coordinator.power.ipmi import IpmiPower
from lab.coordinator.providers import baremetal as bm
from lab.coordinator.providers.ssh import render_table

MAC = "aa:bb:cc:dd:ee:ff"


def test_render_table_matches_the_spec() -> None:
    text = render_table(bm.table_rows("beelink-max", MAC, "ubuntu-24.04", ["k8s-worker", "rocm", "longhorn"], "this device"))
    assert "│ Name       │ beelink-max" in text
    assert "│ Provider   │ baremetal (PXE boot)" in text
    assert "│ MAC        │ AA:BB:CC:DD:EE:FF" in text
    assert "│ Image      │ ubuntu-24.04" in text
    assert "│ Labels     │ k8s-worker,rocm,longhorn" in text
    assert "│ PXE server │ this device" in text


def test_plan_and_warnings() -> None:
    lines = bm.plan_lines(MAC, "ubuntu-24.04", "ubuntu", "en0", ["a"])
    assert lines == [
        "+ Start PXE/DHCP/TFTP on en0",
        "+ Wait for machine with MAC AA:BB:CC:DD:EE:FF to boot",
        "+ Serve unattended ubuntu-24.04 installer (Ubuntu autoinstall)",
        "+ After install: auto-enroll with one-time token baked into installer",
        "+ Assign labels: a, apply puppet classes",
    ]
    assert bm.plan_lines(MAC, "rocky-9", "rhel", None, [], "IPMI")[0] == "+ IPMI: set next boot to PXE and power the machine on"
    warn = bm.warning_lines(MAC, "full", "10.0.0.200-10.0.0.250")
    assert warn[0] == "⚠ PXE requires: network interface on same L2 segment as target machine"
    assert warn[1] == "⚠ DHCP: will respond ONLY to MAC AA:BB:CC:DD:EE:FF (safe for existing networks)"
    assert "no other DHCP server" in warn[2] and "proxyDHCP" in warn[2]
    assert "proxyDHCP" in bm.warning_lines(MAC, "proxy", None)[1]


def test_step_plan() -> None:
    assert bm.STEPS == ("render", "register", "token", "allow", "power", "serve", "wait")
    assert [s.key for s in bm.STAGES] == ["waiting", "boot-request", "ipxe", "kernel", "config", "agent", "enrolled"]


def test_default_pool_stays_in_the_subnet_and_off_the_server() -> None:
    assert bm.default_pool("10.250.7.1", 24) == "10.250.7.205-10.250.7.254"
    assert bm.default_pool("10.250.7.254", 24) == "10.250.7.204-10.250.7.253"
    assert bm.default_pool("192.168.5.1", 29) == "192.168.5.2-192.168.5.6"
    with pytest.raises(UsageError):
        bm.default_pool("10.0.0.1", 32)


@pytest.mark.parametrize(("event", "detail", "stage"), [
    ("dhcp-discover", "ipxe", "boot-request"), ("dhcp-ack", "10.0.0.5", "boot-request"),
    ("proxydhcp-discover", "arch=7", "boot-request"), ("tftp-done", "file=ipxe.efi", "ipxe"),
    ("script-fetched", "", "ipxe"), ("kernel-fetched", "", "kernel"), ("initrd-fetched", "", "kernel"),
    ("config-fetched:user-data", "", "config"), ("agent-script-fetched", "", "agent"),
    ("dhcp-release", "", None), ("tftp-failed", "", None),
])  # fmt: skip
def test_events_map_to_stages(event: str, detail: str, stage: str | None) -> None:
    assert bm.stage_for_event(event, detail) == stage


def test_tracker_only_advances_and_only_for_its_mac() -> None:
    t = bm.StageTracker(MAC.upper())
    assert t.feed("11:22:33:44:55:66", "dhcp-discover") is None
    assert t.feed(MAC, "dhcp-discover") == "boot-request"
    assert t.feed(MAC, "dhcp-ack") is None  # same stage: printed once
    assert t.feed(MAC, "tftp-done") == "ipxe"
    assert t.feed(MAC, "dhcp-discover") is None  # iPXE DHCPs again: no step back
    assert t.feed(MAC, "script-fetched") is None
    assert t.feed(MAC, "kernel-fetched") == "kernel"
    assert t.feed(MAC, "initrd-fetched") is None
    assert t.feed(MAC, "config-fetched:user-data") == "config"
    assert t.history == ["boot-request", "ipxe", "kernel", "config"]
    assert t.stage == "config"


def test_stage_lines() -> None:
    assert bm.stage_line("boot-request", MAC) == "→ Boot request received from AA:BB:CC:DD:EE:FF"
    assert bm.stage_line("ipxe", MAC) == "→ Serving iPXE"
    assert bm.stage_line("kernel", MAC) == "→ kernel + initrd"
    assert bm.stage_line("config", MAC, "user-data") == "→ autoinstall config fetched"
    assert bm.stage_line("config", MAC, "ks.cfg") == "→ kickstart config fetched"
    assert bm.stage_line("agent", MAC) == "→ agent install script fetched"


@pytest.mark.parametrize(("stage", "state", "text"), [
    ("waiting", "running", "pxe: waiting for boot request"),
    ("boot-request", "running", "pxe: boot request received"),
    ("ipxe", "running", "pxe: serving iPXE"),
    ("kernel", "running", "pxe: kernel + initrd"),
    ("config", "running", "pxe: installing OS"),
    ("agent", "running", "pxe: installing agent"),
    ("kernel", "timed-out", "pxe: timed out at kernel + initrd"),
    ("waiting", "timed-out", "pxe: timed out waiting for boot request"),
])  # fmt: skip
def test_stage_to_pillar_text(stage: str, state: str, text: str) -> None:
    assert bm.identity_pillar(bm.onboarding_facts(MAC, stage, state=state)) == text


def test_pillar_for_a_failed_step_and_for_foreign_facts() -> None:
    assert bm.identity_pillar(bm.onboarding_facts(MAC, "ipxe", state="failed", step="power")) == "pxe: failed at step power"
    assert bm.identity_pillar({"hostname": "x"}) is None
    assert bm.identity_pillar({"onboarding": {"stage": "bogus"}}) is None
    assert bm.identity_pillar(None) is None


def _server(**kw: object) -> types.SimpleNamespace:
    base = {"name": "n1", "provider": "baremetal", "labels": (), "environment": None, "region": None, "size": None,
            "enrolled_at": None, "facts": None, "puppet": None}
    return types.SimpleNamespace(**(base | kw))


def test_get_servers_identity_shows_the_stage_until_enrolled() -> None:
    assert _server_record(_server())["identity"] == "not enrolled"
    facts = bm.onboarding_facts(MAC, "ipxe", history=["boot-request", "ipxe"], at=1.0)
    assert facts["onboarding"]["mac"] == MAC and facts["onboarding"]["history"] == ["boot-request", "ipxe"]
    assert _server_record(_server(facts=facts))["identity"] == "pxe: serving iPXE"
    assert _server_record(_server(facts=facts, enrolled_at=5.0))["identity"] == "enrolled"
    assert _server_record(_server(facts={"os": "debian"}))["identity"] == "not enrolled"


def test_bmc_password_from_environment_never_argv() -> None:
    b = bm.bmc_from_options("10.0.0.9:6230", "admin", None, None, None, None, environ={"LAB_IPMI_PASSWORD": "hunter2"})
    assert b is not None and b.kind == "ipmi" and "hunter2" not in repr(b)
    ctl = b.controller()
    assert isinstance(ctl, IpmiPower) and ctl.port == 6230 and ctl.host == "10.0.0.9"
    argv, env = ctl.argv("chassis", "power", "on")
    assert "hunter2" not in " ".join(argv) and "-E" in argv and env == {"IPMI_PASSWORD": "hunter2"}


def test_bmc_password_file(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\n")
    f.chmod(0o600)
    b = bm.bmc_from_options("10.0.0.9", "admin", str(f), None, None, None, environ={})
    assert b is not None and b.password is None
    argv, env = b.controller().argv("chassis", "power", "status")
    assert argv[argv.index("-f") + 1] == str(f) and "s3cret" not in " ".join(argv) and env == {}


@pytest.mark.parametrize(("args", "msg"), [
    (("10.0.0.9", "admin", None, None, None, None), "LAB_IPMI_PASSWORD"),
    (("10.0.0.9", None, None, None, None, None), "--ipmi-user"),
    (("10.0.0.9", "a", None, "https://bmc", "a", None), "not both"),
    ((None, "admin", None, None, None, None), "need --ipmi"),
    ((None, None, None, "https://bmc", "root", None), "LAB_REDFISH_PASSWORD"),
])  # fmt: skip
def test_bmc_option_errors(args: tuple, msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        bm.bmc_from_options(*args, environ={})


def test_no_bmc() -> None:
    assert bm.bmc_from_options(None, None, None, None, None, None, environ={"LAB_IPMI_PASSWORD": "x"}) is None


def test_onboard_cli_has_no_password_option() -> None:
    import typer.main

    from lab.coordinator.cli.app import app

    cmd = typer.main.get_command(app).commands["onboard"]  # type: ignore[attr-defined]
    opts = {o for p in cmd.params for o in p.opts}
    assert {"--mac", "--image", "--ipmi", "--ipmi-user", "--ipmi-password-file", "--redfish", "--redfish-user",
            "--interface", "--proxy-dhcp", "--pool", "--server-address", "--timeout"} <= opts
    assert not any(o in opts for o in ("--ipmi-password", "--redfish-password", "--password"))


def test_redfish_bmc_password_from_file(tmp_path: pathlib.Path) -> None:
    from lab.coordinator.power.redfish import RedfishPower

    f = tmp_path / "pw"
    f.write_text("r3dfish\n")
    b = bm.bmc_from_options(None, None, None, "https://bmc.example", "root", str(f), environ={})
    assert b is not None and b.kind == "redfish" and b.label == "Redfish"
    ctl = b.controller()
    try:
        assert isinstance(ctl, RedfishPower) and "r3dfish" not in repr(ctl)
    finally:
        ctl.close()
