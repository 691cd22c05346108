"""What a machine being onboarded is served: its iPXE script and its unattended-install config
(Ubuntu autoinstall, Debian preseed, RHEL/Rocky kickstart), each with the agent install step,
the one-time join token (written to /etc/lab/join-token, mode 0600, in the target), network
config, hostname and a disk layout chosen by size and labels.

Pure functions: node + image + URLs in, text out.
"""

from __future__ import annotations

import dataclasses
import shlex

import yaml

from lab.common.errors import RemoteProtocolError, UsageError
from lab.common.identity import parse_token_untrusted
from lab.coordinator.pxe.images import Image
from lab.coordinator.pxe.registry import OnboardingNode, mac_for_url

TOKEN_PATH = "/etc/lab/join-token"
DEFAULT_AGENT_INSTALL = "curl -fsSL {http_base}/agent/install.sh | sh -s -- --coordinator {coordinator}"
DATA_LABELS = frozenset({"storage", "longhorn", "ceph", "minio"})
SMALL_DISK_GB = 32


@dataclasses.dataclass(frozen=True)
class DiskLayout:
    """``small``: one root partition, no LVM, no swap. ``standard``: LVM, root takes the disk.
    ``data``: LVM with a 64 GiB root; the rest of the volume group becomes /var/lib/data."""

    name: str
    lvm: bool
    root_gb: int | None  # None: all of it
    swap_gb: int
    data_mount: str | None = None


def choose_disk_layout(node: OnboardingNode) -> DiskLayout:
    if node.disk_gb is not None and node.disk_gb <= SMALL_DISK_GB:
        return DiskLayout("small", lvm=False, root_gb=None, swap_gb=0)
    if DATA_LABELS & set(node.labels):
        return DiskLayout("data", lvm=True, root_gb=64, swap_gb=4, data_mount="/var/lib/data")
    return DiskLayout("standard", lvm=True, root_gb=None, swap_gb=4 if node.size != "small" else 0)


def checked_token(node: OnboardingNode) -> str:
    """The node's token, verified to be a well-formed ``lab1.`` token (so it is safe in shell)."""
    try:
        parse_token_untrusted(node.token)
    except RemoteProtocolError as exc:
        raise UsageError(f"node {node.hostname}: bad join token ({exc})") from None
    return node.token.strip()


def agent_install(node: OnboardingNode, http_base: str, template: str = DEFAULT_AGENT_INSTALL) -> str:
    return template.format(http_base=http_base.rstrip("/"), coordinator=shlex.quote(node.coordinator or "auto"))


def _token_shell(token: str, root: str = "") -> str:
    """Shell that writes the token with mode 0600 (umask first: never readable, not even briefly)."""
    return (f"mkdir -p {root}/etc/lab && chmod 0700 {root}/etc/lab && "
            f"(umask 077; printf '%s\\n' '{token}' > {root}{TOKEN_PATH}) && chmod 0600 {root}{TOKEN_PATH}")


# -- iPXE -------------------------------------------------------------------------------------


def config_url(node: OnboardingNode, http_base: str, name: str = "") -> str:
    return f"{http_base.rstrip('/')}/autoinstall/{mac_for_url(node.mac)}/{name}"


def ipxe_script(node: OnboardingNode, image: Image, http_base: str) -> str:
    base = http_base.rstrip("/")
    if image.family == "ubuntu":
        args = f"autoinstall ip=dhcp ds=nocloud;s={config_url(node, base)}"
    elif image.family == "debian":
        args = (f"auto=true priority=critical url={config_url(node, base, 'preseed.cfg')} "
                f"hostname={node.hostname} domain={node.domain} interface=auto")
    else:
        args = f"inst.ks={config_url(node, base, 'ks.cfg')} ip=dhcp"
    cmdline = " ".join(a for a in (args, image.cmdline, "console=tty0 console=ttyS0,115200n8") if a)
    return "\n".join([
        "#!ipxe",
        f"# lab: {node.hostname} ({node.mac}) installs {image.name}",
        f"kernel {base}/images/{image.name}/vmlinuz initrd=initrd {cmdline}",
        f"initrd --name initrd {base}/images/{image.name}/initrd",
        "boot",
        "",
    ])


