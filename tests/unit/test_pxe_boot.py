"""Boot scripts, install configs (parse, token placement, disk layouts) and the HTTP boot service."""

from __future__ import annotations

import logging
import pathlib

import pytest
import trio
import trio.testing
import yaml

from lab.common.errors import UsageError
from lab.coordinator.pxe import boot
from lab.coordinator.pxe.http import BootService, handle_connection
from lab.coordinator.pxe.images import ImageStore
from lab.coordinator.pxe.registry import Allowlist, OnboardingNode

from lab.common.identity import b32, mint_token

TOKEN, _ = mint_token(b32(bytes(range(32))))
SECRET = TOKEN.rsplit(".", 1)[1]
NOW = 1_800_000_000.0
BASE = "http://10.250.7.1:8080"
MAC = "aa:bb:cc:dd:ee:ff"


def node(**kw) -> OnboardingNode:
    args = dict(mac=MAC, hostname="beelink-max", image="ubuntu-24.04", expires_at=NOW + 600,
                labels=("k8s-worker",), token=TOKEN, coordinator="10.250.7.1:7443")
    args.update(kw)
    return OnboardingNode(**args)  # type: ignore[arg-type]


@pytest.fixture()
def images(tmp_path: pathlib.Path) -> ImageStore:
    (tmp_path / "k").write_bytes(b"KERNEL" * 1000)
    (tmp_path / "i").write_bytes(b"INITRD")
    store = ImageStore(tmp_path / "images")
    store.add("ubuntu-24.04", tmp_path / "k", tmp_path / "i", cmdline="url=http://mirror/ubuntu.iso")
    store.add("debian-12", tmp_path / "k", tmp_path / "i")
    store.add("rocky-9", tmp_path / "k", tmp_path / "i", cmdline="inst.repo=http://mirror/rocky/9/BaseOS/x86_64/os")
    return store


def test_token_never_in_repr() -> None:
    assert TOKEN not in repr(node()) and SECRET not in repr(node())


def test_bad_token_is_refused() -> None:
    with pytest.raises(UsageError, match="token"):
        boot.ubuntu_user_data(node(token="lab1.x.y'; rm -rf /"), BASE)


def test_image_store(images: ImageStore, tmp_path: pathlib.Path) -> None:
    assert [i.name for i in images.list()] == ["debian-12", "rocky-9", "ubuntu-24.04"]
    assert images.get("rocky-9").family == "rhel"
    with pytest.raises(UsageError, match="family"):
        images.add("windows", tmp_path / "k", tmp_path / "i")
    with pytest.raises(UsageError, match="name"):
        images.add("../x", tmp_path / "k", tmp_path / "i")


def test_ipxe_script_per_family(images: ImageStore) -> None:
    s = boot.ipxe_script(node(), images.get("ubuntu-24.04"), BASE)
    assert s.startswith("#!ipxe\n")
    assert f"kernel {BASE}/images/ubuntu-24.04/vmlinuz initrd=initrd autoinstall" in s
    assert f"ds=nocloud;s={BASE}/autoinstall/aa-bb-cc-dd-ee-ff/" in s and "url=http://mirror/ubuntu.iso" in s
    assert f"initrd --name initrd {BASE}/images/ubuntu-24.04/initrd" in s and s.rstrip().endswith("boot")
    d = boot.ipxe_script(node(image="debian-12"), images.get("debian-12"), BASE)
    assert f"url={BASE}/autoinstall/aa-bb-cc-dd-ee-ff/preseed.cfg" in d and "hostname=beelink-max" in d
    r = boot.ipxe_script(node(image="rocky-9"), images.get("rocky-9"), BASE)
    assert f"inst.ks={BASE}/autoinstall/aa-bb-cc-dd-ee-ff/ks.cfg" in r and "inst.repo=" in r
    assert TOKEN not in s + d + r


