"""Alerts: ``[[alert]]`` sections, their conditions over the journal, and where they go.

Pure part: :func:`active` says, from journal entries up to ``now``, which
subjects (a device identity, or ``vm:NAME``) meet one alert's conditions now,
and :class:`Deduper` turns that set over time into *fire* and *all-clear*
transitions: a subject fires once when it starts meeting a condition and
clears once after it has met none for ``clear_after_s`` -- a device that
flaps for an hour gives one alert and one all-clear, not a hundred.

Conditions (keys of an ``[[alert]]``; each one on its own, all optional):

* ``not_back_s = N`` -- a device that left its VM (unplugged, lost, a
  refused attach) is not attached again within N s;
* ``drops = K`` with ``drops_window_s = M`` -- K removals or losses in M s;
* ``mtbf_below_s`` / ``recovery_above_s`` -- the health figures
  (:mod:`vmplug.history.health`) over ``health_window_s``;
* ``vm_lost = true`` -- a VM went down (QEMU gone, shutdown) and is not up
  again within ``not_back_s`` (10 s when unset);
* ``heal_failed = true`` -- a rung of the healing ladder failed.

Sinks: ``webhook = "http://..."`` (JSON POST, ``timeout_s``, ``retries``
with backoff; the body is :meth:`Transition.to_json`), ``command = [argv]``
(run with the event in ``VMPLUG_ALERT_*`` variables, no shell), and the
journal (always: ``alert`` / ``alert-clear`` events, logged at WARNING and
INFO).  The webhook body::

    {"alert": NAME, "state": "firing"|"resolved", "subject": ID, "condition":
     "drops", "reason": "dropped 4 times in 60 s", "ts": UNIX, "since": UNIX}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmplug.engine.remedy import AlertConfig, parse_alerts
from vmplug.history.store import ActionKind, EventKind, HistoryEntry, Result

if TYPE_CHECKING:
    from vmplug.daemon.reconciler import Daemon

log = logging.getLogger("vmplug")


@dataclass(frozen=True, slots=True)
class Problem:
    subject: str
    condition: str
    reason: str


def active(entries: Iterable[HistoryEntry], alert: AlertConfig, now: float) -> dict[str, Problem]:
    """The subjects meeting one of ``alert``'s conditions at ``now`` (first one wins)."""
    rows = [e for e in entries if e.ts <= now]
    out: dict[str, Problem] = {}
    down_since: dict[str, float] = {}
    drops: dict[str, deque[float]] = {}
    vm_down: dict[str, float] = {}
    heal_failed: dict[str, tuple[float, str]] = {}
    held_by: dict[str, str | None] = {}
    for e in rows:
        who = e.identity
        if e.is_action and who is not None and e.kind in (ActionKind.ATTACH, ActionKind.ADOPT):
            if e.result == Result.OK:
                down_since.pop(who, None)
                heal_failed.pop(who, None)
                held_by[who] = e.vm
            else:
                down_since.setdefault(who, e.ts)
        elif e.kind in (EventKind.DEVICE_REMOVE, EventKind.ATTACHMENT_LOST) and who is not None:
            down_since.setdefault(who, e.ts)
            drops.setdefault(who, deque()).append(e.ts)
        elif e.kind == EventKind.DEVICE_ROUTE and who is not None and e.vm is None:
            down_since.pop(who, None)  # no longer wanted anywhere
        elif e.kind == EventKind.VM_DOWN and e.vm is not None:
            vm_down.setdefault(e.vm, e.ts)
            for gone in [w for w, vm in held_by.items() if vm == e.vm]:
                del held_by[gone]  # its devices are out of it until attached again
                down_since.setdefault(gone, e.ts)
        elif e.kind == EventKind.VM_UP and e.vm is not None:
            vm_down.pop(e.vm, None)
        elif e.kind == EventKind.DAEMON_STOP:
            vm_down.clear()
            down_since.clear()
        elif e.kind == EventKind.HEAL_FAILED and who is not None:
            err = str((e.detail or {}).get("error", ""))
            rung = str((e.detail or {}).get("rung", "?"))
            heal_failed[who] = (e.ts, f"heal rung {rung} failed: {err}")
    if alert.heal_failed:
        for who, (_, reason) in heal_failed.items():
            out.setdefault(who, Problem(who, "heal-failed", reason))
    if alert.drops is not None:
        for who, times in drops.items():
            n = sum(1 for t in times if now - t <= alert.drops_window_s)
            if n >= alert.drops:
                reason = f"dropped {n} times in {alert.drops_window_s:g} s"
                out.setdefault(who, Problem(who, "drops", reason))
    if alert.not_back_s is not None:
        for who, t in down_since.items():
            if now - t >= alert.not_back_s:
                reason = f"not back in its VM for {now - t:.0f} s"
                out.setdefault(who, Problem(who, "not-back", reason))
    if alert.vm_lost:
        wait = alert.not_back_s or 10.0
        for vm, t in vm_down.items():
            if now - t >= wait:
                subject = f"vm:{vm}"
                out.setdefault(
                    subject, Problem(subject, "vm-lost", f"VM {vm} down for {now - t:.0f} s")
                )
    if alert.mtbf_below_s is not None or alert.recovery_above_s is not None:
        from vmplug.history.health import health_by_device  # noqa: PLC0415 (statistics: ~0.5 MiB)

        figures = health_by_device(rows, now - alert.health_window_s, now)
        for who, h in figures.items():
            if (
                alert.mtbf_below_s is not None
                and h.mtbf_s is not None
                and h.mtbf_s < alert.mtbf_below_s
            ):
                out.setdefault(who, Problem(who, "mtbf", f"MTBF {h.mtbf_s:.0f} s"))
            worst = max(
                (x for x in (h.worst_recovery_s, h.ongoing_recovery_s) if x is not None),
                default=None,
            )
            if (
                alert.recovery_above_s is not None
                and worst is not None
                and worst > alert.recovery_above_s
            ):
                out.setdefault(who, Problem(who, "recovery", f"recovery took {worst:.1f} s"))
    return out


