"""The shape of the code, checked: which side may import what, no import cycles in the server,
no function too long to read. Parsed from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "adamd.client": ROOT / "client",
    "adamd.server": ROOT / "server",
    "adamd.protocol": ROOT / "protos/adamd/protocol",
}
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> dict[str, ast.Module]:
    folder = PACKAGES[package]
    return {
        f"{package}.{f.stem}" if f.stem != "__init__" else package: ast.parse(f.read_text())
        for f in sorted(folder.glob("*.py"))
    }


def _imports(package: str, tree: ast.Module) -> set[str]:
    """Every module named by an import anywhere in a module of `package` (lazy and
    TYPE_CHECKING ones too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}" if base else package
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_nothing_imports_the_other_sides_private_modules() -> None:
    for module, tree in _modules("adamd.server").items():
        private = {i for i in _imports("adamd.server", tree) if i.startswith("adamd.client._")}
        assert not private, f"{module} imports the client's private {sorted(private)}"
    for package in ("adamd.client", "adamd.protocol"):
        for module, tree in _modules(package).items():
            server = {i for i in _imports(package, tree) if i.startswith("adamd.server")}
            assert not server, f"{module} imports the server: {sorted(server)}"
    for module, tree in _modules("adamd.protocol").items():
        client = {i for i in _imports("adamd.protocol", tree) if i.startswith("adamd.client")}
        assert not client, f"the protocol package's {module} imports the client: {sorted(client)}"


def test_server_modules_import_no_cycle() -> None:
    modules = _modules("adamd.server")
    del modules["adamd.server"]  # `from . import x` names the package; the edge is to x
    graph = {
        m: {i for i in _imports("adamd.server", t) if i in modules and i != m}
        for m, t in modules.items()
    }
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for m in sorted(graph):
        visit(m, [])


def test_no_function_is_too_long_to_read() -> None:
    long = []
    for package in PACKAGES:
        for module, tree in _modules(package).items():
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
