"""A docker-compose service for dockurr/windows whose USB devices survive replug.

Why each piece is there:

* ``/dev/bus/usb:/dev/bus/usb`` as a *bind mount*, not ``devices:``: Docker
  creates ``devices:`` nodes once, at container start, so the node of a
  replugged device (new device number) never appears inside.  The bind mount
  shows the host's live ``/dev/bus/usb``.
* ``device_cgroup_rules: ['c 189:* rwm']``: the device cgroup must still let
  the container open USB device nodes (major 189), including future ones.
* ``/dev/kvm`` for KVM.
* A QMP socket for vmplug in a host folder bind-mounted at ``/qmp``: the
  image's own monitor (``/run/shm/monitor.sock``, HMP) is private to its
  scripts and a QMP socket serves one client at a time.  Newer images take a
  ``QMP`` variable (``-qmp $QMP``); older ones need ``-qmp …`` in
  ``ARGUMENTS``, which works on both and is the default here.
* The ``usb-host`` devices and their controller in ``ARGUMENTS``.  The image
  expands ``ARGUMENTS`` unquoted (``exec … ${ARGS:+ $ARGS}`` in its
  ``entry.sh``), so each option is split on white space and globbed: no
  option may contain white space or ``* ? [``.
* ``$`` in a value is written ``$$``: Compose interpolates ``$VAR``.
"""

from __future__ import annotations

import io
import posixpath
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from vmplug.errors import UsageError
from vmplug.generate.common import CannotExpress, comment_text, device_label
from vmplug.generate.qemu import QemuPlan, plan_qemu, qmp_chardev
from vmplug.model import UsbDevice

IMAGE = "dockurr/windows"
QMP_CONTAINER_DIR = "/qmp"
QMP_CONTAINER_SOCKET = "/qmp/qmp.sock"
USB_CGROUP_RULE = "c 189:* rwm"
USB_BIND = "/dev/bus/usb:/dev/bus/usb"
#: The Compose spec's pattern for service names.
_SERVICE_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
_CONTAINER_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
#: vmplug's own pattern for VM names (config.py).
_VM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: What bash word splitting (IFS) and the image's ``tr``/``sed`` treat as separators,
#: plus every other white space, and what pathname expansion would act on.
_UNSAFE_ARG = re.compile(r"[\s*?\[]")
#: Control characters, surrogates and line/paragraph separators (NEL is a line
#: break to YAML 1.1 readers, not to YAML 1.2 ones).
_UNWRITABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class ComposePlan:
    service: str
    vm: str
    qemu: QemuPlan
    qmp_env: bool
    qmp_host_dir: str
    vmplug_qmp: str
    labels: tuple[str, ...]
    rules: tuple[str, ...]
    changes: tuple[str, ...] = field(default=())

    @property
    def arguments(self) -> list[str]:
        return self.qemu.args()

    @property
    def qmp_value(self) -> str:
        return qmp_chardev(QMP_CONTAINER_SOCKET)

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "vm": self.vm,
            "arguments": arguments_value(self.arguments),
            "arguments_list": self.arguments,
            "qmp_env": self.qmp_value if self.qmp_env else None,
            "qmp_host_dir": self.qmp_host_dir,
            "vmplug_qmp": self.vmplug_qmp,
            "qemu": self.qemu.to_json(),
        }


def compose_escape(value: str) -> str:
    """A literal string for a Compose value: ``$`` is written ``$$``."""
    return value.replace("$", "$$")


def compose_unescape(value: str) -> str:
    """What Compose makes of a value with no variables in it (for tests and merge)."""
    return value.replace("$$", "$")


def arguments_value(args: Sequence[str]) -> str:
    """The ``ARGUMENTS`` string; refuses options the image would split or glob."""
    for arg in args:
        if not arg:
            raise CannotExpress("an empty QEMU option cannot be expressed in ARGUMENTS")
        bad = _UNSAFE_ARG.search(arg)
        if bad:
            raise CannotExpress(
                f"QEMU option {arg!r} contains {bad.group()!r}: dockurr/windows splits ARGUMENTS "
                "on white space and expands * ? [ as file names, so no option may contain them"
            )
    return " ".join(args)


