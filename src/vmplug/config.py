"""vmplug's TOML configuration, validated into typed, frozen models.

```toml
[vm.windows]
qmp = "/srv/windows/qmp/qmp.sock"    # or "tcp:127.0.0.1:4444"

[[rule]]
attach = "windows"
match  = 'id 1235:821a'

[[rule]]
block = true
match = 'with-interface 03:01:01'
```

Every error names the file, the line and column when there is one, and what
was expected.  Loading never changes anything: a caller that holds a valid
config keeps it when a new one fails to load.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmplug.engine.remedy import AlertConfig, HealPolicy, parse_alerts, parse_policy
from vmplug.errors import UsageError
from vmplug.model import UsbDevice
from vmplug.rules import Rule, RuleSyntaxError, first_match, parse_rule

DEFAULT_PATH = Path("/etc/vmplug/vmplug.toml")
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CONTAINER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_TCP = re.compile(r"^tcp:(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class ConfigError(UsageError):
    """The configuration file is missing, unreadable or invalid (bad input)."""

    def __init__(
        self,
        path: Path | str,
        message: str,
        line: int | None = None,
        column: int | None = None,
        excerpt: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = str(path)
        self.message = message
        self.line = line
        self.column = column
        self.excerpt = excerpt

    def render(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        text = f"{where}: error: {self.message}"
        if self.excerpt is not None and self.column is not None:
            text += f"\n  {self.excerpt}\n  {' ' * (self.column - 1)}^"
        return text


# The config's dataclasses are frozen without ``slots=True``: a handful of
# objects per config, and slots made each class twice over at import (the
# dataclass, then its slotted copy): ~0.1 s of ``vmplug run``'s start in the lab
# guest under TCG (issue 16).

#: The keys that say where a VM is; a ``[vm.NAME]`` has exactly one of them.
VM_KINDS = ("qmp", "libvirt", "container", "proxmox")


@dataclass(frozen=True)
class VmConfig:
    """A VM vmplug manages: a QMP socket, a libvirt domain, a QEMU container or a
    Proxmox VMID (exactly one; :attr:`kind` says which)."""

    name: str
    #: QMP socket path or tcp:HOST:PORT ("" for the other kinds)
    qmp: str = ""
    shared: bool = False
    usb_bus: str | None = None
    add_controller: bool = False
    #: libvirt domain name
    libvirt: str = ""
    #: Docker/Podman container name or id (dockurr/windows and other QEMU images)
    container: str = ""
    #: Proxmox VE VMID (its QMP socket is /var/run/qemu-server/VMID.qmp)
    proxmox: int | None = None
    #: libvirt: connection URI (default qemu:///system); container: the Docker or
    #: Podman API socket (unix:///var/run/docker.sock)
    uri: str | None = None
    #: libvirt: also write attached devices into the domain's persistent config
    persist: bool = False
    #: ``heal = false``: the healing ladder never touches this VM's devices
    heal: bool = True

    @property
    def kind(self) -> str:
        """``qmp``, ``libvirt``, ``container`` or ``proxmox``."""
        if self.libvirt:
            return "libvirt"
        if self.container:
            return "container"
        if self.proxmox is not None:
            return "proxmox"
        return "qmp"

    @property
    def where(self) -> str:
        """What the VM is, for people: the socket, domain, container or VMID."""
        kind = self.kind
        if kind == "qmp":
            return self.qmp
        if kind == "proxmox":
            return f"proxmox:{self.proxmox}"
        return f"{kind}:{self.libvirt or self.container}"

    @property
    def is_tcp(self) -> bool:
        return self.qmp.startswith("tcp:")


@dataclass(frozen=True)
class RuleConfig:
    """One ``[[rule]]``: a match and its target (a VM, or block)."""

    index: int
    rule: Rule
    attach: str | None
    block: bool
    line: int | None = None
    #: ``heal = false``: the healing ladder never touches this rule's devices
    heal: bool = True

    @property
    def target(self) -> str:
        return "block" if self.block else f"attach to {self.attach}"


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/vmplug/vmplug.sock"
    database: str = "/var/lib/vmplug/vmplug.db"
    #: seconds between the guest-agent probes (daemon.guestwatch); 0: off
    guest_check_interval: float = 0.0


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the HTTP API beyond the unix socket (off unless ``listen`` is set)."""

    #: "127.0.0.1:PORT" or "[::1]:PORT": loopback TCP with a bearer token
    listen: str | None = None
    #: file holding the bearer token (created, mode 0600, when missing)
    token_file: str | None = None
    #: group allowed on the unix socket (mode 0660) besides root
    group: str | None = None
    #: open connections per listener (unix socket, TCP port), and from one client
    #: (an IP address; a uid on the unix socket): one more is answered 503
    max_connections: int = 256
    max_connections_per_client: int = 64
    #: /v1/events subscribers per listener, and from one client
    max_streams: int = 64
    max_streams_per_client: int = 16
    #: seconds a new connection has to send its first request's headers
    header_timeout: float = 10.0
    #: seconds a keep-alive connection may wait idle for its next request
    idle_timeout: float = 30.0


