"""Render findings: a readable report grouped by layer, or JSON for scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmplug.doctor.findings import LAYERS, Finding, Severity, exit_status, worst
from vmplug.textsafe import printable

#: How much of a finding's title or of one line of its evidence is shown: they
#: quote what devices, VMs and processes say about themselves.
LINE_LIMIT = 400

MARKS = {
    Severity.OK: ("✓", "green"),
    Severity.INFO: ("i", "cyan"),
    Severity.WARNING: ("!", "yellow"),
    Severity.ERROR: ("✗", "red"),
}
SCHEMA_VERSION = 1


def status_label(findings: Sequence[Finding]) -> str:
    """``ok`` (notes at most), ``warning`` or ``error``: the worst finding."""
    level = worst(findings)
    return "error" if level >= Severity.ERROR else "warning" if level >= Severity.WARNING else "ok"


def to_json(findings: Sequence[Finding], fail_on: Severity = Severity.WARNING) -> dict[str, Any]:
    """The ``--json`` document; its keys and values are stable for scripts."""
    counts = {s.label: 0 for s in Severity}
    for f in findings:
        counts[f.severity.label] += 1
    return {
        "version": SCHEMA_VERSION,
        "status": status_label(findings),
        "exit_status": exit_status(findings, fail_on),
        "counts": counts,
        "findings": [f.to_json() for f in findings],
    }


def render(findings: Sequence[Finding], verbose: bool = False) -> str:
    """Rich markup text: per layer, each finding with its evidence and fix.

    ``ok`` findings show as one line each (evidence only with ``verbose``).
    Every line of text from a finding goes through
    :func:`~vmplug.textsafe.printable` (a device's name can hold escape
    sequences and newlines) before Rich's markup escaping; a fix, which is
    meant to be copied, is never cut.
    """
    from rich.markup import escape as rich_escape  # noqa: PLC0415

    def escape(text: str, limit: int | None = LINE_LIMIT) -> str:
        return rich_escape(printable(text, limit, backslash=False))

    lines: list[str] = []
    #: a note's long fix is shown once per check (many VMs without an agent channel)
    shown: dict[str, str] = {}
    for layer in LAYERS:
        mine = [f for f in findings if f.layer == layer]
        if not mine:
            continue
        lines.append(f"[bold]{layer}[/bold]")
        for f in mine:
            mark, style = MARKS[f.severity]
            lines.append(f"  [{style}]{mark}[/{style}] {escape(f.title)}")
            if f.severity >= Severity.INFO or verbose:
                for ev in f.evidence:
                    for i, part in enumerate(ev.splitlines() or [""]):
                        lead = "seen: " if i == 0 else "      "
                        lines.append(f"      [dim]{lead}{escape(part)}[/dim]")
            if f.fix and f.severity == Severity.INFO and f.check in shown:
                lines.append(f"      [bold]fix:[/bold] as for {escape(shown[f.check])} above")
            elif f.fix and f.severity >= Severity.INFO:
                if f.severity == Severity.INFO:
                    shown[f.check] = f.subject or f.title
                fix_lines = f.fix.splitlines()
                lines.append(f"      [bold]fix:[/bold] {escape(fix_lines[0], None)}")
                lines.extend(f"           {escape(x, None)}" for x in fix_lines[1:])
        lines.append("")
    counts = to_json(findings)["counts"]
    status = status_label(findings)
    summary = (
        f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes, "
        f"{counts['ok']} checks passed"
    )
    if status == "ok":
        lines.append(f"[green]nothing to fix[/green] ({summary})")
    else:
        style = "red" if status == "error" else "yellow"
        lines.append(f"[{style}]{summary}[/{style}]")
    return "\n".join(lines)
