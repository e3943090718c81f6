"""The lab is not part of the product: vmplug imports vmplug_lab nowhere but
inside the ``vmplug demo`` command's function, and vmplug_lab's guest scripts
stay standard library only (the guest runs them with ``python3 -I -S``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    found: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node, node.module))
    return found


def _top_level(tree: ast.Module) -> set[int]:
    """ids of the import statements not inside a function."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            inside |= {id(n) for n in ast.walk(fn)}
    return {id(n) for n in ast.walk(tree) if isinstance(n, ast.stmt)} - inside


def test_vmplug_imports_the_lab_only_lazily_in_the_demo_command() -> None:
    seen: list[str] = []
    for path in sorted((SRC / "vmplug").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = _top_level(tree)
        for node, name in _imports(tree):
            if name == "vmplug_lab" or name.startswith("vmplug_lab."):
                rel = path.relative_to(SRC).as_posix()
                seen.append(rel)
                assert id(node) not in top, f"{rel}:{node.lineno} imports {name} at import time"
    assert seen, "the demo command no longer calls into vmplug_lab?"
    assert all(p.endswith("/demo.py") for p in seen), seen


def test_the_cli_and_demo_help_do_not_load_the_lab() -> None:
    code = (
        "import contextlib, sys\n"
        "from vmplug.cli import main\n"
        "with contextlib.suppress(SystemExit):\n"
        "    main(['demo', '--help'])\n"
        "print('LAB', sorted(m for m in sys.modules if m.split('.')[0] == 'vmplug_lab'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "Usage: " in out.stdout and "demo" in out.stdout, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "LAB []"


def test_guest_scripts_use_only_the_standard_library() -> None:
    for path in sorted((SRC / "vmplug_lab" / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for _node, name in _imports(tree):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__", f"{path.name}: {name}"