# -- Ubuntu autoinstall -------------------------------------------------------------------------


def _ubuntu_storage(layout: DiskLayout) -> dict:
    if not layout.lvm:
        return {"layout": {"name": "direct"}, "swap": {"size": 0}}
    policy = "all" if layout.root_gb is None else "scaled"
    return {"layout": {"name": "lvm", "sizing-policy": policy}, "swap": {"size": layout.swap_gb * 1024**3}}


def ubuntu_user_data(node: OnboardingNode, http_base: str) -> str:
    token = checked_token(node)
    layout = choose_disk_layout(node)
    late = [f"curtin in-target -- sh -c {shlex.quote(agent_install(node, http_base))}"]
    if layout.data_mount:
        late.append(
            "curtin in-target -- sh -c "
            + shlex.quote(f"lvcreate -l 100%FREE -n data ubuntu-vg && mkfs.ext4 -q /dev/ubuntu-vg/data && "
                          f"mkdir -p {layout.data_mount} && "
                          f"echo '/dev/ubuntu-vg/data {layout.data_mount} ext4 defaults 0 2' >> /etc/fstab")
        )
    doc = {
        "autoinstall": {
            "version": 1,
            "identity": {"hostname": node.hostname, "username": "lab", "password": "!"},
            "ssh": {"install-server": True, "allow-pw": False},
            "network": {"version": 2, "ethernets": {"boot": {"match": {"macaddress": node.mac}, "dhcp4": True}}},
            "storage": _ubuntu_storage(layout),
            "late-commands": late,
            # cloud-init config for the installed system: the token file, then first-boot enrollment
            "user-data": {
                "hostname": node.hostname,
                "fqdn": f"{node.hostname}.{node.domain}",
                "write_files": [{"path": TOKEN_PATH, "permissions": "0600", "owner": "root:root", "content": token + "\n"}],
            },
        }
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)


def ubuntu_meta_data(node: OnboardingNode) -> str:
    return yaml.safe_dump({"instance-id": f"lab-{mac_for_url(node.mac)}", "local-hostname": node.hostname}, sort_keys=False)


# -- Debian preseed ---------------------------------------------------------------------------


def _preseed_partman(layout: DiskLayout) -> list[str]:
    if not layout.lvm:
        return ["d-i partman-auto/method string regular", "d-i partman-auto/choose_recipe select atomic"]
    lines = ["d-i partman-auto/method string lvm", "d-i partman-lvm/device_remove_lvm boolean true",
             "d-i partman-lvm/confirm boolean true", "d-i partman-lvm/confirm_nooverwrite boolean true",
             "d-i partman-auto-lvm/guided_size string max"]
    if layout.data_mount:
        root_mb = (layout.root_gb or 64) * 1024
        swap_mb = layout.swap_gb * 1024
        recipe = (
            "lab-data :: "
            "1024 1024 1024 ext4 $primary{ } $bootable{ } method{ format } format{ } use_filesystem{ } "
            "filesystem{ ext4 } mountpoint{ /boot } . "
            f"{root_mb} {root_mb} {root_mb} ext4 $lvmok{{ }} method{{ format }} format{{ }} use_filesystem{{ }} "
            "filesystem{ ext4 } mountpoint{ / } . "
            f"{swap_mb} {swap_mb} {swap_mb} linux-swap $lvmok{{ }} method{{ swap }} format{{ }} . "
            f"1000 1000 -1 ext4 $lvmok{{ }} method{{ format }} format{{ }} use_filesystem{{ }} "
            f"filesystem{{ ext4 }} mountpoint{{ {layout.data_mount} }} ."
        )
        lines += [f"d-i partman-auto/expert_recipe string {recipe}"]
    else:
        lines += ["d-i partman-auto/choose_recipe select atomic"]
    return lines


