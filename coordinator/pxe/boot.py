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
DEFAULT_AGENT_INSTALL = "curl -fsSL {http_base}/agent/{mac}/install.sh | sh -s -- --coordinator {coordinator}"
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
    return template.format(http_base=http_base.rstrip("/"), mac=mac_for_url(node.mac),
                           coordinator=shlex.quote(node.coordinator or "auto"))


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
        if image.iso is not None and "url=" not in image.cmdline:  # casper loads the live ISO over HTTP
            args += f" url={base}/images/{image.name}/image.iso cloud-config-url=/dev/null"
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


# -- agent install script (served at /agent/install.sh and /agent/<mac>/install.sh) ---------------

AGENT_PREFIX = "/opt/lab"
AGENT_UNIT = "lab-agent.service"
ENROLL_UNIT = "lab-agent-enroll.service"
_COORDINATOR_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:_[]-")


def agent_wheel_name(version: str) -> str:
    """``lab-<version>-py3-none-any.whl``: what ``python -m build --wheel`` makes of this project."""
    if not version or any(c not in "0123456789abcdefghijklmnopqrstuvwxyz.+_" for c in version.lower()):
        raise UsageError(f"not a usable package version: {version!r}")
    return f"lab-{version}-py3-none-any.whl"


_AGENT_SCRIPT = r"""#!/bin/sh
# lab agent installer{for_node}, generated by lab's boot service.
# Installs the lab agent from {wheel} (served beside this script) into a venv at
# {prefix}, installs the systemd unit {unit}, and enrolls with the coordinator using the
# one-time token in {token_file} (now if systemd runs and the token is there, else at first boot).
#   usage: curl -fsSL {base}/agent/install.sh | sh -s -- --coordinator HOST:PORT
set -eu

BASE={q_base}
WHEEL={q_wheel}
PREFIX={q_prefix}
TOKEN_FILE={q_token_file}
UNIT_SERVED={unit_served}
COORDINATOR={q_coordinator}

die() {{
    printf 'lab agent install: %s\n' "$*" >&2
    exit 1
}}

while [ $# -gt 0 ]; do
    case $1 in
        --coordinator)
            [ $# -ge 2 ] || die "--coordinator needs HOST:PORT"
            COORDINATOR=$2
            shift 2 ;;
        --coordinator=*)
            COORDINATOR=${{1#*=}}
            shift ;;
        *) die "unknown argument: $1 (usage: install.sh --coordinator HOST:PORT)" ;;
    esac
done
case $COORDINATOR in
    '' | auto) die "no coordinator given: pass --coordinator HOST:PORT" ;;
    *[!A-Za-z0-9.:_\[\]-]*) die "not a HOST:PORT: $COORDINATOR" ;;
esac

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v python3 >/dev/null 2>&1 || die "python3 is not installed"

fetch() {{
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL -o "$2" "$1"
    elif command -v wget >/dev/null 2>&1; then
        wget -q -O "$2" "$1"
    else
        die "neither curl nor wget is installed"
    fi
}}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch "$BASE/agent/$WHEEL" "$tmp/$WHEEL" ||
    die "the boot server has no agent wheel at $BASE/agent/$WHEEL (on the server: python -m build --wheel, into its agent directory)"

python3 -m venv "$PREFIX" || die "python3 -m venv $PREFIX failed (is python3-venv installed?)"
"$PREFIX/bin/pip" install --quiet --disable-pip-version-check "$tmp/$WHEEL" ||
    die "pip could not install $WHEEL into $PREFIX"
# the unit runs /usr/bin/lab-agent
if [ ! -e /usr/bin/lab-agent ] || [ -L /usr/bin/lab-agent ]; then
    ln -sf "$PREFIX/bin/lab-agent" /usr/bin/lab-agent
fi

units=/etc/systemd/system
mkdir -p "$units"
if [ "$UNIT_SERVED" = yes ]; then
    fetch "$BASE/agent/{unit}" "$units/{unit}" || die "could not fetch $BASE/agent/{unit}"
else
    printf 'lab agent install: warning: the boot server serves no {unit}; enrolling only\n' >&2
fi

# systemd running here (not a chroot such as curtin in-target, d-i in-target or %post)?
live=no
if [ -d /run/systemd/system ] && ! systemd-detect-virt --quiet --chroot 2>/dev/null; then
    live=yes
fi

if [ -r "$TOKEN_FILE" ] && [ "$live" = yes ]; then
    "$PREFIX/bin/lab-agent" enroll --server "$COORDINATOR" --token-file "$TOKEN_FILE"
else
    # at first boot: the token may only be written then (cloud-init write_files)
    cat > "$units/{enroll_unit}" <<UNIT
[Unit]
Description=lab agent enrollment (one-time token)
Wants=network-online.target
After=network-online.target cloud-init.service
Before={unit}
ConditionPathExists=$TOKEN_FILE

[Service]
Type=oneshot
ExecStart=$PREFIX/bin/lab-agent enroll --server $COORDINATOR --token-file $TOKEN_FILE
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
UNIT
fi

if command -v systemctl >/dev/null 2>&1; then
    if [ -f "$units/{enroll_unit}" ]; then
        systemctl enable {enroll_unit} >/dev/null 2>&1 || die "systemctl enable {enroll_unit} failed"
    fi
    if [ "$UNIT_SERVED" = yes ]; then
        if [ "$live" = yes ]; then
            systemctl daemon-reload
            systemctl enable --now {unit} || die "could not start {unit}"
        else
            systemctl enable {unit} >/dev/null 2>&1 || die "systemctl enable {unit} failed"
        fi
    fi
fi
printf 'lab agent install: done (%s, coordinator %s)\n' "$PREFIX" "$COORDINATOR"
"""


def agent_install_script(node: OnboardingNode | None, http_base: str, version: str, *, unit_served: bool) -> str:
    """The POSIX shell script that installs the lab agent: for ``node`` (its coordinator is the
    default for ``--coordinator``), or generic (``node`` None: ``--coordinator`` required).

    It fetches ``/agent/lab-<version>-py3-none-any.whl`` (failing with a clear message when the
    server has none), makes a venv at /opt/lab, installs ``lab-agent.service`` when the server
    serves it, and runs ``lab-agent enroll --server HOST:PORT --token-file /etc/lab/join-token``:
    right away when systemd runs and the token is there, otherwise from a one-shot unit at first
    boot (installers run it in a chroot; Ubuntu's token arrives with cloud-init on first boot).
    It never contains the token.
    """
    base = http_base.rstrip("/")
    wheel = agent_wheel_name(version)
    coordinator = node.coordinator if node is not None and node.coordinator else ""
    if node is not None and not set(coordinator) <= _COORDINATOR_CHARS:
        raise UsageError(f"node {node.hostname}: not a HOST:PORT coordinator: {coordinator!r}")
    return _AGENT_SCRIPT.format(
        for_node=f" for {node.hostname} ({node.mac})" if node is not None else "",
        wheel=wheel, prefix=AGENT_PREFIX, unit=AGENT_UNIT, enroll_unit=ENROLL_UNIT, token_file=TOKEN_PATH, base=base,
        q_base=shlex.quote(base), q_wheel=shlex.quote(wheel), q_prefix=shlex.quote(AGENT_PREFIX),
        q_token_file=shlex.quote(TOKEN_PATH), unit_served="yes" if unit_served else "no",
        q_coordinator=shlex.quote(coordinator),
    )
