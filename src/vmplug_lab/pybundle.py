"""The Python modules ``vmplug run`` imports, for a lab guest's tmpfs.

The lab guest sees the host's root file system over 9p under TCG, where every
``stat``/``open`` of Python's import system is a round trip through an emulated
virtio ring: ``vmplug run`` imports about 500 modules and took 26-28 s from
start to its first rescan in the guest (issue 16).  :func:`build` writes, on
the host, one tar of those modules' files laid out as a single ``sys.path``
directory (whole packages, so that a submodule imported later is there too;
``.py`` with their current ``__pycache__`` ``.pyc``, so nothing is compiled;
extension modules and package data alike); the guest unpacks it into its
tmpfs with one sequential read of the share.  The files are the host's own,
byte for byte: the same code runs, only found faster.  A module not in the
bundle is still found where it always was (the share), so the bundle can only
make an import faster.

Only vmplug's own Python (the venv's interpreter) is given the bundle: its
modules are that interpreter's (its standard library among them), and a
system Python given them (Debian's docker-compose, with ``PYTHONPATH``) broke.
So no environment variable carries it: the guest lays :func:`pth_text` over a
``.pth`` file of the venv's site-packages (a bind mount in the guest alone:
the host's file is untouched), which only that interpreter's ``site`` reads.
``VMPLUG_LAB_BUNDLE=0`` in a guest command's environment leaves it out.

The bundle is a snapshot taken at boot: a source file edited on the host while
a guest runs is seen by that guest only after its next boot.

Its bytecode is current whatever the host's ``__pycache__`` holds: a ``.py``
whose cached ``.pyc`` does not match it (edited since, and the host's Python
writes no bytecode: ``PYTHONDONTWRITEBYTECODE``) gets a ``.pyc`` compiled for
the bundle alone (:func:`fresh_bytecode`).  Without that the guest compiled
every edited module at its first import after each boot (and over the share,
where it cannot write, at every start): the first ``vmplug run`` of a boot
paid for it under TCG.
"""

from __future__ import annotations

import importlib.util
import json
import os
import py_compile
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

#: What the daemon imports, eagerly or on its first pass (API, metrics, QMP,
#: uevents); their import closure goes in, whole top-level packages at a time.
ENTRY_MODULES = (
    "vmplug.cli.app",
    "vmplug.cli.completion",
    "vmplug.cli.daemon",
    "vmplug.cli.devices",
    "vmplug.daemon.reconciler",
    "vmplug.daemon.alerts",
    "vmplug.daemon.notify",
    "vmplug.api.server",
    "vmplug.api.metrics",
    "vmplug.history.health",
    "vmplug.vms.qmp",
    "vmplug.wire.qmp",
    "vmplug.wire.qga",
    "qemu.qmp",
    "pyudev",
    "aiohttp.web",
    "prometheus_client",
)

#: Run by the Python the guest runs: imports the entries (a missing optional
#: one is skipped) and prints each loaded module's file and ``sys.path``.
_LISTER = """
import importlib, json, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
print(json.dumps({"files": [f for f in files if f], "path": sys.path}))
"""

_SKIP_DIRS = frozenset({"tests", "test", "idle_test"})


