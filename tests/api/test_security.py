"""The TCP listener's token, the page's session and CSRF guard, and bad input everywhere.

One daemon (real QEMU VMs) serves every case of a test, so the cases are many
and the QEMU start-ups few.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.apirig import TOKEN, ApiRig
from vmplug.api.openapi import document
from vmplug.api.security import load_or_create_token
from vmplug.errors import VmplugError

pytestmark = pytest.mark.qemu

KBD = "2-2.4.2"


async def call(
    rig: ApiRig,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    data: Any = None,
    cookies: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        if cookies:
            s.cookie_jar.update_cookies(cookies)
        async with s.request(
            method, rig.base + path, headers=headers or {}, data=data, allow_redirects=False
        ) as r:
            text = await r.text()
            body = json.loads(text) if r.content_type == "application/json" else text
            return r.status, dict(r.headers), body


def _concrete(path: str) -> str:
    return path.replace("{device}", KBD).replace("{name}", "app.js")


async def test_tcp_refuses_requests_without_the_right_token(rig: ApiRig) -> None:
    await rig.up()
    public = {("/", "get"), ("/login", "post"), ("/static/{name}", "get")}
    ops = [(p, m) for p, item in document()["paths"].items() for m in item]
    assert len(ops) >= 15
    for path, method in ops:
        if (path, method) in public:
            continue
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-wrong-token"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Cookie": "vmplug_session=forged"},
        ):
            code, h, body = await call(rig, method.upper(), _concrete(path), headers=headers)
            assert code == 401, (path, method, headers, code, body)
            assert body["error"] == "missing or wrong API token"
            assert h["WWW-Authenticate"].startswith("Bearer")
            assert not [k for k in h if k.lower().startswith("access-control-")]
    # nothing changed: the refused attach/detach/reload never reached the daemon
    assert rig.daemon is not None and rig.daemon.overrides == {}
    # the unix socket is the file system's business: mode 0600, no token asked
    assert stat.S_IMODE(rig.socket.stat().st_mode) == 0o600
    # a foreign Host (DNS rebinding) is refused even with the token
    code, _, body = await call(
        rig,
        "GET",
        "/v1/devices",
        headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example:80"},
    )
    assert code == 421 and "loopback" in body["error"]


async def test_page_session_and_csrf(rig: ApiRig) -> None:
    await rig.up()
    await rig.wait_ports("a", {KBD})
    origin = {"Origin": rig.base}
    # without a session: the login form, never the page or the data
    code, _, html = await call(rig, "GET", "/")
    assert code == 200 and 'action="/login"' in html and "csrf-token" not in html
    code, _, html = await call(rig, "GET", "/?token=wrong")
    assert code == 401 and "wrong token" in html
    # the token trades for an HttpOnly SameSite=Strict cookie
    code, h, _ = await call(rig, "GET", f"/?token={TOKEN}")
    assert code == 303 and h["Location"] == "/"
    cookie = h["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    sid = cookie.split(";")[0].split("=", 1)[1]
    jar = {"vmplug_session": sid}
    code, h, html = await call(rig, "GET", "/", cookies=jar)
    assert code == 200 and '<meta name="csrf-token" content="' in html
    assert "script-src 'self'" in h["Content-Security-Policy"]
    assert h["X-Frame-Options"] == "DENY"
    csrf = html.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    assert len(csrf) >= 32
    code, _, devs = await call(rig, "GET", "/v1/devices", cookies=jar)
    assert code == 200 and any(d["port"] == KBD for d in devs)
    body = json.dumps({"device": KBD, "vm": "b"})
    js = {"Content-Type": "application/json"}
    # a change with the cookie alone, a foreign Origin, or a wrong CSRF token: refused
    for headers in (
        {**js, **origin},
        {**js, "X-CSRF-Token": csrf},
        {**js, "X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        {**js, "X-CSRF-Token": csrf, "Origin": "null"},
        {**js, "X-CSRF-Token": csrf + "x", **origin},
    ):
        code, _, err = await call(
            rig, "POST", "/v1/attach", headers=headers, data=body, cookies=jar
        )
        assert code == 403, (headers, code, err)
    assert await rig.ports("a") == {KBD}
    # with both it goes through, and QEMU b really gets the device
    code, _, res = await call(
        rig,
        "POST",
        "/v1/attach",
        headers={**js, "X-CSRF-Token": csrf, **origin},
        data=body,
        cookies=jar,
    )
    assert code == 200 and res["state"] == "attached", res
    await rig.wait_ports("b", {KBD})
    # the login form: a foreign Origin is refused, the same origin gets a session
    form = {"token": TOKEN}
    code, _, _ = await call(
        rig, "POST", "/login", data=form, headers={"Origin": "http://evil.example"}
    )
    assert code == 403
    code, h, _ = await call(rig, "POST", "/login", data=form, headers=origin)
    assert code == 303 and "vmplug_session=" in h["Set-Cookie"]
    code, _, html = await call(rig, "POST", "/login", data={"token": "nope"}, headers=origin)
    assert code == 401 and "wrong token" in html
    # a bearer token needs no CSRF token: browsers never send the header by themselves
    code, _, _ = await call(
        rig,
        "POST",
        "/v1/detach",
        headers={**js, "Authorization": f"Bearer {TOKEN}"},
        data=json.dumps({"device": KBD}),
    )
    assert code == 200
    # static assets are public (the login form is styled) and only the two exist
    code, h, _ = await call(rig, "GET", "/static/app.js")
    assert code == 200 and h["Content-Type"].startswith("application/javascript")
    code, _, err = await call(rig, "GET", "/static/..%2fserver.py")
    assert code == 404


BAD: list[tuple[str, str, Any, int, str]] = [
    # method, path, JSON body (or raw bytes), status, words in the error
    ("GET", "/v1/devices/9-9.9", None, 404, "no USB device"),
    ("GET", "/v1/devices/" + "x" * 300, None, 400, "at most 256"),
    ("GET", "/v1/devices/rule:id%20zz", None, 400, ""),
    ("GET", "/v1/history?limit=0", None, 400, "limit"),
    ("GET", "/v1/history?limit=abc", None, 400, "limit"),
    ("GET", "/v1/history?limit=10001", None, 400, "limit"),
    ("GET", "/v1/history?limit=-1", None, 400, "limit"),
    ("GET", "/v1/history?device=" + "y" * 300, None, 400, "device"),
    ("GET", "/v1/health?window=0", None, 400, "window"),
    ("GET", "/v1/health?window=nan", None, 400, "window"),
    ("GET", "/v1/health?window=1e12", None, 400, "window"),
    ("GET", "/v1/health?window=x", None, 400, "window"),
    ("GET", "/v1/health?device=%01", None, 404, "no device"),
    ("GET", "/v1/history?device=", None, 400, "device"),
    ("GET", "/v1/history?device=nothing-like-it", None, 404, "no device"),
    ("POST", "/v1/attach", b"not json", 400, "JSON object"),
    ("POST", "/v1/attach", b"", 400, "JSON object"),
    ("POST", "/v1/attach", [1, 2], 400, "JSON object"),
    ("POST", "/v1/attach", {"vm": "a"}, 400, "'device'"),
    ("POST", "/v1/attach", {"device": KBD}, 400, "'vm'"),
    ("POST", "/v1/attach", {"device": "", "vm": "a"}, 400, "'device'"),
    ("POST", "/v1/attach", {"device": 5, "vm": "a"}, 400, "'device'"),
    ("POST", "/v1/attach", {"device": KBD, "vm": "a", "x": 1}, 400, "unknown field"),
    ("POST", "/v1/attach", {"device": KBD, "vm": "nope"}, 404, "no VM named"),
    ("POST", "/v1/attach", {"device": "9-9", "vm": "a"}, 404, "no USB device"),
    ("POST", "/v1/attach", {"device": "2-2", "vm": "a"}, 400, "hub"),
    ("POST", "/v1/attach", {"device": "d" * 300, "vm": "a"}, 400, "longer than"),
    ("POST", "/v1/attach", {"device": "a\nb", "vm": "a"}, 404, "no USB device"),
    ("POST", "/v1/attach", {"device": "rule:id zz", "vm": "a"}, 400, ""),
    ("POST", "/v1/detach", {}, 400, "'device'"),
    ("POST", "/v1/detach", {"device": None}, 400, "'device'"),
    ("POST", "/v1/detach", {"device": "9-9"}, 404, "no USB device"),
    ("POST", "/v1/detach", {"device": KBD, "vm": "a"}, 400, "unknown field"),
    ("POST", "/v1/detach", b"x" * 70000, 413, "larger than"),
    ("GET", "/v1/attach", None, 405, "not allowed"),
    ("POST", "/v1/devices", {}, 405, "not allowed"),
    ("DELETE", "/v1/status", None, 405, "not allowed"),
    ("GET", "/v1/nothing", None, 404, "not found"),
    ("GET", "/static/index.html", None, 404, "no asset"),
]


async def test_bad_input_gets_a_clear_4xx_on_every_endpoint(rig: ApiRig) -> None:
    await rig.up()
    await rig.wait_ports("a", {KBD})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    covered = set()
    for method, path, body, want, words in BAD:
        data: bytes | str | None
        if isinstance(body, bytes):
            data, headers = body, {**auth, "Content-Type": "application/json"}
        elif body is None:
            data, headers = None, auth
        else:
            data, headers = json.dumps(body), {**auth, "Content-Type": "application/json"}
        code, h, err = await call(rig, method, path, headers=headers, data=data)
        assert code == want, (method, path, body, code, err)
        assert h["Content-Type"].startswith("application/json"), (method, path)
        assert isinstance(err, dict) and err["error"], (method, path, err)
        assert words in err["error"], (method, path, err)
        covered.add(path.split("?")[0])
    # the reload refuses a broken config with 422 and keeps the running one
    config = rig.config_path.read_text()
    rig.config_path.write_text(config + "\n[[rule]]\nattach = 'nope'\nmatch = 'id 1:*'\n")
    code, _, res = await call(rig, "POST", "/v1/reload", headers=auth)
    assert code == 422 and not res["ok"] and "nope" in res["message"]
    rig.config_path.write_text(config)
    code, _, res = await call(rig, "POST", "/v1/reload", headers=auth)
    assert code == 200 and res["ok"]
    # every endpoint that takes input had its bad input
    takes_input = {"/v1/devices/", "/v1/history", "/v1/health", "/v1/attach", "/v1/detach"}
    assert all(any(c.startswith(t) for c in covered) for t in takes_input)
    # and after all that the keyboard is still where its rule wants it
    assert await rig.ports("a") == {KBD}


def test_token_file_is_made_private_and_refused_when_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token  # read back, not made again
    os.chmod(path, 0o644)  # noqa: PTH101
    with pytest.raises(VmplugError, match="readable by others"):
        load_or_create_token(path)
    path.write_text("short\n")
    os.chmod(path, 0o600)  # noqa: PTH101
    with pytest.raises(VmplugError, match="shorter than 16"):
        load_or_create_token(path)
