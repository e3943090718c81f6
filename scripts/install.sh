#!/usr/bin/env bash
# Install everything vmplug and its test suite need on Debian 12 (run as root):
# system packages (QEMU, the lab kernel, libvirt, udev tools, usb.ids…) and a
# virtual environment in .venv with vmplug and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

# virtme-ng (the lab guest) runs `file` on busybox and the kernel.
packages=(
  python3 python3-venv python3-pip git ca-certificates
  qemu-system-x86 qemu-utils qemu-guest-agent
  linux-image-amd64 busybox-static file kmod udev usbutils usb.ids procps passwd
  umockdev usbguard usbredirect
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients
  libxml2-utils
  systemd zsh fish man-db
  systemd-container prometheus
  libvirt-dev pkg-config gcc python3-dev
  chromium
  docker.io docker-compose containerd runc podman crun uidmap fuse-overlayfs slirp4netns iptables
  iproute2 curl
)
# Packages whose postinst would start a daemon on this machine (the lab guest
# runs them from this root file system; the host never should).
nostart=(usbguard docker.io containerd podman prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "vmplug: installing system packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  held=()
  for p in "${nostart[@]}"; do [[ " ${missing[*]} " == *" $p "* ]] && held+=("$p"); done
  if ((${#held[@]})); then
    # invoke-rc.d and deb-systemd-invoke ask policy-rc.d; 101 = "do not start":
    # usbguard-daemon, dockerd, containerd and podman's units never run here.
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      own_policy=1
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${held[@]}" >/dev/null
    if ((own_policy)); then
      rm -f /usr/sbin/policy-rc.d
      trap - EXIT
    fi
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The tests need usbguard's programs, never its daemon: Debian's postinst enables
# and starts usbguard-daemon, whose generated policy blocks every USB device
# plugged in afterwards -- on the very machine whose devices vmplug is meant to
# route.  So a usbguard installed here is left stopped and disabled; one that was
# there before (the user's own) is not touched.
if [[ " ${missing[*]} " == *" usbguard "* ]] && command -v systemctl >/dev/null; then
  systemctl disable --now usbguard.service >/dev/null 2>&1 || true
fi
# Prometheus: the tests run only its promtool (check metrics, check rules);
# its postinst enables prometheus.service, which would scrape and store on
# this machine from its next boot.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
# Likewise the container engines: the lab guest starts dockerd / podman's
# service itself, with its state on a tmpfs; enabled units here would start
# them (and their bridges and iptables rules) on the next boot of this machine.
if [[ " ${missing[*]} " =~ " "(docker.io|containerd|podman)" " ]] && command -v systemctl >/dev/null; then
  systemctl disable --now docker.service docker.socket containerd.service podman.service \
    podman.socket podman-restart.service podman-auto-update.service podman-auto-update.timer \
    >/dev/null 2>&1 || true
fi

# libvirt resolves its default QEMU user (libvirt-qemu) before it reads
# /etc/libvirt/qemu.conf, so a system libvirtd (the lab guest runs one from this
# root file system) needs both.  libvirt-daemon-system's postinst creates the
# user and ships the file, but postinst scripts may not have run (a chroot, a
# container, a failed configure): make sure of them here, as that postinst does.
ensure_libvirt() {
  getent group kvm >/dev/null || groupadd --system kvm
  getent group libvirt >/dev/null || groupadd --system libvirt
  if ! getent passwd libvirt-qemu >/dev/null; then
    local uid=()
    getent passwd 64055 >/dev/null || uid=(--uid 64055)
    useradd --system --gid kvm --home-dir /var/lib/libvirt --no-create-home \
      --shell /usr/sbin/nologin --comment "Libvirt Qemu" "${uid[@]}" libvirt-qemu
  fi
  if ! getent group libvirt-qemu >/dev/null; then
    local gid=()
    getent group 64055 >/dev/null || gid=(--gid 64055)
    groupadd --system "${gid[@]}" libvirt-qemu
  fi
  id -nG libvirt-qemu | tr ' ' '\n' | grep -qx libvirt-qemu || usermod -aG libvirt-qemu libvirt-qemu
  mkdir -p /etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
  # Every setting commented out: libvirt's built-in defaults, as Debian ships it.
  [ -e /etc/libvirt/qemu.conf ] || printf '# Master libvirt QEMU driver configuration file\n' \
    >/etc/libvirt/qemu.conf
}
ensure_libvirt

# Debian's python3 (/usr/bin/python3, installed above), never whatever python3
# comes first on PATH (pyenv, /usr/local/bin): the venv is the same everywhere.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# The lab guest sees this tree read-only, so a Python there cannot cache the
# bytecode of vmplug's own modules (pip compiled those in site-packages): each
# `vmplug run` in the guest compiled them again under TCG, up to a minute on a
# fresh clone.  Compiled once here, whatever PYTHONDONTWRITEBYTECODE says.
.venv/bin/python -m compileall -q src >/dev/null
# The man pages vmplug(1) and vmplug.toml(5), made from the same help texts as --help.
.venv/bin/vmplug man --output /usr/local/share/man 2>/dev/null
if command -v mandb >/dev/null; then mandb -q /usr/local/share/man 2>/dev/null || true; fi
echo "vmplug: installed in $(pwd)/.venv" >&2
