"""The import graph of the packages' modules (issue #17): which modules import which, read with `ast`.

Imports inside functions count (they run too); imports under `if TYPE_CHECKING:` do not. Two checks on it:
no import circle among the modules (the strongly connected components are printed with `-s`), and the floors
of docs/architecture.md: each module imports only the floors its row of `FLOORS` allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "tools", "kg_qa_builder", "rl", "sft")

# floor (a module prefix; the longest one that matches a module is its floor) -> the prefixes it may import.
# docs/architecture.md explains each row; an exception is written there with its reason.
FLOORS: dict[str, tuple[str, ...]] = {
    "pipeline.core": ("pipeline.core",),
    "tools": ("pipeline.core", "tools"),
    # the text-QA exports render with the one protocol renderer, so they hold exactly what SFT trains on
    "kg_qa_builder": ("pipeline.core", "tools.protocol", "kg_qa_builder"),
    # the one model loader (tiny build, load, save); the tiny tokenizer's corpus reads the protocol strings
    # and sft.data's instruction strings, so it sits above tools and sft.data and below the stages
    "pipeline.models": ("pipeline.core", "tools", "sft.data", "sft.errors", "sft.export"),
    "rl": ("pipeline.core", "tools", "pipeline.models", "rl"),
    "sft": ("pipeline.core", "tools", "pipeline.models", "rl", "sft"),
    "pipeline.eval": ("pipeline.core", "tools", "kg_qa_builder", "pipeline.models", "rl", "sft", "pipeline.eval"),
    "pipeline": PACKAGES,  # the roof: cli, runner, stages, launcher entry, plan, reports, ablate, importers
}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import in `tree` outside `if TYPE_CHECKING:` blocks."""
    out: list[tuple[str, str | None]] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # only the `else:` branch runs
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out += [(base, a.name) for a in node.names]
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module → the modules of `packages` (under `root`) it imports, anywhere but under TYPE_CHECKING."""
    files = {_module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for target, name in _imports(tree, mod, path.name == "__init__.py"):
            if name is not None and f"{target}.{name}" in files:
                dep = f"{target}.{name}"  # `from pkg import module`
            else:  # the longest known module prefix of `a.b.c`
                parts = target.split(".")
                cands = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
                dep = next((c for c in cands if c in files), "")
            if dep and dep != mod:
                graph[mod].add(dep)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), those with more than one module, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return sorted(comps, key=lambda c: (-len(c), c))


def _component_of(comps: list[list[str]], mod: str) -> set[str]:
    return next((set(c) for c in comps if mod in c), {mod})


def test_finder_sees_function_imports_and_skips_type_checking(tmp_path: Path) -> None:
    """The checker itself: a circle closed by an import inside a function is found; one closed only under
    TYPE_CHECKING is not; relative imports resolve."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from p import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from p.b import f\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.c import y\n"
                              "else:\n    import p.a\n")
    (pkg / "e.py").write_text("import p.d\n")
    g = import_graph(tmp_path, ("p",))
    assert g["p.a"] == {"p.b"} and g["p.b"] == {"p.a"} and g["p.d"] == {"p.a"} and g["p.e"] == {"p.d"}
    assert strongly_connected(g) == [["p.a", "p.b"]]
    (pkg / "c.py").write_text("from p.b import f\nimport p.e\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    from . import c\n")
    comps = strongly_connected(import_graph(tmp_path, ("p",)))
    assert comps == [["p.a", "p.b", "p.c", "p.d", "p.e"]]


@pytest.fixture(scope="module")
def components() -> list[list[str]]:
    comps = strongly_connected(import_graph(REPO, PACKAGES))
    print(f"\nimport circles left among {', '.join(PACKAGES)}: {len(comps)} component(s)")
    for c in comps:
        print(f"  size {len(c)}: {', '.join(c)}")
    return comps


@pytest.mark.parametrize("a, b", [("rl.agent", "rl.backends"), ("tools.server.app", "tools.server.mcp"),
                                  ("tools.server.config", "tools.server.encoding")])
def test_broken_circles_stay_broken(components: list[list[str]], a: str, b: str) -> None:
    assert b not in _component_of(components, a), f"{a} and {b} import each other again (directly or around)"


def _within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def floor_of(mod: str, floors: dict[str, tuple[str, ...]]) -> str:
    """The longest floor prefix of `mod` ("" when none)."""
    return max((f for f in floors if _within(mod, f)), key=len, default="")


def floor_violations(graph: dict[str, set[str]], floors: dict[str, tuple[str, ...]]) -> list[str]:
    """'a -> b' for every import of a module from a floor that a's floor may not import."""
    out = []
    for mod in sorted(graph):
        allowed = floors.get(floor_of(mod, floors), ())
        out += [f"{mod} -> {dep}" for dep in sorted(graph[mod]) if not any(_within(dep, a) for a in allowed)]
    return out


def test_floor_checker_counts_function_imports_and_skips_type_checking(tmp_path: Path) -> None:
    """The floors check itself: an upward import inside a function is reported; one under TYPE_CHECKING is not."""
    for d in ("p", "p/core", "p/roof"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "p/roof/cli.py").write_text("from p.core import base\n")
    (tmp_path / "p/core/base.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from p.roof import cli\n")
    floors = {"p.core": ("p.core",), "p": ("p",)}
    g = import_graph(tmp_path, ("p",))
    assert floor_violations(g, floors) == []
    (tmp_path / "p/core/low.py").write_text("def f():\n    from p.roof.cli import main\n")
    assert floor_violations(import_graph(tmp_path, ("p",)), floors) == ["p.core.low -> p.roof.cli"]


def test_no_import_circles(components: list[list[str]]) -> None:
    assert components == [], f"import circles among the packages' modules: {components}"


def test_every_module_imports_only_the_floors_below_it() -> None:
    graph = import_graph(REPO, PACKAGES)
    assert all(floor_of(m, FLOORS) for m in graph), [m for m in graph if not floor_of(m, FLOORS)]
    bad = floor_violations(graph, FLOORS)
    assert bad == [], "imports that run up the floors (docs/architecture.md):\n  " + "\n  ".join(bad)
