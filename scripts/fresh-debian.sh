#!/usr/bin/env bash
# Run the README's two commands in a clean Debian 12 root file system, as a new
# user would on a machine that never had libvirt, Docker, Podman or usbguard:
#
#   bash scripts/install.sh && .venv/bin/vmplug demo
#   bash scripts/test.sh
#
# debootstrap --variant=minbase bookworm into /var/tmp/vmplug-fresh-STAMP (against
# the mirror this machine's apt uses), a clean `git clone` of REV (default HEAD;
# only committed work) as /root/vmplug in it, /proc /sys /dev /dev/pts /dev/shm
# mounted and a tmpfs on /tmp, then both commands as root in that clone under
# chroot.  Everything goes to /var/tmp/vmplug-fresh-STAMP.log; the closing lines
# are printed at the end.  Mounts are undone and processes left in the tree are
# stopped (by PID) on any exit; the tree is removed unless --keep.
#
# What is copied from this machine is the network's, not a machine's state: the
# apt sources and Acquire settings (the mirror), resolv.conf, and the CA
# certificates of a TLS-intercepting egress proxy (with PIP_CERT and friends, if
# set here) so that pip reaches PyPI.  A policy-rc.d keeps package postinst
# scripts from starting daemons (udevd, libvirtd, usbguard) in the chroot, where
# they would act on this machine's /sys and network: install.sh must not rely
# on postinst having started or created anything.
#
# Usage: bash scripts/fresh-debian.sh [--keep] [--only demo|test] [--commit REV]
# Exit status: that of the command(s) run; 2 for bad usage.
set -euo pipefail

usage() {
  sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

keep=0
only=""
rev=HEAD
while (($#)); do
  case "$1" in
    --keep) keep=1 ;;
    --only)
      [ $# -ge 2 ] || usage
      only=$2
      shift
      case "$only" in demo | test) ;; *)
        echo "fresh-debian: --only takes demo or test, not '$only'" >&2
        exit 2
        ;;
      esac
      ;;
    --commit)
      [ $# -ge 2 ] || usage
      rev=$2
      shift
      ;;
    -h | --help) usage ;;
    *)
      echo "fresh-debian: unknown argument '$1' (try --help)" >&2
      exit 2
      ;;
  esac
  shift
done

if [ "$(id -u)" -ne 0 ]; then
  echo "fresh-debian: run as root (debootstrap, mount and chroot need it)" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$repo" rev-parse --verify --quiet "$rev^{commit}") || {
  echo "fresh-debian: '$rev' is not a commit of $repo" >&2
  exit 2
}

stamp=$(date -u +%Y%m%dT%H%M%SZ)
root=/var/tmp/vmplug-fresh-$stamp
log=/var/tmp/vmplug-fresh-$stamp.log
# Everything into the log; the progress lines and the closing lines to stdout too.
exec 3>&1 >>"$log" 2>&1
say() {
  local line
  line="fresh-debian: $(date -u +%H:%M:%S) $*"
  echo "$line"
  echo "$line" >&3
}

# ------------------------------------------------------------------ cleanup

