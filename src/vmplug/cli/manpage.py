"""Man pages from the command line itself: ``vmplug(1)`` and ``vmplug.toml(5)``.

``vmplug(1)`` walks the click group, so each command, argument and option is
documented with the same text ``--help`` prints; nothing is written twice.
``vmplug.toml(5)`` documents every key the config parser accepts (a test
checks it against :mod:`vmplug.config`).  ``vmplug man --output DIR`` writes
``DIR/man1/vmplug.1`` and ``DIR/man5/vmplug.toml.5`` (scripts/install.sh puts
them under /usr/local/share/man).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click

from vmplug import __version__

_DATE = "2026"


def roff_text(text: str) -> str:
    """Plain text for roff: backslashes, a leading dot or quote, and hyphens of options."""
    text = text.replace("\\", "\\e")
    # -x, --long: minus signs, not hyphens (well-known stays a hyphen)
    text = re.sub(r"(?<![\w-])-[\w-]*", lambda m: m.group().replace("-", "\\-"), text)
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _quote(text: str) -> str:
    return '"' + roff_text(text).replace('"', "\\(dq") + '"'


def _paragraphs(text: str) -> Iterator[str]:
    """click's help text as roff: ``\\b`` blocks kept as they are, the rest filled."""
    text = text.replace("\b\n", "\b").strip("\n")
    for block in re.split(r"\n\s*\n", text):
        if not block.strip():
            continue
        if block.startswith("\b"):
            yield ".PP\n.nf\n" + roff_text(block.lstrip("\b")) + "\n.fi"
        else:
            yield ".PP\n" + roff_text(" ".join(line.strip() for line in block.splitlines()))


def _usage(ctx: click.Context, command: click.Command) -> str:
    pieces = command.collect_usage_pieces(ctx)
    return " ".join(pieces)


def _option_entry(ctx: click.Context, param: click.Parameter) -> str | None:
    record = param.get_help_record(ctx)
    if record is None:
        return None
    names, help_text = record
    if isinstance(param, click.Argument) and not help_text:
        return None  # named in the usage line; its meaning is in the command's text
    return f".TP\n.B {roff_text(names)}\n{roff_text(help_text) or '.'}"


def _walk(
    ctx: click.Context, command: click.Command, path: list[str]
) -> Iterator[tuple[list[str], click.Command, click.Context]]:
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            yield from _walk(sub_ctx, sub, [*path, name])


#: Options every subcommand takes (documented once, under GLOBAL OPTIONS).
_GLOBAL = frozenset({"sysfs_root", "config", "debug"})


