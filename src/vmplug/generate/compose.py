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
* The ``usb-host`` devices in ``ARGUMENTS``, on the image's *own* USB
  controller: its scripts (qemus/qemu ``src/config.sh``, ``configureUsb``)
  add ``-device $USB``, where an empty or ``yes`` ``USB`` means
  ``qemu-xhci,id=xhci,p2=7,p3=7`` (``usb-ehci,id=ehci`` when Windows boots in
  legacy mode: 7, Vista, XP, 2000, 9x, Server 2003/2008, ReactOS; ``src/boot.sh``),
  and ``USB=no`` none at all; with a USB ``MOUSE`` (default ``usb-tablet``)
  the tablet takes the bus's first port.  So the devices go on bus ``xhci.0``
  from port 2, and a second controller beside the image's is never added;
  more devices than its 6 free ports make vmplug set ``USB`` to the same
  controller with 15 ports.
* USB mass storage is *not* put in ``ARGUMENTS`` by default: Windows Setup
  may format a USB disk present at boot (the image's README warns of it).
  Its vmplug rule attaches it live, after boot; ``storage="boot"`` puts it
  in ``ARGUMENTS`` anyway.
* Under rootless Podman ``device_cgroup_rules`` does nothing (no device
  cgroup of its own); the plan's notes say what to do instead.
* The image
  expands ``ARGUMENTS`` unquoted (``exec … ${ARGS:+ $ARGS}`` in its
  ``entry.sh``), so each option is split on white space and globbed: no
  option may contain white space or ``* ? [``.
* ``$`` in a value is written ``$$``: Compose interpolates ``$VAR``.
"""

from __future__ import annotations

import io
import posixpath
import re
import shlex
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomlkit
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from vmplug.errors import UsageError
from vmplug.generate.common import (
    CannotExpress,
    check_passable,
    comment_text,
    device_label,
    is_usb3,
)
from vmplug.generate.qemu import MAX_PORTS, QemuPlan, plan_qemu, qmp_chardev
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


#: The image's values for ``USB`` (qemus/qemu src/config.sh, src/boot.sh).
IMAGE_XHCI = "qemu-xhci,id=xhci,p2=7,p3=7"
IMAGE_EHCI = "usb-ehci,id=ehci"
#: The same controller with QEMU's most ports, when the image's 7 are not enough.
IMAGE_XHCI_15 = "qemu-xhci,id=xhci,p2=15,p3=15"
#: qemus/qemu's enabled()/disabled() words.
_ENABLED = frozenset({"y", "yes", "true", "1", "on", "enable", "enabled"})
_DISABLED = frozenset({"n", "no", "none", "false", "0", "off", "disable", "disabled"})
#: dockurr VERSION values that boot in legacy mode (define.sh isLegacy: win7, vista,
#: xp, 2000, 9x, 2003, 2008, reactos), where the image's USB is usb-ehci.
_LEGACY_VERSIONS = frozenset(
    {"7u", "7", "7e", "7x86", "vu", "xp", "xp64", "2k", "me", "98", "95", "2003", "2008",
     "reactos", "nt4"}
)  # fmt: skip
#: QEMU's EHCI has 6 ports (NB_PORTS in hw/usb/hcd-ehci.h).
EHCI_PORTS = 6
MASS_STORAGE = 0x08
STORAGE_MODES = ("after-setup", "live", "boot")


@dataclass(frozen=True)
class ImageUsb:
    """The USB controller the image adds, and where vmplug's devices go on it."""

    setting: str  # the effective USB value (what -device $USB gets)
    bus_id: str  # xhci
    ports: int  # ports on its bus
    first_port: int  # 2 when the image's usb-tablet took port 1
    set_usb: str | None = None  # a USB value vmplug must write (more ports), else None

    @property
    def bus(self) -> str:
        return f"{self.bus_id}.0"


def _strip(value: str | None) -> str:
    return (value or "").strip().strip('"').strip("'").strip()


def image_usb(env: Mapping[str, str], wanted: int) -> ImageUsb:
    """What the image's ``USB``, ``MOUSE`` and ``VERSION`` make of its USB controller,
    with room for ``wanted`` devices (or a :class:`CannotExpress` saying why not)."""
    usb = _strip(env.get("USB"))
    mouse = _strip(env.get("MOUSE")) or "usb-tablet"
    first = 2 if mouse.lower().startswith("usb") else 1
    if usb.lower() in _DISABLED:
        raise CannotExpress(
            f"USB={usb}: the image then adds no USB controller (and sets usb=off on the "
            "machine), so there is no bus for the devices; remove USB, or set it to "
            f"{IMAGE_XHCI}"
        )
    custom = bool(usb) and usb.lower() not in _ENABLED
    if not custom:
        legacy = _strip(env.get("VERSION")).lower() in _LEGACY_VERSIONS
        usb = IMAGE_EHCI if legacy else IMAGE_XHCI
    driver, *parts = usb.split(",")
    props = dict(p.partition("=")[::2] for p in parts)
    bus_id = props.get("id", "")
    if not bus_id:
        raise CannotExpress(
            f"USB={usb}: the controller has no id=, so its bus has no name to put devices "
            "on; add one (USB=qemu-xhci,id=xhci,p2=7,p3=7)"
        )
    if driver in ("qemu-xhci", "nec-usb-xhci"):
        ports = max(_int_prop(props.get("p2", "4")) or 4, _int_prop(props.get("p3", "4")) or 4)
    elif driver in ("usb-ehci", "ich9-usb-ehci1"):
        ports = EHCI_PORTS
    else:
        raise CannotExpress(
            f"USB={usb}: vmplug knows the ports of qemu-xhci, nec-usb-xhci and usb-ehci "
            f"controllers only; set USB={IMAGE_XHCI}"
        )
    free = ports - (first - 1)
    if wanted <= free:
        return ImageUsb(usb, bus_id, ports, first)
    if not custom and driver == "qemu-xhci" and wanted <= MAX_PORTS - (first - 1):
        return ImageUsb(IMAGE_XHCI_15, bus_id, MAX_PORTS, first, set_usb=IMAGE_XHCI_15)
    raise CannotExpress(
        f"{wanted} devices at boot, but the image's USB controller ({usb}) has {free} free "
        "ports; attach some live instead (leave them out here, keep their vmplug rules)"
    )


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
    image: ImageUsb | None = None
    storage: str = "after-setup"
    #: (label, rule) of mass storage left out of ARGUMENTS: vmplug attaches it live
    live: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

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
            "usb_bus": self.qemu.bus,
            "usb_env": self.image.set_usb if self.image else None,
            "image_usb": self.image.setting if self.image else None,
            "storage": self.storage,
            "live": [{"device": label, "rule": rule} for label, rule in self.live],
            "notes": list(self.notes),
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
    image_env: Mapping[str, str] | None = None,
    storage: str = "after-setup",
    rootless_podman: bool = False,
) -> ComposePlan:
    """The service's pieces for ``devices``.

    ``image_env``: the service's environment as it is (``USB``, ``MOUSE``,
    ``VERSION`` decide the image's controller); ``storage``: where USB mass
    storage goes -- ``after-setup`` (default: not at boot; its vmplug rule is
    written commented out, to enable once Windows is installed), ``live``
    (not at boot; an active vmplug rule attaches it as soon as the VM runs)
    or ``boot`` (in ARGUMENTS, present at boot).
    """
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
    if storage not in STORAGE_MODES:
        raise CannotExpress(f"storage {storage!r}: one of {', '.join(STORAGE_MODES)}")
    check_passable(devices)
    at_boot = [d for d in devices if storage == "boot" or not d.has_interface_class(MASS_STORAGE)]
    later = [d for d in devices if d not in at_boot]
    image = image_usb(image_env or {}, len(at_boot))
    qmp = None if qmp_env else QMP_CONTAINER_SOCKET
    if at_boot:
        qemu = plan_qemu(
            at_boot,
            by_port=by_port,
            controller_id=image.bus_id,
            qmp=qmp,
            isobufs=isobufs,
            isobsize=isobsize,
        )
    else:
        qemu = QemuPlan(image.bus_id, image.ports, image.ports, (), by_port, qmp=qmp)
    # the image's controller, its ports; the first is its usb-tablet's
    offset = image.first_port - 1
    qemu = replace(
        qemu,
        own_controller=False,
        p2=image.ports,
        p3=image.ports,
        devices=tuple(replace(h, port=h.port + offset) for h in qemu.devices),
    )
    arguments_value(qemu.args())
    base = base_dir if base_dir is not None else Path.cwd()
    host_dir = qmp_dir if posixpath.isabs(qmp_dir) else posixpath.join(str(base), qmp_dir)
    vmplug_qmp = posixpath.join(posixpath.normpath(host_dir), "qmp.sock")

    def rule_of(d: UsbDevice) -> str:
        return f'via-port "{d.port}"' if by_port else f"id {d.vidpid}"

    deferred = [d for d in later if storage == "after-setup"]
    active = [d for d in devices if d not in deferred]
    notes = _notes(vm_name, image, at_boot, later, storage, rootless_podman)
    return ComposePlan(
        service=service,
        vm=vm_name,
        qemu=qemu,
        qmp_env=qmp_env,
        qmp_host_dir=qmp_dir,
        vmplug_qmp=vmplug_qmp,
        labels=tuple(device_label(d) for d in active),
        rules=tuple(rule_of(d) for d in active),
        image=image,
        storage=storage,
        live=tuple((device_label(d), rule_of(d)) for d in deferred),
        notes=notes,
    )


#: What a rootless Podman needs instead of device_cgroup_rules.
ROOTLESS_PODMAN_NOTE = (
    "rootless Podman: device_cgroup_rules does nothing there (the container gets no "
    "device cgroup of its own), so it opens /dev/bus/usb nodes only as far as the host "
    "user may: give the nodes a group (vmplug generate udev DEVICE --group kvm --install), "
    "put the user in it, and add group_add: [keep-groups] to the service (Podman only); "
    "or run the container with rootful Podman"
)


def _notes(
    vm: str,
    image: ImageUsb,
    at_boot: Sequence[UsbDevice],
    later: Sequence[UsbDevice],
    storage: str,
    rootless_podman: bool,
) -> tuple[str, ...]:
    out = [f"devices on the image's own USB controller ({image.setting}), bus {image.bus}"]
    if image.set_usb:
        out.append(
            f"USB={image.set_usb}: {len(at_boot)} devices do not fit on the image's "
            "7-port xHCI; the same controller with 15 ports"
        )
    if image.bus_id == "ehci" and any(is_usb3(d) for d in at_boot):
        out.append("the image's EHCI (legacy Windows) runs USB 3 devices at high speed")
    for dev in later:
        what = f"{dev.port} ({device_label(dev)}) is USB mass storage"
        if storage == "after-setup":
            out.append(
                f"{what}: left out of ARGUMENTS, since Windows Setup may format a USB disk "
                "present at boot; its vmplug rule is written commented out: uncomment it "
                "once Windows is installed (vmplug then attaches it live whenever the VM "
                f"runs), or attach it once after boot: vmplug attach {dev.port} --vm {vm}"
            )
        else:
            out.append(
                f"{what}: left out of ARGUMENTS (Windows Setup may format a USB disk present "
                "at boot); vmplug's rule attaches it live once the VM runs -- keep it "
                "unplugged during the first start, while Setup runs"
            )
    if storage == "boot":
        for dev in at_boot:
            if dev.has_interface_class(MASS_STORAGE):
                out.append(
                    f"{dev.port} is USB mass storage in ARGUMENTS: present at boot, which "
                    "Windows Setup may format; unplug it for the first start"
                )
    if rootless_podman:
        out.append(ROOTLESS_PODMAN_NOTE)
    return tuple(out)


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


def service_env(text: str, service: str) -> dict[str, str]:
    """The environment of ``service`` in a compose file (``{}`` when it has none, or
    the file does not parse: :func:`merge_text` then says what is wrong)."""
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except Exception:  # ruamel raises many YAMLError subclasses
        return {}
    svc = ((data or {}).get("services") or {}).get(service) if isinstance(data, dict) else None
    if not isinstance(svc, dict):
        return {}
    env = svc.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {}


def _merge_service(
    service: CommentedMap, plan: ComposePlan, changes: list[str], map_indent: int
) -> None:
    # the image's own controller: USB decides it; vmplug writes USB only for more ports
    env_now = {k: v for k in ("USB", "MOUSE", "VERSION") if (v := _get_env(service, k)) is not None}
    theirs = image_usb(env_now, len(plan.qemu.devices))
    if plan.image is not None and theirs.bus != plan.image.bus:
        raise CannotExpress(
            f"service {plan.service!r} has USB={env_now.get('USB', '')!r}, whose bus is "
            f"{theirs.bus}, but the plan puts the devices on {plan.image.bus}: plan with the "
            "service's environment (vmplug generate compose --merge reads it)"
        )
    if (
        plan.image is not None
        and plan.image.set_usb
        and _get_env(service, "USB") != (plan.image.set_usb)
    ):
        _set_env(service, "USB", plan.image.set_usb, changes)
    # ARGUMENTS (and QMP when asked)
    had_arguments = _get_env(service, "ARGUMENTS") is not None
    new_args = _merge_arguments(_get_env(service, "ARGUMENTS"), plan, changes)
    if new_args or had_arguments:  # nothing at boot (USB storage only): no ARGUMENTS
        _set_env(service, "ARGUMENTS", new_args, changes)
    env = service.get("environment")
    if not had_arguments and new_args and isinstance(env, CommentedMap):
        image = plan.image.setting if plan.image else "its USB setting"
        tablet = plan.image is None or plan.image.first_port == 2
        lines = [
            "vmplug: USB devices on the image's own controller, not a second one",
            f"(USB: {image}; bus {plan.qemu.bus}"
            + (", whose port 1 is the image's usb-tablet)." if tablet else ")."),
            "No option may contain a space: the image splits ARGUMENTS on spaces.",
        ]
        lines += [f"  guest port {d.port}: {d.label}" for d in plan.qemu.devices]
        lines += [f"  not here, USB storage: {label}" for label, _ in plan.live]
        if plan.live:
            lines.append("  (Windows Setup may format a USB disk present at boot: vmplug")
            lines.append("  attaches it live, after boot; see its rule in vmplug's config)")
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
    if len(rules):
        doc.add("rule", rules)
    text = tomlkit.dumps(doc)
    for label, rule_text in plan.live:
        match = tomlkit.string(rule_text, literal="'" not in rule_text).as_string()
        text += (
            f"\n# USB storage: {comment_text(label)}\n"
            "# Windows Setup may format a USB disk present at boot: uncomment once\n"
            "# Windows is installed (vmplug then attaches it live, after boot).\n"
            f'# [[rule]]\n# attach = "{plan.vm}"\n# match = {match}\n'
        )
    return text


# ---------------------------------------------------------------------------
# Podman: the same container by ``podman run`` flags

#: Why a compose file is not enough under Podman (measured in the lab guest with
#: Debian 12's podman 4.3.1: the container's OCI spec held only "deny all").
PODMAN_NOTE = (
    "Podman: a compose file's device_cgroup_rules is dropped there (Podman 4.3's "
    "Docker-compatible API ignores HostConfig.DeviceCgroupRules, so docker-compose "
    "against Podman's socket gets a device cgroup that denies every USB node, and "
    "podman-compose 1.0.3 does not pass the key on): QEMU then holds its usb-host "
    "devices unattached. Run the same container by podman run flags instead"
)

#: Compose keys :func:`podman_run_command` translates (others are refused by name).
_PODMAN_KEYS = frozenset(
    {
        "image",
        "container_name",
        "environment",
        "devices",
        "volumes",
        "device_cgroup_rules",
        "cap_add",
        "ports",
        "restart",
        "stop_grace_period",
        "network_mode",
        "privileged",
        "group_add",
    }
)
_DURATION_RE = re.compile(r"^(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def _seconds(value: object) -> int:
    """A compose duration (``2m``, ``90s``, ``1m30s``, a number) in whole seconds."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return round(float(text))
    m = _DURATION_RE.match(text)
    if not text or m is None:
        raise CannotExpress(f"stop_grace_period {text!r}: not a duration like 2m or 90s")
    return round(int(m.group(1) or 0) * 60 + float(m.group(2) or 0))


def _env_items(env: object) -> list[str]:
    if isinstance(env, Mapping):
        return [f"{k}={'' if v is None else v}" for k, v in env.items()]
    if isinstance(env, list):
        return [str(item) for item in env]
    if env is None:
        return []
    raise CannotExpress("environment: neither a mapping nor a list")


def podman_run_command(
    text: str, service: str = "windows", base_dir: Path | None = None
) -> list[str]:
    """``podman run -d ...`` for ``service`` of the compose file ``text``: the same
    container (name, image, environment, devices, bind mounts, device cgroup
    rules, restart policy, stop timeout) made through Podman's own CLI, which
    keeps ``--device-cgroup-rule`` (see :data:`PODMAN_NOTE`).  Relative bind
    sources are resolved against ``base_dir`` (default: the current folder).
    Raises :class:`CannotExpress` for a key it has no flag for."""
    yaml = YAML(typ="safe", pure=True)
    try:
        doc = yaml.load(text)
    except Exception as exc:  # ruamel raises many error classes
        raise CannotExpress(f"the compose file is not YAML: {exc}") from None
    services = doc.get("services") if isinstance(doc, dict) else None
    svc = services.get(service) if isinstance(services, dict) else None
    if not isinstance(svc, dict):
        raise CannotExpress(f"no service {service!r} in the compose file")
    unknown = sorted(set(svc) - _PODMAN_KEYS)
    if unknown:
        raise CannotExpress(
            f"service {service!r}: no podman run flag here for {', '.join(unknown)}"
        )
    if "image" not in svc:
        raise CannotExpress(f"service {service!r} has no image")
    base = str(base_dir if base_dir is not None else Path.cwd())
    argv = ["podman", "run", "-d", "--name", str(svc.get("container_name") or service)]
    for item in _env_items(svc.get("environment")):
        argv += ["-e", item]
    for dev in svc.get("devices") or []:
        argv += ["--device", str(dev)]
    for vol in svc.get("volumes") or []:
        spec = str(vol)
        source, sep, rest = spec.partition(":")
        if sep and source.startswith("."):
            spec = f"{posixpath.normpath(posixpath.join(base, source))}:{rest}"
        argv += ["-v", spec]
    for rule in svc.get("device_cgroup_rules") or []:
        argv += ["--device-cgroup-rule", str(rule)]
    for cap in svc.get("cap_add") or []:
        argv += ["--cap-add", str(cap)]
    for port in svc.get("ports") or []:
        argv += ["-p", str(port)]
    for group in svc.get("group_add") or []:
        argv += ["--group-add", str(group)]
    if svc.get("privileged"):
        argv.append("--privileged")
    if svc.get("network_mode"):
        argv += ["--network", str(svc["network_mode"])]
    if svc.get("restart"):
        argv += ["--restart", str(svc["restart"])]
    if svc.get("stop_grace_period") is not None:
        argv += ["--stop-timeout", str(_seconds(svc["stop_grace_period"]))]
    argv.append(str(svc["image"]))
    return argv


def podman_shell(text: str, service: str = "windows", base_dir: Path | None = None) -> str:
    """:func:`podman_run_command` as one shell line, after ``mkdir -p`` of the
    compose file's relative bind sources (``podman run`` makes no missing
    folder, docker-compose does)."""
    argv = podman_run_command(text, service, base_dir)
    base = posixpath.normpath(str(base_dir if base_dir is not None else Path.cwd()))
    folders = [
        argv[i + 1].split(":", 1)[0]
        for i, arg in enumerate(argv[:-1])
        if arg == "-v" and argv[i + 1].startswith(base + "/")
    ]
    run = shlex.join(argv)
    return f"mkdir -p {shlex.join(folders)} && {run}" if folders else run
