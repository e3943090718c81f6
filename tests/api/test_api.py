"""The daemon's HTTP API against the real daemon, real QEMU VMs and replayed uevents.

Every assertion about attachments is checked on QEMU itself (through the test's
own QMP socket), not on what the daemon believes.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.apirig import TOKEN, ApiRig, until
from vmplug.api.openapi import document

pytestmark = pytest.mark.qemu

BEARER = {"Authorization": f"Bearer {TOKEN}"}
KBD = "2-2.4.2"  # keyboard behind two hubs; the rule sends it to VM a
TABLET = "1-3"  # no rule: stays on the host unless asked


async def get(rig: ApiRig, path: str, **kw: Any) -> tuple[int, Any]:
    headers = {**BEARER, **kw.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as s,
        s.get(rig.base + path, headers=headers, allow_redirects=False, **kw) as r,
    ):
        text = await r.text()
        return r.status, _parse(r, text)


async def post(rig: ApiRig, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    headers = {**BEARER, **kw.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(rig.base + path, json=body, headers=headers, allow_redirects=False, **kw) as r,
    ):
        return r.status, _parse(r, await r.text())


async def unix(rig: ApiRig, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = aiohttp.UnixConnector(path=str(rig.socket))
    async with (
        aiohttp.ClientSession(connector=conn) as s,
        s.request(method, f"http://vmplug{path}", json=body) as r,
    ):
        return r.status, _parse(r, await r.text())


def _parse(r: aiohttp.ClientResponse, text: str) -> Any:
    if r.content_type == "application/json":
        return json.loads(text)
    return text


async def test_read_endpoints_on_both_listeners(rig: ApiRig) -> None:
    d = await rig.up()
    await rig.wait_ports("a", {KBD})
    assert await d.wait_converged(10)
    # the unix socket needs no token; TCP answers the same with the token
    status_u, devs_u = await unix(rig, "GET", "/v1/devices")
    status_t, devs_t = await get(rig, "/v1/devices")
    assert status_u == status_t == 200
    assert [x["port"] for x in devs_u] == [x["port"] for x in devs_t]
    by_port = {x["port"]: x for x in devs_t}
    kbd = by_port[KBD]
    assert (kbd["vm"], kbd["attached"], kbd["state"]) == ("a", "a", "attached")
    assert kbd["qemu_id"] in await rig.held("a")
    assert (by_port[TABLET]["vm"], by_port[TABLET]["state"]) == (None, "host")
    assert by_port["2-2"]["is_hub"]
    # one device by selector (port, vid:pid) and the 404 naming candidates
    assert (await get(rig, f"/v1/devices/{KBD}"))[1]["identity"] == kbd["identity"]
    vidpid = f"{kbd['vendor_id']}:{kbd['product_id']}"
    same_id = [
        x["port"]
        for x in devs_t
        if x["vendor_id"] == kbd["vendor_id"] and x["product_id"] == kbd["product_id"]
    ]
    code, one = await get(rig, f"/v1/devices/{vidpid}")
    if len(same_id) == 1:
        assert (code, one["port"]) == (200, KBD)
    else:  # ambiguous: 404 naming every candidate
        assert code == 404 and len(one["candidates"]) == len(same_id), one
    code, err = await get(rig, "/v1/devices/9-9.9")
    assert code == 404 and "error" in err
    code, vms = await get(rig, "/v1/vms")
    assert code == 200
    assert {v["name"]: v["devices"] for v in vms} == {"a": [kbd["qemu_id"]], "b": []}
    assert all(v["connected"] for v in vms)
    code, atts = await get(rig, "/v1/attachments")
    assert [(a["port"], a["vm"], a["state"]) for a in atts] == [(KBD, "a", "attached")]
    code, rules = await get(rig, "/v1/rules")
    assert rules == [
        {"index": 1, "match": 'via-port "2-2.4.2"', "action": "attach", "vm": "a", "line": 8}
    ] or (rules[0]["match"], rules[0]["vm"]) == ('via-port "2-2.4.2"', "a")
    code, hist = await get(rig, f"/v1/history?device={KBD}&limit=50")
    kinds = [(e["kind"], e.get("result")) for e in hist if e["identity"] == kbd["identity"]]
    assert ("attach", "ok") in kinds
    code, health = await get(rig, f"/v1/health?device={KBD}")
    assert code == 200 and len(health) == 1
    assert health[0]["port"] == KBD and health[0]["failures"] == 0
    assert health[0]["uptime"] is None or 0.0 <= health[0]["uptime"] <= 1.0
    code, status = await unix(rig, "GET", "/v1/status")
    assert status["daemon"]["devices"] == len(devs_t)
    # metrics: the attach, its hot-plug latency bucket absent (no bind yet), passes timed
    code, text = await get(rig, "/metrics")
    assert code == 200
    assert re.search(r'^vmplug_attachments_total\{vm="a"\} 1\.0$', text, re.M), text
    assert re.search(r"^vmplug_reconcile_duration_seconds_count [1-9]", text, re.M)
    assert re.search(r'^vmplug_vm_devices\{vm="a"\} 1\.0$', text, re.M)
    assert re.search(r'^vmplug_events_total\{kind="device-add"\} [1-9]', text, re.M)
    ident = kbd["identity"]
    assert f'vmplug_device_uptime_ratio{{host="",identity="{ident}",port="{KBD}"}}' in text


async def test_attach_move_detach_reach_qemu(rig: ApiRig) -> None:
    await rig.up()
    await rig.wait_ports("a", {KBD})
    # attach the tablet (no rule) to b: QEMU b really holds it when the call returns
    code, res = await unix(rig, "POST", "/v1/attach", {"device": TABLET, "vm": "b"})
    assert code == 200 and res["state"] == "attached", res
    assert await rig.ports("b") == {TABLET}
    # move the keyboard from a to b over TCP
    code, res = await post(rig, "/v1/attach", {"device": KBD, "vm": "b"})
    assert code == 200 and res["state"] == "attached", res
    await rig.wait_ports("a", set())
    assert await rig.ports("b") == {KBD, TABLET}
    # detach: it stays on the host although its rule names a
    code, res = await post(rig, "/v1/detach", {"device": KBD})
    assert code == 200 and res["vms"] == {"b": {"state": "detached"}}, res
    assert await rig.ports("b") == {TABLET}
    await asyncio.sleep(0.3)
    assert await rig.ports("a") == set()
    code, dev = await get(rig, f"/v1/devices/{KBD}")
    assert (dev["vm"], dev["attached"], dev["state"], dev["override"]) == (None, None, "host", True)


async def test_live_events_stream_an_unplug(rig: ApiRig) -> None:
    d = await rig.up()
    await rig.wait_ports("a", {KBD})
    identity = d.inventory[KBD].identity
    seen: list[tuple[str, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as s, s.get(rig.base + "/v1/events", headers=BEARER) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert "Access-Control-Allow-Origin" not in r.headers

        async def read() -> None:
            event = ""
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((event, json.loads(line[6:])))
                    if event == "action" and seen[-1][1]["kind"] == "detach":
                        return

        reader = asyncio.ensure_future(read())
        await until(lambda: _true(bool(seen)), 5, "hello")
        rig.kernel.unplug(KBD)
        await asyncio.wait_for(reader, 20)
    kinds = [(e, item.get("kind")) for e, item in seen]
    assert kinds[0] == ("hello", None)
    assert ("event", "device-remove") in kinds
    remove = next(i for e, i in seen if i.get("kind") == "device-remove")
    assert (remove["port"], remove["identity"]) == (KBD, identity)
    detach = seen[-1][1]
    assert (detach["vm"], detach["result"]) == ("a", "ok")
    await rig.wait_ports("a", set())


async def _true(value: bool) -> bool:
    return value


def test_openapi_document_names_every_route_and_no_other() -> None:
    from tests.support.apirig import FIXTURES  # noqa: PLC0415
    from vmplug.api.server import Api  # noqa: PLC0415
    from vmplug.config import parse_config  # noqa: PLC0415
    from vmplug.daemon.reconciler import Daemon  # noqa: PLC0415
    from vmplug.host.events import ReplayEventSource  # noqa: PLC0415

    config = parse_config('[vm.a]\nqmp = "/nonexistent"\n', "/x.toml")
    daemon = Daemon(
        config,
        sysfs_root=FIXTURES / "mixed",
        source=ReplayEventSource(Path("/nonexistent")),
    )
    api = Api(daemon)
    routes = {(method.lower(), path) for method, path in api.router.routes()}
    doc = document()
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    # every 2xx JSON answer names a schema that exists
    refs = re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc))
    assert set(refs) <= set(doc["components"]["schemas"])


async def test_metrics_count_qmp_errors_and_time_hotplugs(rig: ApiRig) -> None:
    rig.qemu("nousb", usb=False)  # every device_add fails: "no USB bus"
    d = await rig.up(vms=("a", "b", "nousb"))
    await rig.wait_ports("a", {KBD})
    # an attach the VM cannot take: the API says "retrying" with QEMU's error
    code, res = await post(rig, "/v1/attach", {"device": TABLET, "vm": "nousb"})
    assert code == 200 and res["state"] == "retrying" and res["attempts"] >= 1, res
    code, dev = await get(rig, f"/v1/devices/{TABLET}")
    assert dev["state"] == "retrying" and dev["error"]
    # a replug: bind -> attached, timed into the hot-plug histogram
    rig.kernel.unplug(KBD)
    await rig.wait_ports("a", set())
    rig.kernel.plug(KBD)
    await rig.wait_ports("a", {KBD})
    code, text = await get(rig, "/metrics")
    errors = re.search(
        r'^vmplug_qmp_errors_total\{error_class="(\w+)",vm="nousb"\} (\d+)\.0$', text, re.M
    )
    assert errors and int(errors.group(2)) >= 1, text
    assert d.store is not None
    failed = [e for e in d.store.history(None, limit=None) if e.result == "error"]
    assert {e.error_class for e in failed} == {errors.group(1)}
    assert 1 <= int(errors.group(2)) <= len(failed)  # retries go on after the scrape
    assert re.search(r"^vmplug_hotplug_latency_seconds_count 1\.0$", text, re.M), text
    assert re.search(r'^vmplug_attachments_total\{vm="a"\} 2\.0$', text, re.M)
    assert re.search(r'^vmplug_events_total\{kind="device-remove"\} 1\.0$', text, re.M)
    assert re.search(r'^vmplug_vm_connected\{vm="nousb"\} 1\.0$', text, re.M)
    # the keyboard's failure (its unplug) shows in its figures and the metric
    identity = d.inventory[KBD].identity
    assert re.search(
        rf'^vmplug_device_failures_total\{{host="",identity="{re.escape(identity)}",'
        rf'port="{KBD}"\}} 1\.0$',
        text,
        re.M,
    ), text
    code, health = await get(rig, f"/v1/health?device={TABLET}")
    assert health[0]["errors"] >= 1 and health[0]["errors_per_hour"] > 0
    code, health = await get(rig, f"/v1/health?device={KBD}")
    assert health[0]["failures"] == 1 and health[0]["recoveries"] == 1
