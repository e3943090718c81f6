"""The framework: a failing check is a finding, exit status, JSON and the report."""

from __future__ import annotations

import json
from collections.abc import Iterator

from vmplug.doctor.context import DoctorContext
from vmplug.doctor.findings import CheckSpec, Finding, Severity, exit_status, run_checks
from vmplug.doctor.report import render, to_json


def _ok(ctx: DoctorContext) -> Iterator[Finding]:
    yield Finding("qemu", "t.ok", Severity.OK, "fine")


def _boom(ctx: DoctorContext) -> Iterator[Finding]:
    yield Finding("host", "t.first", Severity.INFO, "before the crash")
    raise KeyError("no such thing")


def _warn(ctx: DoctorContext) -> Iterator[Finding]:
    yield Finding("guest", "t.warn", Severity.WARNING, "hm", evidence=("a: 1",), fix="do x")


def test_a_crashing_check_becomes_a_finding_and_the_others_run() -> None:
    out = run_checks(
        DoctorContext(),
        [
            CheckSpec("qemu", "t.ok", _ok),
            CheckSpec("host", "t.boom", _boom),
            CheckSpec("guest", "t.warn", _warn),
        ],
    )
    # bottom-up: host first, whatever the order given
    assert [f.layer for f in out] == ["host", "host", "qemu", "guest"]
    failed = out[1]
    assert failed.check == "t.boom.failed" and failed.severity is Severity.ERROR
    assert "KeyError" in failed.title and "no such thing" in failed.title
    assert failed.evidence[0].startswith("raised at ") and "test_findings.py" in failed.evidence[0]
    assert exit_status(out) == 1  # found problems; 2 is bad input, the CLI's alone


def test_exit_status() -> None:
    ok = Finding("host", "a", Severity.OK, "x")
    info = Finding("host", "a", Severity.INFO, "x")
    warn = Finding("host", "a", Severity.WARNING, "x")
    err = Finding("host", "a", Severity.ERROR, "x")
    assert exit_status([]) == 0
    assert exit_status([ok, info]) == 0
    assert exit_status([ok, warn, info]) == 1
    assert exit_status([warn, err]) == 1
    assert exit_status([ok, warn], Severity.ERROR) == 0  # --fail-on error
    assert exit_status([warn, err], Severity.ERROR) == 1


def test_json_document_is_stable() -> None:
    out = run_checks(
        DoctorContext(), [CheckSpec("guest", "t.warn", _warn), CheckSpec("qemu", "t.ok", _ok)]
    )
    doc = to_json(out)
    assert doc == json.loads(json.dumps(doc))
    assert doc["version"] == 1 and doc["status"] == "warning" and doc["exit_status"] == 1
    assert doc["counts"] == {"ok": 1, "info": 0, "warning": 1, "error": 0}
    assert doc["findings"][1] == {
        "layer": "guest",
        "check": "t.warn",
        "severity": "warning",
        "title": "hm",
        "subject": None,
        "evidence": ["a: 1"],
        "fix": "do x",
    }


def test_report_groups_by_layer_with_marks_evidence_and_fix() -> None:
    out = run_checks(
        DoctorContext(), [CheckSpec("guest", "t.warn", _warn), CheckSpec("qemu", "t.ok", _ok)]
    )
    text = render(out)
    assert text.index("qemu") < text.index("guest")
    assert "✓[/green] fine" in text and "[yellow]![/yellow] hm" in text
    assert "seen: a: 1" in text and "fix:[/bold] do x" in text
    assert "1 warnings" in text


def test_a_long_note_fix_is_shown_once() -> None:
    notes = [
        Finding(
            "guest",
            "guest.agent",
            Severity.INFO,
            f"VM {n}: no channel",
            fix="line1\nline2",
            subject=n,
        )
        for n in ("a", "b")
    ]
    text = render(notes)
    assert text.count("line2") == 1 and "fix:[/bold] as for a above" in text
