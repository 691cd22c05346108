"""SSH onboarding (spec "Scenario A: machine has OS"): render what will happen, then apply it.

Pure parts (tested in tests/unit/test_onboard*.py): the facts probe and its parser, the
spec's render table, the step plan, label suggestions, and every remote command string — none
of which ever contains the join token (it travels by SFTP into a 0600 file that
``lab-agent enroll --token-file`` reads and removes).

Impure part: :class:`Onboarding` runs the steps over one :class:`~._asyncssh.SshClient`.
Every step is idempotent (an existing venv is reused, wheels are copied only when they differ,
the token file is replaced, enroll reruns with a fresh token, a running agent is stopped and
started again), so a failed onboard is fixed by running it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shlex
from collections.abc import Callable, Sequence
from typing import Any, Final

from lab.agent.facts import Facts, Suggestion, nominal_gb, parse_facts, suggest_labels
from lab.common.errors import LabError

__all__ = [
    "PROBE_SCRIPT", "STEPS", "OnboardFailed", "Onboarding", "RemotePaths", "Remote", "Step", "commands_for",
    "parse_probe", "plan_lines", "render_table", "suggestion_lines", "systemd_unit",
]

SERVICE_MODES: Final = ("auto", "systemd", "process")
AGENT_UNIT: Final = "lab-agent.service"


class OnboardFailed(LabError):
    """One onboarding step failed; ``step`` names it, the message says why in one line."""

    def __init__(self, step: str, why: str) -> None:
        why = " ".join(why.split()) or "failed"
        super().__init__(f"onboard failed at step '{step}': {why} (fix it and run the same `lab onboard` again)")
        self.step = step
        self.why = why


@dataclasses.dataclass(frozen=True)
class Step:
    key: str
    text: str  # what `→ …` prints


STEPS: Final = (
    Step("connect", "SSH into {host}"),
    Step("prepare", "Check python3 and venv, create directories"),
    Step("copy", "Copy lab agent wheels ({wheels} files)"),
    Step("install", "Install lab agent into {venv}"),
    Step("token", "Generate one-time token → {token_file} (0600)"),
    Step("enroll", "Lab agent enrolls with {server}"),
    Step("start", "Start lab agent ({mode})"),
    Step("wait", "Wait for {name} to appear enrolled in the inventory"),
)


# -- remote paths and commands (pure) ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RemotePaths:
    """Where things go on the target; ``root`` prefixes every path (tests: a temp directory)."""

    root: str = ""

    def _p(self, path: str) -> str:
        return (self.root.rstrip("/") + path) if self.root else path

    @property
    def venv(self) -> str:
        return self._p("/opt/lab")

    @property
    def wheels(self) -> str:
        return self._p("/opt/lab/wheels")

    @property
    def etc(self) -> str:
        return self._p("/etc/lab")

    @property
    def token_file(self) -> str:
        return self._p("/etc/lab/join-token")

    @property
    def home(self) -> str:
        return self._p("/var/lib/lab")

    @property
    def run_dir(self) -> str:
        return self._p("/run/lab")

    @property
    def secrets_dir(self) -> str:
        return self._p("/run/secrets")

    @property
    def pidfile(self) -> str:
        return self._p("/run/lab/lab-agent.supervisor.pid")

    @property
    def log(self) -> str:
        return self._p("/var/log/lab-agent.log")

    @property
    def unit(self) -> str:
        return self._p("/etc/systemd/system/" + AGENT_UNIT)

    @property
    def systemd_marker(self) -> str:
        return self._p("/run/systemd/system")

    @property
    def agent(self) -> str:
        return self.venv + "/bin/lab-agent"


q = shlex.quote

# Runs on the target with its own python3 (stdlib only): the raw facts schema of
# lab.agent.facts (host, psutil-like memory, PCI display devices, nvidia-smi, os-release),
# plus "_target" (python version, venv availability) which parse_probe takes out.
PROBE_SCRIPT: Final = r"""
import json, os, platform, shutil, subprocess
r = {"schema": 1, "notes": []}
u = platform.uname()
r["host"] = {"hostname": u.node, "system": u.system, "kernel": u.release, "machine": u.machine}
def rd(p):
    try:
        with open(p) as f: return f.read()
    except OSError: return None
r["os_release"] = rd("/etc/os-release") or rd("/usr/lib/os-release")
mem = None
for l in (rd("/proc/meminfo") or "").splitlines():
    if l.startswith("MemTotal:"): mem = int(l.split()[1]) * 1024