def test_ubuntu_user_data_parses_and_holds_the_token_once() -> None:
    text = boot.ubuntu_user_data(node(), BASE)
    assert text.startswith("#cloud-config\n") and text.count(TOKEN) == 1
    ai = yaml.safe_load(text)["autoinstall"]
    assert ai["version"] == 1 and ai["identity"]["hostname"] == "beelink-max"
    (wf,) = ai["user-data"]["write_files"]
    assert wf == {"path": "/etc/lab/join-token", "permissions": "0600", "owner": "root:root", "content": TOKEN + "\n"}
    assert ai["network"]["ethernets"]["boot"]["match"]["macaddress"] == MAC
    assert any(f"{BASE}/agent/aa-bb-cc-dd-ee-ff/install.sh" in c and "10.250.7.1:7443" in c
               for c in ai["late-commands"])
    meta = yaml.safe_load(boot.ubuntu_meta_data(node()))
    assert meta == {"instance-id": "lab-aa-bb-cc-dd-ee-ff", "local-hostname": "beelink-max"}


@pytest.mark.parametrize(
    "kw, layout, storage",
    [
        ({"disk_gb": 16}, "small", {"layout": {"name": "direct"}, "swap": {"size": 0}}),
        ({}, "standard", {"layout": {"name": "lvm", "sizing-policy": "all"}, "swap": {"size": 4 * 1024**3}}),
        ({"labels": ("k8s-worker", "longhorn"), "disk_gb": 1000}, "data",
         {"layout": {"name": "lvm", "sizing-policy": "scaled"}, "swap": {"size": 4 * 1024**3}}),
    ],
)
def test_disk_layout_by_size_and_labels(kw, layout: str, storage: dict) -> None:
    n = node(**kw)
    assert boot.choose_disk_layout(n).name == layout
    ai = yaml.safe_load(boot.ubuntu_user_data(n, BASE))["autoinstall"]
    assert ai["storage"] == storage
    assert any("lvcreate" in c for c in ai["late-commands"]) == (layout == "data")
    ks = boot.kickstart(n, BASE)
    expect = {"small": "autopart --type=plain", "standard": "autopart --type=lvm",
              "data": "logvol /var/lib/data --vgname=labvg"}[layout]
    assert expect in ks
    pre = boot.debian_preseed(n, BASE)
    assert ("partman-auto/method string lvm" in pre) == (layout != "small")
    assert ("mountpoint{ /var/lib/data }" in pre) == (layout == "data")


def test_preseed_is_well_formed_and_holds_the_token_once() -> None:
    text = boot.debian_preseed(node(image="debian-12"), BASE)
    assert text.count(TOKEN) == 1
    for line in text.splitlines():
        if line and not line.startswith("#"):
            owner, question, qtype, *_ = line.split(" ", 3)
            assert owner in ("d-i", "tasksel", "popularity-contest") and "/" in question and qtype.isalpha()
    (late,) = [ln for ln in text.splitlines() if "preseed/late_command" in ln]
    assert "umask 077" in late and "/target/etc/lab/join-token" in late and "chmod 0600" in late


def test_kickstart_holds_the_token_once_in_post() -> None:
    text = boot.kickstart(node(image="rocky-9"), BASE)
    assert text.count(TOKEN) == 1
    post = text[text.index("%post"):text.index("%end", text.index("%post"))]
    assert TOKEN in post and "umask 077" in post and "/etc/lab/join-token" in post
    assert f"network --bootproto=dhcp --device={MAC}" in text


# -- HTTP routing -----------------------------------------------------------------------------


@pytest.fixture()
def service(images: ImageStore) -> BootService:
    al = Allowlist()
    al.add(node())
    al.add(node(mac="aa:bb:cc:dd:ee:01", hostname="deb", image="debian-12"))
    leases = {MAC: "10.250.7.100"}
    return BootService(al, images, BASE, lease_lookup=leases.get)


def test_script_and_configs_only_for_onboarding_macs(service: BootService) -> None:
    r = service.route("GET", "/boot/aa-bb-cc-dd-ee-ff.ipxe", "10.250.7.100", NOW)
    assert r.status == 200 and r.body.startswith(b"#!ipxe") and r.event == (MAC, "script-fetched")
    r = service.route("GET", "/autoinstall/aa-bb-cc-dd-ee-ff/user-data", "10.250.7.100", NOW)
    assert r.status == 200 and TOKEN.encode() in r.body and r.event == (MAC, "config-fetched:user-data")
    assert service.route("GET", "/autoinstall/aa-bb-cc-dd-ee-ff/ks.cfg", "10.250.7.100", NOW).status == 404
    assert service.route("GET", "/boot/02-00-00-00-00-01.ipxe", "10.250.7.100", NOW).status == 404
    # expired onboarding: nothing
    assert service.route("GET", "/autoinstall/aa-bb-cc-dd-ee-ff/user-data", "10.250.7.100", NOW + 601).status == 404


