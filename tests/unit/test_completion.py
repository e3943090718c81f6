"""Shell completion in the real shells: bash, zsh and fish run `vmplug completion SHELL`'s
script and complete subcommands, options, VM names from a config and the ports and
vid:pid of a sysfs tree captured from a real kernel (tests/fixtures/sysfs/mixed).

bash is driven twice: through its completion function (COMP_WORDS/COMP_CWORD as bash
sets them, ':' split off as COMP_WORDBREAKS does), and through readline itself, by
typing TAB into an interactive bash on a pseudo-terminal.  zsh is typed at on a
pseudo-terminal too (compinit, ZLE); fish answers `complete -C`.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmplug.host.inventory import read_devices

REPO = Path(__file__).resolve().parents[2]
SYSFS = REPO / "tests" / "fixtures" / "sysfs" / "mixed"
BIN = Path(sys.executable).parent
CONFIG = """\
[vm.windows]
qmp = "/tmp/vmplug-test-windows.sock"

[vm.workstation]
qmp = "/tmp/vmplug-test-ws.sock"

[vm.linux]
qmp = "/tmp/vmplug-test-linux.sock"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if not (BIN / "vmplug").exists():
        pytest.skip("no vmplug console script next to this Python")
    config = tmp_path / "vmplug.toml"
    config.write_text(CONFIG)
    out = {k: v for k, v in os.environ.items() if not k.startswith(("VMPLUG_", "_VMPLUG", "COMP_"))}
    out.update(
        PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        VMPLUG_SYSFS_ROOT=str(SYSFS),
        VMPLUG_CONFIG=str(config),
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / ".config"),
        XDG_DATA_HOME=str(tmp_path / ".local"),
    )
    return out


def ports() -> list[str]:
    return sorted(d.port for d in read_devices(SYSFS) if not d.is_root_hub)


def ids() -> list[str]:
    return sorted({d.vidpid for d in read_devices(SYSFS) if not d.is_root_hub and d.vidpid})


# ---------------------------------------------------------------------------
# bash: the completion function, as bash calls it


BASH_DRIVER = r"""
eval "$(vmplug completion bash)"
complete -p vmplug
t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
      _vmplug_completion vmplug; printf '%s\n' "${COMPREPLY[@]}" | sort | tr '\n' ' '; echo; }
"""


def bash_complete(env: dict[str, str], *words: str) -> list[str]:
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER + f"t vmplug {quoted}\n"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "complete -o nosort -F _vmplug_completion vmplug"
    return lines[1].split()


def test_bash_completes_subcommands_and_options(env: dict[str, str]) -> None:
    assert bash_complete(env, "at") == ["attach"]
    assert bash_complete(env, "ge") == ["generate"]
    assert bash_complete(env, "generate", "co") == ["compose"]
    assert "completion" in bash_complete(env, "")
    assert "man" not in bash_complete(env, "")  # hidden
    assert bash_complete(env, "doctor", "--js") == ["--json"]
    assert {"--vm", "--persist", "--sysfs-root"} <= set(bash_complete(env, "attach", "--"))


def test_bash_completes_vm_names_from_the_config(env: dict[str, str]) -> None:
    assert bash_complete(env, "attach", "--vm", "") == ["linux", "windows", "workstation"]
    assert bash_complete(env, "attach", "--vm", "w") == ["windows", "workstation"]
    assert bash_complete(env, "doctor", "--vm", "l") == ["linux"]
    env["VMPLUG_CONFIG"] = "/nonexistent/vmplug.toml"
    assert bash_complete(env, "attach", "--vm", "") == []  # no config: nothing, no error


def test_bash_completes_ports_and_ids_from_sysfs(env: dict[str, str]) -> None:
    assert "2-2.4.2" in ports() and "0409:55aa" in ids()
    assert bash_complete(env, "attach", "2-2.4") == [p for p in ports() if p.startswith("2-2.4")]
    assert bash_complete(env, "generate", "qemu", "3") == [p for p in ports() if p[0] == "3"]
    everything = bash_complete(env, "doctor", "")
    assert set(everything) == set(ports()) | set(ids())
    # bash splits 0409:5 at ':' (COMP_WORDBREAKS): the answer is what follows the ':'
    assert bash_complete(env, "attach", "0409", ":", "5") == ["55aa"]
    assert bash_complete(env, "attach", "46f4", ":") == sorted(
        i.split(":")[1] for i in ids() if i.startswith("46f4:")
    )
    # Proxmox VMIDs from the qemu-server configs (tests/fixtures/proxmox)
    env["VMPLUG_PROXMOX_ETC"] = str(REPO / "tests" / "fixtures" / "proxmox" / "etc" / "qemu-server")
    assert bash_complete(env, "generate", "proxmox", "2-2.1", "--vmid", "10") == [
        "101",
        "102",
        "103",
    ]
    # --sysfs-root before the subcommand wins over the environment
    env["VMPLUG_SYSFS_ROOT"] = "/nonexistent"
    assert bash_complete(env, "--sysfs-root", str(SYSFS), "attach", "2-2.4.") == [
        "2-2.4.1",
        "2-2.4.2",
    ]


