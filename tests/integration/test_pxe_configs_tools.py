"""Generated install configs checked by the real tools: `debconf-set-selections --checkonly`
(Debian's debconf) for the preseed, `ksvalidator -v RHEL9` (PyPI pykickstart; on PATH or at
$KSVALIDATOR) for the kickstart, `cloud-init schema` for the Ubuntu user-data, `shellcheck` for
the agent install script, which is also run (`curl … | sh`) against lab's boot HTTP service up to
its missing-wheel error. Skips without the tools unless CI is set."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from lab.common.identity import b32, mint_token
from lab.coordinator.pxe import boot
from lab.coordinator.pxe.registry import OnboardingNode


LAYOUTS = [((), None), ((), 16), (("longhorn",), 2000)]  # standard, small, data


def node(image: str, labels, disk_gb) -> OnboardingNode:
    return OnboardingNode(mac="aa:bb:cc:dd:ee:ff", hostname="node-1", image=image, expires_at=1e12,
                          labels=labels, disk_gb=disk_gb, token=mint_token(b32(bytes(32)))[0])


@pytest.mark.parametrize("labels, disk_gb", LAYOUTS)
def test_kickstart_passes_ksvalidator(tmp_path: pathlib.Path, labels, disk_gb) -> None:
    tool = shutil.which("ksvalidator") or os.environ.get("KSVALIDATOR")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("CI requires ksvalidator (PyPI pykickstart)")
        pytest.skip("needs ksvalidator")
    f = tmp_path / "ks.cfg"
    f.write_text(boot.kickstart(node("rocky-9", labels, disk_gb), "http://10.0.0.1:8080"))
    r = subprocess.run([tool, "-v", "RHEL9", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("labels, disk_gb", LAYOUTS)
def test_preseed_passes_debconf_checkonly(tmp_path: pathlib.Path, labels, disk_gb) -> None:
    tool = shutil.which("debconf-set-selections")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("CI requires debconf-set-selections (Debian package debconf)")
        pytest.skip("needs debconf-set-selections")
    f = tmp_path / "preseed.cfg"
    f.write_text(boot.debian_preseed(node("debian-12", labels, disk_gb), "http://10.0.0.1:8080"))
    r = subprocess.run([tool, "--checkonly", str(f)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# -- Ubuntu autoinstall user-data: cloud-init's own schema check --------------------------------


def cloud_init_command() -> list[str] | None:
    """`cloud-init` on PATH or $CLOUD_INIT; else Debian's cloud-init .deb unpacked (dpkg -x, not
    installed: no systemd units) under $LAB_TEST_TOOLS (~/.cache/lab-test-tools)/cloud-init-root,
    run by that venv's python, which has its Python dependencies."""
    if tool := os.environ.get("CLOUD_INIT") or shutil.which("cloud-init"):
        return [tool]
    tools = pathlib.Path(os.environ.get("LAB_TEST_TOOLS") or pathlib.Path.home() / ".cache" / "lab-test-tools")
    site = tools / "cloud-init-root" / "usr" / "lib" / "python3" / "dist-packages"
    python = tools / "bin" / "python"
    if (site / "cloudinit").is_dir() and python.exists():
        return ["env", f"PYTHONPATH={site}", str(python), "-m", "cloudinit.cmd.main"]
    return None