def test_config_only_to_the_leased_ip(service: BootService) -> None:
    assert service.route("GET", "/autoinstall/aa-bb-cc-dd-ee-ff/user-data", "10.250.7.77", NOW).status == 403
    # no lease known (proxy mode): served to whoever asks for an onboarding MAC
    assert service.route("GET", "/autoinstall/aa-bb-cc-dd-ee-01/preseed.cfg", "10.9.9.9", NOW).status == 200


@pytest.mark.parametrize("path", ["/images/../etc/passwd", "/images/ubuntu-24.04/../../x", "/boot/../x.ipxe",
                                  "/autoinstall/aa-bb-cc-dd-ee-ff/../../etc/passwd", "/images/ubuntu-24.04/image.yaml"])
def test_nothing_else_is_served(service: BootService, path: str) -> None:
    assert service.route("GET", path, "10.250.7.100", NOW).status == 404


def test_kernels_are_files_and_only_get_head(service: BootService) -> None:
    r = service.route("GET", "/images/ubuntu-24.04/vmlinuz", "1.2.3.4", NOW)
    assert r.status == 200 and r.file is not None and r.file.read_bytes().startswith(b"KERNEL")
    assert service.route("POST", "/images/ubuntu-24.04/vmlinuz", "1.2.3.4", NOW).status == 405


def _exchange(service: BootService, raw: bytes, events: list | None = None) -> bytes:
    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        got = bytearray()
        async with trio.open_nursery() as n:
            n.start_soon(handle_connection, service, server, "10.250.7.100",
                         (lambda *e: events.append(e)) if events is not None else None, lambda: NOW)
            await client.send_all(raw)
            while chunk := await client.receive_some(65536):
                got += chunk
        return bytes(got)

    return trio.run(main)


