"""The healer's kernel-log triggers over the doctor's kernel-log fixtures (the
errors in the kernel's own format strings; a real guest's replug log has none)."""

from __future__ import annotations

from pathlib import Path

from vmplug.daemon.heal import parse_kernel_line
from vmplug.host.usbctl import port_of

KERNEL = Path(__file__).parents[1] / "fixtures" / "doctor" / "kernel"


def test_each_error_is_found_on_its_port() -> None:
    hits = [parse_kernel_line(ln) for ln in (KERNEL / "hub-errors.log").read_text().splitlines()]
    found = [(h[0], h[1]) for h in hits if h is not None]
    assert found == [
        ("3-2", "descriptor-read"),
        ("3-2", "descriptor-read"),
        ("3-2", "not-accepting-address"),
        ("3-2", "cannot-enumerate"),  # usb3-port2: the root hub's port 2
        ("1-4", "over-current"),
    ]


def test_a_normal_replug_log_triggers_nothing() -> None:
    lines = (KERNEL / "lab-replug.log").read_text().splitlines()
    assert lines and all(parse_kernel_line(ln) is None for ln in lines)


def test_kmsg_records_are_read_like_dmesg_lines() -> None:
    line = (KERNEL / "hub-errors.log").read_text().splitlines()[1].split("] ", 1)[1]
    hit = parse_kernel_line(f"3,812,817233114,-;{line}")
    assert hit is not None and hit[0] == "3-2" and hit[2] == line


def test_port_paths_name_their_hub_port() -> None:
    assert (port_of("2-2.4.2").hub, port_of("2-2.4.2").number) == ("2-2.4", 2)
    assert (port_of("3-1").hub, port_of("3-1").number) == ("usb3", 1)