def cloud_init_schema(path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    cmd = cloud_init_command()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("CI requires cloud-init (Debian package cloud-init, or its .deb unpacked into the test-tools venv)")
        pytest.skip("needs cloud-init")
    return subprocess.run([*cmd, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("labels, disk_gb", LAYOUTS)
def test_ubuntu_user_data_passes_cloud_init_schema(tmp_path: pathlib.Path, labels, disk_gb) -> None:
    """The user-data the installer's cloud-init reads, and the cloud-config nested in it
    (`autoinstall.user-data`) that cloud-init runs on the installed system's first boot."""
    import yaml

    text = boot.ubuntu_user_data(node("ubuntu-24.04", labels, disk_gb), "http://10.0.0.1:8080")
    outer = tmp_path / "user-data"
    outer.write_text(text)
    r = cloud_init_schema(outer)
    assert r.returncode == 0 and "Valid cloud-config" in r.stdout, r.stdout + r.stderr
    inner = tmp_path / "target-user-data"
    inner.write_text("#cloud-config\n" + yaml.safe_dump(yaml.safe_load(text)["autoinstall"]["user-data"]))
    r = cloud_init_schema(inner)
    assert r.returncode == 0 and "Valid cloud-config" in r.stdout, r.stdout + r.stderr


def test_cloud_init_schema_check_does_catch_mistakes(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("#cloud-config\nautoinstall:\n  identity: {}\nwrite_files:\n  - permissions: 600\n")
    r = cloud_init_schema(bad)
    assert r.returncode != 0 and "'version' is a required property" in r.stdout + r.stderr


# -- the agent install script: shellcheck, and a real run up to the missing wheel -------------------


def need_tool(name: str, package: str) -> str:
    tool = shutil.which(name)
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires {name} (Debian package {package})")
        pytest.skip(f"needs {name}")
    return tool


@pytest.mark.parametrize("per_node, unit_served", [(True, True), (True, False), (False, True)])
def test_agent_install_script_passes_shellcheck(tmp_path: pathlib.Path, per_node: bool, unit_served: bool) -> None:
    tool = need_tool("shellcheck", "shellcheck")
    n = node("ubuntu-24.04", (), None)
    n = OnboardingNode(**{**{f: getattr(n, f) for f in ("mac", "hostname", "image", "expires_at", "token")},
                          "coordinator": "10.0.0.2:7443"})
    f = tmp_path / "install.sh"
    f.write_text(boot.agent_install_script(n if per_node else None, "http://10.0.0.1:8080", "0.1.0",
                                           unit_served=unit_served))
    r = subprocess.run([tool, "--shell=sh", "--severity=style", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture()
def boot_http(tmp_path: pathlib.Path):
    """lab's boot HTTP service on 127.0.0.1 (a trio thread) with an empty agent directory."""
    import threading

    import trio

    from lab.coordinator.pxe.http import BootService, serve_http
    from lab.coordinator.pxe.images import ImageStore
    from lab.coordinator.pxe.registry import Allowlist

    (tmp_path / "dist").mkdir()
    service = BootService(Allowlist(), ImageStore(tmp_path / "images"), "http://127.0.0.1:0",
                          agent_dir=tmp_path / "dist", agent_unit=tmp_path / "none.service", agent_version="0.1.0")
    started = threading.Event()
    box: dict = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            box["cancel"] = n.cancel_scope
            box["token"] = trio.lowlevel.current_trio_token()
            box["port"] = await n.start(lambda task_status: serve_http(service, address="127.0.0.1", port=0,
                                                                       task_status=task_status))
            started.set()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    assert started.wait(10)
    service.http_base = f"http://127.0.0.1:{box['port']}"
    try:
        yield service.http_base
    finally:
        trio.from_thread.run_sync(box["cancel"].cancel, trio_token=box["token"])
        t.join(10)


def test_agent_install_script_fails_clearly_without_a_wheel(boot_http: str) -> None:
    """curl … | sh as in the configs: stops at the missing wheel, before it changes anything."""
    need_tool("curl", "curl")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI requires root")
        pytest.skip("needs root (the script refuses to run otherwise)")
    r = subprocess.run(["sh", "-c", f"curl -fsSL {boot_http}/agent/install.sh | sh -s -- --coordinator 127.0.0.1:7443"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"the boot server has no agent wheel at {boot_http}/agent/lab-0.1.0-py3-none-any.whl" in r.stderr


def test_agent_install_script_refuses_bad_arguments(tmp_path: pathlib.Path) -> None:
    sh = need_tool("sh", "dash")
    f = tmp_path / "install.sh"
    f.write_text(boot.agent_install_script(None, "http://127.0.0.1:9", "0.1.0", unit_served=False))
    for args, msg in ((["--coordinator", "a;reboot"], "not a HOST:PORT: a;reboot"),
                      ([], "no coordinator given: pass --coordinator HOST:PORT"),
                      (["--coordinator"], "--coordinator needs HOST:PORT"),
                      (["--bogus"], "unknown argument: --bogus")):
        r = subprocess.run([sh, str(f), *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
