"""Writing vmplug's config: a rule for a device, a first config, a rule added to one.

The one writer behind ``vmplug init`` (a new file) and ``vmplug attach
--persist`` / ``detach --persist`` (a rule put first into an existing file,
its comments and layout kept).  The functions that make text are pure; only
:func:`write_config` touches the file, and it refuses to write what
:func:`vmplug.config.parse_config` would not load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vmplug.config import parse_config

if TYPE_CHECKING:
    from tomlkit.items import Table

    from vmplug.model import UsbDevice

#: How a rule names its device:
#: ``id``: its model (``id VID:PID``: every device of that model);
#: ``port``: its socket (``via-port "3-1.2"``: whatever sits there);
#: ``this``: this very device (``id VID:PID serial "S"``, or by its port when it has no serial).
MatchBy = Literal["id", "port", "this"]


def rule_escape(text: str) -> str:
    """A string for inside a rule's double quotes (``"``, ``\\`` and the
    unprintable escaped, the latter as ``\\xHH`` bytes)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def match_for(dev: UsbDevice, by: MatchBy) -> str:
    """The rule text that matches ``dev`` the way ``by`` says."""
    port = f'via-port "{rule_escape(dev.port)}"'
    if by == "port":
        return port
    if by == "id":
        return f"id {dev.vidpid}"
    if dev.serial:
        return f'id {dev.vidpid} serial "{rule_escape(dev.serial)}"'
    return f"id {dev.vidpid} {port}"


@dataclass(frozen=True)
class NewRule:
    """A ``[[rule]]`` to write: ``attach`` a VM, or block (``vm`` None)."""

    vm: str | None
    match: str
    #: a TOML comment after the match (``# 1235:821a Scarlett 4i4 ...``)
    label: str | None = None
    #: the rule's own ``comment`` key
    note: str | None = None


def _rule_table(rule: NewRule) -> Table:
    import tomlkit  # noqa: PLC0415

    table = tomlkit.table()
    if rule.vm is None:
        table.add("block", True)
    else:
        table.add("attach", rule.vm)
    table.add("match", tomlkit.string(rule.match, literal="'" not in rule.match))
    if rule.label:
        table["match"].comment(rule.label)
    if rule.note:
        table.add("comment", rule.note)
    return table


def render_config(
    vms: Sequence[tuple[str, Mapping[str, Any], str | None]], rules: Sequence[NewRule]
) -> str:
    """A new config: ``(name, [vm.NAME] keys, comment)`` VMs and ``rules``, in order."""
    import tomlkit  # noqa: PLC0415

    doc = tomlkit.document()
    doc.add(tomlkit.comment("vmplug configuration, first written by `vmplug init`."))
    doc.add(tomlkit.comment("Check it with `vmplug check-config`; rules: first match wins."))
    doc.add(tomlkit.nl())
    vm_super = tomlkit.table(is_super_table=True)
    for name, keys, comment in vms:
        table = tomlkit.table()
        for key, value in keys.items():
            table.add(key, value)
        if comment:
            table.comment(comment)
        vm_super.add(name, table)
    doc.add("vm", vm_super)
    if rules:
        aot = tomlkit.aot()
        for rule in rules:
            aot.append(_rule_table(rule))
        doc.add("rule", aot)
    return tomlkit.dumps(doc)


def prepend_rule(text: str, rule: NewRule) -> str:
    """``text`` (a config) with ``rule`` as its first rule (the first match wins),
    everything else as it was, comments included."""
    import tomlkit  # noqa: PLC0415

    doc = tomlkit.parse(text)
    rules = doc.get("rule")
    if rules is None:
        aot = tomlkit.aot()
        aot.append(_rule_table(rule))
        doc.add("rule", aot)
    else:
        rules.insert(0, _rule_table(rule))
    return tomlkit.dumps(doc)


def write_config(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed
    over it), after checking it loads: a :class:`~vmplug.config.ConfigError`
    leaves the file as it was."""
    parse_config(text, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".vmplug-tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def add_rule(path: Path, rule: NewRule) -> None:
    """Put ``rule`` first into the config at ``path`` (comments kept)."""
    write_config(path, prepend_rule(path.read_text(encoding="utf-8"), rule))


__all__ = [
    "MatchBy",
    "NewRule",
    "add_rule",
    "match_for",
    "prepend_rule",
    "render_config",
    "rule_escape",
    "write_config",
]