def debian_preseed(node: OnboardingNode, http_base: str) -> str:
    token = checked_token(node)
    layout = choose_disk_layout(node)
    late = f"{_token_shell(token, '/target')}; in-target sh -c {shlex.quote(agent_install(node, http_base))}"
    lines = [
        f"# lab: unattended Debian install for {node.hostname}",
        "d-i debian-installer/locale string en_US.UTF-8",
        "d-i keyboard-configuration/xkb-keymap select us",
        "d-i netcfg/choose_interface select auto",
        f"d-i netcfg/get_hostname string {node.hostname}",
        f"d-i netcfg/get_domain string {node.domain}",
        "d-i netcfg/hostname string " + node.hostname,
        "d-i mirror/country string manual",
        "d-i mirror/http/hostname string deb.debian.org",
        "d-i mirror/http/directory string /debian",
        "d-i mirror/http/proxy string",
        "d-i passwd/root-login boolean false",
        "d-i passwd/user-fullname string lab",
        "d-i passwd/username string lab",
        "d-i passwd/user-password-crypted password !",
        "d-i clock-setup/utc boolean true",
        "d-i time/zone string Etc/UTC",
        "d-i partman-auto/disk string",
        *_preseed_partman(layout),
        "d-i partman-partitioning/confirm_write_new_label boolean true",
        "d-i partman/choose_partition select finish",
        "d-i partman/confirm boolean true",
        "d-i partman/confirm_nooverwrite boolean true",
        "tasksel tasksel/first multiselect standard, ssh-server",
        "d-i pkgsel/include string curl ca-certificates",
        "popularity-contest popularity-contest/participate boolean false",
        "d-i grub-installer/only_debian boolean true",
        "d-i grub-installer/bootdev string default",
        "d-i finish-install/reboot_in_progress note",
        f"d-i preseed/late_command string {late}",
        "",
    ]
    return "\n".join(lines)


# -- RHEL / Rocky kickstart ---------------------------------------------------------------------


def _kickstart_disk(layout: DiskLayout) -> list[str]:
    head = ["zerombr", "clearpart --all --initlabel"]
    if not layout.lvm:
        return head + ["autopart --type=plain --nohome --noswap"]
    if not layout.data_mount:
        return head + ["autopart --type=lvm --nohome" + (" --noswap" if layout.swap_gb == 0 else "")]
    return head + [
        "reqpart --add-boot",
        "part pv.01 --size=1 --grow",
        "volgroup labvg pv.01",
        f"logvol / --vgname=labvg --name=root --fstype=xfs --size={(layout.root_gb or 64) * 1024}",
        f"logvol swap --vgname=labvg --name=swap --size={layout.swap_gb * 1024}",
        f"logvol {layout.data_mount} --vgname=labvg --name=data --fstype=xfs --size=1 --grow",
    ]


def kickstart(node: OnboardingNode, http_base: str) -> str:
    token = checked_token(node)
    layout = choose_disk_layout(node)
    lines = [
        f"# lab: unattended RHEL/Rocky install for {node.hostname}",
        "text",
        "lang en_US.UTF-8",
        "keyboard us",
        "timezone Etc/UTC --utc",
        f"network --bootproto=dhcp --device={node.mac} --activate --hostname={node.hostname}.{node.domain}",
        "rootpw --lock",
        "user --name=lab --lock",
        "firstboot --disabled",
        "selinux --enforcing",
        *_kickstart_disk(layout),
        "bootloader --location=mbr",
        "reboot",
        "",
        "%packages",
        "@^minimal-environment",
        "curl",
        "%end",
        "",
        "%post --erroronfail",
        _token_shell(token),
        agent_install(node, http_base),
        "%end",
        "",
    ]
    return "\n".join(lines)


CONFIG_FILES = {
    "ubuntu": ("user-data", "meta-data"),
    "debian": ("preseed.cfg",),
    "rhel": ("ks.cfg",),
}


def render_config(name: str, node: OnboardingNode, image: Image, http_base: str) -> str | None:
    """The file ``name`` of this node's install config, or None if its image family has none."""
    if name not in CONFIG_FILES[image.family]:
        return None
    if name == "user-data":
        return ubuntu_user_data(node, http_base)
    if name == "meta-data":
        return ubuntu_meta_data(node)
    if name == "preseed.cfg":
        return debian_preseed(node, http_base)
    return kickstart(node, http_base)
