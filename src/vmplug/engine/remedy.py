"""The settings of self-healing and alerting: ``[heal]`` and ``[[alert]]``.

Pure data and its validation, read by :mod:`vmplug.config`; the ladder that
uses :class:`HealPolicy` is :mod:`vmplug.daemon.heal`, the alerts that use
:class:`AlertConfig` are :mod:`vmplug.daemon.alerts` (their docstrings say
what each key means).  The parsers raise ``ValueError`` with the message the
config loader shows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Rung(StrEnum):
    REATTACH = "reattach"
    RESET = "reset"
    PORT_CYCLE = "port-cycle"
    REAUTHORIZE = "reauthorize"
    #: the host controller unbound from its driver and bound again: only after
    #: the ladder, and only for a controller ``[heal] controllers`` names
    CONTROLLER = "controller"


LADDER: tuple[Rung, ...] = (Rung.REATTACH, Rung.RESET, Rung.PORT_CYCLE, Rung.REAUTHORIZE)
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclass(frozen=True, slots=True)
class HealPolicy:
    """``[heal]`` in the config."""

    enabled: bool = True
    dry_run: bool = False
    attach_refusals: int = 3
    drops: int = 3
    drops_window_s: float = 600.0
    settle_s: float = 10.0
    interval_s: float = 5.0
    max_interval_s: float = 600.0
    max_per_hour: int = 12
    #: rungs allowed, in order (a site may leave out port-cycle, say)
    rungs: tuple[Rung, ...] = LADDER
    #: PCI addresses ("0000:00:14.0") of host controllers the ladder may unbind
    #: and bind again after its last rung; none by default
    controllers: tuple[str, ...] = ()


_POLICY_KEYS: dict[str, type | tuple[type, ...]] = {
    "enabled": bool,
    "dry_run": bool,
    "attach_refusals": int,
    "drops": int,
    "drops_window_s": (int, float),
    "settle_s": (int, float),
    "interval_s": (int, float),
    "max_interval_s": (int, float),
    "max_per_hour": int,
    "rungs": list,
    "controllers": list,
}


def parse_policy(table: Mapping[str, Any]) -> HealPolicy:
    """``[heal]`` to a :class:`HealPolicy`; a ``ValueError`` says what is wrong."""
    kw: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _POLICY_KEYS:
            known = ", ".join(sorted(_POLICY_KEYS))
            raise ValueError(f"unknown key {key!r} in [heal] (expected one of: {known})")
        want = _POLICY_KEYS[key]
        if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
            raise ValueError(f"[heal] {key} has the wrong type ({type(value).__name__})")
        if key == "controllers" and isinstance(value, list):
            bad = [v for v in value if not isinstance(v, str) or not _PCI_ADDRESS.match(v)]
            if bad:
                raise ValueError(
                    f'[heal] controllers: PCI addresses like "0000:00:14.0" '
                    f"(lspci -D), not {bad[0]!r}"
                )
            kw[key] = tuple(value)
        elif isinstance(value, list):
            try:
                kw[key] = tuple(Rung(v) for v in value)
                if Rung.CONTROLLER in kw[key]:
                    raise ValueError("controller")
            except ValueError:
                names = ", ".join(r.value for r in LADDER)
                raise ValueError(f"[heal] rungs: each one of {names}") from None
        elif isinstance(value, bool):
            kw[key] = value
        elif isinstance(value, (int, float)):
            if value <= 0:
                raise ValueError(f"[heal] {key} must be > 0")
            kw[key] = float(value) if key.endswith("_s") else value
    return HealPolicy(**kw)


@dataclass(frozen=True, slots=True)
class AlertConfig:
    name: str
    not_back_s: float | None = None
    drops: int | None = None
    drops_window_s: float = 600.0
    mtbf_below_s: float | None = None
    recovery_above_s: float | None = None
    health_window_s: float = 86400.0
    vm_lost: bool = False
    heal_failed: bool = False
    clear_after_s: float = 60.0
    webhook: str | None = None
    command: tuple[str, ...] = ()
    timeout_s: float = 5.0
    retries: int = 3


_NUM = (int, float)
_KEYS: dict[str, Any] = {
    "name": str,
    "not_back_s": _NUM,
    "drops": int,
    "drops_window_s": _NUM,
    "mtbf_below_s": _NUM,
    "recovery_above_s": _NUM,
    "health_window_s": _NUM,
    "vm_lost": bool,
    "heal_failed": bool,
    "clear_after_s": _NUM,
    "webhook": str,
    "command": list,
    "timeout_s": _NUM,
    "retries": int,
}


def parse_alerts(tables: Sequence[Any]) -> tuple[AlertConfig, ...]:
    """``[[alert]]`` tables to :class:`AlertConfig`; ``ValueError`` says what is wrong."""
    out: list[AlertConfig] = []
    for i, table in enumerate(tables):
        what = f"alert #{i + 1}"
        if not isinstance(table, dict):
            raise ValueError(f"{what} must be a table")
        kw: dict[str, Any] = {"name": f"alert-{i + 1}"}
        for key, value in table.items():
            if key not in _KEYS:
                known = ", ".join(sorted(_KEYS))
                raise ValueError(f"unknown key {key!r} in {what} (expected one of: {known})")
            want = _KEYS[key]
            if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
                raise ValueError(f"{what}: {key} has the wrong type ({type(value).__name__})")
            if key == "command":
                if not value or not all(isinstance(a, str) for a in value):
                    raise ValueError(f'{what}: command must be a list of strings: ["prog", "arg"]')
                kw[key] = tuple(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if value <= 0 and key != "retries":
                    raise ValueError(f"{what}: {key} must be > 0")
                kw[key] = float(value) if key.endswith("_s") else value
            else:
                kw[key] = value
        url = kw.get("webhook")
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise ValueError(f"{what}: webhook must be an http:// or https:// URL")
        a = AlertConfig(**kw)
        if not any(
            (a.not_back_s, a.drops, a.mtbf_below_s, a.recovery_above_s, a.vm_lost, a.heal_failed)
        ):
            raise ValueError(
                f"{what}: no condition (not_back_s, drops, mtbf_below_s, recovery_above_s, "
                "vm_lost, heal_failed)"
            )
        out.append(a)
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError("two [[alert]] sections have the same name")
    return tuple(out)
