"""The API and the web page at 200 devices and 20 VMs.

Setup: a synthetic sysfs tree of 200 devices built only from real captured
device directories (tests/fixtures/sysfs/mixed, as bench_list.py does: hubs and
keyboards copied and renumbered), 20 real QEMU VMs (TCG, qemu-xhci), the daemon
and its API in this process on a unix socket and a loopback TCP port; the
192 non-hub devices are spread over the 20 VMs (about 10 each) and attached.

Printed in one run, each beside an alternative:
* first render of the page in headless Chromium (navigation start -> tree and
  20 VM columns drawn), beside the time of the page's two data requests alone;
* event-to-screen: a uevent written to the daemon's event FIFO -> the row gone
  from the page (unplug), and replug -> the card shown attached in its VM;
  beside the moment the same event reaches the page over SSE, and the daemon's
  own bind -> device_add answered latency;
* GET /v1/devices requests per second (load from a separate process, keep-alive
  connections), beside GET /v1/status and /v1/devices over the unix socket.

Run (from the repository root): .venv/bin/python -m bench.bench_api [--runs 10] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.apirig import TOKEN, ApiRig

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VMS = 20


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_tree(dst: Path) -> int:
    """200 devices: 4 buses x 2 hubs x (1 hub + 24 keyboards), from bench_list's builder."""
    bench_list = _load("bench_list", ROOT / "bench" / "bench_list.py")
    bench_list.BUSES, bench_list.HUBS, bench_list.PORTS = 4, 2, 24
    return int(bench_list.build_tree(dst))


LOAD = r"""
import asyncio, sys, time, aiohttp
url, token, sock = sys.argv[1:4]
seconds, conc = float(sys.argv[4]), int(sys.argv[5])
async def main():
    conn = aiohttp.UnixConnector(path=sock) if sock != "-" else aiohttp.TCPConnector(limit=conc)
    headers = {"Authorization": f"Bearer {token}"} if token != "-" else {}
    n = 0
    async with aiohttp.ClientSession(connector=conn, headers=headers) as s:
        end = time.perf_counter() + seconds
        async def worker():
            nonlocal n
            while time.perf_counter() < end:
                async with s.get(url) as r:
                    await r.read()
                    assert r.status == 200, r.status
                n += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        print(n / (time.perf_counter() - t0))
asyncio.run(main())
"""


async def _rps(url: str, token: str, sock: str, seconds: float, conc: int = 8) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOAD,
        url,
        token,
        sock,
        str(seconds),
        str(conc),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    return float(out.decode().strip())


def _ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs):7.1f} ms  min {min(xs):7.1f}  max {max(xs):7.1f}"


WATCH = """
([port, vm, mode]) => new Promise((resolve) => {
  const t = () => performance.timeOrigin + performance.now();
  const es = new EventSource('/v1/events');
  const out = {};
  es.addEventListener('event', (ev) => {
    const item = JSON.parse(ev.data);
    if (item.port === port && !out.sse &&
        item.kind === (mode === 'unplug' ? 'device-remove' : 'device-bind')) out.sse = t();
  });
  const done = () => {
    if (mode === 'unplug') return !document.querySelector(`#tree li[data-port="${port}"]`);
    return !!document.querySelector(
      `section.vm[data-vm="${vm}"] li.card.s-attached[data-port="${port}"]`);
  };
  const obs = new MutationObserver(() => {
    if (out.dom || !done()) return;
    out.dom = t();
    requestAnimationFrame(() => { out.frame = t(); obs.disconnect(); es.close(); resolve(out); });
  });
  es.addEventListener('open', () => {
    obs.observe(document.body, {childList: true, subtree: true, attributes: true});
    window.__armed = true;
  });
})
"""


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--trace", action="store_true", help="print each refresh's timeline")
    args = ap.parse_args()
    from playwright.async_api import async_playwright  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        n = build_tree(tmp / "sysfs")
        rig = ApiRig(tmp, sysfs_root=tmp / "sysfs")
        try:
            names = tuple(f"vm{i:02d}" for i in range(VMS))
            t0 = time.perf_counter()
            d = await rig.up(rules="", vms=names)
            while not all(n in d.observed for n in names):  # every VM connected and read
                await asyncio.sleep(0.05)
            leaves = sorted((x for x in d.inventory.values() if not x.is_hub), key=lambda x: x.port)
            d.set_route(overrides={x.identity: names[i % VMS] for i, x in enumerate(leaves)})
            ok = await d.wait_converged(120)
            while sum(len(v) for v in d.observed.values()) < len(leaves):
                await asyncio.sleep(0.05)
            ok = await d.wait_converged(120)
            held = sum(len(v) for v in d.observed.values())
            print(
                f"setup: {n} devices ({len(leaves)} attachable), {VMS} VMs, {held} attached "
                f"in {time.perf_counter() - t0:.1f} s (converged: {ok})"
            )
            await _browser(rig, leaves, names, args.runs, async_playwright, args.trace)
            print(f"\nGET requests/s, 8 keep-alive connections, {args.seconds:.0f} s each:")
            tok = TOKEN
            for label, url, token, sock in (
                ("TCP  /v1/devices (200 devices)", f"{rig.base}/v1/devices", tok, "-"),
                ("TCP  /v1/status", f"{rig.base}/v1/status", tok, "-"),
                ("unix /v1/devices", "http://vmplug/v1/devices", "-", str(rig.socket)),
            ):
                rps = await _rps(url, token, sock, args.seconds)
                print(f"  {label:34s} {rps:8.0f} req/s")
            size = len(json.dumps(await _get_json(rig, "/v1/devices")))
            print(f"  (/v1/devices body: {size / 1024:.0f} KiB)")
        finally:
            await rig.close()