def _package_files(root: str, top: str, tag: str) -> list[str]:
    """Every file of the top-level package ``top`` under ``root`` (relative
    paths), without test suites and without bytecode of other optimisation
    levels or interpreters."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(Path(root, top)):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".pyc") and (tag not in name or ".opt-" in name):
                continue
            out.append(os.path.relpath(Path(dirpath, name), root))
    return out


def collect(
    python: str = sys.executable, entries: tuple[str, ...] = ENTRY_MODULES
) -> dict[str, str]:
    """Archive name -> host file, for the modules ``entries`` load in ``python``."""
    # -B: importing the entries must not write the host's __pycache__ (a stale
    # .pyc there is the host's business; the bundle compiles its own)
    proc = subprocess.run(
        [python, "-B", "-c", _LISTER, *entries],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    found = json.loads(proc.stdout)
    roots = sorted((p for p in found["path"] if p and Path(p).is_dir()), key=len, reverse=True)
    tag = sys.implementation.cache_tag or "cpython"
    files: dict[str, str] = {}
    tops: set[tuple[str, str]] = set()
    for path in found["files"]:
        root = next((r for r in roots if path.startswith(r.rstrip("/") + "/")), None)
        if root is None:
            continue  # the script itself, a file outside sys.path
        rel = os.path.relpath(path, root)
        if "/" in rel:
            tops.add((root, rel.split("/", 1)[0]))
            continue
        files.setdefault(rel, path)
        stem = rel.rsplit(".", 1)[0]
        cached = Path(root, "__pycache__", f"{stem}.{tag}.pyc")
        if rel.endswith(".py") and cached.exists():
            files.setdefault(f"__pycache__/{stem}.{tag}.pyc", str(cached))
    for root, top in sorted(tops, key=lambda t: roots.index(t[0])):  # first on sys.path wins
        for rel in _package_files(root, top, tag):
            files.setdefault(rel, str(Path(root, rel)))
    return files


def _bytecode_current(source: Path, cached: Path) -> bool:
    """Whether ``cached`` is the timestamp-checked bytecode the import system
    would take for ``source`` (magic number, source mtime and size)."""
    try:
        head = cached.read_bytes()[:16]
        st = source.stat()
    except OSError:
        return False
    return (
        len(head) == 16
        and head[:4] == importlib.util.MAGIC_NUMBER
        and int.from_bytes(head[4:8], "little") == 0  # timestamp-based, not hash-based
        and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF
    )


def fresh_bytecode(files: dict[str, str], out: Path) -> int:
    """Give every ``.py`` of ``files`` (archive name -> host file) a current
    ``__pycache__`` ``.pyc`` for this interpreter: the host's where it is
    current, else one compiled into ``out``; the number compiled.  A file
    that does not compile (a template, another Python's code) keeps none, as
    the import system would."""
    tag = sys.implementation.cache_tag or "cpython"
    compiled = 0
    for arcname, src in list(files.items()):
        if not arcname.endswith(".py"):
            continue
        head, _, name = arcname.rpartition("/")
        cache_arc = f"{head + '/' if head else ''}__pycache__/{name[:-3]}.{tag}.pyc"
        cached = files.get(cache_arc)
        if cached is not None and _bytecode_current(Path(src), Path(cached)):
            continue
        target = out / cache_arc
        try:
            py_compile.compile(src, cfile=str(target), doraise=True)
        except (py_compile.PyCompileError, OSError, ValueError):
            files.pop(cache_arc, None)
            continue
        files[cache_arc] = str(target)
        compiled += 1
    return compiled


def build(
    dest: Path, python: str = sys.executable, entries: tuple[str, ...] = ENTRY_MODULES
) -> int:
    """Write the bundle tar at ``dest``; the number of files in it."""
    files = collect(python, entries)
    tmp = dest.with_name(dest.name + ".part")
    with tempfile.TemporaryDirectory(prefix="vmplug-bundle-pyc-") as pyc:
        fresh_bytecode(files, Path(pyc))
        with tarfile.open(tmp, "w") as tar:
            for arcname, src in sorted(files.items()):
                tar.add(src, arcname=arcname, recursive=False)  # mtimes kept: the .pyc stay valid
    tmp.replace(dest)
    return len(files)


def site_pth() -> Path | None:
    """The ``.pth`` of this Python's site-packages (the venv the guest runs vmplug
    from) to lay the bundle's line over: vmplug's own (an editable install's),
    else the first there is; None when there is none."""
    found = sorted(Path(sysconfig.get_paths()["purelib"]).glob("*.pth"))
    own = [p for p in found if p.name.startswith("__editable__.vmplug-")]
    return (own or found)[0] if found else None


def pth_text(original: str, bundle_dir: str) -> str:
    """``original`` (a ``.pth``'s lines, kept as they were) and one line more that
    puts ``bundle_dir`` on ``sys.path`` where ``PYTHONPATH`` would have put it:
    after the entries ``PYTHONPATH`` itself gives (a checkout named there still
    wins, as tests/lab/test_lab_remove_race.py asks), before the standard library;
    unless the process runs with ``VMPLUG_LAB_BUNDLE=0``."""
    line = (
        "import os, sys; os.environ.get('VMPLUG_LAB_BUNDLE') == '0' or sys.path.insert("
        "0 if sys.flags.ignore_environment else "
        "len([p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]), "
        f"{bundle_dir!r})"
    )
    return f"{original.rstrip(chr(10))}\n{line}\n" if original.strip() else f"{line}\n"
