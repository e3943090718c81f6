"""Shell completion for bash, zsh and fish: ``vmplug completion SHELL``.

The script is click's own (``_VMPLUG_COMPLETE=SHELL_source``): at every TAB it
runs ``vmplug`` again with ``_VMPLUG_COMPLETE=SHELL_complete``, which answers
with the subcommands, the options, and these values:

* VM names (``--vm``) from the config file (``--config`` before the
  subcommand, ``VMPLUG_CONFIG``, or ``/etc/vmplug/vmplug.toml``);
* devices (``DEVICE`` arguments): every port path and vendor:product id of
  the host's USB devices, read from sysfs (``--sysfs-root`` before the
  subcommand, ``VMPLUG_SYSFS_ROOT``, or ``/sys``);
* Proxmox VMIDs (``--vmid``) from /etc/pve/qemu-server (``VMPLUG_PROXMOX_ETC``).

bash counts ``:`` as a word break (``COMP_WORDBREAKS``), so it hands ``1235:8``
over as three words; :class:`VmplugBashComplete` joins them again and answers
with what comes after the last ``:``, as bash-completion's
``__ltrim_colon_completions`` does, so ``vid:pid`` completes in a plain bash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from click.shell_completion import (
    BashComplete,
    CompletionItem,
    ShellComplete,
    add_completion_class,
    get_completion_class,
    split_arg_string,
)

PROG = "vmplug"
COMPLETE_VAR = "_VMPLUG_COMPLETE"
SHELLS = ("bash", "zsh", "fish")

#: How to install each shell's script, for the help text, the README and the man page.
INSTALL = {
    "bash": "vmplug completion bash > /etc/bash_completion.d/vmplug   "
    '# or: eval "$(vmplug completion bash)" in ~/.bashrc',
    "zsh": 'vmplug completion zsh > "${fpath[1]}/_vmplug"   '
    '# or: eval "$(vmplug completion zsh)" in ~/.zshrc',
    "fish": "vmplug completion fish > ~/.config/fish/completions/vmplug.fish",
}


class VmplugBashComplete(BashComplete):
    """click's bash completion, with ``vid:pid`` words joined again (see the module doc)."""

    name = "bash"
    _colon_prefix = ""

    def get_completion_args(self) -> tuple[list[str], str]:
        cwords = split_arg_string(os.environ["COMP_WORDS"])
        cword = int(os.environ["COMP_CWORD"])
        # COMP_WORDS may lack the empty word being completed
        while len(cwords) <= cword:
            cwords.append("")
        joined: list[str] = []
        current = 0
        after_colon = False
        for i, word in enumerate(cwords[: cword + 1]):
            if i > 1 and (word == ":" or after_colon):
                joined[-1] += word  # "1235" ":" "821a" was one word: 1235:821a
            else:
                joined.append(word)
            after_colon = word == ":"
            if i == cword:
                current = len(joined) - 1
        incomplete = joined[current] if joined else ""
        args = joined[1:current]
        self._colon_prefix = incomplete.rpartition(":")[0] + ":" if ":" in incomplete else ""
        return args, incomplete

    def format_completion(self, item: CompletionItem) -> str:
        value = str(item.value)
        if self._colon_prefix and value.startswith(self._colon_prefix):
            value = value[len(self._colon_prefix) :]
        return f"{item.type},{value}"


add_completion_class(VmplugBashComplete, "bash")


def _root_param(ctx: click.Context, name: str) -> Any:
    return ctx.find_root().params.get(name)


def complete_vm_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """The ``[vm.NAME]`` tables of the config file; nothing when it does not load."""
    from vmplug.config import load_config  # noqa: PLC0415
    from vmplug.errors import VmplugError  # noqa: PLC0415

    try:
        config = load_config(_root_param(ctx, "config"))
    except (VmplugError, OSError):
        return []
    return [
        CompletionItem(name, help=vm.where)
        for name, vm in sorted(config.vms.items())
        if name.startswith(incomplete)
    ]


def complete_devices(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Port paths and vendor:product ids of the host's USB devices (root hubs left out)."""
    from vmplug.host.inventory import read_devices, sysfs_root_from_env  # noqa: PLC0415

    explicit = _root_param(ctx, "sysfs_root")
    try:
        devices = read_devices(sysfs_root_from_env(Path(explicit) if explicit else None))
    except (OSError, ValueError):
        return []
    items: dict[str, CompletionItem] = {}
    for dev in devices:
        if dev.is_root_hub:
            continue
        name = dev.display_name
        items.setdefault(dev.port, CompletionItem(dev.port, help=f"{dev.vidpid or ''} {name}"))
        if dev.vidpid:
            items.setdefault(dev.vidpid, CompletionItem(dev.vidpid, help=name))
    return [item for value, item in sorted(items.items()) if value.startswith(incomplete)]


def complete_vmids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Proxmox VMIDs from /etc/pve/qemu-server (VMPLUG_PROXMOX_ETC), with their names."""
    from vmplug.vms.proxmox_conf import read_vm_confs  # noqa: PLC0415

    return [
        CompletionItem(str(vm.vmid), help=vm.name or "")
        for vm in read_vm_confs()
        if str(vm.vmid).startswith(incomplete)
    ]


#: Parameter names whose values are devices, VM names and Proxmox VMIDs.
DEVICE_PARAMS = frozenset({"device", "selectors"})
VM_PARAMS = frozenset({"vm"})
VMID_PARAMS = frozenset({"vmid"})


def add_completers(command: click.Command) -> None:
    """Give ``command``'s device arguments and ``--vm`` options their completers
    (a parameter that has its own is left alone)."""
    for param in command.params:
        if getattr(param, "_custom_shell_complete", None) is not None:
            continue
        if isinstance(param, click.Argument) and param.name in DEVICE_PARAMS:
            param._custom_shell_complete = complete_devices
        elif isinstance(param, click.Option) and param.name in VM_PARAMS:
            param._custom_shell_complete = complete_vm_names
        elif isinstance(param, click.Option) and param.name in VMID_PARAMS:
            param._custom_shell_complete = complete_vmids


def script(shell: str) -> str:
    """The completion script for ``shell``: click's, for the ``vmplug`` program."""
    from vmplug.cli.app import cli  # noqa: PLC0415

    cls: type[ShellComplete] | None = get_completion_class(shell)
    if cls is None:
        raise click.BadParameter(f"no completion for {shell!r} (one of {', '.join(SHELLS)})")
    return cls(cli, {}, PROG, COMPLETE_VAR).source()


@click.command(
    "completion",
    epilog="\b\nInstall:\n" + "\n".join(f"  {s}: {line}" for s, line in INSTALL.items()),
)
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    It completes subcommands, options, VM names from the config (--vm) and
    the host's device ports and vendor:product ids (DEVICE).  Load it once
    per shell (eval) or install it where the shell looks for completions.
    """
    click.echo(script(shell), nl=False)


__all__ = [
    "COMPLETE_VAR",
    "INSTALL",
    "SHELLS",
    "VmplugBashComplete",
    "add_completers",
    "complete_devices",
    "complete_vm_names",
    "complete_vmids",
    "completion",
    "script",
]
