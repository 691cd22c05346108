#!/usr/bin/env bash
# Installs the Debian packages a purpose needs, when they are missing and we may (root + apt).
#   tools/system-deps.sh venv   - what `python3 -m venv` needs on a bare Debian
#   tools/system-deps.sh test   - the real peers the integration tests run against
set -euo pipefail
case "${1:-test}" in
  venv) pkgs=(python3-venv python3-pip) ;;
  test) pkgs=(bind9 bind9-dnsutils prometheus nagios4-core monitoring-plugins-basic) ;;
  *) echo "usage: $0 venv|test" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
