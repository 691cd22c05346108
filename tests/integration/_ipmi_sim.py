"""Shared by the tests that power a machine through OpenIPMI's ipmi_sim (a BMC emulator on
loopback): its configuration, and a chassis control script that keeps the power and boot device
in files. A plain module, not a test file: the integration tests import it from their own folder.

The simulated BMC answers on 127.0.0.1:PORT (LAN, IPMI 2.0) to user ``admin`` / ``s3cret``."""

from __future__ import annotations

import pathlib
import textwrap

CHASSIS = textwrap.dedent(
    """\
    #!/bin/sh
    # ipmi_sim chassis_control: <mc> get|set <parm> [<value>]...; state in files beside this script
    d=$(dirname "$0"); op=$2; shift 2
    if [ "$op" = get ]; then
      for p in "$@"; do case $p in
        power) echo "power:$(cat "$d/power" 2>/dev/null || echo 0)";;
        boot) echo "boot:$(cat "$d/boot" 2>/dev/null || echo default)";;
      esac; done
    elif [ "$op" = set ]; then
      while [ $# -ge 2 ]; do case $1 in
        power) echo "$2" > "$d/power";;
        reset) echo "$2" >> "$d/resets";;
        boot) echo "$2" > "$d/boot";;
      esac; shift 2; done
    else exit 1; fi
    """
)

_USER_TEST = '  user 1 true  ""      "test" user  10 none md2 md5 straight\n'


def ipmi_sim_args(directory: pathlib.Path, port: int, *, user_test: bool = False) -> list[str]:
    """Write one BMC's configuration into ``directory`` (the chassis script writes its ``power``,
    ``boot`` and ``resets`` files there too) and return the arguments that run ipmi_sim on it,
    after the program's name. ``user_test``: also user 1, ``test`` with an empty password."""
    chassis = directory / "chassis.sh"
    chassis.write_text(CHASSIS)
    chassis.chmod(0o755)
    (directory / "lan.conf").write_text(
        textwrap.dedent(f"""\
            name "labtest"
            set_working_mc 0x20
              startlan 1
                addr 127.0.0.1 {port}
                priv_limit admin
                allowed_auths_callback none md2 md5 straight
                allowed_auths_user none md2 md5 straight
                allowed_auths_operator none md2 md5 straight
                allowed_auths_admin none md2 md5 straight
                guid a123456789abcdefa123456789abcdef
              endlan
              chassis_control "{chassis} 0x20"
            """)
        + (_USER_TEST if user_test else "")
        + '  user 2 true  "admin" "s3cret" admin 10 none md2 md5 straight\n'
    )
    (directory / "sim.emu").write_text(
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n"
        "sel_enable 0x20 1000 0x0a\nmc_enable 0x20\n")
    return ["-c", str(directory / "lan.conf"), "-f", str(directory / "sim.emu"), "-s", str(directory / "state"), "-n"]
