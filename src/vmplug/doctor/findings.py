"""The doctor's vocabulary: findings, severities, layers and the check runner.

A *check* is a small function over a :class:`~vmplug.doctor.context.DoctorContext`
that yields :class:`Finding` objects.  Checks are independent: one that raises
becomes a finding of its own (``<check>.failed``, severity error) and the
others still run.  A check that has nothing to complain about yields an
``ok`` finding, so the report shows what was looked at, not only what broke.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmplug.doctor.context import DoctorContext

#: The layers, bottom-up: the order checks run in and the report is grouped by.
LAYERS = ("host", "network", "container", "qemu", "guest")


class Severity(IntEnum):
    OK = 0
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the doctor saw: where, how bad, the proof, and what to do."""

    layer: str
    check: str
    severity: Severity
    title: str
    #: the exact file and value, or command and output, the finding rests on
    evidence: tuple[str, ...] = ()
    #: a command or config snippet that fixes it (None: nothing to do)
    fix: str | None = None
    #: what it is about: a port path, a VM, a container, a QEMU id
    subject: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "check": self.check,
            "severity": self.severity.label,
            "title": self.title,
            "subject": self.subject,
            "evidence": list(self.evidence),
            "fix": self.fix,
        }


Check = Callable[["DoctorContext"], Iterable[Finding]]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    layer: str
    id: str
    run: Check
    doc: str = field(default="")


def run_checks(ctx: DoctorContext, checks: Sequence[CheckSpec]) -> list[Finding]:
    """Run every check in layer order; a check's exception is a finding, not a crash."""
    out: list[Finding] = []
    order = {layer: i for i, layer in enumerate(LAYERS)}
    for spec in sorted(checks, key=lambda c: order.get(c.layer, len(LAYERS))):
        try:
            out.extend(spec.run(ctx))
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
            out.append(
                Finding(
                    layer=spec.layer,
                    check=f"{spec.id}.failed",
                    severity=Severity.ERROR,
                    title=f"check {spec.id} could not run: {type(exc).__name__}: {exc}",
                    evidence=(f"raised at {where}",),
                    fix="run with --debug for the traceback, and report it if it is a bug",
                )
            )
            if ctx.debug:
                traceback.print_exc()
    return out


def worst(findings: Iterable[Finding]) -> Severity:
    """The most severe finding's severity (OK when there is none)."""
    return max((f.severity for f in findings), default=Severity.OK)


#: Exit statuses of ``vmplug doctor``: 2 (bad input: a bad selector, an
#: unreadable or invalid file) is the command line's, before any check runs.
NOTHING_WRONG = 0
FOUND_PROBLEMS = 1


def exit_status(findings: Iterable[Finding], fail_on: Severity = Severity.WARNING) -> int:
    """0: nothing wrong; 1: a finding at ``fail_on`` or worse (by default a
    warning or an error).  Never 2: that is bad input, which the CLI refuses."""
    return FOUND_PROBLEMS if worst(findings) >= fail_on else NOTHING_WRONG