r["psutil"] = {"cpu_count_logical": os.cpu_count(), "memory_total": mem}
b = "/sys/bus/pci/devices"
try:
    pci = []
    for d in sorted(os.listdir(b)):
        cls = (rd(b + "/" + d + "/class") or "0").strip()
        if int(cls, 16) >> 16 != 3: continue
        ven = (rd(b + "/" + d + "/vendor") or "").strip()[2:].upper()
        dev = (rd(b + "/" + d + "/device") or "").strip()[2:].upper()
        drv = os.path.basename(os.readlink(b + "/" + d + "/driver")) if os.path.islink(b + "/" + d + "/driver") else None
        pci.append({"slot": d, "class": cls[2:].upper(), "pci_id": ven + ":" + dev, "model": None, "driver": drv})
    r["udev"] = {"pci_display": pci}
except OSError as e:
    r["notes"].append("pci: " + str(e))
smi = shutil.which("nvidia-smi")
if smi:
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,pci.bus_id", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        devs, drv = [], None
        for i, line in enumerate(x for x in out.splitlines() if x.strip()):
            name, memt, drv, bus = [c.strip() for c in line.split(",")][:4]
            devs.append({"index": i, "name": name, "pci_bus_id": bus,
                         "memory_total": int(memt) * 1048576 if memt.isdigit() else "not supported"})
        r["nvml"] = {"status": "ok", "devices": devs, "driver_version": drv}
    except Exception as e:
        r["nvml"] = {"status": "error"}; r["notes"].append("nvidia-smi: " + str(e))
else:
    r["nvml"] = {"status": "absent"}
try:
    import ensurepip, venv
    has_venv = True
except ImportError:
    has_venv = False
r["_target"] = {"python": platform.python_version(), "venv": has_venv, "machine": u.machine}
print(json.dumps(r))
"""


def probe_command() -> str:
    return "python3 -c " + q(PROBE_SCRIPT)


def parse_probe(stdout: str) -> tuple[Facts, dict[str, Any]]:
    """The probe's JSON → (Facts, target info); raises ValueError on garbage."""
    try:
        raw = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        raise ValueError(f"the facts probe printed no JSON ({stdout[:80]!r})") from exc
    if not isinstance(raw, dict):
        raise ValueError("the facts probe printed something other than an object")
    target = raw.pop("_target", {}) or {}
    return parse_facts(raw), dict(target)


@dataclasses.dataclass(frozen=True)
class Remote:
    """Everything that varies a command: paths, the coordinator endpoint, the node name."""

    paths: RemotePaths
    server: str
    name: str
    lab_wheel: str  # file name of this project's wheel
    mode: str = "process"  # "systemd" or "process"


def commands_for(r: Remote) -> dict[str, str]:
    """Every remote shell command of the apply steps, by key. None contains a token."""
    p = r.paths
    agent_env = f"LAB_HOME={q(p.home)} LAB_RUNTIME_DIR={q(p.run_dir)} LAB_SECRETS_DIR={q(p.secrets_dir)}"
    run_args = f"run --home {q(p.home)} --runtime-dir {q(p.run_dir)} --secrets-dir {q(p.secrets_dir)}"
    stop_process = (
        f"if [ -f {q(p.pidfile)} ]; then pid=$(cat {q(p.pidfile)}); "
        f"if kill -0 \"$pid\" 2>/dev/null; then kill -TERM -- -\"$pid\" 2>/dev/null || kill -TERM \"$pid\"; "
        "for i in $(seq 50); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; fi; "
        f"rm -f {q(p.pidfile)}; fi"
    )
    stop = (
        f"if [ -f {q(p.unit)} ] && command -v systemctl >/dev/null; then systemctl stop {AGENT_UNIT} || true; fi; {stop_process}"
        if r.mode == "systemd" else stop_process
    )  # fmt: skip
    # The supervisor: its own session (setsid), restarts the agent 2 s after any exit, pid in a file.
    loop = f"echo $$ > {q(p.pidfile)}; while :; do {agent_env} {q(p.agent)} {run_args}; sleep 2; done"
    start_process = (
        f"mkdir -p {q(p.run_dir)} {q(p.secrets_dir)} || exit 1; "
        f"(nohup setsid sh -c {q(loop)} >>{q(p.log)} 2>&1 </dev/null &); "
        f"for i in $(seq 50); do [ -s {q(p.pidfile)} ] && break; sleep 0.1; done; cat {q(p.pidfile)}"
    )
    start_systemd = f"systemctl daemon-reload && systemctl enable {AGENT_UNIT} && systemctl restart {AGENT_UNIT}"
    wheel = f"{p.wheels}/{r.lab_wheel}"
    pip = f"{q(p.venv + '/bin/pip')} install --no-index --find-links {q(p.wheels)} --disable-pip-version-check -q"
    return {
        "probe": probe_command(),
        "systemd": f"test -d {q(p.systemd_marker)} && echo yes || echo no",
        "prepare": (
            "command -v python3 >/dev/null || { echo 'python3 is not installed' >&2; exit 3; }; "
            f"mkdir -p {q(p.wheels)} {q(p.home)} {q(p.run_dir)} {q(p.secrets_dir)} {q(p.etc)} {q(str(pathlib.PurePosixPath(p.log).parent))} && "
            f"chmod 0700 {q(p.home)} {q(p.etc)}"
        ),
        "hashes": f"cd {q(p.wheels)} && sha256sum -- *.whl 2>/dev/null || true",
        "venv": (
            f"if [ -x {q(p.venv + '/bin/python')} ] && [ -x {q(p.venv + '/bin/pip')} ]; then echo reused; else "
            f"python3 -m venv {q(p.venv)} && echo created; fi"
        ),
        "install": f"{pip} {q(wheel)} && {pip} --no-deps --force-reinstall {q(wheel)} && {q(p.agent)} --help >/dev/null",
        "stop": stop,
        "enroll": f"{agent_env} {q(p.agent)} enroll --server {q(r.server)} --token-file {q(p.token_file)} --home {q(p.home)} --name {q(r.name)} -o json",
        "start": start_systemd if r.mode == "systemd" else start_process,
        "cleanup_token": f"rm -f {q(p.token_file)}",
    }


