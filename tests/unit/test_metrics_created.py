"""``_created`` series are off unless asked for, with the prometheus_client of the
venv and with the floor's (0.17 has no disable_created_metrics(), only its flag:
scripts/floors.py runs the suite's floor checks there)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from vmplug.api.metrics import created_series


def _page() -> str:
    r = CollectorRegistry()
    Counter("vmplug_test_things", "things", registry=r).inc()
    Histogram("vmplug_test_seconds", "time", registry=r).observe(0.1)
    return generate_latest(r).decode()


def test_created_series_switch() -> None:
    try:
        created_series(True)
        assert "vmplug_test_things_created" in _page()
        created_series(False)
        page = _page()
        assert "_created" not in page and "vmplug_test_things_total 1.0" in page
    finally:
        created_series(False)