mounted=()
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  # Processes still running inside the tree (a daemon a test left behind, the
  # lab guest's QEMU): ours, found by their root directory, stopped by PID.
  local pids=() p link
  for p in /proc/[0-9]*; do
    link=$(readlink "$p/root" 2>/dev/null) || continue
    [ "$link" = "$root" ] && pids+=("${p#/proc/}")
  done
  if ((${#pids[@]})); then
    say "stopping processes left in the tree: ${pids[*]}"
    local procs
    procs=$(ps -o pid,ppid,etime,args -p "$(
      IFS=,
      echo "${pids[*]}"
    )")
    echo "$procs"
    echo "$procs" >&3
    kill -TERM "${pids[@]}" 2>/dev/null
    sleep 2
    kill -KILL "${pids[@]}" 2>/dev/null
    sleep 0.5
  fi
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -R "${mounted[i]}" 2>/dev/null || umount -R -l "${mounted[i]}"
  done
  if [ -d "$root" ]; then
    if findmnt -rn -o TARGET | grep -q "^$root"; then
      say "something is still mounted under $root: left in place"
    elif ((keep)); then
      say "tree kept in $root"
    else
      rm -rf --one-file-system "$root"
    fi
  fi
  {
    echo "---- closing lines of $log"
    grep -v '^fresh-debian: ' "$log" | tail -n 25
    echo "----"
    grep '^fresh-debian: .*\(exit\|done\)' "$log"
  } >&3
  echo "fresh-debian: log: $log" >&3
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mnt() { # mnt TARGET mount-args...
  local target=$1
  shift
  mkdir -p "$target"
  mount "$@" "$target"
  mounted+=("$target")
  # Nothing mounted under it may propagate back to this machine's tree.
  mount --make-rslave "$target"
}

# ------------------------------------------------------------- the mirror

# The first Debian mirror configured for plain `bookworm` (deb822 .sources or
# one-line sources.list), as apt on this machine uses it.
find_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      function flush() { if (uri != "" && suites ~ /(^| )bookworm( |$)/ && types ~ /(^| )deb( |$)/) { print uri; found = 1; exit } uri = ""; suites = ""; types = "" }
      /^[ \t]*$/ { flush(); next }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { $1 = ""; suites = $0 " " }
      /^Types:/ { $1 = ""; types = $0 " " }
      END { if (!found) flush() }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++;
         if ($(i + 1) == "bookworm") print $i }' "$f"
  done
}
mirror=$(find_mirror | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}

say "commit $commit ($(git -C "$repo" log -1 --format=%s "$commit" | cut -c1-80))"
say "root $root, mirror $mirror, only=${only:-both}, keep=$keep"
say "host: $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"

if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap on this machine"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# ------------------------------------------------------------- the tree

t0=$SECONDS
say "debootstrap --variant=minbase bookworm"
mkdir -p /var/cache/vmplug-debootstrap
debootstrap --variant=minbase --cache-dir=/var/cache/vmplug-debootstrap \
  bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
  tail -n 30 "$root.debootstrap.log"
  say "debootstrap failed (log: $root.debootstrap.log)"
  exit 1
}
rm -f "$root.debootstrap.log"
say "debootstrap done in $((SECONDS - t0)) s"

# The network's settings (see the header), nothing else of this machine's.
rm -f "$root/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && grep -qi debian "$f" && cp "$f" "$root$f"
done
for f in /etc/apt/apt.conf.d/*; do
  [ -f "$f" ] && grep -q '^Acquire::' "$f" && cp "$f" "$root$f"
done
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
[ -f /etc/pip.conf ] && grep -q '^cert' /etc/pip.conf && cp /etc/pip.conf "$root/etc/pip.conf"
printf '#!/bin/sh\n# fresh-debian.sh: no daemons started by postinst in this chroot\nexit 101\n' \
  >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

clone=$root/root/vmplug
git clone -q --no-hardlinks "$repo" "$clone"
git -C "$clone" -c advice.detachedHead=false checkout -q "$commit"
say "clean clone of $commit in /root/vmplug ($(git -C "$clone" ls-files | wc -l) files)"

# A real machine's / is a mount point, and so must the tree's be: podman's
# layer import makes / private (MS_REC|MS_PRIVATE), EINVAL on a plain directory.
mnt "$root" --bind "$root"
mnt "$root/proc" -t proc proc
mnt "$root/sys" --rbind /sys
mnt "$root/dev" --bind /dev
mnt "$root/dev/pts" --bind /dev/pts
mnt "$root/dev/shm" -t tmpfs -o mode=1777,nosuid,nodev shm
mnt "$root/tmp" -t tmpfs -o mode=1777 tmpfs
mnt "$root/run" -t tmpfs -o mode=755 run

# The environment a root login on a fresh Debian has, plus the network's
# certificate settings when this machine sets them.
envs=(HOME=/root USER=root LOGNAME=root SHELL=/bin/bash LANG=C.UTF-8 TERM=dumb
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
for v in PIP_CERT SSL_CERT_FILE REQUESTS_CA_BUNDLE http_proxy https_proxy no_proxy \
  HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [ -n "${!v:-}" ] && envs+=("$v=${!v}")
done

in_tree() { # in_tree LABEL COMMAND
  local t=$SECONDS rc=0
  say "[$1] # $2"
  chroot "$root" /usr/bin/env -i "${envs[@]}" /bin/bash -c "cd /root/vmplug && $2" </dev/null ||
    rc=$?
  say "[$1] exit $rc after $((SECONDS - t)) s"
  return "$rc"
}

# Both, as the README has them; the test command runs even if the first failed
# (it installs again itself), and the first failure decides the exit status.
rc=0
if [ "$only" != test ]; then
  in_tree demo 'bash scripts/install.sh && .venv/bin/vmplug demo' || rc=$?
fi
if [ "$only" != demo ]; then
  r=0
  in_tree test 'bash scripts/test.sh' || r=$?
  [ "$rc" -ne 0 ] || rc=$r
fi
say "done: exit $rc, $((SECONDS - t0)) s in all, load $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"
