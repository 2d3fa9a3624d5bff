"""The package's structure: imports run one way (no cycle, lazy imports included)."""

from __future__ import annotations

import ast
import pathlib

import pagescan

ROOT = pathlib.Path(pagescan.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, name: str, modules: set[str]) -> set[str]:
    """pagescan modules that ``name`` imports, at module level or inside functions
    (imports under ``if TYPE_CHECKING:`` are not run, so they do not count)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("pagescan"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if not mod.startswith("pagescan"):
                    continue
                subs = {f"{mod}.{a.name}" for a in child.names if f"{mod}.{a.name}" in modules}
                found.update(subs)  # ``from . import _probe`` imports the module _probe
                if len(subs) < len(child.names):
                    found.add(mod)
            visit(child)

    visit(tree)
    found.discard(name)
    # Importing pagescan.a.b runs pagescan/__init__ and pagescan/a/__init__ first; those
    # package edges are what `import` does, not a design choice, so count the module only.
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, name, modules) for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m.endswith("__main__"):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    # Packages re-export their children; an edge from a package's __init__ down to its
    # own modules is the package's surface, not a layer boundary.
    pruned = {n: {m for m in deps if not m.startswith(n + ".")} if n in ("pagescan", "pagescan.snapshot",
              "pagescan.cli", "pagescan._uapi") else deps for n, deps in graph.items()}
    # Nothing below the public surface may import the package root.
    importers = sorted(n for n, deps in pruned.items() if "pagescan" in deps and n != "pagescan")
    assert not importers or all(n.startswith("pagescan.cli") for n in importers), importers
    cycle = _find_cycle({n: deps - {"pagescan"} for n, deps in pruned.items()})
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_low_layers_import_nothing_above_them() -> None:
    graph = import_graph()
    low = {"pagescan._uapi.libc", "pagescan._uapi.pagemap", "pagescan._uapi.userfaultfd",
           "pagescan._uapi.mman", "pagescan._uapi._ioc", "pagescan._uapi.since"}
    for name in low:
        assert graph[name] <= low | {"pagescan._uapi"}, (name, graph[name] - low)
    for name in ("pagescan._probe", "pagescan._backend_kernel", "pagescan._backend_emulated",
                 "pagescan._engine", "pagescan._args", "pagescan._target"):
        above = {m for m in graph[name] if m in {"pagescan.capabilities", "pagescan._scan",
                                                  "pagescan.userfaultfd", "pagescan.writewatch"}}
        assert not above, (name, above)
