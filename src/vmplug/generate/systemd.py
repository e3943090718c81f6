"""A systemd unit for the ``vmplug run`` daemon.

It starts after udev (devices are enumerated and the rules vmplug wrote have
run) and after the container runtime and libvirt (the VMs it serves live
there); ``After=`` on a unit that is not installed is a no-op, so one unit
fits every host.  It restarts on failure; vmplug's own state is level
triggered, so a restart picks up where the last run left off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmplug.generate.common import CannotExpress

UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "vmplug.service"
AFTER = (
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "network-online.target",
    "docker.service",
    "containerd.service",
    "podman.service",
    "libvirtd.service",
    "virtqemud.service",
)


def exec_quote(word: str) -> str:
    """One word of an ``ExecStart=`` line, as systemd will read it back.

    systemd splits ``ExecStart=`` like a shell with C escapes inside double
    quotes (``extract_first_word`` with ``EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE``),
    then expands ``%`` specifiers and ``$VAR``/``${VAR}``: those are written
    ``%%`` and ``$$``.
    """
    if not word:
        return '""'
    if "\0" in word:
        raise CannotExpress("an ExecStart= argument cannot contain NUL")
    if word == ";":
        raise CannotExpress("a lone ';' in ExecStart= separates commands; it cannot be an argument")
    out = ['"']
    for ch in word:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "%":
            out.append("%%")
        elif ch == "$":
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "'":
            out.append("\\'")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif not ch.isprintable() and ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")  # NEL, U+2028, ...: keep the file plain
        elif not ch.isprintable():
            out.append(f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    quoted = "".join(out)
    plain = quoted[1:-1]
    # Simple words stay readable: no quoting needed when nothing special is in them.
    if plain == word and not any(c in word for c in " \t;'\"\\%$"):
        return word
    return quoted


@dataclass(frozen=True)
class SystemdPlan:
    exec_argv: tuple[str, ...]
    after: tuple[str, ...] = AFTER
    restart_sec: int = 2

    def text(self) -> str:
        exec_line = " ".join(exec_quote(w) for w in self.exec_argv)
        return (
            "# vmplug: keeps USB devices attached to VMs across replug and restarts.\n"
            "# Written by `vmplug generate systemd`.\n"
            "[Unit]\n"
            "Description=vmplug USB pass-through daemon\n"
            "# udev first (devices enumerated at boot, vmplug's rules applied), then the\n"
            "# container runtime and libvirt that run the VMs; After= on a unit that\n"
            "# is not installed does nothing.\n"
            f"After={' '.join(self.after)}\n"
            "StartLimitIntervalSec=0\n"
            "\n"
            "[Service]\n"
            "Type=simple\n"
            f"ExecStart={exec_line}\n"
            "Restart=on-failure\n"
            f"RestartSec={self.restart_sec}\n"
            "\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n"
        )


def plan_systemd(
    executable: str, *, config: str | None = None, extra_args: Sequence[str] = ()
) -> SystemdPlan:
    if not executable.startswith("/"):
        raise CannotExpress(f"{executable!r}: ExecStart= needs an absolute path to vmplug")
    argv = [executable]
    if config is not None:
        argv += ["--config", config]
    argv.append("run")
    argv += list(extra_args)
    for word in argv:
        exec_quote(word)
    return SystemdPlan(tuple(argv))
