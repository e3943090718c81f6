"""Whether the tests run inside a chroot (as scripts/fresh-debian.sh runs them)."""

from __future__ import annotations

from pathlib import Path


def in_chroot() -> bool:
    """True when this process's root is not PID 1's: systemd-nspawn cannot boot a
    container and rootless Podman cannot set up its user namespace from there."""
    try:
        mine, init = Path("/").stat(), Path("/proc/1/root/").stat()
    except OSError:  # no /proc, or PID 1's root is not ours to read
        return False
    return (mine.st_dev, mine.st_ino) != (init.st_dev, init.st_ino)
