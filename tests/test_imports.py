"""The package's import graph is one-way: no module imports, at module level, one that
(directly or not) imports it back, and no function hides an import of the package's own
modules (the usual way a cycle is dodged). Read with `ast`, nothing is imported."""

import ast
from pathlib import Path

PACKAGE = "diffusion_blocks"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "plugins" / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, tuple[Path, ast.Module]]:
    return {
        module_name(path): (path, ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
    }


def absolute_targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules (or module.name candidates) an import statement names, absolute."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # `from pkg import name`: name is a submodule or an attribute of pkg
    return [source] + [f"{source}.{alias.name}" for alias in node.names]


def resolve(target: str, modules: dict) -> str | None:
    """The package module `target` loads (its longest importable prefix), if ours."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return None


def is_type_checking_block(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:`: imports for annotations only, never run."""
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported (not inside a def, nor
    under `if TYPE_CHECKING:`)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif is_type_checking_block(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def function_imports(tree: ast.Module):
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield func, node


def import_graph(modules: dict) -> dict[str, set[str]]:
    """module -> the package modules its module-level imports load. Importing a.b.c
    also runs a/__init__ and a/b/__init__, so parents count as edges too."""
    graph = {}
    for module, (path, tree) in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in top_level_imports(tree):
            for target in absolute_targets(node, module, is_package):
                found = resolve(target, modules)
                while found:
                    if found != module and not module.startswith(found + "."):
                        edges.add(found)
                    found = found.rpartition(".")[0] or None
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycle():
    graph = import_graph(package_modules())
    assert len(graph) > 50 and f"{PACKAGE}.train" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_import_of_the_package():
    modules = package_modules()
    found = []
    for module, (path, tree) in modules.items():
        is_package = path.name == "__init__.py"
        for func, node in function_imports(tree):
            targets = absolute_targets(node, module, is_package)
            if any(resolve(t, modules) for t in targets):
                found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno} in {func.name}(): "
                             f"{ast.unparse(node)}")
    assert not found, "function-local imports of the package:\n" + "\n".join(found)


def test_cycle_finder_reports_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
