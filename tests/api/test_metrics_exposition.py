"""A live daemon's ``/metrics`` as Prometheus reads it (real daemon, real QEMU).

* Debian's ``promtool check metrics`` (package ``prometheus``) has nothing to
  say about the exposition: counters end in ``_total``, units in the names;
* every family exported is a row of the README's metrics table, with the same
  type and labels, and every row is exported;
* counters are counters (``vmplug_device_failures_total`` after an unplug),
  ``vmplug_build_info`` names the version, the process collector is there and
  no ``_created`` series is.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.support.apirig import TOKEN, ApiRig
from vmplug import __version__

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
KBD = "2-2.4.2"  # the rig's rule sends it to VM a


def readme_table() -> dict[str, tuple[str, frozenset[str]]]:
    """The README's metrics table: name -> (type, labels)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("#### Metrics", 1)[1].split("\n#", 1)[0]
    rows: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z_:]+)` \| (\w+) \|([^|]*)\|", line)
        if m:
            labels = frozenset(re.findall(r"`(\w+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), labels)
    assert rows, "no metrics table in README.md"
    return rows


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """The exposition's families: name -> (type, the labels its samples carry)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        out[name] = (kind, set())
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ", line)
        assert m, line
        sample, labels = m.group(1), m.group(2) or ""
        family = next(
            (f for f in out if sample in (f, f + "_bucket", f + "_count", f + "_sum")), None
        )
        assert family is not None, f"{sample}: a sample of no declared family"
        out[family][1].update(re.findall(r'(\w+)="', labels))
        out[family][1].discard("le")
    return out


async def scrape(rig: ApiRig) -> str:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s, s.get(rig.base + "/metrics", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        return await r.text()


async def test_live_metrics_are_what_prometheus_and_the_readme_say(rig: ApiRig) -> None:
    d = await rig.up(vms=("a", "b"))
    await rig.wait_ports("a", {KBD})
    rig.kernel.unplug(KBD)  # one failure: the counter has a sample to show
    await rig.wait_ports("a", set())
    rig.kernel.plug(KBD)
    await rig.wait_ports("a", {KBD})
    text = await scrape(rig)

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: prometheus)")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), (
        res.stdout + res.stderr
    )

    exported = families(text)
    table = readme_table()
    assert set(exported) == set(table), sorted(set(exported) ^ set(table))
    for name, (kind, labels) in exported.items():
        want_kind, want_labels = table[name]
        assert kind == want_kind, (name, kind, want_kind)
        if labels:  # a family with no sample yet shows no labels
            assert labels == want_labels, (name, labels, want_labels)

    assert "_created" not in text
    version = re.escape(__version__)
    assert re.search(
        rf'^vmplug_build_info\{{python="[\d.]+",version="{version}"\}} 1\.0$', text, re.M
    ), text
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    identity = d.inventory[KBD].identity
    assert re.search(
        rf'^vmplug_device_failures_total\{{host="",identity="{re.escape(identity)}",'
        rf'port="{KBD}"\}} 1\.0$',
        text,
        re.M,
    ), text
