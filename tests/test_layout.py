"""The package's import structure (DESIGN §2): no module imports itself back through others,
and the search and export sides never import each other. Every import counts, lazy ones inside
functions and type-only ones too: a circle hidden that way is still a circle."""

import ast
from pathlib import Path

import abs_deploy

ROOT = Path(abs_deploy.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the abs_deploy modules it imports (a `from package import name` counts as
    importing the submodule when `name` is one)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_itself_back():
    graph = _imports()
    # A package's __init__ re-exporting its modules is not a circle of the code's own making;
    # the modules of that package importing each other would be, so those edges stay.
    for name in list(graph):
        if (ROOT.parent / name.replace(".", "/") / "__init__.py").exists():
            for m in graph:
                graph[m].discard(name)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_search_and_export_never_import_each_other():
    graph = _imports()
    side = {m: m.split(".")[1] if m.count(".") else None for m in graph}
    crossing = [(m, n) for m, deps in graph.items() for n in deps
                if {side[m], side[n]} == {"search", "export"}]
    assert crossing == []


def test_the_checker_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