@dataclass(frozen=True)
class ExportDeviceConfig:
    """``[export.device.NAME]``: one device that may leave this host."""

    name: str
    #: the device's sysfs port path on this host ("2-1", "3-1.4")
    port_path: str
    #: the TCP port its endpoint listens on
    port: int
    #: vendor and product it must have (another device in the socket is not sent)
    vendor: int | None = None
    product: int | None = None


@dataclass(frozen=True)
class ExportRule:
    """One ``[[export.rule]]``: devices it matches may leave this host (or,
    with ``block = true``, may not).  The first matching rule decides."""

    rule: Rule
    block: bool = False
    line: int | None = None


#: ``[export] ports``: the TCP ports endpoints made by rules take
DEFAULT_EXPORT_PORTS = (7100, 7199)
#: ``[host.NAME] api_port``: where a device host's API listens (``[api] listen``)
DEFAULT_DEVICE_HOST_API_PORT = 7200


@dataclass(frozen=True)
class ExportConfig:
    """``[export]``: this host is a device host (see vmplug.remote.export).

    Which devices may leave is given by ``[[export.rule]]`` (vmplug's rule
    language; each present device that a rule allows gets an endpoint on a
    port of ``ports``, the same port for the same device identity) and by
    static ``[export.device.NAME]`` tables (a port path on a pinned port).
    """

    #: this host's name: its certificate is CERTS/NAME-cert.pem
    name: str
    #: directory with ca-cert.pem, NAME-cert.pem, NAME-key.pem (None only with insecure)
    certs: str | None
    #: address the endpoints listen on
    listen: str = "0.0.0.0"  # noqa: S104 (a device host serves its LAN)
    #: VM host names (their certificates' names) that may connect; empty: any the CA signed
    allow: tuple[str, ...] = ()
    #: plaintext usbredir, no authentication (lab networks only)
    insecure: bool = False
    devices: tuple[ExportDeviceConfig, ...] = ()
    rules: tuple[ExportRule, ...] = ()
    #: first and last TCP port of the endpoints made by rules
    ports: tuple[int, int] = DEFAULT_EXPORT_PORTS

    def allows(self, device: UsbDevice) -> bool:
        """The first ``[[export.rule]]`` that matches says; none: stays here.
        Hubs never leave (usbredir cannot carry one)."""
        if device.is_hub or device.is_root_hub or device.host is not None:
            return False
        index = first_match([r.rule for r in self.rules], device)
        return index is not None and not self.rules[index].block


@dataclass(frozen=True)
class RemoteHostConfig:
    """``[host.NAME]``: a device host this VM host takes devices from."""

    name: str
    #: DNS name or IP address the VM host dials (the device host's certificate must carry it)
    address: str
    #: directory with ca-cert.pem, ME-cert.pem, ME-key.pem (None only with insecure)
    certs: str | None
    #: this VM host's own name (its certificate), default "vmhost"
    me: str = "vmhost"
    insecure: bool = False
    #: seconds between QEMU's reconnects
    reconnect: int = 1
    #: remote device name -> TCP port of its endpoint (the static, pinned form)
    devices: Mapping[str, int] = field(default_factory=dict)
    #: the device host's API port (mutual TLS): its export list, polled
    api_port: int = DEFAULT_DEVICE_HOST_API_PORT


