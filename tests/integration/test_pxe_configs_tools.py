"""Generated install configs checked by the real tools: `debconf-set-selections --checkonly`
(Debian's debconf) for the preseed, `ksvalidator -v RHEL9` (PyPI pykickstart; on PATH or at
$KSVALIDATOR) for the kickstart. Skips without them unless CI is set."""

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
