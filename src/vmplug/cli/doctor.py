"""``vmplug doctor``: find where a USB pass-through breaks, layer by layer."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vmplug.cli.app import EPILOG_ENV, Context, emit_json, pass_ctx
from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Severity, exit_status, run_checks
from vmplug.doctor.report import render, to_json
from vmplug.errors import UsageError


def all_checks() -> list[CheckSpec]:
    from vmplug.doctor import container, guest, host, network, proxmox, qemu  # noqa: PLC0415

    return [
        *host.CHECKS,
        *network.CHECKS,
        *container.CHECKS,
        *qemu.CHECKS,
        *proxmox.CHECKS,
        *guest.CHECKS,
    ]


EPILOG = EPILOG_ENV.replace(
    "Exit status: 0 success, 1 failure or nothing found, 2 bad input.",
    "Exit status: 0 nothing wrong, 1 found problems (a warning or an error; with\n"
    "--fail-on error: an error), 2 bad input (a bad DEVICE, option or config, an\n"
    "unreadable or invalid --compose, --inspect or --kernel-log file): no check ran.",
)


def _check_inputs(
    device: str | None,
    compose_files: tuple[Path, ...],
    inspect_files: tuple[Path, ...],
    kernel_log: Path | None,
) -> str | None:
    """Refuse bad input before any check runs (exit status 2, not a finding);
    returns the kernel log's text when --kernel-log names one."""
    from vmplug.doctor.container_info import (  # noqa: PLC0415
        load_compose_file,
        load_inspect_file,
    )

    if device is not None and not device.strip():
        raise UsageError("DEVICE is empty: give a port path, vid:pid, a serial or rule:RULE")
    if device and device.strip().startswith("rule:"):
        from vmplug.rules import parse_rule  # noqa: PLC0415

        parse_rule(device.strip()[len("rule:") :])  # a bad rule is bad input: exit 2 now
    for what, paths, loader in (
        ("--compose", compose_files, load_compose_file),
        ("--inspect", inspect_files, load_inspect_file),
    ):
        for path in paths:
            try:
                loader(path)
            except UsageError:
                raise
            except OSError as exc:
                raise UsageError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
            except Exception as exc:  # YAML and JSON parsers raise many kinds
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise UsageError(
                    f"{what} {path}: not a valid {what[2:]} file: {type(exc).__name__}: {first}"
                ) from None
    if kernel_log is None:
        return None
    try:
        return kernel_log.read_text(errors="replace")
    except OSError as exc:
        raise UsageError(f"--kernel-log {kernel_log}: cannot read: {exc.strerror}") from None