# ---------------------------------------------------------------------------
# interactive shells on a pseudo-terminal: TAB typed into readline and ZLE

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """A shell on a pseudo-terminal, started and stopped (by PID) by the test."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.buffer = ""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            found = regex.search(_ANSI.sub("", self.buffer))
            if found:
                return found.group(found.lastindex or 0)
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.buffer += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        raise AssertionError(f"{pattern!r} not seen; the terminal showed:\n{self.buffer[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def terminal(env: dict[str, str]) -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for term in started:
        term.close()


def typed_line(term: Terminal, keys: str, marker: str) -> str:
    """Type ``keys`` (with TABs), then go to the line's start and make it an echo:
    the shell prints the command line exactly as completion left it."""
    term.send(keys)
    time.sleep(1.5)  # each TAB runs vmplug once
    term.send(f"\x01echo {marker}:\n")
    return term.expect(rf"(?m)^{marker}:(.*)$")


def test_bash_readline_tab(env: dict[str, str], terminal: list[Terminal]) -> None:
    env.update(PS1="$ ", TERM="dumb", INPUTRC="/dev/null")
    term = Terminal(["bash", "--norc", "--noprofile", "-i"], env)
    terminal.append(term)
    term.send('eval "$(vmplug completion bash)"; echo RE""ADY\n')
    term.expect(r"(?m)^READY$")
    assert typed_line(term, "vmplug att\t", "L1").strip() == "vmplug attach"
    assert typed_line(term, "vmplug attach --vm li\t", "L2").strip() == ("vmplug attach --vm linux")
    # readline completes after the ':' of a vid:pid: only the pid is inserted
    assert typed_line(term, "vmplug attach 0409:5\t", "L3").strip() == "vmplug attach 0409:55aa"
    assert typed_line(term, "vmplug generate qemu 2-2.4.2\t", "L4").strip() == (
        "vmplug generate qemu 2-2.4.2"
    )


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (apt install zsh)")
def test_zsh_tab(env: dict[str, str], terminal: list[Terminal]) -> None:
    env.update(TERM="xterm", PS1="%% ", ZDOTDIR=env["HOME"])
    term = Terminal(["zsh", "-f", "-i"], env)
    terminal.append(term)
    term.send(
        "bindkey -e; autoload -Uz compinit && compinit -u -D; "
        'eval "$(vmplug completion zsh)"; echo RE""ADY\n'
    )
    term.expect(r"(?m)^READY$")
    assert typed_line(term, "vmplug att\t", "Z1").strip() == "vmplug attach"
    assert typed_line(term, "vmplug attach --vm wo\t", "Z2").strip() == (
        "vmplug attach --vm workstation"
    )
    assert typed_line(term, "vmplug attach 0409:\t", "Z3").strip() == "vmplug attach 0409:55aa"
    assert typed_line(term, "vmplug doctor 2-2.4.1\t", "Z4").strip() == ("vmplug doctor 2-2.4.1")


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed (apt install fish)")
def test_fish_complete(env: dict[str, str]) -> None:
    def fish(line: str) -> list[str]:
        proc = subprocess.run(
            ["fish", "--no-config", "-c", f"vmplug completion fish | source; complete -C '{line}'"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return sorted(x.split("\t")[0] for x in proc.stdout.splitlines())

    assert fish("vmplug att") == ["attach"]
    assert fish("vmplug attach --vm w") == ["windows", "workstation"]
    assert fish("vmplug attach 0409:") == ["0409:55aa"]
    assert fish("vmplug attach 2-2.4") == [p for p in ports() if p.startswith("2-2.4")]


def test_completion_command_help_says_how_to_install(env: dict[str, str]) -> None:
    proc = subprocess.run(
        ["vmplug", "completion", "--help"], env=env, capture_output=True, text=True, check=True
    )
    for line in ("/etc/bash_completion.d/vmplug", "_vmplug", "completions/vmplug.fish"):
        assert line in proc.stdout
    bad = subprocess.run(
        ["vmplug", "completion", "tcsh"], env=env, capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
