#!/usr/bin/env bash
# Install everything vmplug and its test suite need on Debian 12 (run as root):
# system packages (QEMU, the lab kernel, libvirt, udev tools, usb.ids…) and a
# virtual environment in .venv with vmplug and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv python3-pip git ca-certificates
  qemu-system-x86 qemu-utils qemu-guest-agent
  linux-image-amd64 busybox-static kmod udev usbutils usb.ids
  umockdev
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils
  systemd
  libvirt-dev pkg-config gcc python3-dev
  chromium
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "vmplug: installing system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "vmplug: installed in $(pwd)/.venv" >&2
