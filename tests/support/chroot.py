"""Whether the tests run inside a chroot (as scripts/fresh-debian.sh runs them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def in_chroot() -> bool:
    """True when this process's root is not PID 1's: systemd-nspawn cannot boot a
    container and rootless Podman cannot set up its user namespace from there."""
    try:
        mine, init = Path("/").stat(), Path("/proc/1/root/").stat()
    except OSError:  # no /proc, or PID 1's root is not ours to read
        return False
    return (mine.st_dev, mine.st_ino) != (init.st_dev, init.st_ino)


def user_namespaces_refused() -> bool:
    """True when the kernel refuses this process a user namespace, as it does
    in a chroot (whether or not :func:`in_chroot` can tell: PID 1's root may be
    unreadable) or with ``user.max_user_namespaces=0``: rootless Podman cannot
    start then.  Asked of the kernel itself, with util-linux's ``unshare``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False  # no way to ask: let the test say what fails
    res = subprocess.run([unshare, "--user", "true"], capture_output=True, timeout=30, check=False)
    return res.returncode != 0
