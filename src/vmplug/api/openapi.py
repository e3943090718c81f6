"""The OpenAPI 3.0 document of the daemon's HTTP API (served at ``/v1/openapi.json``).

Kept beside the handlers on purpose: ``tests/api`` checks that every route the
server registers is described here and nothing else is, and schemathesis
checks the live server against it.
"""

from __future__ import annotations

from typing import Any

from vmplug import __version__

SELECTOR = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "description": "port (2-2.4.2), vid:pid (046d:c52b), serial, or rule:RULE",
}
NAME = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[A-Za-z0-9_.-]+$"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


STR_N = _nullable({"type": "string"})
NUM_N = _nullable({"type": "number"})
INT_N = _nullable({"type": "integer"})

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "candidates": {"type": "array", "items": {"type": "string"}},
            "vms": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Device": {
        "type": "object",
        "required": ["port", "identity", "qemu_id", "is_hub", "vm", "attached", "state"],
        "properties": {
            "port": {"type": "string"},
            "identity": {"type": "string"},
            "qemu_id": {"type": "string"},
            "busnum": INT_N,
            "devnum": INT_N,
            "vendor_id": STR_N,
            "product_id": STR_N,
            "manufacturer": STR_N,
            "product": STR_N,
            "name": STR_N,
            "serial": STR_N,
            "speed_mbps": NUM_N,
            "is_hub": {"type": "boolean"},
            "host": {**STR_N, "description": "its device host ([host.NAME]); null: this host"},
            "vm": {**STR_N, "description": "the VM the rules (or an override) name"},
            "attached": {**STR_N, "description": "the VM that holds the device now"},
            "state": {
                "type": "string",
                "enum": ["attached", "pending", "retrying", "host", "elsewhere", "held"],
                "description": "host: no VM wanted; elsewhere: held by a VM it is not meant "
                "for; held: a remote device another VM host holds (error says which)",
            },
            "override": {"type": "boolean"},
            "error": STR_N,
        },
        "additionalProperties": True,
    },
    "Vm": {
        "type": "object",
        "required": ["name", "connected", "state", "qmp", "devices"],
        "properties": {
            "name": {"type": "string"},
            "connected": {"type": "boolean"},
            "state": STR_N,
            "qmp": STR_N,
            "kind": STR_N,
            "where": STR_N,
            "devices": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Attachment": {
        "type": "object",
        "required": ["port", "identity", "vm", "qemu_id", "state"],
        "properties": {
            "port": {"type": "string"},
            "identity": {"type": "string"},
            "vm": {"type": "string"},
            "qemu_id": {"type": "string"},
            "hostbus": {"type": "integer"},
            "hostport": {"type": "string"},
            "hostaddr": INT_N,
            "state": {"type": "string", "enum": ["attached", "pending", "retrying"]},
            "attempts": {"type": "integer"},
            "error": STR_N,
        },
    },
    "Rule": {
        "type": "object",
        "required": ["index", "match", "action", "vm"],
        "properties": {
            "index": {"type": "integer"},
            "match": {"type": "string"},
            "action": {"type": "string", "enum": ["attach", "block"]},
            "vm": STR_N,
            "line": INT_N,
        },
    },
    "HistoryEntry": {
        "type": "object",
        "required": ["id", "ts", "entry", "kind"],
        "properties": {
            "id": {"type": "integer"},
            "ts": {"type": "number"},
            "entry": {"type": "string", "enum": ["event", "action"]},
            "kind": {"type": "string"},
            "identity": STR_N,
            "vm": STR_N,
            "port": STR_N,
            "qemu_id": STR_N,
            "result": STR_N,
            "error_class": STR_N,
            "error_message": STR_N,
            "duration_s": NUM_N,
            "attempt": INT_N,
            "detail": _nullable({"type": "object"}),
        },
    },
    "Health": {
        "type": "object",
        "required": ["identity", "uptime", "failures", "mtbf_s", "errors_per_hour"],
        "properties": {
            "identity": {"type": "string"},
            "port": STR_N,
            "name": STR_N,
            "present": {"type": "boolean"},
            "window_start": {"type": "number"},
            "window_end": {"type": "number"},
            "wanted_s": {"type": "number"},
            "up_s": {"type": "number"},
            "uptime": NUM_N,
            "failures": {"type": "integer"},
            "mtbf_s": NUM_N,
            "recoveries": {"type": "integer"},
            "median_recovery_s": NUM_N,
            "worst_recovery_s": NUM_N,
            "ongoing_recovery_s": NUM_N,
            "errors": {"type": "integer"},
            "errors_per_hour": NUM_N,
        },
    },
    "Status": {
        "type": "object",
        "required": ["daemon", "vms", "attachments", "overrides"],
        "properties": {
            "daemon": {"type": "object"},
            "vms": {"type": "object", "additionalProperties": {"type": "object"}},
            "attachments": {"type": "array", "items": {"$ref": "#/components/schemas/Attachment"}},
            "overrides": {"type": "object", "additionalProperties": STR_N},
        },
    },
    "AttachRequest": {
        "type": "object",
        "required": ["device", "vm"],
        "properties": {"device": SELECTOR, "vm": NAME},
        "additionalProperties": False,
    },
    "DetachRequest": {
        "type": "object",
        "required": ["device"],
        "properties": {"device": SELECTOR},
        "additionalProperties": False,
    },
    "AttachResult": {
        "type": "object",
        "required": ["device", "vm", "state"],
        "properties": {
            "device": {"type": "string"},
            "vm": {"type": "string"},
            "state": {"type": "string", "enum": ["attached", "retrying", "pending"]},
            "error": {"type": "string"},
            "attempts": {"type": "integer"},
        },
    },
    "DetachResult": {
        "type": "object",
        "required": ["device", "vms"],
        "properties": {
            "device": {"type": "string"},
            "vms": {"type": "object", "additionalProperties": {"type": "object"}},
        },
    },
    "ReloadResult": {
        "type": "object",
        "required": ["ok", "message"],
        "properties": {"ok": {"type": "boolean"}, "message": {"type": "string"}},
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


UNAUTH = {"401": _err("no or wrong token (TCP listener only)")}
BAD = {"400": _err("invalid input")}
FORBIDDEN = {"403": _err("cross-site request: missing CSRF token or foreign Origin")}


def _get(summary: str, ok: dict[str, Any], params: list[Any] | None = None, **more: Any) -> Any:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **UNAUTH, **more}}
    if params:
        op["parameters"] = params
    return {"get": op}


