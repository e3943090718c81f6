"""Prometheus metrics of a running daemon (served at ``/metrics``).

Fed by the daemon's read model (:class:`vmplug.daemon.readmodel.ReadModel`), not
by polling: :meth:`~ReadModel.subscribe` gives every event and action as the
journal records it, :meth:`~ReadModel.subscribe_passes` the duration of every
reconcile pass.  Gauges that describe the present (devices, VMs, per-device
uptime) are read from it when Prometheus scrapes.

The names, types and labels are the README's table ("Metrics"); a test holds
every family a live daemon exports to it, and ``promtool check metrics``
(Debian's ``prometheus``) to the exposition.  No ``_created`` series (they
double the series count and Prometheus 2 ignores them) unless ``created=True``.

Counters
  ``vmplug_events_total{kind}``                 host, VM and daemon events
  ``vmplug_actions_total{kind,vm,result}``      attach/detach/adopt tried
  ``vmplug_attachments_total{vm}``              successful attaches (device_add answered)
  ``vmplug_qmp_errors_total{vm,error_class}``   failed actions, by QMP error class
  ``vmplug_device_failures_total{identity,port,host}`` times the device left its VM
                                                by unplug or loss, since the daemon started
                                                (``host``: its device host, "" for this one)
Histograms
  ``vmplug_reconcile_duration_seconds``         one reconcile pass (diff + acting)
  ``vmplug_hotplug_latency_seconds``            bind uevent -> device_add answered
Gauges
  ``vmplug_devices``                            USB devices present (no root hubs)
  ``vmplug_vm_connected{vm}``                   1 while vmplug's QMP session is up
  ``vmplug_vm_devices{vm}``                     vmplug devices the VM holds
  ``vmplug_device_uptime_ratio{identity,port,host}`` share of wanted time attached,
                                                since the daemon started (vmplug.history.health)
  ``vmplug_remote_host_up{host}``               1 while the device host answers
  ``vmplug_remote_host_devices{host}``          devices it exports that are present
  ``vmplug_build_info{version,python}``         1, with the running version
and the process collector's ``process_*`` (CPU, memory, open files, start time).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from vmplug import __version__
from vmplug.daemon.readmodel import ReadModel

#: health over the whole run is recomputed at most this often (a scrape is cheap)
HEALTH_CACHE_S = 10.0

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PASS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    """One registry per daemon (tests run several daemons in one process)."""

    def __init__(self, view: ReadModel, *, created: bool = False) -> None:
        self.view = view
        created_series(created)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        r.register(_BuildInfo())
        self.events = Counter("vmplug_events", "Events recorded, by kind", ["kind"], registry=r)
        self.actions = Counter(
            "vmplug_actions", "Actions tried on VMs", ["kind", "vm", "result"], registry=r
        )
        self.attachments = Counter(
            "vmplug_attachments", "Successful attaches (device_add answered)", ["vm"], registry=r
        )
        self.qmp_errors = Counter(
            "vmplug_qmp_errors", "Failed actions, by QMP error class", ["vm", "error_class"],
            registry=r,
        )  # fmt: skip
        self.reconcile = Histogram(
            "vmplug_reconcile_duration_seconds", "Duration of one reconcile pass",
            buckets=PASS_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "vmplug_hotplug_latency_seconds", "From the bind uevent to device_add answered",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._state = _StateCollector(view)
        r.register(self._state)
        view.subscribe(self.on_item)
        view.subscribe_passes(self.on_pass)

    def close(self) -> None:
        self.view.unsubscribe(self.on_item)
        self.view.unsubscribe_passes(self.on_pass)

    def on_item(self, item: dict[str, Any]) -> None:
        kind = str(item.get("kind"))
        if item.get("type") == "event":
            self.events.labels(kind).inc()
            return
        vm = str(item.get("vm") or "")
        result = str(item.get("result") or "")
        self.actions.labels(kind, vm, result).inc()
        if result == "error":
            self.qmp_errors.labels(vm, str(item.get("error_class") or "unknown")).inc()
        elif kind == "attach" and result == "ok":
            self.attachments.labels(vm).inc()
            latency = item.get("latency_s")
            if isinstance(latency, int | float):
                self.latency.observe(latency)

    def on_pass(self, seconds: float, actions: int) -> None:
        self.reconcile.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def created_series(on: bool) -> None:
    """``_created`` series on or off.  prometheus_client's switch is process-wide
    (the last daemon made decides); before 0.18 there is no function for it, only
    the flag those functions set."""
    import prometheus_client  # noqa: PLC0415
    from prometheus_client import metrics  # noqa: PLC0415

    fn = getattr(
        prometheus_client, "enable_created_metrics" if on else "disable_created_metrics", None
    )
    if fn is not None:
        fn()
    else:
        metrics._use_created = on


class _BuildInfo(Collector):
    """``vmplug_build_info{version,python} 1``: which vmplug answers."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "vmplug_build_info", "The vmplug version running", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


class _StateCollector(Collector):
    def __init__(self, view: ReadModel) -> None:
        self.view = view
        self._health: tuple[float, dict[str, Any]] = (0.0, {})

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed at scrape time

    def _health_now(self) -> dict[str, Any]:
        from vmplug.history.health import health_by_device  # noqa: PLC0415

        stamp, figures = self._health
        now = time.monotonic()
        store = self.view.store
        if store is None or (now - stamp < HEALTH_CACHE_S and figures):
            return figures
        end = time.time()
        start = self.view.started
        # the daemon's own start is in the journal after stats.started: no earlier
        # state is needed, and a long journal is not read in full on every scrape
        entries = store.history(None, limit=None, since=start - 1.0)
        figures = health_by_device(entries, min(start, end), end)
        self._health = (now, figures)
        return figures

    def collect(self) -> Iterator[Metric]:
        view = self.view
        devices = GaugeMetricFamily("vmplug_devices", "USB devices present")
        devices.add_metric([], view.device_count())
        yield devices
        connected = GaugeMetricFamily(
            "vmplug_vm_connected", "1 while the QMP session is up", labels=["vm"]
        )
        held = GaugeMetricFamily("vmplug_vm_devices", "vmplug devices the VM holds", labels=["vm"])
        for vm in view.vms():
            connected.add_metric([vm.name], 1.0 if vm.connected else 0.0)
            held.add_metric([vm.name], len(vm.devices))
        yield connected
        yield held
        uptime = GaugeMetricFamily(
            "vmplug_device_uptime_ratio",
            "Share of the time wanted in a VM that the device was attached to it "
            "(since the daemon started)",
            labels=["identity", "port", "host"],
        )
        failures = CounterMetricFamily(
            "vmplug_device_failures",
            "Times the device left its VM by unplug or loss (since the daemon started)",
            labels=["identity", "port", "host"],
        )
        where = {dev.identity: (dev.port, dev.host or "") for dev in view.devices()}
        for identity, h in sorted(self._health_now().items()):
            port, host = where.get(identity, ("", ""))
            if h.uptime is not None:
                uptime.add_metric([identity, port, host], h.uptime)
            failures.add_metric([identity, port, host], h.failures)
        yield uptime
        yield failures
        up = GaugeMetricFamily(
            "vmplug_remote_host_up", "1 while the device host answers", labels=["host"]
        )
        count = GaugeMetricFamily(
            "vmplug_remote_host_devices",
            "Devices the device host exports that are present",
            labels=["host"],
        )
        for h in view.remote_hosts():  # none on a host without [host.NAME]
            up.add_metric([h["name"]], 1.0 if h["state"] == "up" else 0.0)
            count.add_metric([h["name"]], float(h["devices"]))
        yield up
        yield count
