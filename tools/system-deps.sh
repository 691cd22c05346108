#!/usr/bin/env bash
# Installs what a purpose needs outside Python, when it is missing and we may (root + apt).
#   tools/system-deps.sh venv   - what `python3 -m venv` needs on a bare Debian
#   tools/system-deps.sh test   - the real peers the integration tests run against
set -euo pipefail
case "${1:-test}" in
  venv) pkgs=(python3-venv python3-pip) ;;
  test)
    pkgs=(
      bind9 bind9-dnsutils                                  # DNS: named, tsig-keygen, dig
      prometheus prometheus-node-exporter                   # alerts: promtool, a real server and exporter
      nagios4-core monitoring-plugins-basic                 # alerts: nagios4 -v on rendered objects
      tmux                                                  # lab dash end-to-end
      age git                                               # secret backups: stock age decrypts, Git history
      iproute2 busybox tftp-hpa                             # PXE: netns hosts, udhcpc, tftp client
      qemu-system-x86 ipxe-qemu ipxe ovmf                   # PXE: real BIOS/UEFI network boot
      ipmitool openipmi debconf                             # power: ipmi_sim BMC; preseed check
      swtpm swtpm-tools tpm2-tools systemd                  # agent: TPM-sealed cache key, unit verify
      puppet                                                # agent reporters: real puppet apply runs
      shellcheck curl                                       # PXE: the generated agent install script
      openssh-server openssh-client                         # SSH onboarding against a real sshd
      xorriso                                               # PXE: real ISO images for `lab image add --iso`
    ) ;;
  *) echo "usage: $0 venv|test" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "${1:-test}" = test ]; then
  # Test-only Python tools with dependency trees of their own (Redfish emulator, kickstart
  # validator), in a separate virtual environment; the Makefile points the tests at them.
  tools_dir="${LAB_TEST_TOOLS:-$HOME/.cache/lab-test-tools}"
  if [ ! -x "$tools_dir/bin/sushy-emulator" ] || [ ! -x "$tools_dir/bin/ksvalidator" ]; then
    python3 -m venv "$tools_dir"
    "$tools_dir/bin/pip" install --quiet sushy-tools pykickstart
  fi
  # cloud-init's schema check for generated autoinstall user-data. It is not on PyPI, and Debian's
  # package enables boot-time services, so its .deb is unpacked into the tools dir, not installed.
  if [ ! -d "$tools_dir/cloud-init-root/usr/lib/python3/dist-packages/cloudinit" ] && command -v apt-get >/dev/null; then
    (cd "$tools_dir" && apt-get download -qq cloud-init && dpkg -x cloud-init_*.deb cloud-init-root && rm -f cloud-init_*.deb)
    "$tools_dir/bin/pip" install --quiet pyyaml jsonschema jinja2 configobj requests jsonpatch
  fi

  # An independent Noise implementation in another language (npm `noise-protocol`, libsodium),
  # kept outside the repository; tests/integration/test_noise_interop_node.py finds it there.
  node_dir="${LAB_NODE_PEER_DIR:-$HOME/.cache/lab-node}"
  if command -v node >/dev/null && command -v npm >/dev/null && [ ! -d "$node_dir/node_modules/noise-protocol" ]; then
    npm install --silent --no-audit --no-fund --prefix "$node_dir" noise-protocol@3.0.2 >/dev/null
  fi
fi