def systemd_unit(template: str, paths: RemotePaths) -> str:
    """packaging/systemd/lab-agent.service with ExecStart pointing at the venv's lab-agent."""
    lines = []
    for line in template.splitlines():
        if line.startswith("ExecStart="):
            line = f"ExecStart={paths.agent} run"
        lines.append(line)
    return "\n".join(lines) + "\n"


# -- render (pure) -----------------------------------------------------------------------------


def _gpu_text(facts: Facts) -> str:
    if facts.gpus is None:
        return "unknown"
    if not facts.gpus:
        return "none detected"
    g = facts.gpus[0]
    kind = {"NVIDIA": "CUDA", "AMD": "ROCm"}.get(g.vendor, g.vendor)
    more = f" (+{len(facts.gpus) - 1})" if len(facts.gpus) > 1 else ""
    return f"{kind} (detected: {g.model}){more}"


def table_rows(name: str, host: str, facts: Facts) -> list[tuple[str, str]]:
    os_text = "unknown"
    if facts.os is not None:
        os_text = f"{facts.os.pretty or facts.os.id or 'unknown'} (detected)"
    ram = f"{nominal_gb(facts.memory_bytes)}GB" if facts.memory_bytes else "unknown"
    return [
        ("Name", name),
        ("Provider", "ssh (existing machine)"),
        ("Host", host),
        ("OS", os_text),
        ("Arch", facts.cpu.arch),
        ("RAM", ram),
        ("GPU", _gpu_text(facts)),
    ]


def render_table(rows: Sequence[tuple[str, str]]) -> str:
    """The spec's box: ┌──┬──┐ … └──┴──┘."""
    w1 = max(len(k) for k, _ in rows) + 2
    w2 = max(len(v) for _, v in rows) + 2
    out = [f"┌{'─' * w1}┬{'─' * w2}┐"]
    out += [f"│ {k:<{w1 - 2}} │ {v:<{w2 - 2}} │" for k, v in rows]
    out.append(f"└{'─' * w1}┴{'─' * w2}┘")
    return "\n".join(out)


def plan_lines(name: str, *, dns_zone: str | None, labels: Sequence[str]) -> list[str]:
    lines = ["+ Install lab agent", "+ Generate one-time enrollment token"]
    lines.append(f"+ Register in DNS: {name}.{dns_zone}" if dns_zone else "+ Register in DNS (if configured): not configured, skipped")
    lines.append(f"+ Assign labels: {','.join(labels)}" if labels else "+ Assign labels (--labels flag): none")
    return lines


def suggestion_lines(suggestions: Sequence[Suggestion]) -> list[str]:
    return [f"{s.evidence} → suggesting label: {s.label} (rule {s.rule})" for s in suggestions]


def suggest(facts: Facts) -> list[Suggestion]:
    return suggest_labels(facts)


def step_lines(values: dict[str, Any]) -> list[str]:
    return [f"→ {s.text.format(**values)}" for s in STEPS]


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheels_to_copy(local: dict[str, str], remote_listing: str) -> list[str]:
    """Names whose sha256 differs from (or is missing in) ``sha256sum`` output from the target."""
    have: dict[str, str] = {}
    for line in remote_listing.splitlines():
        parts = line.split()
        if len(parts) == 2:
            have[parts[1].lstrip("*")] = parts[0]
    return sorted(n for n, digest in local.items() if have.get(n) != digest)


# -- apply (impure) ----------------------------------------------------------------------------


Printer = Callable[[str], None]