def render_vmplug1(root: click.Group | None = None) -> str:
    """``vmplug(1)``: every command with its help, arguments and options."""
    from vmplug.cli.app import GLOBAL_NOTE, cli  # noqa: PLC0415
    from vmplug.cli.completion import INSTALL  # noqa: PLC0415

    group = root or cli
    root_ctx = click.Context(group, info_name="vmplug")
    out = [
        f'.TH VMPLUG 1 "{_DATE}" "vmplug {__version__}" "User Commands"',
        ".SH NAME",
        "vmplug \\- route host USB devices into QEMU/KVM virtual machines",
        ".SH SYNOPSIS",
        ".B vmplug",
        "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        *_paragraphs(group.help or ""),
        ".SH GLOBAL OPTIONS",
    ]
    for param in group.params:
        entry = _option_entry(root_ctx, param)
        if entry:
            out.append(entry)
    out.append(f".PP\n{roff_text(GLOBAL_NOTE)}")
    out.append(".SH COMMANDS")
    for path, command, ctx in _walk(root_ctx, group, []):
        if not path:
            continue
        if isinstance(command, click.Group):
            out.append(f".SS {_quote('vmplug ' + ' '.join(path) + ' COMMAND')}")
            out.extend(_paragraphs(command.help or ""))
            continue
        out.append(f".SS {_quote('vmplug ' + ' '.join(path) + ' ' + _usage(ctx, command))}")
        out.extend(_paragraphs(command.help or command.short_help or ""))
        entries = [
            e
            for p in command.params
            if p.name not in _GLOBAL and (e := _option_entry(ctx, p)) is not None
        ]
        if entries:
            out.append(".PP\nOptions:")
            out.append(".RS")
            out.extend(entries)
            out.append(".RE")
        epilog = (command.epilog or "").replace(GLOBAL_NOTE, "").strip()
        if epilog:
            out.extend(_paragraphs(epilog))
    out += [
        ".SH EXIT STATUS",
        ".TP\n.B 0\nSuccess (doctor: nothing wrong).",
        ".TP\n.B 1\nFailure or nothing found (doctor: it found problems).",
        ".TP\n.B 2\nBad input: a bad rule, selector, option, config file or unreadable file; "
        "the reason is printed on stderr.",
        ".TP\n.B 70\nAn internal error (a bug; --debug prints the traceback).",
        ".TP\n.B 130\nInterrupted.",
        ".TP\n.B 141\nA closed pipe.",
        ".SH ENVIRONMENT",
        ".TP\n.B VMPLUG_CONFIG\nThe config file (default /etc/vmplug/vmplug.toml).",
        ".TP\n.B VMPLUG_SYSFS_ROOT\nRead USB devices from this sysfs root instead of /sys.",
        ".TP\n.B VMPLUG_USB_IDS\nThe usb.ids file for device names (default: the system's).",
        ".TP\n.B VMPLUG_DEBUG\nWith 1: print tracebacks for internal errors.",
        ".TP\n.B VMPLUG_PROXMOX_RUN\nWhere Proxmox's QMP sockets are "
        "(default /var/run/qemu-server).",
        ".TP\n.B VMPLUG_PROXMOX_ETC\nWhere Proxmox's VM configs are "
        "(default /etc/pve/qemu-server).",
        ".TP\n.B VMPLUG_PROXMOX_NODE\nThis Proxmox node's name, for resource mappings "
        "(default: the host name).",
        ".TP\n.B DOCKER_HOST\nThe Docker or Podman API socket the doctor and vms ask.",
        ".SH FILES",
        ".TP\n.I /etc/vmplug/vmplug.toml\nThe config file, see \\fBvmplug.toml\\fR(5).",
        ".TP\n.I /run/vmplug/vmplug.sock\nThe daemon's API socket (default).",
        ".TP\n.I /var/lib/vmplug/vmplug.db\nThe daemon's history database (default).",
        ".TP\n.I /etc/pve/qemu-server/VMID.conf\nProxmox VM configs: names and usbN: lines.",
        ".SH SHELL COMPLETION",
        ".nf",
        *(roff_text(f"{shell}: {line}") for shell, line in INSTALL.items()),
        ".fi",
        ".SH SEE ALSO",
        "\\fBvmplug.toml\\fR(5), \\fBqemu\\fR(1), \\fBusbguard\\fR(1), \\fBudevadm\\fR(8), "
        "\\fBqm\\fR(1)",
    ]
    return "\n".join(out) + "\n"


