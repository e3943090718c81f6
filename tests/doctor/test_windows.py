"""Windows guest output: Get-PnpDevice JSON and powercfg, shaped as Microsoft documents them."""

from __future__ import annotations

from vmplug.doctor.findings import Severity
from vmplug.doctor.guest import selective_suspend_findings, windows_findings
from vmplug.doctor.windows import PROBLEM_CODES, parse_pnp_json, parse_selective_suspend, usb_ids

from .conftest import DOCTOR

WIN = DOCTOR / "windows"


def test_problem_code_table_is_microsofts() -> None:
    documented = {1, 3, 9, 10, 12, 14, 16, 18, 19, 21, 22, 24, 28, 29, *range(31, 55), 55, 56, 57}
    assert set(PROBLEM_CODES) == documented
    assert PROBLEM_CODES[10] == ("CM_PROB_FAILED_START", "This device cannot start.")
    assert PROBLEM_CODES[28][0] == "CM_PROB_FAILED_INSTALL"
    assert PROBLEM_CODES[43][0] == "CM_PROB_FAILED_POST_START"
    assert PROBLEM_CODES[45][0] == "CM_PROB_PHANTOM"


def test_devices_with_problem_codes() -> None:
    devs = parse_pnp_json((WIN / "pnp-problems.json").read_text())
    assert len(devs) == 6
    found = list(windows_findings(devs, "win"))
    assert [(f.severity, f.subject) for f in found] == [
        (Severity.ERROR, "USB\\VID_1235&PID_821A\\00000000"),
        (Severity.ERROR, "USB\\VID_1C75&PID_02CB&MI_00\\7&2A1F5B3C&0&0000"),
        (Severity.ERROR, "USB\\VID_0000&PID_0002\\5&1B2C3D4E&0&3"),
        (Severity.WARNING, "USB\\VID_1235&PID_8210\\00000000"),
    ]
    scarlett = found[0]
    assert scarlett.title == (
        "VM win: Scarlett 4i4 USB (1235:821a): Code 10 CM_PROB_FAILED_START: "
        "This device cannot start."
    )
    assert "ConfigManagerErrorCode=10" in scarlett.evidence[0]
    assert (
        "Code 28 CM_PROB_FAILED_INSTALL: The drivers for this device are not installed."
        in found[1].title
    )
    assert found[1].fix and "driver" in found[1].fix
    assert "Code 43" in found[2].title and "Present=False" not in found[2].evidence[0]
    assert "Code 45 CM_PROB_PHANTOM" in found[3].title and "Present=False" in found[3].evidence[0]


def test_single_object_and_no_problem() -> None:
    devs = parse_pnp_json("\ufeff" + (WIN / "pnp-one-ok.json").read_text())
    assert len(devs) == 1 and devs[0].problem == 0 and usb_ids(devs[0].instance_id) == "1235:821a"
    (f,) = windows_findings(devs, "win")
    assert f.severity is Severity.OK and "1 USB/audio/HID devices" in f.title
    assert parse_pnp_json("") == []


def test_problem_as_enum_name() -> None:
    (d,) = parse_pnp_json(
        '{"InstanceId": "USB\\\\X", "FriendlyName": "x", "Problem": "CM_PROB_FAILED_POST_START"}'
    )
    assert d.problem == 43


def test_selective_suspend() -> None:
    on = (WIN / "powercfg-suspend-on.txt").read_text()
    assert parse_selective_suspend(on) == (1, 1)
    (f,) = selective_suspend_findings(on, "win")
    assert f.severity is Severity.WARNING and f.fix and "/SETACVALUEINDEX" in f.fix
    (f,) = selective_suspend_findings((WIN / "powercfg-suspend-off.txt").read_text(), "win")
    assert f.severity is Severity.OK
    (f,) = selective_suspend_findings("", "win", "Access denied")
    assert f.severity is Severity.INFO and f.evidence == ("Access denied",)
