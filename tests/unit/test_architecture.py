"""ARCHITECTURE.md, kept true: the import graph of src/ has no cycle and no
import against the layering.

The layers (lowest first) and what each may import are the table in
ARCHITECTURE.md; this test is that table, executable.  Every import counts,
also those inside functions (a lazy import is still a dependency), except
those under ``if TYPE_CHECKING:``.  Cycles are looked for among module-level
imports: those are the ones that decide import order and break at start-up.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

#: Lowest first.  A module may import modules of its own layer or of a lower one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("vmplug", "vmplug.errors", "vmplug.model", "vmplug.aio", "vmplug.textsafe")),
    (
        "pure core",
        (
            "vmplug.rules",
            "vmplug.config",
            "vmplug.config_write",
            "vmplug.engine",
            "vmplug.generate",
        ),
    ),
    ("edges", ("vmplug.host", "vmplug.wire", "vmplug.history")),
    ("vms", ("vmplug.vms",)),
    ("services", ("vmplug.daemon", "vmplug.doctor", "vmplug.remote")),
    ("api", ("vmplug.api",)),
    ("cli", ("vmplug.cli", "vmplug.__main__")),
    ("lab", ("vmplug_lab",)),
)

#: The pure core performs no I/O of its own: none of these, anywhere in it.
PURE = (
    "vmplug.rules",
    "vmplug.engine",
    "vmplug.generate",
    "vmplug.model",
    "vmplug.errors",
    "vmplug.textsafe",
)
IO_MODULES = frozenset(
    {"socket", "subprocess", "asyncio", "sqlite3", "aiohttp", "http", "urllib", "pyudev", "qemu"}
)

#: The one import against the layering that the design allows: `vmplug demo`
#: is a product command whose machinery is the lab, loaded only when it runs.
ALLOWED = frozenset({("vmplug.cli.demo", "vmplug_lab")})


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    top_level: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> Iterator[Import]:
    source = _module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))

    def visit(node: ast.AST, top: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(source, alias.name, child.lineno, top)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join([*base, child.module] if child.module else base)
                else:
                    module = child.module or ""
                yield Import(source, module, child.lineno, top)
                # `from vmplug import store` imports the module vmplug.store
                for alias in child.names:
                    yield Import(source, f"{module}.{alias.name}", child.lineno, top)
            else:
                in_function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from visit(child, top and not in_function)

    yield from visit(tree, True)


def _all_imports() -> tuple[set[str], list[Import]]:
    modules: set[str] = set()
    found: list[Import] = []
    for path in sorted(SRC.rglob("*.py")):
        modules.add(_module_name(path))
        found.extend(_imports(path))
    return modules, found


def _resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import names (the longest existing prefix), or None."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def _layer(module: str) -> tuple[int, str]:
    best: tuple[int, int, str] | None = None
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # the bare package name stands for its __init__ alone
            inside = module.startswith(prefix + ".") and prefix != "vmplug"
            if (module == prefix or inside) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index, name)
    assert best is not None, f"{module} is in no layer of ARCHITECTURE.md: add it there"
    return best[1], best[2]


def test_every_module_is_in_a_layer() -> None:
    modules, _ = _all_imports()
    for module in modules:
        _layer(module)


def test_no_import_against_the_layering() -> None:
    modules, found = _all_imports()
    wrong = []
    for imp in found:
        target = _resolve(imp.target, modules)
        if target is None or target == imp.source:
            continue
        (src_level, src_name), (dst_level, dst_name) = _layer(imp.source), _layer(target)
        top = target.split(".")[0]
        if dst_level > src_level and (imp.source, top) not in ALLOWED:
            wrong.append(f"{imp.source}:{imp.line} ({src_name}) imports {target} ({dst_name})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_the_pure_core_does_no_io() -> None:
    _, found = _all_imports()
    wrong = []
    for imp in found:
        if not any(imp.source == p or imp.source.startswith(p + ".") for p in PURE):
            continue
        if imp.target.split(".")[0] in IO_MODULES:
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    sys.setrecursionlimit(10000)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle() -> None:
    modules, found = _all_imports()
    edges: dict[str, set[str]] = {}
    for imp in found:
        target = _resolve(imp.target, modules)
        # a package's __init__ importing its own submodules is how packages work
        if (
            imp.top_level
            and target is not None
            and target != imp.source
            and not target.startswith(imp.source + ".")
        ):
            edges.setdefault(imp.source, set()).add(target)
    assert _cycles(edges) == []


def test_the_checker_sees_a_cycle_and_a_wrong_import() -> None:
    """The checks above can fail: a made-up graph with both faults is caught."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _layer("vmplug.cli.devices")[0] > _layer("vmplug.host.sysfs")[0]
    assert _resolve("vmplug.host.sysfs.read_device", {"vmplug.host.sysfs"}) == "vmplug.host.sysfs"