#: vmplug.toml(5): each table, its keys and what they mean.  A test checks that
#: every key :mod:`vmplug.config` accepts is here.
CONFIG_SECTIONS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "[vm.NAME]",
        "A VM vmplug manages. NAME is letters, digits, '_', '.' and '-' (at most 64), "
        "first a letter or digit. Exactly one of qmp, libvirt, container and proxmox "
        "says where the VM is.",
        (
            ("qmp", 'The VM\'s QMP socket: an absolute path, or "tcp:HOST:PORT".'),
            ("libvirt", "A libvirt domain name (vmplug attaches through libvirt)."),
            (
                "container",
                "A Docker or Podman container running QEMU (dockurr/windows and other "
                "QEMU images), by name or id.",
            ),
            (
                "proxmox",
                "A Proxmox VE VMID (100 to 999999999); its QMP socket is "
                "/var/run/qemu-server/VMID.qmp, always shared.",
            ),
            (
                "shared",
                "true: connect to the QMP socket per operation and let go at once, "
                "because another client (Proxmox's qm) needs it too. Not for libvirt.",
            ),
            (
                "usb_bus",
                'The QEMU USB bus devices are attached to ("xhci.0"); default: the '
                "first USB bus QEMU reports. Not for libvirt.",
            ),
            (
                "add_controller",
                "true: add a qemu-xhci controller of vmplug's own when the VM has none. "
                "Not for libvirt.",
            ),
            (
                "uri",
                "libvirt: the connection URI (default qemu:///system); container: the "
                "Docker or Podman API socket (unix:///var/run/docker.sock).",
            ),
            ("persist", "libvirt: also write attached devices into the persistent domain."),
            ("heal", "false: the healing ladder ([heal]) never touches this VM's devices."),
        ),
    ),
    (
        "[[rule]]",
        "Rules, in order; the first whose match fits a device decides. Hubs never match.",
        (
            (
                "match",
                "A usbguard-style rule: 'id 1235:821a', 'via-port \"3-1.2\"', "
                "'serial \"X\"', 'with-interface 03:01:01' and their combinations.",
            ),
            ("attach", "The VM (a [vm.NAME]) a matching device goes to."),
            ("block", "true: a matching device stays on the host, whatever later rules say."),
            ("comment", "Free text for people; vmplug ignores it."),
            ("heal", "false: the healing ladder ([heal]) never touches this rule's devices."),
        ),
    ),
    (
        "[heal]",
        "Self-healing of devices a rule sends to a VM: re-attach, reset (USBDEVFS_RESET), "
        "hub port disable/enable, de-authorize/authorize, one rung at a time, each one "
        "journaled (heal, heal-failed). The controller is never touched.",
        (
            ("enabled", "false: no healing (default true)."),
            ("dry_run", "true: journal what would be done, do nothing."),
            ("attach_refusals", "Attach errors in a row that start the ladder (default 3)."),
            ("drops", "Removals or losses within drops_window_s that start it (default 3)."),
            ("drops_window_s", "The window for drops (default 600)."),
            ("settle_s", "Seconds attached, without a new trigger, that end an episode (10)."),
            ("interval_s", "Seconds between rungs, doubled per rung (default 5)."),
            ("max_interval_s", "The most seconds between rungs (default 600)."),
            ("max_per_hour", "At most this many rungs per device and hour (default 12)."),
            (
                "rungs",
                'The rungs, in order (default ["reattach", "reset", "port-cycle", "reauthorize"]).',
            ),
            (
                "controllers",
                "PCI addresses of the host controllers the last rung may unbind from"
                ' their driver and bind again (e.g. ["0000:00:14.0"]); a controller not'
                " named here is never touched (default []).",
            ),
        ),
    ),
    (
        "[[alert]]",
        "An alert: conditions over the journal, and where a firing and its all-clear go "
        "(the journal always; a webhook and a command when given). A subject fires once "
        "and clears once after clear_after_s without its condition.",
        (
            ("name", "The alert's name (default alert-N)."),
            ("not_back_s", "A device not attached again within this many seconds."),
            ("drops", "A device removed or lost this many times within drops_window_s."),
            ("drops_window_s", "The window for drops (default 600)."),
            ("mtbf_below_s", "A device whose MTBF over health_window_s is below this."),
            ("recovery_above_s", "A device whose worst or ongoing recovery is above this."),
            ("health_window_s", "The window of the health figures (default 86400)."),
            ("vm_lost", "true: a VM down for not_back_s (default 10)."),
            ("heal_failed", "true: a rung of the healing ladder failed."),
            ("clear_after_s", "Seconds without the condition before the all-clear (60)."),
            ("webhook", "An http(s) URL: a JSON POST per firing and all-clear."),
            ("command", "argv run per firing and all-clear, the event in VMPLUG_ALERT_*."),
            ("timeout_s", "Timeout of one webhook POST or command (default 5)."),
            ("retries", "Webhook retries on errors and 5xx (default 3)."),
        ),
    ),
    (
        "[daemon]",
        "Where vmplug run keeps its API socket and history.",
        (
            ("socket", "The daemon's unix API socket (default /run/vmplug/vmplug.sock)."),
            ("database", "The SQLite history database (default /var/lib/vmplug/vmplug.db)."),
            (
                "guest_check_interval",
                "Seconds between asks of each VM's guest agent whether the devices vmplug"
                " passed in have a driver (Linux) or a problem code (Windows); a problem"
                " is journaled as guest-problem and starts the healing ladder"
                " (default 0: off).",
            ),
        ),
    ),
    (
        "[api]",
        "The HTTP API beyond the unix socket; off unless listen is set.",
        (
            (
                "listen",
                '"127.0.0.1:PORT" or "[::1]:PORT": loopback TCP with a bearer token '
                "(never any other address; put a TLS proxy in front).",
            ),
            ("token_file", "An absolute path to the bearer token (created, mode 0600)."),
            ("group", "A group allowed on the unix socket (mode 0660) besides root."),
            ("max_connections", "At most this many connections at once (at least 1)."),
            ("max_connections_per_client", "At most this many from one client (at least 1)."),
            ("max_streams", "At most this many event streams at once (0: none)."),
            ("max_streams_per_client", "At most this many event streams from one client."),
            ("header_timeout", "Seconds a client has to send a request's headers."),
            ("idle_timeout", "Seconds an idle connection is kept open."),
        ),
    ),
    (
        "[export]",
        "On a device host: export USB devices to VM hosts over usbredir and mutual TLS.",
        (
            ("name", "This host's certificate name (CERTS/NAME-cert.pem, NAME-key.pem)."),
            ("certs", "The folder with ca-cert.pem and this host's certificate and key."),
            ("listen", 'The address to listen on ("0.0.0.0").'),
            ("allow", "The VM hosts (certificate names) that may connect."),
            ("insecure", "true: no TLS (lab networks only)."),
            ("device", "Pinned devices: [export.device.NAME] tables."),
            ("rule", "Which devices may leave this host: [[export.rule]] tables."),
            ("ports", 'The TCP ports of the endpoints rules make ("7100-7199").'),
        ),
    ),
    (
        "[[export.rule]]",
        "Devices a rule matches may leave this host (each gets an endpoint); first match wins.",
        (
            ("match", "A rule in the rule language (as in [[rule]])."),
            ("block", "true: the devices it matches stay on this host."),
            ("comment", "Free text."),
        ),
    ),
    (
        "[export.device.NAME]",
        "One exported device: the socket it sits in and its TLS port.",
        (
            ("port_path", 'Its port path on this host ("2-1").'),
            ("port", "Its TCP port (TLS)."),
            ("vendor", 'Only this vendor id from that socket ("0627"; optional).'),
            ("product", 'Only this product id ("0001"; optional).'),
        ),
    ),
    (
        "[host.NAME]",
        "On a VM host: a device host whose exported devices VMs here may use.",
        (
            ("address", "Its address; a name in its certificate."),
            ("certs", "The folder with ca-cert.pem and this host's certificate and key."),
            ("me", "This host's certificate name."),
            ("insecure", "true: no TLS (lab networks only)."),
            ("reconnect", "Seconds between QEMU's reconnects."),
            ("api_port", "Its API port (mutual TLS; default 7200): its export list."),
            ("devices", "Pinned devices: { NAME = TCPPORT, ... } (optional)."),
        ),
    ),
)

