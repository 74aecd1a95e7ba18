#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmarks need on a fresh
# Debian 12 machine: Debian packages, a venv with the project, and cnitool.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(iproute2 iputils-ping iptables nftables ipset iperf3 tcpdump ethtool
              containernetworking-plugins golang-go golang-github-appc-cni-dev dpkg-dev
              gcc libc6-dev)
VENV=${VENV:-.venv}
CACHE=${CACHE:-.cache}

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (network namespaces and apt need it)" >&2
    exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV" >&2
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
    echo "setup: installing Python packages into $VENV" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

tools/build-cnitool.sh "$CACHE"

# The native thin client (`fan`, `fan-ipam`), where `cni-fan install` finds it;
# again whenever its source or the package's version changed.
client=cni_fan/native/fan-client
if [ ! -x "$client" ] || [ native/fan-client.c -nt "$client" ] || [ cni_fan/__init__.py -nt "$client" ] \
        || [ native/build.sh -nt "$client" ]; then
    mkdir -p cni_fan/native
    native/build.sh "$client"
fi

"$VENV/bin/cni-fan" install --bin-dir "$CACHE/cni-bin" 2>/dev/null
