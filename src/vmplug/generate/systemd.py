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


#: the places that hold a user's files: ProtectHome= hides them
HOME_DIRS = ("/home", "/root", "/run/user")
#: the shared temporary directories: PrivateTmp= gives the unit empty ones
TMP_DIRS = ("/tmp", "/var/tmp")
#: the directories systemd makes for the unit (RuntimeDirectory=, StateDirectory=)
OWN_DIRS = ("/run/vmplug", "/var/lib/vmplug")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class SystemdPlan:
    """A ``Type=notify`` unit: vmplug says READY=1 after its first pass, pings the
    watchdog from its event loop and re-reads its config on ``ExecReload=``.

    The sandbox still lets it do its work: connect to QMP, libvirt, Docker and
    Podman sockets (``connect()`` to a socket works on a read-only mount, so
    ``ProtectSystem=strict`` leaves them reachable; the VMs' socket directories
    are in ``ReadWritePaths=`` all the same, for the sockets vmplug itself
    creates beside them), open ``/dev/bus/usb`` nodes
    (``DeviceAllow=char-usb_device``), read ``/dev/kmsg`` (the self-healing
    reads port errors there), write the USB port controls under
    ``/sys/devices``, listen on netlink for uevents and on TCP for the API.
    """

    exec_argv: tuple[str, ...]
    after: tuple[str, ...] = AFTER
    restart_sec: int = 2
    watchdog_sec: int = 30
    #: directories of the VMs' QMP (and other unix) sockets
    socket_dirs: tuple[str, ...] = ()
    #: directories vmplug writes besides /run/vmplug and /var/lib/vmplug
    #: (a [daemon] socket or database elsewhere)
    state_dirs: tuple[str, ...] = ()
    #: where vmplug and its Python live (a venv or pyenv in /root needs /root)
    program_dirs: tuple[str, ...] = ()

    @property
    def protect_home(self) -> str:
        """``yes``, or ``read-only`` when a VM's socket, vmplug or its Python
        lives in a home directory."""
        dirs = (*self.socket_dirs, *self.program_dirs)
        if any(_under(d, h) for d in dirs for h in HOME_DIRS):
            return "read-only"
        return "yes"

    @property
    def private_tmp(self) -> str:
        """``yes``, or ``no`` when a VM's socket, vmplug or its Python lives under
        /tmp or /var/tmp (PrivateTmp= would hide it: the daemon could not start)."""
        dirs = (*self.socket_dirs, *self.program_dirs)
        if any(_under(d, t) for d in dirs for t in TMP_DIRS):
            return "no"
        return "yes"

    def rw_paths(self) -> list[str]:
        """``ReadWritePaths=`` words (``-``: a directory missing at start is no error)."""
        out = ["-/sys/devices"]
        for d in (*self.state_dirs, *self.socket_dirs):
            if any(_under(d, t) for t in OWN_DIRS):
                continue
            # quoted like ExecStart= (C escapes, %% specifiers), but no $VAR here
            word = exec_quote(d).replace("$$", "$")
            word = '"-' + word[1:] if word.startswith('"') else "-" + word
            if word not in out:
                out.append(word)
        return out

    def text(self) -> str:
        exec_line = " ".join(exec_quote(w) for w in self.exec_argv)
        home_note = (
            "# a VM's socket or vmplug itself is in a home directory: read-only, not hidden\n"
            if self.protect_home != "yes"
            else ""
        )
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
            "# READY=1 once the API socket is up and the first reconcile pass is done\n"
            "Type=notify\n"
            f"ExecStart={exec_line}\n"
            "# SIGHUP re-reads the config (RELOADING=1, then READY=1)\n"
            "ExecReload=/bin/kill -HUP $MAINPID\n"
            "# WATCHDOG=1 comes from the event loop: a stuck daemon is restarted\n"
            f"WatchdogSec={self.watchdog_sec}\n"
            "Restart=on-failure\n"
            f"RestartSec={self.restart_sec}\n"
            "# /run/vmplug (the API socket), /var/lib/vmplug (history, API token)\n"
            "RuntimeDirectory=vmplug\n"
            "RuntimeDirectoryPreserve=restart\n"
            "StateDirectory=vmplug\n"
            "PrivateMounts=yes\n"
            "# the history and the API token are root's alone (the socket is chmod'ed)\n"
            "UMask=0077\n"
            "# -- the sandbox: what vmplug needs and no more\n"
            "NoNewPrivileges=yes\n"
            "# unix (QMP, libvirt, Docker, the API), netlink (uevents), TCP (API, remote)\n"
            "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6\n"
            "ProtectSystem=strict\n"
            "# the USB port controls (self-healing), the VMs' socket directories\n"
            f"ReadWritePaths={' '.join(self.rw_paths())}\n"
            f"{home_note}"
            f"ProtectHome={self.protect_home}\n"
            f"PrivateTmp={self.private_tmp}\n"
            "# USB device nodes (given to QEMU, reset), the kernel log (port errors)\n"
            "DevicePolicy=closed\n"
            "DeviceAllow=char-usb_device rw\n"
            "DeviceAllow=/dev/kmsg r\n"
            "ProtectKernelTunables=yes\n"
            "ProtectKernelModules=yes\n"
            "ProtectControlGroups=yes\n"
            "ProtectClock=yes\n"
            "ProtectHostname=yes\n"
            "RestrictNamespaces=yes\n"
            "RestrictRealtime=yes\n"
            "RestrictSUIDSGID=yes\n"
            "LockPersonality=yes\n"
            "MemoryDenyWriteExecute=yes\n"
            "SystemCallArchitectures=native\n"
            "SystemCallFilter=@system-service\n"
            "SystemCallFilter=~@privileged @resources\n"
            "# ...but chown (of the API socket to [api] group), which @privileged holds\n"
            "SystemCallFilter=@chown\n"
            "SystemCallErrorNumber=EPERM\n"
            "# root reaches sockets owned by the qemu/libvirt users (DAC) and gives the\n"
            "# API socket to [api] group (chown); no other capability\n"
            "CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_CHOWN CAP_FOWNER\n"
            "\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n"
        )


