"""Power control against real BMC emulators on loopback: OpenIPMI's ipmi_sim driven by ipmitool,
and the sushy-tools Redfish emulator (fake driver). Skips when they are missing unless CI is set.

sushy-emulator is looked up on PATH, then in $SUSHY_EMULATOR (path to the script)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest
from _ipmi_sim import ipmi_sim_args

from lab.common.errors import AuthError, TransportError
from lab.coordinator.power import PowerState
from lab.coordinator.power.ipmi import IpmiPower
from lab.coordinator.power.redfish import RedfishPower


def need(*binaries: str) -> list[str]:
    paths, missing = [], []
    for b in binaries:
        p = shutil.which(b) or (os.environ.get("SUSHY_EMULATOR") if b == "sushy-emulator" else None)
        (paths if p else missing).append(p or b)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")
    return paths


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, kind)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ipmi_sim(tmp_path: pathlib.Path):
    (sim,) = need("ipmi_sim")
    need("ipmitool")
    port = free_port()
    proc = subprocess.Popen([sim, *ipmi_sim_args(tmp_path, port, user_test=True)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        ctl = IpmiPower("127.0.0.1", "admin", password="s3cret", port=port)
        for _ in range(50):
            try:
                ctl.state()
                break
            except TransportError:
                time.sleep(0.2)
        yield port, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ipmi_power_and_pxe_next_boot(ipmi_sim) -> None:
    port, state = ipmi_sim
    ctl = IpmiPower("127.0.0.1", "admin", password="s3cret", port=port)
    assert ctl.state() == PowerState.OFF
    ctl.set_next_boot_pxe()
    assert (state / "boot").read_text().strip() == "pxe"
    assert ctl.boot_device() == "pxe"
    ctl.on()
    assert ctl.state() == PowerState.ON
    ctl.cycle()
    ctl.off()
    assert ctl.state() == PowerState.OFF


def test_ipmi_password_file(ipmi_sim, tmp_path: pathlib.Path) -> None:
    port, _ = ipmi_sim
    pw = tmp_path / "ipmi-password"
    pw.write_text("s3cret")
    pw.chmod(0o600)
    assert IpmiPower("127.0.0.1", "admin", password_file=pw, port=port).state() == PowerState.OFF


@pytest.mark.parametrize("user, password", [("admin", "wrong"), ("nobody", "s3cret")])
def test_ipmi_wrong_credentials(ipmi_sim, user: str, password: str) -> None:
    port, _ = ipmi_sim
    with pytest.raises(AuthError, match="credentials refused"):
        IpmiPower("127.0.0.1", user, password=password, port=port, retries=1).state()


def test_ipmi_unreachable_bmc() -> None:
    need("ipmitool")
    with pytest.raises(TransportError):
        IpmiPower("127.0.0.1", "admin", password="x", port=free_port(), retries=1).state()


@pytest.fixture()
def sushy(tmp_path: pathlib.Path):
    (emulator,) = need("sushy-emulator")
    port = free_port(socket.SOCK_STREAM)
    python = pathlib.Path(emulator).with_name("python")
    (tmp_path / "htpasswd").write_text("")
    r = subprocess.run([str(python), "-c", "import bcrypt,sys; print('admin:' + bcrypt.hashpw(b'pw', "
                        "bcrypt.gensalt(rounds=4)).decode())"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    (tmp_path / "htpasswd").write_text(r.stdout)
    (tmp_path / "conf.py").write_text(f"SUSHY_EMULATOR_AUTH_FILE = {str(tmp_path / 'htpasswd')!r}\n"
                                      f"SUSHY_EMULATOR_STATE_DIR = {str(tmp_path / 'state')!r}\n")
    proc = subprocess.Popen([emulator, "--fake", "-i", "127.0.0.1", "-p", str(port), "--config", str(tmp_path / "conf.py")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.closing(socket.socket()) as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_redfish_power_and_pxe_next_boot(sushy: str) -> None:
    with RedfishPower(sushy, "admin", "pw") as ctl:
        assert ctl.system_path().startswith("/redfish/v1/Systems/")
        ctl.set_next_boot_pxe()
        assert ctl.boot_override()[0] == "Pxe"
        ctl.on()  # the fake driver applies power changes after 1-11 s, like real hardware
        assert ctl.wait_for(PowerState.ON, timeout=20, interval=0.5)
        ctl.off()
        assert ctl.wait_for(PowerState.OFF, timeout=20, interval=0.5)


def test_redfish_wrong_credentials(sushy: str) -> None:
    with pytest.raises(AuthError):
        RedfishPower(sushy, "admin", "wrong").state()