def plan_compose(
    devices: Sequence[UsbDevice],
    *,
    service: str = "windows",
    vm: str | None = None,
    by_port: bool = False,
    qmp_dir: str = "./qmp",
    qmp_env: bool = False,
    base_dir: Path | None = None,
    isobufs: int | None = None,
    isobsize: int | None = None,
) -> ComposePlan:
    if not _SERVICE_RE.match(service):
        raise CannotExpress(
            f"service name {service!r}: Compose allows only letters, digits, '.', '_' and '-'"
        )
    vm_name = vm or service
    if not _VM_RE.match(vm_name):
        raise CannotExpress(
            f"VM name {vm_name!r}: vmplug needs a letter or digit first, then letters, digits, "
            "'.', '_' or '-' (at most 64); pass --vm NAME"
        )
    if not qmp_dir or any(unicodedata.category(ch) in _UNWRITABLE for ch in qmp_dir):
        raise CannotExpress(
            "--qmp-dir must be a folder path without control characters or line separators "
            "(YAML 1.1 and 1.2 readers do not agree on them)"
        )
    qemu = plan_qemu(
        devices,
        by_port=by_port,
        qmp=None if qmp_env else QMP_CONTAINER_SOCKET,
        isobufs=isobufs,
        isobsize=isobsize,
    )
    arguments_value(qemu.args())
    base = base_dir if base_dir is not None else Path.cwd()
    host_dir = qmp_dir if posixpath.isabs(qmp_dir) else posixpath.join(str(base), qmp_dir)
    vmplug_qmp = posixpath.join(posixpath.normpath(host_dir), "qmp.sock")
    rules = tuple(f'via-port "{d.port}"' if by_port else f"id {d.vidpid}" for d in devices)
    return ComposePlan(
        service=service,
        vm=vm_name,
        qemu=qemu,
        qmp_env=qmp_env,
        qmp_host_dir=qmp_dir,
        vmplug_qmp=vmplug_qmp,
        labels=tuple(device_label(d) for d in devices),
        rules=rules,
    )


# ---------------------------------------------------------------------------
# YAML


def _yaml(indent: int | None, block_seq_indent: int | None) -> YAML:
    """A round-trip YAML (comments, order, quoting kept) in the file's own indentation.

    ``indent``/``block_seq_indent`` are what ``load_yaml_guess_indent`` found:
    the sequence indent and the dash offset (None when the file has no list).
    """
    y = YAML()
    y.preserve_quotes = True
    y.width = 1 << 16  # never fold a long ARGUMENTS line
    if block_seq_indent is None:
        mapping = indent or 2
        y.indent(mapping=mapping, sequence=mapping + 2, offset=2)
    else:
        seq = indent or 2 + block_seq_indent
        y.indent(mapping=max(seq - block_seq_indent, 1), sequence=seq, offset=block_seq_indent)
    return y


def _plain_scalar(name: str) -> str:
    """``name`` as a YAML scalar that stays a string (``1.0`` or ``null`` would not)."""
    y = YAML(typ="safe", pure=True)
    if y.load(name) == name:
        return name
    return f'"{name}"'


def _template(plan: ComposePlan) -> str:
    container = (
        f"    container_name: {_plain_scalar(plan.service)}\n"
        if _CONTAINER_RE.match(plan.service)
        else ""
    )
    return (
        "# dockurr/windows with USB pass-through that survives replug (vmplug generate compose).\n"
        "services:\n"
        f"  {_plain_scalar(plan.service)}:\n"
        f"    image: {IMAGE}\n"
        f"{container}"
        "    environment:\n"
        '      VERSION: "11"\n'
        "    devices:\n"
        "      - /dev/kvm\n"
        "      - /dev/net/tun\n"
        "    cap_add:\n"
        "      - NET_ADMIN\n"
        "    ports:\n"
        "      - 8006:8006\n"
        "      - 3389:3389/tcp\n"
        "      - 3389:3389/udp\n"
        "    volumes:\n"
        "      - ./windows:/storage\n"
        "    restart: always\n"
        "    stop_grace_period: 2m\n"
    )


def render_new(plan: ComposePlan) -> str:
    """A complete compose file with one service."""
    text, _ = merge_text(_template(plan), plan)
    return text