def plan_systemd(
    executable: str,
    *,
    config: str | None = None,
    extra_args: Sequence[str] = (),
    sockets: Sequence[str] = (),
    state: Sequence[str] = (),
) -> SystemdPlan:
    """The unit for ``executable run``.  ``sockets``: the VMs' unix socket paths
    (their directories join ``ReadWritePaths=``; one in a home directory makes
    ``ProtectHome=read-only``); ``state``: files vmplug writes (the config's
    ``[daemon] socket`` and ``database``).  ``tcp:`` addresses are skipped."""
    if not executable.startswith("/"):
        raise CannotExpress(f"{executable!r}: ExecStart= needs an absolute path to vmplug")
    argv = [executable]
    if config is not None:
        argv += ["--config", config]
    argv.append("run")
    argv += list(extra_args)
    for word in argv:
        exec_quote(word)

    def dirs(paths: Sequence[str]) -> tuple[str, ...]:
        out = [str(Path(p).parent) for p in paths if p.startswith("/")]
        for d in out:
            exec_quote(d)
        return tuple(dict.fromkeys(out))

    return SystemdPlan(
        tuple(argv),
        socket_dirs=dirs(sockets),
        state_dirs=dirs(state),
        program_dirs=dirs(_program_files(executable)),
    )


def _program_files(executable: str) -> list[str]:
    """The executable and, for a script, its interpreter, both resolved (symlinks
    followed: a venv's python is a link into pyenv or /usr)."""
    out = [executable, str(Path(executable).resolve())]
    try:
        with Path(executable).open("rb") as fh:
            first = fh.readline(512)
    except OSError:
        return out
    if first.startswith(b"#!"):
        words = first[2:].decode(errors="replace").split()
        if words and words[0].startswith("/"):
            out += [words[0], str(Path(words[0]).resolve())]
    return out