_EXAMPLE = """\
[vm.windows]
qmp = "/srv/windows/qmp/qmp.sock"

[vm.pve]
proxmox = 101

[[rule]]
attach = "windows"
match  = 'id 1235:821a'

[[rule]]
block = true
match = 'with-interface 03:01:01'
"""


def render_vmplug_toml5() -> str:
    """``vmplug.toml(5)``: every table and key of the config file."""
    out = [
        f'.TH VMPLUG.TOML 5 "{_DATE}" "vmplug {__version__}" "File Formats"',
        ".SH NAME",
        "vmplug.toml \\- vmplug's configuration: VMs and the rules that route USB devices",
        ".SH SYNOPSIS",
        "/etc/vmplug/vmplug.toml (or \\fB\\-\\-config\\fR FILE, or $VMPLUG_CONFIG)",
        ".SH DESCRIPTION",
        ".PP",
        "A TOML file. Unknown keys and tables are errors naming the file, line and "
        "column; loading never changes anything, and a running daemon keeps its config "
        "when a new one fails to load (\\fBvmplug check\\-config\\fR validates one).",
    ]
    for header, intro, keys in CONFIG_SECTIONS:
        out.append(f".SH {_quote(header)}")
        out.append(".PP\n" + roff_text(intro))
        for key, text in keys:
            out.append(f".TP\n.B {key}\n{roff_text(text)}")
    out += [
        ".SH EXAMPLE",
        ".PP\n.nf",
        roff_text(_EXAMPLE.rstrip("\n")),
        ".fi",
        ".SH SEE ALSO",
        "\\fBvmplug\\fR(1), \\fBusbguard\\-rules.conf\\fR(5)",
    ]
    return "\n".join(out) + "\n"


PAGES = {"1": ("man1", "vmplug.1"), "5": ("man5", "vmplug.toml.5")}


def render(section: str) -> str:
    return render_vmplug1() if section == "1" else render_vmplug_toml5()


@click.command("man", hidden=True)
@click.option(
    "--section",
    type=click.Choice(sorted(PAGES)),
    default="1",
    show_default=True,
    help="1: vmplug(1); 5: vmplug.toml(5).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Write DIR/man1/vmplug.1 and DIR/man5/vmplug.toml.5 instead of printing.",
)
def man_cmd(section: str, output: Path | None) -> None:
    """Print the man page vmplug(1) or vmplug.toml(5), or write both under DIR."""
    if output is None:
        click.echo(render(section), nl=False)
        return
    for sec, (folder, name) in PAGES.items():
        path = output / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(sec), encoding="utf-8")
        click.echo(str(path), err=True)


__all__ = [
    "CONFIG_SECTIONS",
    "man_cmd",
    "render",
    "render_vmplug1",
    "render_vmplug_toml5",
    "roff_text",
]
