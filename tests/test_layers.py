"""Layers point one way: the import graph of the package, read with ``ast`` (nothing is imported).

The CLI layer is exactly the module ``amortize.cli`` (one file, ``amortize/cli.py``: parsing, printing,
exit codes); core modules (everything else in ``amortize/`` except ``amortize/validate/``) import
nothing from ``validate`` or ``cli`` (imports under ``if TYPE_CHECKING:`` and inside functions count);
``validate`` imports nothing from ``cli``; runtime imports (module- and function-level, not those
under ``if TYPE_CHECKING:``) have no cycle; no module is over 400 lines; library code never prints.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "amortize"
MAX_LINES = 400
# modules still over the limit, to be split next; no other violation may join this set
KNOWN: set[str] = set()


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "amortize.validate.sbc"
    target: str  # imported module of the package, e.g. "amortize.cli"
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the package at ``root`` (``__init__`` is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, guarded: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node``, with whether it lies in the body of an ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        yield child, guarded
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, guarded
                yield from _walk(stmt, guarded)
        else:
            yield from _walk(child, guarded)


def imports(root: Path) -> list[Import]:
    """Every import of a module of the package by a module of the package, wherever it stands."""
    mods = modules(root)
    out = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node, guarded in _walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from pkg import sub`` needs the submodule; ``from pkg import name``, pkg's own namespace
                # (a package's ``__init__`` runs before any of its submodules, so that is not counted as an edge)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # ``import amortize.validate.nuts`` names a module; trim to one
                    t = t.rpartition(".")[0]
                if t and t != name:
                    out.append(Import(name, t, node.lineno, guarded))
    return out


def layer(module: str) -> str:
    """``"cli"`` (the module ``amortize.cli`` only), ``"validate"`` or ``"core"`` (a submodule of a package
    ``amortize.cli`` would be core, and its imports of validate upward)."""
    parts = module.split(".")
    if module == "amortize.cli":
        return "cli"
    return "validate" if len(parts) > 1 and parts[1] == "validate" else "core"


def upward_imports(root: Path) -> list[str]:
    """Imports from core into validate or cli, and from validate into cli."""
    allowed = {"core": {"core"}, "validate": {"core", "validate"}, "cli": {"core", "validate", "cli"}}
    return [
        f"{i.source} (line {i.line}{', TYPE_CHECKING' if i.type_checking else ''}) imports {i.target}"
        for i in imports(root)
        if layer(i.target) not in allowed[layer(i.source)]
    ]


def cycle_edges(root: Path) -> dict[str, list[str]]:
    """Runtime import edges that lie on a cycle (``"a -> b"``), with the cycle's modules (Tarjan's SCCs)."""
    graph: dict[str, set[str]] = {m: set() for m in modules(root)}
    for i in imports(root):
        if not i.type_checking:
            graph[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    component: dict[str, int] = {}
    sccs: list[list[str]] = []

    def visit(v: str) -> None:  # recursive Tarjan; the package is far shallower than the recursion limit
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component[w] = len(sccs)
                scc.append(w)
                if w == v:
                    break
            sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return {
        f"cycle: {a} -> {b}": sccs[component[a]]
        for a in sorted(graph)
        for b in sorted(graph[a])
        if component[a] == component[b]
    }


def long_modules(root: Path) -> list[str]:
    """Files of the package over :data:`MAX_LINES` lines."""
    return [
        f"size: {path.relative_to(root.parent).as_posix()}"
        for path in modules(root).values()
        if len(path.read_text().splitlines()) > MAX_LINES
    ]


def prints(root: Path) -> list[str]:
    """Calls of ``print`` outside the CLI."""
    return [
        f"{name} line {node.lineno}"
        for name, path in modules(root).items()
        if layer(name) != "cli"
        for node, _ in _walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


# --------------------------------------------------------------------------------------------- the package
def test_core_never_imports_validate_or_cli_and_validate_never_imports_cli() -> None:
    assert upward_imports(PACKAGE) == []


def test_the_cli_is_one_module() -> None:
    mods = modules(PACKAGE)
    assert (PACKAGE / "cli.py").is_file() and not (PACKAGE / "cli").exists()
    assert [m for m in mods if m.startswith("amortize.cli.")] == []


def test_runtime_imports_have_no_new_cycle() -> None:
    edges = cycle_edges(PACKAGE)
    new = sorted(set(edges) - KNOWN)
    assert not new, "\n".join(f"{e} (cycle through {', '.join(edges[e])})" for e in new)


def test_no_new_module_over_400_lines() -> None:
    assert sorted(set(long_modules(PACKAGE)) - KNOWN) == []


def test_library_code_never_prints() -> None:
    assert prints(PACKAGE) == []


# --------------------------------------------------------------------------------------------- the checks
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "amortize"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_find_upward_imports_wherever_they_stand(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "data.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .validate.sbc import SBCResult\n",
            "train.py": "def f():\n    from amortize.cli import load_run\n",
            "posterior.py": "from . import data\nfrom .validate import plots\n",
            "cli.py": "from .validate import sbc\nfrom . import train\n",
            "tools/__init__.py": "",
            "tools/checks.py": "from ..validate import sbc\n",
            "validate/__init__.py": "from . import sbc, plots\n",
            "validate/sbc.py": "import amortize.cli\nfrom ..data import x\n",
            "validate/plots.py": "",
        },
    )
    found = upward_imports(root)
    assert found == [
        "amortize.data (line 3, TYPE_CHECKING) imports amortize.validate.sbc",
        "amortize.posterior (line 2) imports amortize.validate.plots",
        "amortize.tools.checks (line 1) imports amortize.validate.sbc",
        "amortize.train (line 2) imports amortize.cli",
        "amortize.validate.sbc (line 1) imports amortize.cli",
    ]


def test_the_checks_find_runtime_cycles_long_modules_and_prints(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "from .a import x\n",
            "a.py": "from .b import y\n" + "z = 1\n" * MAX_LINES,
            "b.py": "def f():\n    from . import a\n    print(a)\n",
            "c.py": "from typing import TYPE_CHECKING\nfrom .a import x\nif TYPE_CHECKING:\n    from .d import w\n",
            "d.py": "from .c import v\n",
            "cli.py": "print('fine here')\n",
        },
    )
    edges = cycle_edges(root)
    assert sorted(edges) == ["cycle: amortize.a -> amortize.b", "cycle: amortize.b -> amortize.a"]
    assert edges["cycle: amortize.a -> amortize.b"] == ["amortize.a", "amortize.b"]  # c <-> d only under TYPE_CHECKING
    assert long_modules(root) == ["size: amortize/a.py"]
    assert prints(root) == ["amortize.b line 3"]


@pytest.mark.parametrize(
    "module, expect",
    [("amortize.cli", "cli"), ("amortize.validate.nuts", "validate"), ("amortize.cli.checks", "core")],
)
def test_layers_by_name(module: str, expect: str) -> None:
    assert layer(module) == expect and layer("amortize.models.radon") == "core" and layer("amortize") == "core"


def test_a_cli_package_is_found(tmp_path: Path) -> None:
    """``amortize/cli/`` as a package: its submodules are core, so their imports of validate are upward."""
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "cli/__init__.py": "from .checks import run\n",
            "cli/checks.py": "from ..validate.sbc import sbc\nprint('x')\n",
            "validate/__init__.py": "",
            "validate/sbc.py": "",
        },
    )
    assert upward_imports(root) == ["amortize.cli.checks (line 1) imports amortize.validate.sbc"]
    assert prints(root) == ["amortize.cli.checks line 2"]
