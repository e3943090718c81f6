"""``vmplug generate prometheus-rules``: Alertmanager alerting rules over vmplug's metrics.

For sites that already run Prometheus and Alertmanager: the same conditions as
``[[alert]]`` (:mod:`vmplug.daemon.alerts`), over the series ``/metrics``
exports (:mod:`vmplug.api.metrics`):

* ``vmplug_device_uptime_ratio`` below a bound -- a device not in its VM;
* ``vmplug_device_failures_total`` rising K times within a window -- a device that
  keeps dropping;
* ``vmplug_vm_connected == 0`` -- a VM lost;
* ``vmplug_events_total{kind="heal-failed"}`` rising -- a rung failed;
* ``vmplug_events_total{kind="overflow"}`` rising -- uevents lost;
* ``vmplug_hotplug_latency_seconds`` p99 above a bound;
* ``up{job=...} == 0`` -- the daemon itself is not scraped.

The output is one YAML rule file (``groups:``) that ``promtool check rules``
accepts; strings are written as JSON strings, which YAML reads unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: the series the rules read; a test checks each one is what /metrics exports
METRICS = (
    "vmplug_device_uptime_ratio",
    "vmplug_device_failures_total",
    "vmplug_vm_connected",
    "vmplug_events_total",
    "vmplug_hotplug_latency_seconds_bucket",
)


@dataclass(frozen=True, slots=True)
class RuleOptions:
    job: str = "vmplug"
    uptime_below: float = 0.99
    drops: int = 3
    drops_window: str = "10m"
    not_back_for: str = "1m"
    vm_lost_for: str = "1m"
    latency_p99_above_s: float = 2.0


def _q(s: str) -> str:
    return json.dumps(s)


def rules(o: RuleOptions) -> list[dict[str, object]]:
    sel = f'job="{o.job}"'
    return [
        {
            "alert": "VmplugDown",
            "expr": f"up{{{sel}}} == 0",
            "for": "2m",
            "severity": "critical",
            "summary": "vmplug on {{ $labels.instance }} is not scraped",
        },
        {
            "alert": "VmplugDeviceNotInVm",
            "expr": f"vmplug_device_uptime_ratio{{{sel}}} < {o.uptime_below:g}",
            "for": o.not_back_for,
            "severity": "warning",
            "summary": "USB device {{ $labels.identity }} ({{ $labels.port }}) is out of its VM",
        },
        {
            "alert": "VmplugDeviceFlapping",
            "expr": f"increase(vmplug_device_failures_total{{{sel}}}[{o.drops_window}])"
            f" >= {o.drops}",
            "for": "0m",
            "severity": "warning",
            "summary": f"USB device {{{{ $labels.identity }}}} dropped {o.drops}+ times "
            f"in {o.drops_window}",
        },
        {
            "alert": "VmplugVmLost",
            "expr": f"vmplug_vm_connected{{{sel}}} == 0",
            "for": o.vm_lost_for,
            "severity": "critical",
            "summary": "VM {{ $labels.vm }} is not reachable over QMP",
        },
        {
            "alert": "VmplugHealFailed",
            "expr": f'increase(vmplug_events_total{{{sel},kind="heal-failed"}}[15m]) > 0',
            "for": "0m",
            "severity": "warning",
            "summary": "a self-healing rung failed (vmplug history shows which)",
        },
        {
            "alert": "VmplugUeventsLost",
            "expr": f'increase(vmplug_events_total{{{sel},kind="overflow"}}[15m]) > 0',
            "for": "0m",
            "severity": "info",
            "summary": "the kernel's uevent buffer overflowed; vmplug rescanned",
        },
        {
            "alert": "VmplugSlowHotplug",
            "expr": "histogram_quantile(0.99, sum by (le) (rate("
            f"vmplug_hotplug_latency_seconds_bucket{{{sel}}}[30m]))) > {o.latency_p99_above_s:g}",
            "for": "15m",
            "severity": "warning",
            "summary": f"hot-plug p99 above {o.latency_p99_above_s:g} s",
        },
    ]


def render(o: RuleOptions) -> str:
    out = ["# vmplug alerting rules (vmplug generate prometheus-rules)", "groups:"]
    out += [f"  - name: {_q('vmplug')}", "    rules:"]
    for r in rules(o):
        out += [
            f"      - alert: {_q(str(r['alert']))}",
            f"        expr: {_q(str(r['expr']))}",
            f"        for: {_q(str(r['for']))}",
            "        labels:",
            f"          severity: {_q(str(r['severity']))}",
            "        annotations:",
            f"          summary: {_q(str(r['summary']))}",
        ]
    return "\n".join(out) + "\n"