def _host_path(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry.split(":", 1)[0]
    if isinstance(entry, dict):
        src = entry.get("source")
        return src if isinstance(src, str) else None
    return None


def _target_path(entry: Any) -> str | None:
    if isinstance(entry, str):
        parts = entry.split(":")
        return parts[1] if len(parts) >= 2 else parts[0]
    if isinstance(entry, dict):
        tgt = entry.get("target")
        return tgt if isinstance(tgt, str) else None
    return None


def _seq(service: CommentedMap, key: str, changes: list[str]) -> CommentedSeq:
    value = service.get(key)
    if value is None:
        value = CommentedSeq()
        service[key] = value
    if not isinstance(value, list):
        raise CannotExpress(
            f"{key}: expected a list in the compose file, found {type(value).__name__}"
        )
    return value  # type: ignore[return-value]


def _split_args(text: str) -> list[str]:
    return text.split()


def _int_prop(value: str) -> int | None:
    try:
        return int(value, 0)
    except ValueError:
        return None


def _is_ours_or_same(opt: str, value: str, plan: ComposePlan) -> bool:
    """An option vmplug wrote before, or a usb-host for one of the same devices."""
    props: dict[str, str] = {}
    for part in value.split(",")[1:]:
        key, _, val = part.partition("=")
        props[key] = val
    driver = value.split(",", 1)[0]
    if opt == "-device" and props.get("id", "").startswith("vmplug-"):
        return True
    if opt == "-qmp" and QMP_CONTAINER_SOCKET in value:
        return True
    if opt == "-device" and driver == "usb-host":
        wanted = {
            (m.get("vendorid"), m.get("productid"))
            for m in (dict(d.match) for d in plan.qemu.devices)
        }
        vid, pid = _int_prop(props.get("vendorid", "")), _int_prop(props.get("productid", ""))
        return any(
            w[0] is not None and w[1] is not None and vid == int(w[0], 16) and pid == int(w[1], 16)
            for w in wanted
        )
    return False


def _merge_arguments(existing: str | None, plan: ComposePlan, changes: list[str]) -> str:
    kept: list[str] = []
    removed: list[str] = []
    words = _split_args(compose_unescape(existing or ""))
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-device", "-qmp") and i + 1 < len(words):
            if _is_ours_or_same(word, words[i + 1], plan):
                removed.append(f"{word} {words[i + 1]}")
            else:
                kept += [word, words[i + 1]]
            i += 2
            continue
        kept.append(word)
        i += 1
    ours = plan.arguments
    added = [f"{ours[j]} {ours[j + 1]}" for j in range(0, len(ours), 2)]
    changes.extend(f"ARGUMENTS: removed {r}" for r in removed if r not in added)
    changes.extend(f"ARGUMENTS: added {a}" for a in added if a not in removed)
    return compose_escape(arguments_value([*kept, *ours]))


def _set_env(service: CommentedMap, key: str, value: str, changes: list[str]) -> str | None:
    """Set an environment variable in mapping or list form; returns the old value."""
    env = service.get("environment")
    if env is None:
        env = CommentedMap()
        service["environment"] = env
    if isinstance(env, dict):
        old = env.get(key)
        old_s = None if old is None else str(old)
        if isinstance(old, DoubleQuotedScalarString):
            env[key] = DoubleQuotedScalarString(value)
        elif isinstance(old, SingleQuotedScalarString) and "'" not in value:
            env[key] = SingleQuotedScalarString(value)
        else:
            env[key] = value
        if old is None:
            changes.append(f"environment: set {key}")
        return old_s
    if isinstance(env, list):
        for i, item in enumerate(env):
            if isinstance(item, str) and item.split("=", 1)[0] == key:
                old_s = item.split("=", 1)[1] if "=" in item else ""
                env[i] = f"{key}={value}"
                return old_s
        env.append(f"{key}={value}")
        changes.append(f"environment: set {key}")
        return None
    raise CannotExpress("environment: expected a mapping or a list in the compose file")


def _get_env(service: CommentedMap, key: str) -> str | None:
    env = service.get("environment")
    if isinstance(env, dict):
        v = env.get(key)
        return None if v is None else str(v)
    if isinstance(env, list):
        for item in env:
            if isinstance(item, str) and item.split("=", 1)[0] == key:
                return item.split("=", 1)[1] if "=" in item else ""
    return None


def _merge_service(
    service: CommentedMap, plan: ComposePlan, changes: list[str], map_indent: int
) -> None:
    # ARGUMENTS (and QMP when asked)
    had_arguments = _get_env(service, "ARGUMENTS") is not None
    new_args = _merge_arguments(_get_env(service, "ARGUMENTS"), plan, changes)
    _set_env(service, "ARGUMENTS", new_args, changes)
    env = service.get("environment")
    if not had_arguments and isinstance(env, CommentedMap):
        lines = [
            "vmplug: USB controller and devices (no option may contain a space:",
            "the image splits ARGUMENTS on spaces)",
        ]
        lines += [f"  guest port {d.port}: {d.label}" for d in plan.qemu.devices]
        env.yaml_set_comment_before_after_key(
            "ARGUMENTS",
            before="\n".join(comment_text(line) for line in lines),
            indent=3 * map_indent,
        )
    if plan.qmp_env:
        current = _get_env(service, "QMP")
        if current is not None and current != plan.qmp_value:
            raise CannotExpress(
                f"service {plan.service!r} already sets QMP={current!r}; a QMP socket serves one "
                "client at a time, so vmplug needs its own: drop --qmp-env to add a second "
                "-qmp socket in ARGUMENTS instead"
            )
        _set_env(service, "QMP", plan.qmp_value, changes)

    # devices: /dev/kvm yes, /dev/bus/usb no (the bind mount replaces it)
    devices = _seq(service, "devices", changes)
    for i in reversed(range(len(devices))):
        host = _host_path(devices[i])
        if host is not None and host.rstrip("/").startswith("/dev/bus/usb"):
            changes.append(
                f"devices: removed {devices[i]!s} (a node made at container start; the "
                "/dev/bus/usb bind mount also sees devices plugged in later)"
            )
            del devices[i]
    if not any(_host_path(d) == "/dev/kvm" for d in devices):
        devices.insert(0, "/dev/kvm")
        changes.append("devices: added /dev/kvm")

    rules = _seq(service, "device_cgroup_rules", changes)
    if not any(isinstance(r, str) and " ".join(r.split()) == USB_CGROUP_RULE for r in rules):
        rules.append(SingleQuotedScalarString(USB_CGROUP_RULE))
        rules.yaml_add_eol_comment(
            "vmplug: USB device nodes (major 189), also ones plugged in later", len(rules) - 1
        )
        changes.append(f"device_cgroup_rules: added '{USB_CGROUP_RULE}'")

    volumes = _seq(service, "volumes", changes)
    if not any(
        _host_path(v) == "/dev/bus/usb" and _target_path(v) == "/dev/bus/usb" for v in volumes
    ):
        volumes.append(USB_BIND)
        volumes.yaml_add_eol_comment(
            "vmplug: bind mount, so replugged devices appear", len(volumes) - 1
        )
        changes.append(f"volumes: added {USB_BIND}")
    source = compose_escape(plan.qmp_host_dir)
    found = False
    for i, vol in enumerate(volumes):
        if _target_path(vol) == QMP_CONTAINER_DIR:
            found = True
            if compose_unescape(_host_path(vol) or "") != plan.qmp_host_dir:
                volumes[i] = _qmp_volume(source)
                changes.append(f"volumes: {QMP_CONTAINER_DIR} now from {plan.qmp_host_dir}")
    if not found:
        volumes.append(_qmp_volume(source))
        volumes.yaml_add_eol_comment(
            "vmplug: QMP socket folder (kept out of /run and /dev/shm)", len(volumes) - 1
        )
        changes.append(f"volumes: added {plan.qmp_host_dir} at {QMP_CONTAINER_DIR}")


def _qmp_volume(source: str) -> str | CommentedMap:
    """Short syntax ``SOURCE:/qmp`` unless the path has a ``:`` (then the long syntax)."""
    if ":" not in source and source.strip() == source and not source.startswith("#"):
        return f"{source}:{QMP_CONTAINER_DIR}"
    vol = CommentedMap()
    vol["type"] = "bind"
    vol["source"] = source
    vol["target"] = QMP_CONTAINER_DIR
    bind = CommentedMap()
    bind["create_host_path"] = True
    vol["bind"] = bind
    return vol


def merge_text(text: str, plan: ComposePlan) -> tuple[str, list[str]]:
    """``text`` (a compose file) with the plan's service settings merged in.

    Comments, key order and the file's indentation are kept; running it twice
    changes nothing the second time.  Returns the new text and what changed.
    """
    try:
        _, indent, bsi = load_yaml_guess_indent(text)
        yaml = _yaml(indent, bsi)
        data = yaml.load(text)
    except Exception as exc:  # ruamel raises many YAMLError subclasses
        raise UsageError(f"not a valid YAML file: {exc}") from None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap):
        raise UsageError("not a compose file: the top level is not a mapping")
    services = data.get("services")
    if services is None:
        services = CommentedMap()
        data["services"] = services
    if not isinstance(services, CommentedMap):
        raise UsageError("not a compose file: 'services' is not a mapping")
    service = services.get(plan.service)
    if service is None:
        names = ", ".join(str(k) for k in services) or "none"
        raise UsageError(
            f"no service {plan.service!r} in the compose file (services: {names}); "
            "name it with --service"
        )
    if not isinstance(service, CommentedMap):
        raise UsageError(f"service {plan.service!r} is not a mapping")
    changes: list[str] = []
    _merge_service(service, plan, changes, yaml.map_indent or 2)
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue(), changes


# ---------------------------------------------------------------------------
# vmplug's own config


def vmplug_snippet(plan: ComposePlan) -> str:
    """The ``[vm.NAME]`` table and ``[[rule]]`` entries for vmplug's config."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment(f"dockurr/windows service {plan.service!r} (vmplug generate compose)"))
    vm_table = tomlkit.table(is_super_table=True)
    inner = tomlkit.table()
    inner.add("qmp", plan.vmplug_qmp)
    inner.add("usb_bus", plan.qemu.bus)
    vm_table.add(plan.vm, inner)
    doc.add("vm", vm_table)
    rules = tomlkit.aot()
    for rule_text, label in zip(plan.rules, plan.labels, strict=True):
        rule = tomlkit.table()
        rule.add("attach", plan.vm)
        rule.add("match", tomlkit.string(rule_text, literal="'" not in rule_text))
        rule["match"].comment(label)
        rules.append(rule)
    doc.add("rule", rules)
    return tomlkit.dumps(doc)