def test_http_over_memory_streams_keepalive_and_logs_without_token(service: BootService, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    events: list = []
    raw = (b"GET /boot/aa-bb-cc-dd-ee-ff.ipxe HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /autoinstall/aa-bb-cc-dd-ee-ff/user-data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = _exchange(service, raw, events)
    assert out.count(b"HTTP/1.1 200") == 2 and TOKEN.encode() in out
    assert events == [(MAC, "script-fetched"), (MAC, "config-fetched:user-data")]
    assert "path=/autoinstall/aa-bb-cc-dd-ee-ff/user-data status=200" in caplog.text
    assert TOKEN not in caplog.text and SECRET not in caplog.text


def test_http_streams_files_and_rejects_garbage(service: BootService) -> None:
    out = _exchange(service, b"GET /images/ubuntu-24.04/vmlinuz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"KERNEL" * 1000)
    out = _exchange(service, b"\x00\x01garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    out = _exchange(service, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n")
    assert out.startswith(b"HTTP/1.1 431") or out.startswith(b"HTTP/1.1 400")


# -- agent install script ---------------------------------------------------------------------


def test_agent_script_per_node() -> None:
    s = boot.agent_install_script(node(), BASE, "0.1.0", unit_served=True)
    assert s.startswith("#!/bin/sh\n") and "\nset -eu\n" in s
    assert f"for beelink-max ({MAC})" in s
    assert "\nBASE=http://10.250.7.1:8080\n" in s and "\nWHEEL=lab-0.1.0-py3-none-any.whl\n" in s
    assert "\nCOORDINATOR=10.250.7.1:7443\n" in s and "\nUNIT_SERVED=yes\n" in s
    assert "\nPREFIX=/opt/lab\n" in s and "\nTOKEN_FILE=/etc/lab/join-token\n" in s
    assert 'fetch "$BASE/agent/$WHEEL"' in s and "has no agent wheel" in s
    assert 'python3 -m venv "$PREFIX"' in s
    assert '"$PREFIX/bin/lab-agent" enroll --server "$COORDINATOR" --token-file "$TOKEN_FILE"' in s
    assert "ExecStart=$PREFIX/bin/lab-agent enroll --server $COORDINATOR --token-file $TOKEN_FILE" in s
    assert 'fetch "$BASE/agent/lab-agent.service" "$units/lab-agent.service"' in s
    assert TOKEN not in s and SECRET not in s


def test_agent_script_generic_needs_a_coordinator_and_unit_is_optional() -> None:
    s = boot.agent_install_script(None, BASE, "0.1.0", unit_served=False)
    assert "\nCOORDINATOR=''\n" in s and "no coordinator given: pass --coordinator HOST:PORT" in s
    assert "\nUNIT_SERVED=no\n" in s and "installer for" not in s.splitlines()[1]


@pytest.mark.parametrize("version", ["", "1.0 ; rm", "1.0/../x"])
def test_agent_wheel_name_refuses_odd_versions(version: str) -> None:
    with pytest.raises(UsageError):
        boot.agent_wheel_name(version)


def test_agent_script_refuses_a_coordinator_unsafe_in_shell() -> None:
    with pytest.raises(UsageError, match="coordinator"):
        boot.agent_install_script(node(coordinator="x;reboot"), BASE, "0.1.0", unit_served=True)


def test_every_config_installs_the_agent_from_its_per_mac_script() -> None:
    url = f"{BASE}/agent/aa-bb-cc-dd-ee-ff/install.sh"
    assert url in boot.debian_preseed(node(image="debian-12"), BASE)
    assert url in boot.kickstart(node(image="rocky-9"), BASE)
    assert url in boot.ubuntu_user_data(node(), BASE)


@pytest.fixture()
def agent_service(images: ImageStore, tmp_path: pathlib.Path) -> BootService:
    al = Allowlist()
    al.add(node())
    dist = tmp_path / "dist"
    dist.mkdir()
    return BootService(al, images, BASE, lease_lookup={MAC: "10.250.7.100"}.get,
                       agent_dir=dist, agent_unit=tmp_path / "lab-agent.service", agent_version="1.2.3")


def test_agent_routes(agent_service: BootService, tmp_path: pathlib.Path) -> None:
    r = agent_service.route("GET", "/agent/aa-bb-cc-dd-ee-ff/install.sh", "10.250.7.100", NOW)
    assert r.status == 200 and r.event == (MAC, "agent-script-fetched")
    assert b"\nWHEEL=lab-1.2.3-py3-none-any.whl\n" in r.body and b"\nUNIT_SERVED=no\n" in r.body
    assert agent_service.route("GET", "/agent/aa-bb-cc-dd-ee-ff/install.sh", "10.250.7.7", NOW).status == 403
    assert agent_service.route("GET", "/agent/02-00-00-00-00-01/install.sh", "10.250.7.100", NOW).status == 404
    assert agent_service.route("GET", "/agent/aa-bb-cc-dd-ee-ff/install.sh", "10.250.7.100", NOW + 601).status == 404
    generic = agent_service.route("GET", "/agent/install.sh", "10.9.9.9", NOW)
    assert generic.status == 200 and b"\nCOORDINATOR=''\n" in generic.body and generic.event is None
    # no wheel built: a clear 404 (the script turns it into a clear error)
    r = agent_service.route("GET", "/agent/lab-1.2.3-py3-none-any.whl", "10.9.9.9", NOW)
    assert r.status == 404 and b"no agent wheel lab-1.2.3-py3-none-any.whl" in r.body
    assert agent_service.route("GET", "/agent/lab-agent.service", "10.9.9.9", NOW).status == 404
    # once they exist they are served, to anyone; other names under /agent/ are not
    wheel = tmp_path / "dist" / "lab-1.2.3-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    (tmp_path / "lab-agent.service").write_text("[Unit]\n")
    (tmp_path / "dist" / "other.whl").write_bytes(b"PK")
    r = agent_service.route("GET", "/agent/lab-1.2.3-py3-none-any.whl", "10.9.9.9", NOW)
    assert r.status == 200 and r.file == wheel
    assert agent_service.route("GET", "/agent/lab-agent.service", "10.9.9.9", NOW).file == tmp_path / "lab-agent.service"
    assert b"\nUNIT_SERVED=yes\n" in agent_service.route("GET", "/agent/install.sh", "1.2.3.4", NOW).body
    for path in ("/agent/other.whl", "/agent/../dist/other.whl", "/agent/", "/agent/lab-0.0.1-py3-none-any.whl"):
        assert agent_service.route("GET", path, "10.9.9.9", NOW).status == 404
    assert agent_service.route("POST", "/agent/install.sh", "10.9.9.9", NOW).status == 405