@dataclass(frozen=True, slots=True)
class Transition:
    alert: str
    state: str  # "firing" | "resolved"
    subject: str
    condition: str
    reason: str
    ts: float
    since: float

    def to_json(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "state": self.state,
            "subject": self.subject,
            "condition": self.condition,
            "reason": self.reason,
            "ts": self.ts,
            "since": self.since,
        }


@dataclass
class Deduper:
    """One alert's firing subjects; :meth:`step` gives the transitions."""

    alert: AlertConfig
    #: subject -> (problem when it fired, fired at, last time the problem was seen)
    firing: dict[str, tuple[Problem, float, float]] = field(default_factory=dict)

    def step(self, problems: Mapping[str, Problem], now: float) -> list[Transition]:
        out: list[Transition] = []
        for subject, p in problems.items():
            if subject in self.firing:
                first, since, _ = self.firing[subject]
                self.firing[subject] = (first, since, now)
            else:
                self.firing[subject] = (p, now, now)
                out.append(
                    Transition(self.alert.name, "firing", subject, p.condition, p.reason, now, now)
                )
        for subject, (p, since, seen) in list(self.firing.items()):
            if subject not in problems and now - seen >= self.alert.clear_after_s:
                del self.firing[subject]
                reason = f"all clear: no {p.condition} for {now - seen:.0f} s"
                out.append(
                    Transition(
                        self.alert.name, "resolved", subject, p.condition, reason, now, since
                    )
                )
        return out


def replay(
    entries: Sequence[HistoryEntry], alert: AlertConfig, times: Iterable[float]
) -> list[Transition]:
    """The transitions a daemon checking at each of ``times`` would have sent."""
    dd = Deduper(alert)
    out: list[Transition] = []
    for t in times:
        out.extend(dd.step(active(entries, alert, t), t))
    return out


# ---------------------------------------------------------------- sinks