@click.command("doctor", epilog=EPILOG)
@click.argument("device", required=False, metavar="[DEVICE]")
@click.option("--vm", help="Only this VM (a config [vm.NAME] or a QEMU -name).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document for scripts.")
@click.option("-v", "--verbose", is_flag=True, help="Show the evidence of passed checks too.")
@click.option(
    "--compose",
    "compose_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    metavar="FILE",
    help="Check this compose file (dockurr/windows) too.",
)
@click.option(
    "--inspect",
    "inspect_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    metavar="FILE",
    help="Check containers from `docker inspect` output saved in FILE.",
)
@click.option(
    "--docker-socket",
    "api_sockets",
    multiple=True,
    metavar="SOCKET",
    help="Docker/Podman API socket (default: $DOCKER_HOST, /var/run/docker.sock, podman's).",
)
@click.option(
    "--qmp", "qmp_sockets", multiple=True, metavar="SOCKET", help="A QMP socket to check."
)
@click.option("--qga", "qga_socket", metavar="SOCKET", help="The guest agent's socket.")
@click.option(
    "--kernel-log",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    metavar="FILE",
    help="Read the kernel log from FILE (dmesg or journalctl -k output) instead of /dev/kmsg.",
)
@click.option(
    "--db",
    "store_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="vmplug's history database (default: the config's [daemon] database).",
)
@click.option(
    "--proc-root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("/proc"),
    show_default=True,
    help="Find processes here (e.g. the host's /proc mounted into a container).",
)
@click.option(
    "--dev-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/dev"),
    show_default=True,
    help="Device nodes (/dev/bus/usb, udev symlinks) under this directory.",
)
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for a socket.")
@click.option(
    "--fail-on",
    type=click.Choice(["warning", "error"]),
    default="warning",
    show_default=True,
    help="Exit 1 on a finding this severe or worse (error: warnings exit 0).",
)
@pass_ctx
def doctor(
    obj: Context,
    device: str | None,
    vm: str | None,
    as_json: bool,
    verbose: bool,
    compose_files: tuple[Path, ...],
    inspect_files: tuple[Path, ...],
    api_sockets: tuple[str, ...],
    qmp_sockets: tuple[str, ...],
    qga_socket: str | None,
    kernel_log: Path | None,
    store_path: Path | None,
    proc_root: Path,
    dev_root: Path,
    timeout: float,
    fail_on: str,
) -> None:
    """Find where a USB pass-through breaks: host, container, QEMU, guest.

    Runs the checks bottom-up and reports each finding with its layer,
    severity, the evidence it saw (the exact file, value or command output)
    and a fix (a command or a config snippet).  DEVICE (a port path like
    2-1.4, vid:pid, a serial, or rule:RULE) narrows the device checks to
    it; without it, the devices a config rule or a running QEMU's usb-host
    takes are checked.

    \b
    Host: device present (and since when, from vmplug's history), not
      authorized (authorized = 0: usbguard or someone blocked it), USB
      errors in the kernel log, autosuspend on audio/MIDI devices, host
      drivers and programs holding the device, its /dev/bus/usb node,
      isochronous bandwidth per bus, controller sharing, stale udev symlinks.
    Container: /dev/bus/usb as devices: instead of a bind mount, the
      c 189:* rwm cgroup rule, SELinux, USB=N, vmplug's QMP socket,
      usb-host by address in ARGUMENTS (Docker/Podman API, --compose, --inspect).
    QEMU: processes (/proc, QMP sockets), USB controller kind, usb-host by
      address, shared vendorid:productid, attached or waiting over QMP.
    Guest (QEMU guest agent): Windows problem codes (Get-PnpDevice) and USB
      selective suspend; a Linux guest's USB devices and drivers.

    --json prints one object: {"version": 1, "status": "ok"|"warning"|"error",
    "exit_status", "counts": {"ok", "info", "warning", "error"}, "findings":
    [{"layer", "check", "severity", "title", "subject", "evidence": [...],
    "fix"}]}, findings in layer order (host, network, container, qemu, guest).  A
    check that itself fails is reported as the finding CHECK.failed.

    \b
    Examples:
      vmplug doctor                         # everything this host runs
      vmplug doctor 1235:821a --vm windows  # one device, one VM
      vmplug doctor --compose docker-compose.yml
      vmplug doctor --qmp /run/vm.qmp --qga /run/vm-qga.sock --json
    """
    from vmplug.config import config_path, load_config  # noqa: PLC0415

    kernel_text = _check_inputs(device, compose_files, inspect_files, kernel_log)
    config = None
    path = config_path(obj.config)
    if obj.config or path.exists():
        config = load_config(obj.config)
    ctx = DoctorContext(
        sysfs_root=obj.sysfs_root,
        dev_root=dev_root,
        proc_root=proc_root,
        kernel_log_source=(lambda: kernel_text) if kernel_text is not None else None,
        config=config,
        store_path=store_path,
        device=device,
        vm=vm,
        qmp_sockets=list(qmp_sockets),
        compose_files=list(compose_files),
        inspect_files=list(inspect_files),
        api_sockets=list(api_sockets) or None,
        qga_socket=qga_socket,
        timeout=timeout,
        debug=obj.debug,
    )
    try:
        findings = run_checks(ctx, all_checks())
    finally:
        ctx.close()
    threshold = Severity.ERROR if fail_on == "error" else Severity.WARNING
    if as_json:
        emit_json(to_json(findings, threshold))
    else:
        from rich.console import Console  # noqa: PLC0415

        console = Console(highlight=False, soft_wrap=not sys.stdout.isatty())
        console.print(render(findings, verbose=verbose))
    raise SystemExit(exit_status(findings, threshold))
