"""Install what the generators write onto this host: a systemd unit, udev rules.

The generators (:mod:`vmplug.generate`) are pure: they turn devices into text.
Writing that text under ``/etc`` and telling systemd or udev about it is I/O,
and lives here, at the edge.  ``run`` is injected so that tests drive real
stand-ins of ``systemctl`` and ``udevadm``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from vmplug.generate.common import CannotExpress, comment_text
from vmplug.generate.systemd import UNIT_DIR, UNIT_NAME, SystemdPlan
from vmplug.generate.udev import RULES_DIR, UdevRule, render_rules

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing what it says; its exit status is the caller's to judge."""
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` at once (a reader sees the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_unit(
    plan: SystemdPlan,
    *,
    unit_dir: Path = UNIT_DIR,
    name: str = UNIT_NAME,
    enable: bool = True,
    systemctl: str = "systemctl",
    run: Runner = run_command,
) -> list[str]:
    """Write the unit, reload systemd and enable+start it; say what was done."""
    if "/" in name or not name.endswith(".service"):
        raise CannotExpress(f"{name!r}: a unit name ending in .service, without '/'")
    path = unit_dir / name
    write_atomic(path, plan.text())
    done = [f"wrote {path}"]
    steps = [[systemctl, "daemon-reload"]]
    if enable:
        steps.append([systemctl, "enable", "--now", name])
    for argv in steps:
        res = run(argv)
        if res.returncode != 0:
            why = (res.stderr or "").strip().splitlines()[-1:] or [f"status {res.returncode}"]
            done.append(f"`{' '.join(argv)}` failed: {why[0]}")
            return done
        done.append(f"ran `{' '.join(argv)}`")
    return done


def install_rules(
    rules: Sequence[UdevRule],
    *,
    rules_dir: Path = RULES_DIR,
    single_file: str | None = None,
    udevadm: str = "udevadm",
    sysfs_root: Path = Path("/sys"),
    run: Runner = run_command,
) -> list[str]:
    """Write the rules, reload udev and re-trigger the devices; say what was done.

    One file per device (``70-vmplug-VID-PID-SERIAL.rules``) so that installing
    another device later leaves the first in place; ``single_file`` puts them
    all in one.  udev not running is reported, not an error: the rules apply
    when it starts.
    """
    done: list[str] = []
    if single_file is not None:
        if "/" in single_file or not single_file.endswith(".rules"):
            raise CannotExpress(f"{single_file!r}: a file name ending in .rules, without '/'")
        files = {single_file: render_rules(rules)}
    else:
        files = {r.filename: render_rules([r]) for r in rules}
    for name, text in files.items():
        path = rules_dir / name
        write_atomic(path, text)
        done.append(f"wrote {path}")
    reload = run([udevadm, "control", "--reload"])
    if reload.returncode != 0:
        why = comment_text(reload.stderr.strip() or f"exit status {reload.returncode}")
        done.append(
            f"udev did not reload ({why}); the rules apply when udev starts or at the next boot"
        )
        return done
    done.append("reloaded udev rules (udevadm control --reload)")
    for rule in rules:
        sys_path = sysfs_root / "bus" / "usb" / "devices" / rule.port
        trig = run([udevadm, "trigger", "--action=change", str(sys_path)])
        if trig.returncode == 0:
            done.append(f"re-applied to {rule.port} (udevadm trigger --action=change {sys_path})")
        else:
            why = comment_text(trig.stderr.strip() or f"exit status {trig.returncode}")
            done.append(f"could not re-apply to {rule.port} now ({why}); it applies at next plug")
    return done