async def post_webhook(url: str, body: Mapping[str, Any], timeout_s: float, retries: int) -> bool:
    """POST ``body`` as JSON; retried (0.5, 1, 2 s...) on errors and 5xx. True when a 2xx came."""
    import aiohttp  # noqa: PLC0415 (the daemon's only HTTP client use)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    for attempt in range(retries + 1):
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=dict(body)) as resp,
            ):
                if 200 <= resp.status < 300:
                    return True
                if resp.status < 500:
                    log.warning("alert webhook %s answered %d; not retried", url, resp.status)
                    return False
                log.warning("alert webhook %s answered %d", url, resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning(
                "alert webhook %s: %s (attempt %d)", url, exc or type(exc).__name__, attempt + 1
            )
        if attempt < retries:
            await asyncio.sleep(0.5 * 2**attempt)
    return False


def command_env(t: Transition) -> dict[str, str]:
    return {
        "VMPLUG_ALERT": t.alert,
        "VMPLUG_ALERT_STATE": t.state,
        "VMPLUG_ALERT_SUBJECT": t.subject,
        "VMPLUG_ALERT_CONDITION": t.condition,
        "VMPLUG_ALERT_REASON": t.reason,
        "VMPLUG_ALERT_TS": f"{t.ts:.3f}",
        "VMPLUG_ALERT_JSON": json.dumps(t.to_json()),
    }


async def run_command(argv: Sequence[str], t: Transition, timeout_s: float) -> int | None:
    """Run ``argv`` with the transition in its environment; its exit status (None: killed)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **command_env(t)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        log.warning("alert command %s: %s", argv[0], exc.strerror)
        return None
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("alert command %s: killed after %.0f s", argv[0], timeout_s)
        return None


class Alerter:
    """Checks every alert each ``tick_s`` over the daemon's recent journal."""

    def __init__(self, daemon: Daemon, alerts: Sequence[AlertConfig], tick_s: float = 1.0) -> None:
        from vmplug.daemon.heal import _entry  # noqa: PLC0415 (one converter)

        self._entry = _entry
        self.daemon = daemon
        self.alerts = tuple(alerts)
        self.tick_s = tick_s
        self.recent: deque[HistoryEntry] = deque(maxlen=20000)
        self._n = 0
        self.dedup = {a.name: Deduper(a) for a in self.alerts}
        self.sent: list[tuple[Transition, bool]] = []
        self._task: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        #: transitions waiting to be sent, in order (a resolve never overtakes its fire)
        self._queue: asyncio.Queue[tuple[AlertConfig, Transition]] = asyncio.Queue()

    def on_item(self, item: Mapping[str, Any]) -> None:
        if item.get("kind") in (EventKind.ALERT, EventKind.ALERT_CLEAR):
            return
        self._n += 1
        self.recent.append(self._entry(self._n, item))

    def start(self) -> None:
        self.daemon.listeners.append(self.on_item)
        self._task = asyncio.ensure_future(self._loop())
        self._sender = asyncio.ensure_future(self._send_loop())

    async def stop(self) -> None:
        if self.on_item in self.daemon.listeners:
            self.daemon.listeners.remove(self.on_item)
        for task in (self._task, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick(time.time())
            except Exception:
                log.exception("alerts: check failed")

    def tick(self, now: float) -> list[Transition]:
        out: list[Transition] = []
        for a in self.alerts:
            for t in self.dedup[a.name].step(active(self.recent, a, now), now):
                out.append(t)
                self._emit(a, t)
        return out

    def _emit(self, a: AlertConfig, t: Transition) -> None:
        kind = EventKind.ALERT if t.state == "firing" else EventKind.ALERT_CLEAR
        identity = None if t.subject.startswith("vm:") else t.subject
        vm = t.subject[3:] if t.subject.startswith("vm:") else None
        self.daemon.journal.event(kind, identity=identity, vm=vm, detail=t.to_json())
        if t.state == "firing":
            log.warning("ALERT %s: %s: %s", a.name, t.subject, t.reason)
        else:
            log.info("alert %s: %s: %s", a.name, t.subject, t.reason)
        self._queue.put_nowait((a, t))

    async def _send_loop(self) -> None:
        while True:
            a, t = await self._queue.get()
            try:
                await self._send(a, t)
            except Exception:
                log.exception("alert %s: sending failed", a.name)

    async def _send(self, a: AlertConfig, t: Transition) -> None:
        ok = True
        if a.webhook:
            ok = await post_webhook(a.webhook, t.to_json(), a.timeout_s, a.retries)
        if a.command:
            status = await run_command(a.command, t, a.timeout_s)
            ok = ok and status == 0
        self.sent.append((t, ok))


__all__ = ["AlertConfig", "Alerter", "Deduper", "Problem", "Transition", "active", "parse_alerts"]
