"""SSH onboarding, pure parts: render table, plan, labels, commands, the apply steps against a
fake SSH client (no sockets, no processes), and the host key policy."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import pathlib
from typing import Any

import pytest

from lab.agent.facts import parse_facts, suggest_labels
from lab.coordinator.providers import _known_hosts as kh
from lab.coordinator.providers import ssh
from lab.coordinator.providers._asyncssh import RemoteResult

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "facts"
REPO = pathlib.Path(__file__).parents[2]
TOKEN = "lab1.SHA256-abcdef.SECRETSECRETSECRETSECRETSECRET"


def raw(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def probe_output(name: str, **target: Any) -> str:
    doc = raw(name)
    doc["_target"] = {"python": "3.11.2", "venv": True, "machine": doc["host"]["machine"], **target}
    return "some motd noise\n" + json.dumps(doc) + "\n"


# -- render ------------------------------------------------------------------------------------


def test_render_table_is_the_specs_box() -> None:
    facts, target = ssh.parse_probe(probe_output("dgx-spark-gb10"))
    assert target["python"] == "3.11.2"
    text = ssh.render_table(ssh.table_rows("dgx-spark", "192.168.1.50", facts))
    lines = text.splitlines()
    assert lines[0].startswith("┌") and lines[-1].startswith("└") and len({len(x) for x in lines}) == 1
    assert [x.split("│")[1].strip() for x in lines[1:-1]] == ["Name", "Provider", "Host", "OS", "Arch", "RAM", "GPU"]
    assert "│ Provider │ ssh (existing machine)" in text
    assert "Ubuntu 24.04.3 LTS (detected)" in text
    assert "│ Arch     │ aarch64" in text and "│ RAM      │ 128GB" in text
    assert "CUDA (detected: NVIDIA GB10)" in text


def test_render_unknowns_and_no_gpu() -> None:
    facts, _ = ssh.parse_probe(probe_output("kvm-epyc-2vcpu-vm"))
    rows = dict(ssh.table_rows("vm", "10.0.0.5", facts))
    assert rows["GPU"] == "none detected" and rows["Arch"] == "x86_64" and rows["OS"].startswith("Debian")
    facts = parse_facts({"schema": 1, "notes": []})
    rows = dict(ssh.table_rows("x", "h", facts))
    assert rows["RAM"] == "unknown" and rows["GPU"] == "unknown" and rows["OS"] == "unknown"


def test_parse_probe_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="no JSON"):
        ssh.parse_probe("bash: python3: command not found\n")
    with pytest.raises(ValueError):
        ssh.parse_probe("[1, 2]")


def test_plan_and_steps() -> None:
    lines = ssh.plan_lines("dgx-spark", dns_zone="lab.internal", labels=["cuda", "arm"])
    assert lines[:3] == ["+ Install lab agent", "+ Generate one-time enrollment token", "+ Register in DNS: dgx-spark.lab.internal"]
    assert lines[3] == "+ Assign labels: cuda,arm"
    assert "not configured" in ssh.plan_lines("x", dns_zone=None, labels=[])[2]
    steps = ssh.step_lines({"host": "h", "wheels": 3, "venv": "/opt/lab", "token_file": "/etc/lab/join-token",
                            "server": "c:7443", "mode": "systemd unit", "name": "x"})  # fmt: skip
    assert steps[0] == "→ SSH into h" and all(s.startswith("→ ") for s in steps)
    assert [s.key for s in ssh.STEPS] == ["connect", "prepare", "copy", "install", "token", "enroll", "start", "wait"]


@pytest.mark.parametrize("fixture", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_label_suggestions_follow_the_facts_rules(fixture: str) -> None:
    facts, _ = ssh.parse_probe(probe_output(fixture))
    got = ssh.suggest(facts)
    assert got == suggest_labels(parse_facts(raw(fixture)))
    for s, line in zip(got, ssh.suggestion_lines(got), strict=True):
        assert line.endswith(f"→ suggesting label: {s.label} (rule {s.rule})")


def test_dgx_suggestions() -> None:
    facts, _ = ssh.parse_probe(probe_output("dgx-spark-gb10"))
    assert [s.label for s in ssh.suggest(facts)] == ["cuda", "ai-inference", "arm"]


# -- commands ----------------------------------------------------------------------------------


def remote(root: str = "", mode: str = "process") -> ssh.Remote:
    return ssh.Remote(ssh.RemotePaths(root), "10.0.0.1:7443", "web-1", "lab-0.1.0-py3-none-any.whl", mode)


def test_remote_paths_prefix() -> None:
    p = ssh.RemotePaths()
    assert (p.venv, p.token_file, p.home, p.unit) == ("/opt/lab", "/etc/lab/join-token", "/var/lib/lab", "/etc/systemd/system/lab-agent.service")
    t = ssh.RemotePaths("/tmp/t x/")
    for path in (t.venv, t.wheels, t.etc, t.token_file, t.home, t.run_dir, t.secrets_dir, t.pidfile, t.log, t.unit, t.agent):
        assert path.startswith("/tmp/t x/") and "//" not in path


@pytest.mark.parametrize("mode", ["process", "systemd"])
def test_commands_never_carry_a_token(mode: str) -> None:
    cmds = ssh.commands_for(remote("/tmp/root with space", mode))
    for key, cmd in cmds.items():
        assert "lab1." not in cmd and "--token " not in cmd, key
    enroll = cmds["enroll"]
    assert "--token-file '/tmp/root with space/etc/lab/join-token'" in enroll
    assert "--server 10.0.0.1:7443" in enroll and "--name web-1" in enroll
    assert "--home '/tmp/root with space/var/lib/lab'" in enroll
    assert "--no-index --find-links" in cmds["install"] and "--force-reinstall" in cmds["install"]
    assert "python3 -m venv" in cmds["venv"] and "reused" in cmds["venv"]


def test_start_command_per_mode() -> None:
    proc = ssh.commands_for(remote(mode="process"))
    assert "nohup setsid sh -c" in proc["start"] and "/run/lab/lab-agent.supervisor.pid" in proc["start"]
    assert "systemctl" not in proc["start"] and "systemctl" not in proc["stop"]
    sysd = ssh.commands_for(remote(mode="systemd"))
    assert "systemctl enable lab-agent.service" in sysd["start"] and "systemctl stop" in sysd["stop"]


def test_systemd_unit_points_at_the_venv() -> None:
    template = (REPO / "packaging/systemd/lab-agent.service").read_text()
    unit = ssh.systemd_unit(template, ssh.RemotePaths())
    assert "ExecStart=/opt/lab/bin/lab-agent run\n" in unit and "/usr/bin/lab-agent" not in unit.split("ExecStartPre")[0] + unit.split("ExecStart=")[-1]
    assert unit.count("\n") == template.rstrip("\n").count("\n") + 1


def test_wheels_to_copy() -> None:
    listing = "aaa  a.whl\nbbb *b.whl\nnot a line\n"
    assert ssh.wheels_to_copy({"a.whl": "aaa", "b.whl": "ccc", "c.whl": "ddd"}, listing) == ["b.whl", "c.whl"]
    assert ssh.wheels_to_copy({"a.whl": "aaa"}, "") == ["a.whl"]


# -- the apply steps against a fake client -----------------------------------------------------


@dataclasses.dataclass
class FakeSsh:
    fail: dict[str, RemoteResult] = dataclasses.field(default_factory=dict)  # substring → result
    commands: list[str] = dataclasses.field(default_factory=list)
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    secrets: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def run(self, command: str, *, timeout: float = 0) -> RemoteResult:
        self.commands.append(command)
        for needle, result in self.fail.items():
            if needle in command:
                return result
        if "enroll --server" in command:
            return RemoteResult(0, json.dumps({"node": "web-1"}), "")
        if "python3 -m venv" in command:
            return RemoteResult(0, "created\n", "")
        if "supervisor.pid" in command and "nohup" in command:
            return RemoteResult(0, "4242\n", "")
        return RemoteResult(0, "", "")

    def put_file(self, local: Any, remote: str, mode: int = 0o644) -> None:
        self.files[remote] = pathlib.Path(local).read_bytes()

    def write_secret(self, remote: str, data: bytes) -> None:
        self.secrets[remote] = data


def make(tmp_path: pathlib.Path, fake: FakeSsh, mode: str = "process", **kw: Any) -> tuple[ssh.Onboarding, list[Any]]:
    wheel = tmp_path / "lab-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    dep = tmp_path / "dep-1.0-py3-none-any.whl"
    dep.write_bytes(b"dep")
    events: list[Any] = []
    run = ssh.Onboarding(
        fake, remote(mode=mode), {wheel.name: wheel, dep.name: dep}, lambda: TOKEN, lambda: True,
        lambda action, detail: events.append((action, detail)), lambda line: events.append(line), **kw,
    )  # fmt: skip
    return run, events


def test_apply_runs_every_step_and_keeps_the_token_out_of_commands(tmp_path: pathlib.Path) -> None:
    fake = FakeSsh()
    run, events = make(tmp_path, fake)
    result = run.apply()
    assert result["supervisor_pid"] == "4242" and result["enrollment"] == {"node": "web-1"}
    assert fake.secrets == {"/etc/lab/join-token": (TOKEN + "\n").encode()}
    assert set(fake.files) == {"/opt/lab/wheels/lab-0.1.0-py3-none-any.whl", "/opt/lab/wheels/dep-1.0-py3-none-any.whl"}
    assert not any(TOKEN in c or "lab1." in c for c in fake.commands)
    assert not any(TOKEN in str(e) for e in events)
    steps = [e[1]["step"] for e in events if isinstance(e, tuple) and e[0] == "onboard.step"]
    assert steps == ["prepare", "copy", "install", "token", "enroll", "start", "wait"]
    printed = [e for e in events if isinstance(e, str)]
    assert all(line.startswith(("  → ", "    ")) for line in printed)
    # the agent is stopped before enroll, and started after it
    order = [i for i, c in enumerate(fake.commands) if "kill -TERM" in c or "enroll --server" in c or "nohup" in c]
    assert len(order) == 3 and "kill -TERM" in fake.commands[order[0]] and "nohup" in fake.commands[order[2]]


def test_apply_copies_only_changed_wheels(tmp_path: pathlib.Path) -> None:
    digest = hashlib.sha256(b"dep").hexdigest()
    fake = FakeSsh(fail={"sha256sum": RemoteResult(0, f"{digest}  dep-1.0-py3-none-any.whl\n", "")})
    run, _ = make(tmp_path, fake)
    run.apply()
    assert list(fake.files) == ["/opt/lab/wheels/lab-0.1.0-py3-none-any.whl"]


def test_apply_names_the_failed_step(tmp_path: pathlib.Path) -> None:
    fake = FakeSsh(fail={"--force-reinstall": RemoteResult(1, "", "ERROR: Wheel 'lab' is invalid\n  zipfile.BadZipFile: bad\n")})
    run, _ = make(tmp_path, fake)
    with pytest.raises(ssh.OnboardFailed) as info:
        run.apply()
    assert info.value.step == "install" and info.value.why == "zipfile.BadZipFile: bad"
    assert "step 'install'" in str(info.value) and "run the same `lab onboard` again" in str(info.value)
    assert fake.secrets == {}  # no token was minted or written before install succeeded


def test_apply_missing_python3_venv(tmp_path: pathlib.Path) -> None:
    fake = FakeSsh(fail={"python3 -m venv": RemoteResult(1, "", "The virtual environment was not created successfully because ensurepip is not available.")})
    run, _ = make(tmp_path, fake)
    with pytest.raises(ssh.OnboardFailed, match="install python3-venv") as info:
        run.apply()
    assert info.value.step == "install"


def test_apply_failed_enroll_removes_the_token_file(tmp_path: pathlib.Path) -> None:
    fake = FakeSsh(fail={"enroll --server": RemoteResult(3, "", "lab-agent: enrollment rejected by 10.0.0.1:7443\n")})
    run, _ = make(tmp_path, fake)
    with pytest.raises(ssh.OnboardFailed) as info:
        run.apply()
    assert info.value.step == "enroll" and "rejected" in info.value.why
    assert fake.commands[-1] == "rm -f /etc/lab/join-token"


def test_apply_wait_timeout(tmp_path: pathlib.Path) -> None:
    run, _ = make(tmp_path, FakeSsh())
    run.wait_enrolled = lambda: False
    with pytest.raises(ssh.OnboardFailed) as info:
        run.apply()
    assert info.value.step == "wait"


def test_apply_systemd_writes_the_unit(tmp_path: pathlib.Path) -> None:
    fake = FakeSsh()
    template = (REPO / "packaging/systemd/lab-agent.service").read_text()
    run, _ = make(tmp_path, fake, mode="systemd", unit_template=template)
    assert run.apply()["supervisor_pid"] is None
    assert b"ExecStart=/opt/lab/bin/lab-agent run" in fake.secrets["/etc/systemd/system/lab-agent.service"]
    assert any("systemctl restart lab-agent.service" in c for c in fake.commands)


def test_inject_failure_hook_corrupts_the_copied_wheel(tmp_path: pathlib.Path) -> None:
    fake = FakeSsh()
    run, _ = make(tmp_path, fake, inject_failure="install")
    run.apply()
    truncate = [i for i, c in enumerate(fake.commands) if c.startswith("truncate")]
    install = [i for i, c in enumerate(fake.commands) if "--force-reinstall" in c]
    assert truncate and install and truncate[0] < install[0]


# -- host key policy ---------------------------------------------------------------------------

KEY_A = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + b"A" * 36).decode()
KEY_B = base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + b"B" * 36).decode()


def decide(known: str, host: str = "10.0.0.5", port: int = 22, key: str = KEY_A, accept_new: bool = False) -> kh.HostKeyDecision:
    return kh.decide([known], host, port, "ssh-ed25519", key, accept_new=accept_new)


def test_fingerprint_is_openssh_sha256() -> None:
    want = base64.b64encode(hashlib.sha256(base64.b64decode(KEY_A)).digest()).decode().rstrip("=")
    assert kh.fingerprint(KEY_A) == "SHA256:" + want


def test_known_key_trusted() -> None:
    assert decide(f"10.0.0.5 ssh-ed25519 {KEY_A}\n").action == kh.TRUSTED
    assert decide(f"# comment\nweb,10.0.0.5 ssh-ed25519 {KEY_A} root@x\n").action == kh.TRUSTED
    assert decide(f"[10.0.0.5]:2222 ssh-ed25519 {KEY_A}\n", port=2222).action == kh.TRUSTED
    assert decide(f"10.0.0.* ssh-ed25519 {KEY_A}\n").action == kh.TRUSTED


def test_port_is_part_of_the_name() -> None:
    # a key for port 22 says nothing about port 2222 (and the brackets are literal, not a class)
    assert decide(f"10.0.0.5 ssh-ed25519 {KEY_A}\n", port=2222).action == kh.REFUSE
    assert decide(f"[10.0.0.5]:2222 ssh-ed25519 {KEY_A}\n", host="1", port=2222).action == kh.REFUSE


def test_unknown_host_refused_unless_accept_new() -> None:
    d = decide("other ssh-ed25519 " + KEY_B + "\n")
    assert d.action == kh.REFUSE and "unknown host key" in d.reason and "--accept-new-host-key" in d.reason
    assert kh.fingerprint(KEY_A) in d.reason
    d = decide("", accept_new=True)
    assert d.action == kh.ACCEPT_NEW and d.fingerprint == kh.fingerprint(KEY_A)


def test_changed_key_refused_even_with_accept_new() -> None:
    d = decide(f"10.0.0.5 ssh-ed25519 {KEY_B}\n", accept_new=True)
    assert d.action == kh.REFUSE and "MISMATCH" in d.reason
    # another algorithm listed for the host: still not ours to accept silently
    assert decide(f"10.0.0.5 ssh-rsa {KEY_B}\n", accept_new=True).action == kh.REFUSE


def test_revoked_and_negated_and_ca_lines() -> None:
    assert decide(f"@revoked * ssh-ed25519 {KEY_A}\n10.0.0.5 ssh-ed25519 {KEY_A}\n").action == kh.REFUSE
    assert decide(f"10.0.0.*,!10.0.0.5 ssh-ed25519 {KEY_A}\n", accept_new=True).action == kh.ACCEPT_NEW
    assert decide(f"@cert-authority * ssh-ed25519 {KEY_B}\n", accept_new=True).action == kh.ACCEPT_NEW


def test_hashed_entries() -> None:
    salt = os.urandom(20)
    digest = hmac.new(salt, b"[10.0.0.5]:2222", hashlib.sha1).digest()
    line = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()} ssh-ed25519 {KEY_A}\n"
    assert decide(line, port=2222).action == kh.TRUSTED
    assert decide(line, port=22).action == kh.REFUSE
    assert decide("|1|!!|?? ssh-ed25519 " + KEY_A + "\n").action == kh.REFUSE


def test_sources_are_combined_and_written_line_is_readable() -> None:
    line = kh.known_hosts_line("10.0.0.5", 2222, "ssh-ed25519", KEY_A)
    assert line == f"[10.0.0.5]:2222 ssh-ed25519 {KEY_A}\n"
    d = kh.decide(["", "garbage\n", line], "10.0.0.5", 2222, "ssh-ed25519", KEY_A, accept_new=False)
    assert d.action == kh.TRUSTED


# -- the prompt ----------------------------------------------------------------------------------


def test_no_tty_and_no_yes_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.common.errors import UsageError
    from lab.coordinator.cli import onboard_cmd

    class NoTty:
        def isatty(self) -> bool:
            return False

    monkeypatch.setattr("sys.stdin", NoTty())
    with pytest.raises(UsageError, match="pass --yes"):
        onboard_cmd._ask("Proceed?", yes=False)
    onboard_cmd._ask("Proceed?", yes=True)  # no question asked
