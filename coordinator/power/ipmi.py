"""IPMI power control through ``ipmitool`` (lanplus). The password never goes on argv: it is
passed as IPMI_PASSWORD in the child's environment (``-E``) or read by ipmitool from a 0600
file (``-f``). Parsing of ipmitool's output is pure and tested with captured output."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence

from lab.common.errors import AuthError, ConfigError, RemoteProtocolError, TransportError, UsageError
from lab.coordinator.power.base import PowerController, PowerState

DEFAULT_TIMEOUT = 30.0

# (argv, extra environment, timeout) -> (returncode, stdout, stderr)
Runner = Callable[[Sequence[str], Mapping[str, str], float], tuple[int, str, str]]

_AUTH_PATTERNS = re.compile(r"RAKP \d.*(invalid|error)|unauthorized name|invalid user|password", re.I)
_POWER_RE = re.compile(r"^Chassis Power is (on|off)\s*$", re.M)


def run_subprocess(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> tuple[int, str, str]:
    try:
        r = subprocess.run(list(argv), env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise ConfigError(f"{argv[0]} is not installed (Debian: apt-get install ipmitool)") from exc
    except subprocess.TimeoutExpired as exc:
        raise TransportError(f"ipmitool timed out after {timeout:.0f}s") from exc
    return r.returncode, r.stdout, r.stderr


def parse_power_status(stdout: str) -> PowerState:
    m = _POWER_RE.search(stdout)
    if m is None:
        raise RemoteProtocolError(f"unexpected ipmitool power status output: {stdout.strip()[:200]!r}")
    return PowerState.ON if m[1] == "on" else PowerState.OFF


def classify_failure(host: str, stderr: str) -> Exception:
    text = stderr.strip().splitlines()
    last = text[-1] if text else "no output"
    if _AUTH_PATTERNS.search(stderr):
        return AuthError(f"IPMI {host}: credentials refused ({last})")
    return TransportError(f"IPMI {host}: {last}")


@dataclasses.dataclass
class IpmiPower(PowerController):
    host: str
    user: str
    password: str | None = dataclasses.field(default=None, repr=False)
    password_file: pathlib.Path | None = None
    port: int = 623
    interface: str = "lanplus"
    ipmitool: str = "ipmitool"
    timeout: float = DEFAULT_TIMEOUT
    retries: int = 2
    retry_interval: int = 1
    runner: Runner = run_subprocess

    def __post_init__(self) -> None:
        if (self.password is None) == (self.password_file is None):
            raise UsageError("IPMI needs exactly one of a password (from IPMI_PASSWORD) or a password file")
        if self.password_file is not None:
            try:
                mode = stat.S_IMODE(self.password_file.stat().st_mode)
            except OSError as exc:
                raise ConfigError(f"IPMI password file: {exc}") from exc
            if mode & 0o077:
                raise ConfigError(f"IPMI password file {self.password_file} must not be readable by others (chmod 600)")

    def argv(self, *command: str) -> tuple[list[str], dict[str, str]]:
        # -v: ipmitool only names the RAKP failure (bad user/password) when verbose
        base = [self.ipmitool, "-v", "-I", self.interface, "-H", self.host, "-p", str(self.port),
                "-N", str(self.retry_interval), "-R", str(self.retries), "-U", self.user]
        if self.password_file is not None:
            return [*base, "-f", str(self.password_file), *command], {}
        return [*base, "-E", *command], {"IPMI_PASSWORD": self.password or ""}

    def _run(self, *command: str) -> str:
        argv, env = self.argv(*command)
        rc, out, err = self.runner(argv, env, self.timeout)
        if rc != 0:
            raise classify_failure(self.host, err or out)
        return out

    def state(self) -> PowerState:
        return parse_power_status(self._run("chassis", "power", "status"))

    def on(self) -> None:
        self._run("chassis", "power", "on")

    def off(self) -> None:
        self._run("chassis", "power", "off")

    def cycle(self) -> None:
        if self.state() == PowerState.OFF:
            self.on()
        else:
            self._run("chassis", "power", "cycle")

    def set_next_boot_pxe(self, *, uefi: bool = False) -> None:
        self._run("chassis", "bootdev", "pxe", *(["options=efiboot"] if uefi else []))

    def boot_device(self) -> str:
        """The boot device override the BMC reports (``chassis bootparam get 5``), e.g. "pxe"."""
        out = self._run("chassis", "bootparam", "get", "5")
        m = re.search(r"Boot Device Selector\s*:\s*Force (\w+)", out) or re.search(r"Force (PXE)", out)
        return m[1].lower() if m else "none"
