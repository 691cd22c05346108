"""Power control: ipmitool argv/env and output parsing (captured from ipmitool 1.8.19 against
ipmi_sim), Redfish requests against an httpx.MockTransport. No subprocess, no socket."""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest

from lab.common.errors import AuthError, ConfigError, NotFound, RemoteProtocolError, TransportError, UsageError
from lab.coordinator.power import PowerState
from lab.coordinator.power.ipmi import IpmiPower, classify_failure, parse_power_status
from lab.coordinator.power.redfish import RedfishPower

BAD_PASSWORD = ("Unable to Get Channel Cipher Suites\n> RAKP 2 HMAC is invalid\n"
                "Error: Unable to establish IPMI v2 / RMCP+ session\n")
BAD_USER = ("Unable to Get Channel Cipher Suites\nRAKP 2 message indicates an error : unauthorized name\n"
            "Error: Unable to establish IPMI v2 / RMCP+ session\n")
UNREACHABLE = "Error: Unable to establish IPMI v2 / RMCP+ session\n"


class FakeIpmitool:
    def __init__(self, replies: dict[str, tuple[int, str, str]]) -> None:
        self.replies = replies
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, argv, env, timeout):
        self.calls.append((list(argv), dict(env)))
        return self.replies.get(" ".join(argv[argv.index("-U") + 2 :]).replace("-E ", ""), (0, "", ""))


def test_password_goes_through_the_environment_never_argv() -> None:
    fake = FakeIpmitool({"chassis power status": (0, "Chassis Power is on\n", "")})
    ctl = IpmiPower("127.0.0.1", "admin", password="s3cret", runner=fake)
    assert ctl.state() == PowerState.ON
    argv, env = fake.calls[0]
    assert "s3cret" not in " ".join(argv) and "-E" in argv and "-P" not in argv
    assert env == {"IPMI_PASSWORD": "s3cret"}
    assert "s3cret" not in repr(ctl)


def test_password_file_must_be_private(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        IpmiPower("h", "u", password_file=f)
    f.chmod(0o600)
    fake = FakeIpmitool({})
    IpmiPower("h", "u", password_file=f, runner=fake).on()
    argv, env = fake.calls[0]
    assert argv[-5:] == ["-f", str(f), "chassis", "power", "on"] and env == {}
    with pytest.raises(UsageError):
        IpmiPower("h", "u")


def test_commands() -> None:
    fake = FakeIpmitool({"chassis power status": (0, "Chassis Power is off\n", "")})
    ctl = IpmiPower("h", "u", password="p", runner=fake)
    ctl.set_next_boot_pxe()
    ctl.set_next_boot_pxe(uefi=True)
    ctl.off()
    ctl.cycle()  # off → on
    tails = [c[0][c[0].index("-E") + 1 :] for c in fake.calls]
    assert tails == [["chassis", "bootdev", "pxe"], ["chassis", "bootdev", "pxe", "options=efiboot"],
                     ["chassis", "power", "off"], ["chassis", "power", "status"], ["chassis", "power", "on"]]


def test_parse_and_classify() -> None:
    assert parse_power_status("Chassis Power is off\n") == PowerState.OFF
    with pytest.raises(RemoteProtocolError):
        parse_power_status("weird")
    assert isinstance(classify_failure("h", BAD_PASSWORD), AuthError)
    assert isinstance(classify_failure("h", BAD_USER), AuthError)
    assert isinstance(classify_failure("h", UNREACHABLE), TransportError)
    fake = FakeIpmitool({"chassis power on": (1, "", BAD_PASSWORD)})
    with pytest.raises(AuthError, match="credentials refused"):
        IpmiPower("h", "u", password="p", runner=fake).on()


# -- Redfish -----------------------------------------------------------------------------------


class FakeBmc:
    def __init__(self) -> None:
        self.power = "Off"
        self.boot = {"BootSourceOverrideTarget": "None", "BootSourceOverrideEnabled": "Disabled"}
        self.resets: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != httpx.BasicAuth("admin", "pw")._auth_header:
            return httpx.Response(401)
        path = request.url.path
        if path == "/redfish/v1/Systems":
            return httpx.Response(200, json={"Members": [{"@odata.id": "/redfish/v1/Systems/node-1"}]})
        if path == "/redfish/v1/Systems/node-1":
            if request.method == "PATCH":
                self.boot.update(json.loads(request.content)["Boot"])
                return httpx.Response(204)
            return httpx.Response(200, json={
                "PowerState": self.power, "Boot": self.boot,
                "Actions": {"#ComputerSystem.Reset": {"ResetType@Redfish.AllowableValues": ["On", "ForceOff", "ForceRestart"]}}})
        if path == "/redfish/v1/Systems/node-1/Actions/ComputerSystem.Reset":
            kind = json.loads(request.content)["ResetType"]
            self.resets.append(kind)
            self.power = "Off" if kind == "ForceOff" else "On"
            return httpx.Response(204)
        return httpx.Response(404)


def test_redfish_power_and_pxe_override() -> None:
    bmc = FakeBmc()
    with RedfishPower("https://bmc", "admin", "pw", transport=httpx.MockTransport(bmc)) as ctl:
        assert ctl.state() == PowerState.OFF
        ctl.set_next_boot_pxe()
        assert ctl.boot_override() == ("Pxe", "Once")
        ctl.cycle()
        ctl.cycle()
        ctl.off()
        assert bmc.resets == ["On", "ForceRestart", "ForceOff"]
        assert "pw" not in repr(ctl)


def test_redfish_errors() -> None:
    with pytest.raises(AuthError):
        RedfishPower("https://bmc", "admin", "wrong", transport=httpx.MockTransport(FakeBmc())).state()
    with pytest.raises(NotFound):
        RedfishPower("https://bmc", "admin", "pw", system_id="nope", transport=httpx.MockTransport(FakeBmc())).state()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(TransportError):
        RedfishPower("https://bmc", "a", "b", transport=httpx.MockTransport(refuse)).on()
    with pytest.raises(RemoteProtocolError):
        RedfishPower("https://bmc", "a", "b", system_id="x",
                     transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"[1]"))).state()