@dataclasses.dataclass
class Onboarding:
    """The apply steps over one connected client. ``mint_token`` returns the token text;
    ``wait_enrolled`` polls the inventory; ``audit(action, detail)`` records progress."""

    ssh: Any  # _asyncssh.SshClient (or a test double with run/put_file/write_secret)
    remote: Remote
    wheels: dict[str, pathlib.Path]  # file name → local path
    mint_token: Callable[[], str]
    wait_enrolled: Callable[[], bool]
    audit: Callable[[str, dict[str, Any]], None]
    say: Printer
    unit_template: str | None = None
    inject_failure: str | None = None  # test hook: a step key whose work is sabotaged once

    def _run(self, step: str, command: str, timeout: float = 300) -> str:
        try:
            r = self.ssh.run(command, timeout=timeout)
        except LabError as exc:
            raise OnboardFailed(step, str(exc)) from exc
        if r.rc != 0:
            lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()]
            raise OnboardFailed(step, (lines[-1] if lines else f"exit status {r.rc}"))
        return r.stdout

    def step(self, key: str, text: str) -> None:
        self.say(f"  → {text}")
        self.audit("onboard.step", {"step": key})

    def apply(self) -> dict[str, Any]:
        cmds = commands_for(self.remote)
        p = self.remote.paths
        self.step("prepare", STEPS[1].text)
        self._run("prepare", cmds["prepare"])
        self.step("copy", STEPS[2].text.format(wheels=len(self.wheels)))
        try:
            digests = {n: sha256_file(path) for n, path in self.wheels.items()}
        except OSError as exc:
            raise OnboardFailed("copy", f"cannot read a local wheel: {exc}") from exc
        todo = wheels_to_copy(digests, self._run("copy", cmds["hashes"]))
        for n in todo:
            try:
                self.ssh.put_file(self.wheels[n], f"{p.wheels}/{n}")
            except LabError as exc:
                raise OnboardFailed("copy", exc.message if hasattr(exc, "message") else str(exc)) from exc
        self.say(f"    {len(todo)} copied, {len(digests) - len(todo)} already there")
        self.step("install", STEPS[3].text.format(venv=p.venv))
        try:
            r = self.ssh.run(cmds["venv"])
        except LabError as exc:
            raise OnboardFailed("install", str(exc)) from exc
        if r.rc != 0:
            text = r.stderr + r.stdout
            if "ensurepip" in text or "venv" in text:
                raise OnboardFailed("install", "python3 cannot create a virtual environment: install python3-venv on the target (apt-get install python3-venv)")
            raise OnboardFailed("install", (text.strip().splitlines() or [f"exit status {r.rc}"])[-1])
        self.say(f"    venv {r.stdout.strip() or 'ready'}")
        if self.inject_failure == "install":  # test hook: a wheel corrupted in transit
            self._run("install", f"truncate -s 100 {q(p.wheels + '/' + self.remote.lab_wheel)}")
        self._run("install", cmds["install"], timeout=600)
        self.step("token", STEPS[4].text.format(token_file=p.token_file))
        try:
            text = self.mint_token()
        except LabError as exc:
            raise OnboardFailed("token", str(exc)) from exc
        try:
            self.ssh.write_secret(p.token_file, (text + "\n").encode())
        except LabError as exc:
            raise OnboardFailed("token", str(exc)) from exc
        finally:
            del text
        self.step("enroll", STEPS[5].text.format(server=self.remote.server))
        self._run("enroll", cmds["stop"], timeout=60)
        try:
            out = self._run("enroll", cmds["enroll"], timeout=120)
        except OnboardFailed:
            try:
                self.ssh.run(cmds["cleanup_token"])
            except LabError:
                pass
            raise
        try:
            enrolled = json.loads(out)
        except json.JSONDecodeError:
            enrolled = {}
        self.step("start", STEPS[6].text.format(mode="systemd unit" if self.remote.mode == "systemd" else "supervised background process"))
        if self.remote.mode == "systemd":
            if self.unit_template is None:
                raise OnboardFailed("start", "no packaging/systemd/lab-agent.service template found")
            try:
                self.ssh.write_secret(p.unit, systemd_unit(self.unit_template, p).encode())
            except LabError as exc:
                raise OnboardFailed("start", str(exc)) from exc
            self._run("start", f"chmod 0644 {q(p.unit)}")
            self._run("start", cmds["start"], timeout=60)
            pid = None
        else:
            pid = self._run("start", cmds["start"], timeout=60).strip() or None
        self.step("wait", STEPS[7].text.format(name=self.remote.name))
        if not self.wait_enrolled():
            raise OnboardFailed("wait", f"{self.remote.name} did not show up enrolled in the inventory in time")
        return {"enrollment": enrolled, "supervisor_pid": pid, "mode": self.remote.mode}