async def _get_json(rig: Any, path: str) -> Any:
    import aiohttp  # noqa: PLC0415

    conn = aiohttp.UnixConnector(path=str(rig.socket))
    async with aiohttp.ClientSession(connector=conn) as s, s.get(f"http://vmplug{path}") as r:
        return await r.json()


async def _browser(
    rig: Any, leaves: list[Any], names: tuple[str, ...], runs: int, apw: Any, trace: bool
) -> None:
    import aiohttp  # noqa: PLC0415

    token = sys.modules["apirig"].TOKEN
    async with apw() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = await browser.new_context(
                viewport={"width": 1400, "height": 1000}, bypass_csp=True
            )
            page = await ctx.new_page()
            await page.goto(f"{rig.base}/?token={token}")
            # first render: a fresh navigation each time, the session cookie kept
            renders, fetches = [], []
            for _ in range(runs):
                await page.goto(f"{rig.base}/")
                await page.wait_for_function(
                    "document.body.dataset.version >= 1 && "
                    f"document.querySelectorAll('section.vm').length === {len(names)}"
                )
                renders.append(await page.evaluate("window.vmplugStats.firstRenderMs"))
                headers = {"Authorization": f"Bearer {token}"}
                async with aiohttp.ClientSession(headers=headers) as s:
                    t0 = time.perf_counter()
                    async with (
                        s.get(f"{rig.base}/v1/devices") as r1,
                        s.get(f"{rig.base}/v1/vms") as r2,
                    ):
                        await r1.read()
                        await r2.read()
                    fetches.append((time.perf_counter() - t0) * 1000)
            rows = await page.locator("#tree li.dev").count()
            print(f"\nfirst render ({rows} rows, {len(names)} VM columns), {runs} runs:")
            print(f"  page: navigation -> drawn        {_ms(renders)}")
            print(f"  its data alone (/v1/devices+vms) {_ms(fetches)}")
            # event to screen: unplug and replug devices, one at a time
            d = rig.daemon
            unplug: dict[str, list[float]] = {"sse": [], "dom": [], "frame": []}
            replug: dict[str, list[float]] = {"sse": [], "dom": [], "frame": []}
            daemon_lat: list[float] = []
            for i in range(runs):
                dev = leaves[(i * 7) % len(leaves)]
                vm = names[leaves.index(dev) % len(names)]
                for mode, sink in (("unplug", unplug), ("replug", replug)):
                    await page.evaluate("window.__armed = false")
                    watch = asyncio.ensure_future(page.evaluate(WATCH, [dev.port, vm, mode]))
                    await page.wait_for_function("window.__armed === true")
                    t0 = time.time() * 1000
                    if mode == "unplug":
                        rig.kernel.unplug(dev.port)
                    else:
                        before = len(d.stats.event_to_attached)
                        rig.kernel.plug(dev.port)
                    out = await asyncio.wait_for(watch, 60)
                    st = await page.evaluate("window.vmplugStats")
                    if trace:
                        log = [(round(a - t0), round(b), round(c), m) for a, b, c, m in st["log"]]
                        print(mode, {k: round(v - t0) for k, v in out.items()}, log[-3:])
                    sink.setdefault("fetch", []).append(st["fetchMs"])
                    sink.setdefault("render", []).append(st["renderMs"])
                    for k in ("sse", "dom", "frame"):
                        sink[k].append(out[k] - t0)
                    if mode == "replug":
                        while len(d.stats.event_to_attached) == before:
                            await asyncio.sleep(0.01)
                        daemon_lat.append(d.stats.event_to_attached[-1][1] * 1000)
            print(f"\nevent to screen, {runs} devices (each unplugged, then replugged):")
            print(f"  unplug uevent -> SSE event in the page  {_ms(unplug['sse'])}")
            print(f"  unplug uevent -> row gone (DOM)         {_ms(unplug['dom'])}")
            print(f"  unplug uevent -> next frame             {_ms(unplug['frame'])}")
            print(f"  replug uevent -> SSE event in the page  {_ms(replug['sse'])}")
            print(f"  replug uevent -> card 'attached' (DOM)  {_ms(replug['dom'])}")
            print(f"  replug uevent -> next frame             {_ms(replug['frame'])}")
            print(f"  daemon: bind -> device_add answered     {_ms(daemon_lat)}")
            print(f"  page's last refresh: fetch              {_ms(unplug['fetch'])}")
            print(f"  page's last refresh: render             {_ms(unplug['render'])}")
        finally:
            await browser.close()


if __name__ == "__main__":
    asyncio.run(main())
