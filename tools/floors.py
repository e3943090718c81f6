#!/usr/bin/env python3
"""Prove the dependency floors that pyproject.toml declares.

A floor (``aiohttp>=3.14``) is a promise: vmplug works with that version.
This check keeps the promise honest.  It makes a throwaway virtual
environment, installs every direct runtime dependency pinned to its floor
(``aiohttp==3.14``) and the test tools the unit tier needs, pinned to the
floors of the ``test`` extra, then installs vmplug itself with ``--no-deps``
(built by the floor of ``setuptools`` in ``[build-system]``) and runs, in
that environment:

1. ``pip check``: the pins agree with each other;
2. an import of every vmplug module (an API missing at import time, such as
   ``web.RequestKey`` in aiohttp < 3.14, fails here, whatever the tests cover);
3. ``vmplug ... --help`` for every command and subcommand, found by walking
   the click group (a new command is covered without editing this file);
4. the unit tier: ``pytest -m "not lab and not qemu"`` (no QEMU, no lab guest),
   less the tests of external programs named in ``UNIT_TIER_IGNORE`` and
   ``UNIT_TIER_DESELECT`` (each with the reason it is left out).

Exit 0 when all pass, 1 when any fails, 2 on bad input (e.g. a dependency
without a ``>=`` floor).  ``--floor NAME=VERSION`` tries another floor without
editing pyproject.toml (``--floor aiohttp=3.13.5`` shows the check failing).

    python3 tools/floors.py [--venv DIR] [--fresh] [--floor NAME=VERSION]... [-- PYTEST_ARGS]

The environment is kept (default ``.floors-venv``) and reused while the pins
are unchanged: a second run installs only vmplug.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The test tools the unit tier imports (pytest plugins included), by their
#: names in the ``test`` extra; each is pinned to the floor declared there.
UNIT_TIER_TOOLS = (
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
    "hypothesis",
    "jsonschema",
    "PyYAML",
    "check-jsonschema",  # tests/generate validate against the Compose schema it vendors
    "mypy",  # tests/vms/test_contract.py runs it on a probe of the VmBackend contract
)

#: What the unit tier leaves out, and why.  This tier proves the declared
#: floors of vmplug's *Python* dependencies; a test that mainly proves an
#: external program (systemd, a shell's line editor, Podman) gains nothing
#: from a floor pin, and re-running it here only makes CI slower.  Those
#: tests run in the full suite (scripts/test.sh's pytest step) with .venv.
UNIT_TIER_IGNORE: dict[str, str] = {
    # imports playwright at module level (not a unit-tier tool), although
    # every test in it is marked ``qemu``
    "tests/web": "playwright",
    # boots a generated unit under systemd-nspawn (a whole systemd in a
    # container, ~1 min per test on a loaded 2-core machine): proves systemd
    # runs the unit, not a Python floor; test_unit_text.py covers the unit text
    "tests/systemd/test_unit_under_systemd.py": "systemd-nspawn boots",
    # starts real Podman API services (rootless and rootful): proves Podman,
    # not a Python floor; the doctor's Python paths run in the other
    # tests/doctor modules
    "tests/doctor/test_rootless_podman.py": "Podman API services",
}

#: Single tests left out: shell completion typed into an interactive bash
#: and zsh on a pseudo-terminal proves readline / ZLE.  The click completion
#: code they go through is still proved at the floor by the other
#: tests/unit/test_completion.py tests (bash's completion function, fish).
UNIT_TIER_DESELECT: dict[str, str] = {
    "tests/unit/test_completion.py::test_bash_readline_tab": "bash readline on a pty",
    "tests/unit/test_completion.py::test_zsh_tab": "zsh ZLE on a pty",
}

#: The unit tier: every test that needs neither QEMU nor the lab guest.
UNIT_TIER_MARKERS = "not lab and not qemu"

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")
_FLOOR = re.compile(r"^>=\s*([0-9][0-9A-Za-z.+!-]*)$")


#: pip's word on each extra index location it cannot read: said for every package
_PIP_NOISE = re.compile(r"^WARNING: Location '.*' is ignored")


class FloorsError(Exception):
    """Bad input: a dependency this check cannot pin (exit 2)."""


@dataclass(frozen=True)
class Requirement:
    name: str
    spec: str  # the specifier set as written, e.g. ">=0.0.3,<0.0.7"
    floor: str | None  # the version after ">=", when there is one

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.floor}"


def parse_requirement(text: str) -> Requirement:
    """``"qemu.qmp>=0.0.3,<0.0.7"`` -> Requirement("qemu.qmp", ">=0.0.3,<0.0.7", "0.0.3")."""
    m = _REQ.match(text)
    if m is None or not m.group(1):
        raise FloorsError(f"cannot read requirement {text!r}")
    spec = m.group(3).replace(" ", "")
    floors = [f.group(1) for part in spec.split(",") if (f := _FLOOR.match(part))]
    if len(floors) > 1:
        raise FloorsError(f"{text!r}: more than one '>=' floor")
    return Requirement(m.group(1), spec, floors[0] if floors else None)


def normalize(name: str) -> str:
    """PEP 503 name: ``ruamel.yaml`` and ``Ruamel_YAML`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(pyproject: Path, overrides: dict[str, str]) -> tuple[list[str], list[str], str]:
    """(runtime pins, test-tool pins, build backend pin) from ``pyproject``."""
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FloorsError(f"{pyproject}: {exc}") from exc
    project = data.get("project", {})
    runtime = [parse_requirement(r) for r in project.get("dependencies", [])]
    tests = {
        normalize(r.name): r
        for r in map(parse_requirement, project.get("optional-dependencies", {}).get("test", []))
    }
    build = [parse_requirement(r) for r in data.get("build-system", {}).get("requires", [])]
    backend = next((r for r in build if normalize(r.name) == "setuptools"), None)
    if not runtime:
        raise FloorsError(f"{pyproject}: no [project] dependencies")
    if backend is None:
        raise FloorsError(f"{pyproject}: [build-system] requires no setuptools")
    chosen = [*runtime, *(tests.get(normalize(t)) for t in UNIT_TIER_TOOLS), backend]
    missing = [t for t, r in zip(UNIT_TIER_TOOLS, chosen[len(runtime) : -1], strict=True) if not r]
    if missing:
        raise FloorsError(f"{pyproject}: the test extra lacks {', '.join(missing)}")
    known = {normalize(r.name) for r in chosen if r}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise FloorsError(f"--floor names no pinned dependency: {', '.join(unknown)}")
    pins: list[str] = []
    for req in chosen:
        assert req is not None  # checked above
        floor = overrides.get(normalize(req.name), req.floor)
        if floor is None:
            raise FloorsError(f"{req.name}{req.spec}: no '>=' floor to test (write {req.name}>=X)")
        pins.append(f"{req.name}=={floor}")
    return pins[: len(runtime)], pins[len(runtime) : -1], pins[-1]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One run at a time per environment (test.sh runs may overlap)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def run(
    step: str,
    argv: Sequence[str],
    env: dict[str, str],
    tail: bool = False,
    cwd: Path | None = None,
) -> bool:
    """Run one step, print its name, duration and (on failure) its output."""
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env, cwd=cwd)
    took = time.monotonic() - t0
    ok = proc.returncode == 0
    print(f"floors: {step}: {'ok' if ok else f'FAILED (exit {proc.returncode})'} in {took:.1f} s")
    if not ok:
        for line in (proc.stdout + proc.stderr).splitlines():
            if not _PIP_NOISE.match(line):
                print(f"  {line}")
    elif tail and proc.stdout.strip():
        print(f"floors:   {proc.stdout.strip().splitlines()[-1]}")
    sys.stdout.flush()
    return ok


def clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def build_venv(venv: Path, pins: list[str], fresh: bool, env: dict[str, str]) -> bool:
    """Make ``venv`` hold exactly ``pins`` (reused when a previous run installed them)."""
    stamp = venv / "floors-pins.json"
    want = json.dumps({"python": sys.version, "pins": pins}, indent=1)
    if not fresh and stamp.is_file() and stamp.read_text() == want:
        print(f"floors: reusing {venv} (pins unchanged)")
        return True
    shutil.rmtree(venv, ignore_errors=True)
    py = "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable
    if not run("venv", [py, "-m", "venv", str(venv)], env=env):
        return False
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    if not run("install the floors", [*pip, *pins], env=env):
        return False
    stamp.write_text(want)
    return True


def install_vmplug(venv: Path, env: dict[str, str]) -> bool:
    """Build vmplug from a copy of the work tree (no build/ or egg-info left
    in it) with the floor setuptools, and install it with --no-deps."""
    with tempfile.TemporaryDirectory(prefix="vmplug-floors-") as tmp:
        src = Path(tmp) / "src"
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, Path(tmp) / name)
        shutil.copytree(
            ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        return run(
            "install vmplug --no-deps",
            [*pip, "--no-deps", "--no-build-isolation", "--force-reinstall", tmp],
            env=env,
        )


#: Run inside the floors venv: import every vmplug module.
IMPORT_ALL = """
import importlib, pkgutil, sys, traceback
import vmplug
bad = 0
for mod in pkgutil.walk_packages(vmplug.__path__, "vmplug."):
    if mod.name.endswith(".__main__"):
        continue
    try:
        importlib.import_module(mod.name)
    except Exception:
        bad += 1
        print(f"import {mod.name} failed:", file=sys.stderr)
        traceback.print_exc()
print(f"{bad} of the vmplug modules failed to import", file=sys.stderr)
sys.exit(1 if bad else 0)
"""

#: Run inside the floors venv: print every command path of the click group.
WALK = """
import json, click
from vmplug.cli import cli
def walk(cmd, path, ctx):
    yield path
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None:
                raise SystemExit(f"{' '.join(path + [name])}: listed but not found")
            yield from walk(sub, path + [name], click.Context(sub, info_name=name, parent=ctx))
print(json.dumps(list(walk(cli, [], click.Context(cli, info_name="vmplug")))))
"""


def check_helps(venv: Path, env: dict[str, str]) -> bool:
    """``vmplug PATH --help`` for every command path: exit 0 and a usage line."""
    t0 = time.monotonic()
    python = str(venv / "bin" / "python")
    walked = subprocess.run(
        [python, "-c", WALK], capture_output=True, text=True, check=False, env=env
    )
    if walked.returncode != 0:
        print(f"floors: walking the commands FAILED:\n{walked.stdout}{walked.stderr}")
        return False
    paths: list[list[str]] = json.loads(walked.stdout)
    exe = str(venv / "bin" / "vmplug")

    def one(path: list[str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        argv = [exe, *path, "--help"]
        return path, subprocess.run(argv, capture_output=True, text=True, check=False, env=env)

    failed = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path, proc in pool.map(one, paths):
            if proc.returncode != 0 or "Usage:" not in proc.stdout:
                failed += 1
                cmd = " ".join(["vmplug", *path, "--help"])
                print(f"floors: {cmd}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    took = time.monotonic() - t0
    verdict = "ok" if not failed else f"FAILED ({failed} failed)"
    print(f"floors: --help of {len(paths)} commands: {verdict} in {took:.1f} s")
    return not failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--venv", type=Path, default=ROOT / ".floors-venv", help="environment (kept, reused)"
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild the environment")
    parser.add_argument(
        "--floor",
        action="append",
        default=[],
        metavar="NAME=VERSION",
        help="test this version instead of the declared floor (repeatable)",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    overrides: dict[str, str] = {}
    for item in args.floor:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            print(f"floors: --floor wants NAME=VERSION, not {item!r}", file=sys.stderr)
            return 2
        overrides[normalize(name)] = version
    try:
        runtime, tools, backend = read_pins(ROOT / "pyproject.toml", overrides)
    except FloorsError as exc:
        print(f"floors: {exc}", file=sys.stderr)
        return 2
    venv: Path = args.venv.resolve()
    print(f"floors: runtime {' '.join(runtime)}")
    print(f"floors: tests {' '.join(tools)}; build {backend}")
    sys.stdout.flush()
    t0 = time.monotonic()
    env = clean_env(venv)
    python = str(venv / "bin" / "python")
    with locked(venv.with_name(venv.name + ".lock")):
        ok = build_venv(venv, [*runtime, *tools, backend, "wheel"], args.fresh, env)
        ok = ok and install_vmplug(venv, env)
        if ok:
            results = [
                run("pip check", [python, "-m", "pip", "check"], env=env),
                run("import every vmplug module", [python, "-c", IMPORT_ALL], env=env),
                check_helps(venv, env),
                run(
                    f'unit tier (pytest -m "{UNIT_TIER_MARKERS}")',
                    [
                        python,
                        "-m",
                        "pytest",
                        "-p",
                        "no:cacheprovider",
                        "-q",
                        "-m",
                        UNIT_TIER_MARKERS,
                        *(f"--ignore={path}" for path in UNIT_TIER_IGNORE),
                        *(f"--deselect={node}" for node in UNIT_TIER_DESELECT),
                        *args.pytest_args,
                    ],
                    tail=True,
                    env=env,
                    cwd=ROOT,
                ),
            ]
            ok = all(results)
    took = time.monotonic() - t0
    print(f"floors: {'all floors hold' if ok else 'a floor does not hold'} ({took:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