def _post(summary: str, body: str, ok: dict[str, Any], **more: Any) -> Any:
    return {
        "post": {
            "summary": summary,
            "parameters": [_csrf_param()],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body)}},
            },
            "responses": {"200": ok, **UNAUTH, **BAD, **FORBIDDEN, **more},
        }
    }


def _csrf_param() -> dict[str, Any]:
    return {
        "name": "X-CSRF-Token",
        "in": "header",
        "required": False,
        "description": "the page's CSRF token; required with cookie authentication",
        "schema": {"type": "string"},
    }


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


DEVICE_Q = _q(
    "device", SELECTOR, "only this device: a selector of a present one, or a stored identity"
)


def document() -> dict[str, Any]:
    html = {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
    paths: dict[str, Any] = {
        "/v1/status": _get("Daemon, VMs, attachments and overrides", _json(_ref("Status"), "ok")),
        "/v1/devices": _get(
            "Host USB devices, where each is meant to be and where it is",
            _json({"type": "array", "items": _ref("Device")}, "ok"),
        ),
        "/v1/devices/{device}": _get(
            "One device",
            _json(_ref("Device"), "ok"),
            [{"name": "device", "in": "path", "required": True, "schema": SELECTOR}],
            **BAD,
            **{"404": _err("no such device")},
        ),
        "/v1/vms": _get(
            "Configured VMs and the devices each holds",
            _json({"type": "array", "items": _ref("Vm")}, "ok"),
        ),
        "/v1/attachments": _get(
            "Every attachment the rules and overrides ask for, and its state",
            _json({"type": "array", "items": _ref("Attachment")}, "ok"),
        ),
        "/v1/rules": _get(
            "The rules of the running config, in order",
            _json({"type": "array", "items": _ref("Rule")}, "ok"),
        ),
        "/v1/history": _get(
            "Journal of events and actions, oldest first",
            _json({"type": "array", "items": _ref("HistoryEntry")}, "ok"),
            [
                DEVICE_Q,
                _q(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
                    "newest entries",
                ),
            ],
            **BAD,
            **{"404": _err("no such device, present or in the history")},
            **{"503": _err("no history database")},
        ),
        "/v1/health": _get(
            "Health figures per device over a window ending now",
            _json({"type": "array", "items": _ref("Health")}, "ok"),
            [
                DEVICE_Q,
                _q(
                    "window",
                    {"type": "number", "minimum": 1, "maximum": 31622400, "default": 604800},
                    "seconds before now",
                ),
            ],
            **BAD,
            **{"404": _err("no such device, present or in the history")},
            **{"503": _err("no history database")},
        ),
        "/v1/attach": _post(
            "Attach (or move) a device to a VM until the daemon stops",
            "AttachRequest",
            _json(_ref("AttachResult"), "what became of it within 10 s"),
            **{"404": _err("no such device or VM")},
        ),
        "/v1/detach": _post(
            "Keep a device on the host until the daemon stops",
            "DetachRequest",
            _json(_ref("DetachResult"), "what became of it within 10 s"),
            **{"404": _err("no such device")},
        ),
        "/v1/reload": {
            "post": {
                "summary": "Re-read the config file (an invalid one is refused)",
                "parameters": [_csrf_param()],
                "responses": {
                    "200": _json(_ref("ReloadResult"), "reloaded"),
                    "422": _json(_ref("ReloadResult"), "refused; the running config stays"),
                    **UNAUTH,
                    **FORBIDDEN,
                },
            }
        },
        "/v1/events": _get(
            "Server-Sent Events: every event and action as the daemon records it "
            "(event: event|action|resync, data: one JSON object)",
            {"description": "an endless stream", "content": {"text/event-stream": {}}},
        ),
        "/v1/export": _get(
            "A device host's exportable devices: endpoint port, present, holder "
            "(over mutual TLS, the client certificate is the credential)",
            _json({"type": "object"}, "the export list; ETag over its content"),
            [
                _q(
                    "wait",
                    {"type": "number", "minimum": 0, "maximum": 25, "default": 0},
                    "with If-None-Match: seconds to wait for a change (then 304)",
                )
            ],
            **{
                "304": {"description": "unchanged (If-None-Match)"},
                "403": _err("not over mutual TLS, or a client certificate not allowed"),
                "404": _err("this host exports nothing (no [export])"),
            },
        ),
        "/v1/openapi.json": _get(
            "This document", _json({"type": "object"}, "OpenAPI 3.0 document")
        ),
        "/metrics": _get(
            "Prometheus metrics",
            {"description": "text exposition format", "content": {"text/plain": {}}},
        ),
        "/": _get(
            "The web page (a login form without a session)",
            html,
            [_q("token", {"type": "string", "maxLength": 256}, "trade the token for a session")],
            **{
                "303": {"description": "session made; go to /"},
                "401": {"description": "wrong token: the login form", "content": {"text/html": {}}},
            },
        ),
        "/login": {
            "post": {
                "summary": "Trade the token for a browser session",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string", "maxLength": 256}},
                            }
                        }
                    },
                },
                "responses": {
                    "303": {"description": "session made; go to /"},
                    "401": {"description": "wrong token", "content": {"text/html": {}}},
                    **FORBIDDEN,
                },
            }
        },
        "/static/{name}": _get(
            "The page's script and style sheet",
            {
                "description": "asset",
                "content": {"text/css": {}, "application/javascript": {}},
            },
            [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["app.js", "app.css"]},
                }
            ],
            **{"404": _err("no such asset")},
        ),
    }
    paths["/"]["get"]["security"] = [{}, {"bearer": []}, {"session": []}]
    paths["/static/{name}"]["get"]["security"] = []
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "vmplug daemon API",
            "version": __version__,
            "description": (
                "On the unix socket no authentication (file permissions decide). "
                "On the loopback TCP listener every request needs the bearer token, or "
                "the session cookie the page gets for it; changes made with the cookie "
                "also need X-CSRF-Token and a same-origin Origin."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"session": []}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "vmplug_session"},
            },
        },
        "paths": paths,
    }