@dataclass(frozen=True)
class Config:
    path: str
    vms: Mapping[str, VmConfig]
    rules: tuple[RuleConfig, ...]
    daemon: DaemonConfig = DaemonConfig()
    api: ApiConfig = ApiConfig()
    export: ExportConfig | None = None
    hosts: Mapping[str, RemoteHostConfig] = field(default_factory=dict)
    #: ``[heal]`` and ``[[alert]]`` (vmplug.engine.remedy)
    heal: HealPolicy = field(default_factory=HealPolicy)
    alerts: tuple[AlertConfig, ...] = ()

    def decide(self, device: UsbDevice) -> RuleConfig | None:
        """The first rule that matches the device (``None``: stays on the host).

        Hubs never match: QEMU cannot pass a hub through.
        """
        if device.is_hub or device.is_root_hub:
            return None
        index = first_match([rc.rule for rc in self.rules], device)
        return None if index is None else self.rules[index]


def config_path(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``VMPLUG_CONFIG``, else ``/etc/vmplug/vmplug.toml``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("VMPLUG_CONFIG") or DEFAULT_PATH)


class _Locator:
    """Finds where tables and keys stand in the TOML text (tomllib gives no positions)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (line number, header text, is_array) for every table header
        self.headers: list[tuple[int, str, bool]] = []
        for n, line in enumerate(self.lines, 1):
            m = self._HEADER.match(line)
            if m:
                self.headers.append((n, re.sub(r"\s+", "", m.group(2)), m.group(1) == "[["))

    def table(self, header: str, occurrence: int = 0, array: bool = False) -> int | None:
        found = [n for n, h, a in self.headers if h == header and a == array]
        return found[occurrence] if occurrence < len(found) else None

    def first_header(self, key: str) -> int | None:
        """Line of the first table header under the top-level ``key``."""
        for n, header, _ in self.headers:
            if header == key or header.startswith((f"{key}.", f'"{key}".')):
                return n
        return None

    def key(self, table_line: int | None, key: str) -> tuple[int, int] | None:
        """(line, column of the value) of ``key = …`` inside the table at table_line."""
        if table_line is None:
            return None
        pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*)")
        for n in range(table_line + 1, len(self.lines) + 1):
            line = self.lines[n - 1]
            if self._HEADER.match(line):
                return None
            m = pattern.match(line)
            if m:
                return n, len(m.group(1)) + 1
        return None

    def excerpt(self, line: int | None) -> str | None:
        if line is None or not 0 < line <= len(self.lines):
            return None
        return self.lines[line - 1]


_VM_KEYS = {*VM_KINDS, "shared", "usb_bus", "add_controller", "uri", "persist", "heal"}
_RULE_KEYS = {"attach", "block", "match", "comment", "heal"}
_DAEMON_KEYS = {"socket", "database", "guest_check_interval"}
#: the [api] bounds: key -> (type, least value)
_API_BOUNDS: dict[str, tuple[type, float]] = {
    "max_connections": (int, 1),
    "max_connections_per_client": (int, 1),
    "max_streams": (int, 0),
    "max_streams_per_client": (int, 0),
    "header_timeout": (float, 0.1),
    "idle_timeout": (float, 0.1),
}
_API_KEYS = {"listen", "token_file", "group", *_API_BOUNDS}
_TOP_KEYS = {"vm", "rule", "daemon", "api", "export", "host", "heal", "alert"}
_EXPORT_KEYS = {"name", "certs", "listen", "allow", "insecure", "device", "rule", "ports"}
_EXPORT_RULE_KEYS = {"match", "block", "comment"}
_EXPORT_DEVICE_KEYS = {"port_path", "port", "vendor", "product"}
_HOST_KEYS = {"address", "certs", "me", "insecure", "reconnect", "devices", "api_port"}
_PORT_PATH = re.compile(r"^[0-9]+-[0-9]+(\.[0-9]+)*$")
_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[0-9.]+|localhost):(?P<port>\d{1,5})$")


def _type_name(value: object) -> str:
    return {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


class _Loader:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.loc = _Locator(text)

    def error(
        self, message: str, where: tuple[int, int] | int | None = None, col: int | None = None
    ) -> ConfigError:
        line: int | None
        if isinstance(where, tuple):
            line, col = where
        else:
            line = where
        return ConfigError(self.path, message, line, col, self.loc.excerpt(line))

    def unknown_keys(
        self, table: Mapping[str, Any], allowed: Iterable[str], what: str, line: int | None
    ) -> None:
        for key in table:
            if key not in allowed:
                where = self.loc.key(line, key) or line
                if line == 0:  # top level: a stray key, or a table header
                    where = self.loc.key(0, key) or self.loc.first_header(key)
                expected = ", ".join(sorted(allowed))
                raise self.error(
                    f"unknown key {key!r} in {what} (expected one of: {expected})", where
                )

    def typed(
        self, table: Mapping[str, Any], key: str, kind: type, what: str, line: int | None
    ) -> Any:
        value = table.get(key)
        if (value is not None and not isinstance(value, kind)) or (
            kind is int and isinstance(value, bool)
        ):
            where = self.loc.key(line, key) or line
            raise self.error(
                f"{what}: {key} must be {_type_name(kind())}, not {_type_name(value)}", where
            )
        return value

    def vm(self, name: str, table: Any) -> VmConfig:
        line = self.loc.table(f"vm.{name}") or self.loc.table(f'vm."{name}"')
        what = f"[vm.{name}]"
        if not isinstance(table, dict):
            raise self.error(f"{what} must be a table", line)
        if not _VM_NAME.match(name):
            raise self.error(
                f"VM name {name!r}: use letters, digits, '_', '.', '-' (at most 64)", line
            )
        self.unknown_keys(table, _VM_KEYS, what, line)
        kinds = [k for k in VM_KINDS if k in table]
        choices = (
            'qmp = "PATH" | "tcp:HOST:PORT", libvirt = "DOMAIN", container = "NAME", proxmox = VMID'
        )
        if not kinds:
            raise self.error(f"{what}: missing qmp (give exactly one of {choices})", line)
        if len(kinds) > 1:
            raise self.error(
                f"{what}: give exactly one of {choices} (it has {' and '.join(kinds)})",
                self.loc.key(line, kinds[1]) or line,
            )
        kind = kinds[0]

        def at(key: str) -> tuple[int, int] | int | None:
            return self.loc.key(line, key) or line

        qmp = ""
        libvirt = ""
        container = ""
        proxmox: int | None = None
        if kind == "qmp":
            qmp = self.typed(table, "qmp", str, what, line)
            if not qmp:
                raise self.error(f'{what}: missing qmp = "PATH" or "tcp:HOST:PORT"', at("qmp"))
            if qmp.startswith("tcp:"):
                m = _TCP.match(qmp)
                if not m or not 0 < int(m.group("port")) < 65536:
                    raise self.error(f"{what}: qmp {qmp!r} is not tcp:HOST:PORT", at("qmp"))
            elif not qmp.startswith("/"):
                raise self.error(f"{what}: qmp socket path {qmp!r} must be absolute", at("qmp"))
        elif kind == "libvirt":
            libvirt = self.typed(table, "libvirt", str, what, line)
            if not libvirt.strip():
                raise self.error(f'{what}: libvirt = "DOMAIN" names no domain', at("libvirt"))
        elif kind == "container":
            container = self.typed(table, "container", str, what, line)
            if not _CONTAINER.match(container):
                raise self.error(
                    f"{what}: container {container!r} is not a container name or id",
                    at("container"),
                )
        else:
            proxmox = self.typed(table, "proxmox", int, what, line)
            if proxmox is None or not 100 <= proxmox <= 999_999_999:
                raise self.error(
                    f"{what}: proxmox = {proxmox} is not a Proxmox VMID (100 ... 999999999)",
                    at("proxmox"),
                )
        uri = self.typed(table, "uri", str, what, line)
        if uri is not None and kind not in ("libvirt", "container"):
            raise self.error(
                f"{what}: uri applies to libvirt (connection URI) and container "
                "(the Docker/Podman API socket) VMs only",
                at("uri"),
            )
        if uri is not None and kind == "container" and not uri.startswith(("unix://", "/")):
            raise self.error(
                f"{what}: uri {uri!r}: the Docker/Podman API is reached over a unix socket "
                "(unix:///var/run/docker.sock)",
                at("uri"),
            )
        persist = self.typed(table, "persist", bool, what, line)
        if persist is not None and kind != "libvirt":
            raise self.error(f"{what}: persist applies to libvirt VMs only", at("persist"))
        shared = self.typed(table, "shared", bool, what, line)
        if kind == "proxmox" and shared is False:
            raise self.error(
                f"{what}: a Proxmox VM's QMP socket is also used by Proxmox's own tools, "
                "so vmplug always shares it (remove shared = false)",
                at("shared"),
            )
        if kind == "libvirt" and shared is not None:
            raise self.error(
                f"{what}: shared applies to QMP sockets; libvirt serves many clients",
                at("shared"),
            )
        add_controller = self.typed(table, "add_controller", bool, what, line)
        if kind == "libvirt" and add_controller is not None:
            raise self.error(
                f"{what}: add_controller applies to QMP VMs; give the domain a "
                "<controller type='usb' model='qemu-xhci'/> instead",
                at("add_controller"),
            )
        usb_bus = self.typed(table, "usb_bus", str, what, line)
        if kind == "libvirt" and usb_bus is not None:
            raise self.error(
                f"{what}: usb_bus applies to QMP VMs; libvirt places a <hostdev> on the "
                "domain's USB controller itself",
                at("usb_bus"),
            )
        return VmConfig(
            name=name,
            qmp=qmp,
            shared=bool(shared) or kind == "proxmox",
            usb_bus=usb_bus,
            add_controller=bool(add_controller),
            libvirt=libvirt,
            container=container,
            proxmox=proxmox,
            uri=uri,
            persist=bool(persist),
            heal=self.typed(table, "heal", bool, what, line) is not False,
        )

    def rule(self, index: int, table: Any, vms: Mapping[str, VmConfig]) -> RuleConfig:
        line = self.loc.table("rule", index, array=True)
        what = f"rule #{index + 1}"
        if not isinstance(table, dict):
            raise self.error(f"{what} must be a table", line)
        self.unknown_keys(table, _RULE_KEYS, what, line)
        text = self.typed(table, "match", str, what, line)
        attach = self.typed(table, "attach", str, what, line)
        block = self.typed(table, "block", bool, what, line)
        if text is None:
            raise self.error(f"{what}: missing match = 'RULE'", line)
        if (attach is None) == (not block):
            raise self.error(f'{what}: give exactly one of attach = "VM" or block = true', line)
        if attach is not None and attach not in vms:
            known = ", ".join(sorted(vms)) or "none defined"
            where = self.loc.key(line, "attach") or line
            raise self.error(
                f"{what}: attach names VM {attach!r}, which has no [vm.{attach}] table "
                f"(VMs: {known})",
                where,
            )
        rule = self.match_rule(text, what, line)
        heal = self.typed(table, "heal", bool, what, line) is not False
        return RuleConfig(
            index=index, rule=rule, attach=attach, block=bool(block), line=line, heal=heal
        )

    def match_rule(self, text: str, what: str, line: int | None) -> Rule:
        try:
            return parse_rule(text)
        except RuleSyntaxError as exc:
            where = self.loc.key(line, "match")
            if where is None:
                raise self.error(f"{what}: {exc.message}", line) from None
            mline, mcol = where
            # Point into the rule text when it sits on one line after its quote.
            excerpt = self.loc.excerpt(mline) or ""
            if exc.line == 1 and excerpt[mcol - 1 : mcol] in ("'", '"'):
                mcol += 1 + exc.column
            raise self.error(f"{what}: bad match rule: {exc.message}", mline, mcol) from None

    def load(self, data: Mapping[str, Any]) -> Config:
        self.unknown_keys(data, _TOP_KEYS, "the top level", 0)
        vm_tables = data.get("vm", {})
        if not isinstance(vm_tables, dict):
            raise self.error("vm must be tables: [vm.NAME]", self.loc.key(0, "vm"))
        vms = {name: self.vm(name, table) for name, table in vm_tables.items()}
        rule_tables = data.get("rule", [])
        if not isinstance(rule_tables, list):
            where = self.loc.key(0, "rule") or self.loc.table("rule")
            raise self.error("rule must be an array of tables: [[rule]]", where)
        rules = tuple(self.rule(i, t, vms) for i, t in enumerate(rule_tables))
        daemon_table = data.get("daemon", {})
        line = self.loc.table("daemon")
        if not isinstance(daemon_table, dict):
            raise self.error("daemon must be a table: [daemon]", self.loc.key(0, "daemon"))
        self.unknown_keys(daemon_table, _DAEMON_KEYS, "[daemon]", line)
        defaults = DaemonConfig()
        guest_every = daemon_table.get("guest_check_interval", 0.0)
        if (
            isinstance(guest_every, bool)
            or not isinstance(guest_every, int | float)
            or guest_every < 0
        ):
            raise self.error(
                "[daemon]: guest_check_interval must be seconds >= 0 (0: off)",
                self.loc.key(line, "guest_check_interval") or line,
            )
        daemon = DaemonConfig(
            guest_check_interval=float(guest_every),
            socket=self.typed(daemon_table, "socket", str, "[daemon]", line) or defaults.socket,
            database=self.typed(daemon_table, "database", str, "[daemon]", line)
            or defaults.database,
        )
        export = self.export(data)
        return Config(
            path=str(self.path),
            vms=vms,
            rules=rules,
            daemon=daemon,
            api=self.api(data, export),
            export=export,
            hosts=self.hosts(data),
            **self.remedy(data),
        )

    def remedy(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """``[heal]`` and ``[[alert]]``, validated by vmplug.engine.remedy."""
        heal, alerts = data.get("heal", {}), data.get("alert", [])
        if not isinstance(heal, dict):
            raise self.error("heal must be a table: [heal]", self.loc.key(0, "heal"))
        if not isinstance(alerts, list):
            where = self.loc.key(0, "alert")
            raise self.error("alert must be an array of tables: [[alert]]", where)
        try:
            policy = parse_policy(heal)
        except ValueError as exc:
            raise self.error(str(exc), self.loc.table("heal")) from None
        try:
            parsed = parse_alerts(alerts)
        except ValueError as exc:
            raise self.error(str(exc), self.loc.table("alert", 0, array=True)) from None
        return {"heal": policy, "alerts": parsed}

    def _port(self, value: object, what: str, key: str, line: int | None) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            where = self.loc.key(line, key) or line
            raise self.error(f"{what}: {key} must be a TCP port 1..65535, not {value!r}", where)
        return value

    def _certs(self, table: Mapping[str, Any], what: str, line: int | None) -> str | None:
        certs = self.typed(table, "certs", str, what, line)
        insecure = self.typed(table, "insecure", bool, what, line) or False
        if certs is None and not insecure:
            raise self.error(
                f'{what}: certs = "DIR" is needed (mutual TLS), or insecure = true '
                "for a lab network",
                line,
            )
        if certs is not None and not certs.startswith("/"):
            raise self.error(
                f"{what}: certs {certs!r} must be absolute", self.loc.key(line, "certs")
            )
        return str(certs) if certs is not None else None

    def export(self, data: Mapping[str, Any]) -> ExportConfig | None:
        table = data.get("export")
        if table is None:
            return None
        line = self.loc.table("export")
        if not isinstance(table, dict):
            raise self.error("export must be a table: [export]", self.loc.key(0, "export"))
        self.unknown_keys(table, _EXPORT_KEYS, "[export]", line)
        name = self.typed(table, "name", str, "[export]", line) or os.uname().nodename
        allow = table.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise self.error(
                "[export]: allow must be a list of host names", self.loc.key(line, "allow")
            )
        devices: list[ExportDeviceConfig] = []
        dev_tables = table.get("device", {})
        if not isinstance(dev_tables, dict):
            raise self.error("[export]: device must be tables: [export.device.NAME]", line)
        for dev_name, dev in dev_tables.items():
            what = f"[export.device.{dev_name}]"
            dline = self.loc.table(f"export.device.{dev_name}") or line
            if not isinstance(dev, dict):
                raise self.error(f"{what} must be a table", dline)
            self.unknown_keys(dev, _EXPORT_DEVICE_KEYS, what, dline)
            port_path = self.typed(dev, "port_path", str, what, dline)
            if port_path is None or not _PORT_PATH.match(port_path):
                raise self.error(f'{what}: port_path = "BUS-PORT[.PORT...]" (like "2-1")', dline)
            ids: dict[str, int | None] = {}
            for key in ("vendor", "product"):
                raw = self.typed(dev, key, str, what, dline)
                if raw is not None and not re.fullmatch(r"[0-9a-fA-F]{4}", raw):
                    raise self.error(f'{what}: {key} must be 4 hex digits ("0627")', dline)
                ids[key] = None if raw is None else int(raw, 16)
            devices.append(
                ExportDeviceConfig(
                    dev_name,
                    port_path,
                    self._port(dev.get("port"), what, "port", dline),
                    ids["vendor"],
                    ids["product"],
                )
            )
        ports = [d.port for d in devices]
        if len(ports) != len(set(ports)):
            raise self.error("[export]: two devices on the same port", line)
        rule_tables = table.get("rule", [])
        if not isinstance(rule_tables, list):
            raise self.error("[export]: rule must be an array of tables: [[export.rule]]", line)
        rules: list[ExportRule] = []
        for i, rt in enumerate(rule_tables):
            what = f"[[export.rule]] #{i + 1}"
            rline = self.loc.table("export.rule", i, array=True) or line
            if not isinstance(rt, dict):
                raise self.error(f"{what} must be a table", rline)
            self.unknown_keys(rt, _EXPORT_RULE_KEYS, what, rline)
            text = self.typed(rt, "match", str, what, rline)
            if text is None:
                raise self.error(f"{what}: missing match = 'RULE'", rline)
            block = self.typed(rt, "block", bool, what, rline) or False
            rules.append(ExportRule(self.match_rule(text, what, rline), block, rline))
        span = DEFAULT_EXPORT_PORTS
        raw_ports = self.typed(table, "ports", str, "[export]", line)
        if raw_ports is not None:
            m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", raw_ports)
            where = self.loc.key(line, "ports") or line
            if not m or not 0 < int(m.group(1)) <= int(m.group(2)) < 65536:
                raise self.error(
                    f'[export]: ports {raw_ports!r} is not "FIRST-LAST" (like "7100-7199")', where
                )
            span = (int(m.group(1)), int(m.group(2)))
            if any(span[0] <= p <= span[1] for p in ports):
                raise self.error(
                    "[export]: a [export.device.NAME] port lies in ports (the rules' range)",
                    where,
                )
        return ExportConfig(
            name=name,
            certs=self._certs(table, "[export]", line),
            listen=self.typed(table, "listen", str, "[export]", line) or "0.0.0.0",  # noqa: S104
            allow=tuple(allow),
            insecure=self.typed(table, "insecure", bool, "[export]", line) or False,
            devices=tuple(devices),
            rules=tuple(rules),
            ports=span,
        )

    def hosts(self, data: Mapping[str, Any]) -> dict[str, RemoteHostConfig]:
        tables = data.get("host", {})
        if not isinstance(tables, dict):
            raise self.error("host must be tables: [host.NAME]", self.loc.key(0, "host"))
        out: dict[str, RemoteHostConfig] = {}
        for name, table in tables.items():
            what = f"[host.{name}]"
            line = self.loc.table(f"host.{name}")
            if not isinstance(table, dict):
                raise self.error(f"{what} must be a table", line)
            if not _VM_NAME.match(name):
                raise self.error(f"host name {name!r}: use letters, digits, '_', '.', '-'", line)
            self.unknown_keys(table, _HOST_KEYS, what, line)
            address = self.typed(table, "address", str, what, line)
            if not address:
                raise self.error(f'{what}: address = "HOST" is needed', line)
            devices = table.get("devices", {})
            if not isinstance(devices, dict):
                raise self.error(f"{what}: devices must be a table: NAME = PORT", line)
            ports = {k: self._port(v, what, k, line) for k, v in devices.items()}
            reconnect = self.typed(table, "reconnect", int, what, line)
            if reconnect is not None and not 1 <= reconnect <= 3600:
                raise self.error(f"{what}: reconnect must be 1..3600 s", line)
            api_port = table.get("api_port")
            out[name] = RemoteHostConfig(
                name=name,
                address=address,
                certs=self._certs(table, what, line),
                me=self.typed(table, "me", str, what, line) or "vmhost",
                insecure=self.typed(table, "insecure", bool, what, line) or False,
                reconnect=reconnect or 1,
                devices=ports,
                api_port=DEFAULT_DEVICE_HOST_API_PORT
                if api_port is None
                else self._port(api_port, what, "api_port", line),
            )
        return out

    def api(self, data: Mapping[str, Any], export: ExportConfig | None = None) -> ApiConfig:
        table = data.get("api", {})
        line = self.loc.table("api")
        if not isinstance(table, dict):
            raise self.error("api must be a table: [api]", self.loc.key(0, "api"))
        self.unknown_keys(table, _API_KEYS, "[api]", line)
        listen = self.typed(table, "listen", str, "[api]", line)
        if listen is not None:
            where = self.loc.key(line, "listen") or line
            m = _LISTEN.match(listen)
            if not m or not 0 < int(m.group("port")) < 65536:
                raise self.error(f"[api]: listen {listen!r} is not HOST:PORT", where)
            host = m.group("host").strip("[]")
            if host not in ("localhost", "::1") and not host.startswith("127.") and export is None:
                raise self.error(
                    f"[api]: listen {listen!r}: vmplug listens on loopback only "
                    "(127.0.0.1 or [::1]) unless this host is a device host ([export]: "
                    "then the listener takes mutual TLS); put a TLS proxy in front "
                    "for anything else",
                    where,
                )
        token_file = self.typed(table, "token_file", str, "[api]", line)
        if token_file is not None and not token_file.startswith("/"):
            where = self.loc.key(line, "token_file") or line
            raise self.error(f"[api]: token_file {token_file!r} must be absolute", where)
        bounds: dict[str, Any] = {}
        for key, (kind, least) in _API_BOUNDS.items():
            value = table.get(key)
            if value is None:
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            self.typed({key: value}, key, kind, "[api]", line)
            if value < least:
                where = self.loc.key(line, key) or line
                raise self.error(f"[api]: {key} must be at least {least:g}, not {value}", where)
            bounds[key] = value
        return ApiConfig(
            listen=listen,
            token_file=token_file,
            group=self.typed(table, "group", str, "[api]", line),
            **bounds,
        )


def parse_config(text: str, path: Path | str = "<config>") -> Config:
    """Validate TOML text into a :class:`Config`; raises :class:`ConfigError`."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line L, column C)"; keep its words, add our format.
        m = re.search(r"\(at line (\d+), column (\d+)\)$", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)$", "", str(exc))
        message = f"invalid TOML: {message[:1].lower()}{message[1:]}"
        if m:
            line, col = int(m.group(1)), int(m.group(2))
            lines = text.splitlines()
            excerpt = lines[line - 1] if 0 < line <= len(lines) else None
            raise ConfigError(path, message, line, col, excerpt) from None
        raise ConfigError(path, message) from None
    return _Loader(path, text).load(data)


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate the config file; raises :class:`ConfigError`."""
    path = config_path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            path, "no such file (create it, or name another with --config or VMPLUG_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, path)


def decisions(
    config: Config, devices: Sequence[UsbDevice]
) -> list[tuple[UsbDevice, RuleConfig | None]]:
    """For each non-root-hub device, the rule it meets (``None``: none)."""
    return [(d, config.decide(d)) for d in devices if not d.is_root_hub]
