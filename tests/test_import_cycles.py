"""No import cycles inside relayd.

The rule. Module A *imports* module B when A has ``import B``, ``from B import x`` or
``from B import module`` (relative imports resolved) anywhere: in the module body, and also
inside functions (a lazy import is still a dependency, only a later one). Importing ``a.b.c``
imports the packages ``a`` and ``a.b`` too; a package's ``__init__`` importing its own
submodules is how packages work and is not counted. Two graphs are checked:

* every module of relayd, imports under ``if TYPE_CHECKING:`` left out (they never run): no
  cycle at all;
* the core (relayd minus relayd.components.*) and relayd.components.http_proxy, type-only
  imports included: no cycle either, so their modules can be read (and typed) in one order.
  (The other components' internals are held to the first rule only; today they pass this one
  too.)

A cycle means the order in which modules happen to be imported decides whether a name exists
yet, and that the modules cannot be understood, or moved, one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import relayd

ROOT = Path(relayd.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, type_checking: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, in functions too; ``if TYPE_CHECKING:`` bodies only if asked."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test) and not type_checking:
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            visit(child)

    visit(tree)
    return out


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path)), type_checking):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                # `import a.b.c` runs a, a.b and a.b.c; the parents of a module are packages.
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    candidate = ".".join(parts[:i])
                    if candidate in modules and candidate != name:
                        graph[name].add(candidate)
    # A package's __init__ importing its own submodules (which need the package to exist) is
    # how Python packages work, not a cycle between two ideas: those edges are left out.
    return {a: {b for b in targets if not (b.startswith(a + ".") and a.count(".") < b.count("."))}
            for a, targets in graph.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


# Known cycles, each to be removed (never added to): none left.
KNOWN: list[list[str]] = []


def _report(cycles: list[list[str]]) -> str:
    return "\n".join(" <-> ".join(c) for c in cycles)


def test_no_import_cycles_in_relayd():
    cycles = [c for c in find_cycles(import_graph()) if c not in KNOWN]
    assert not cycles, "import cycles (TYPE_CHECKING imports left out):\n" + _report(cycles)


def _type_checked(name: str) -> bool:
    """Modules held to the second rule: the core and the http_proxy component."""
    return not name.startswith("relayd.components.") or name.startswith("relayd.components.http_proxy")


def test_no_import_cycles_in_the_core_and_http_proxy_even_type_only():
    graph = import_graph(type_checking=True)
    held = {a: {b for b in targets if _type_checked(b)} for a, targets in graph.items() if _type_checked(a)}
    cycles = [c for c in find_cycles(held) if c not in KNOWN]
    assert not cycles, "import cycles in the core or http_proxy (TYPE_CHECKING imports included):\n" + \
        _report(cycles)


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
