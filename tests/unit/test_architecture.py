"""The shape of the code, checked: which side and which layer may import what, no import cycles
in the server, no function too long to read. Parsed from the source (every module of every
subpackage), nothing imported.

The server's layers (docs/architecture.md):
  core/       models, Adam, pushes, rounds, staging, limits: no networking, no `adamd.v1`
  cuda/       the CUDA step, used by the core
  storage/    snapshots on disk, over the core
  operations  (with errors, config) every operation once, over core and storage
  transport/  gRPC, the bulk-data channel, same-host memory: adapters over the operations layer
  http/       FastAPI, views, metrics: an adapter over the operations layer
  cli/        the command line and the daemon that wires everything together
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "adamd.client": ROOT / "client",
    "adamd.server": ROOT / "server",
    "adamd.protocol": ROOT / "protos/adamd/protocol",
    "tests": ROOT / "tests",
}
MAX_FUNCTION_LINES = 80
# Cohesion: a concept that grows leaves for a module of its own (stepping.py, reads.py, the bulk/
# package), so neither the model class nor any server module grows back past these.
MAX_HOSTED_MODEL_LINES = 350
MAX_SERVER_MODULE_LINES = 520
# The client's too: Client, ShardedClient and RemoteAdam keep their calls; what they work out
# (layouts and merges, param groups, state dicts, retries, the service's stubs) has its module.
MAX_CLIENT_MODULE_LINES = 500
MAX_BENCH_MODULE_LINES = 500
S = "adamd.server"

# Layer -> the server modules it must not import (by prefix). Everything else is allowed.
FORBIDDEN = {
    f"{S}.core": [f"{S}.transport", f"{S}.http", f"{S}.cli", f"{S}.storage", f"{S}.operations"],
    f"{S}.cuda": [f"{S}.transport", f"{S}.http", f"{S}.cli", f"{S}.storage", f"{S}.operations"],
    f"{S}.storage": [f"{S}.transport", f"{S}.http", f"{S}.cli", f"{S}.operations"],
    f"{S}.operations": [f"{S}.transport", f"{S}.http", f"{S}.cli"],
    f"{S}.errors": [f"{S}.core", f"{S}.transport", f"{S}.http", f"{S}.cli", f"{S}.storage"],
    f"{S}.config": [f"{S}.transport", f"{S}.http", f"{S}.cli", f"{S}.storage", f"{S}.operations"],
    f"{S}.transport": [f"{S}.http", f"{S}.cli"],
    f"{S}.http": [f"{S}.transport", f"{S}.cli"],
}
# The transports, each apart from the others (what they share: `messages`, the adamd.v1 <->
# core conversions, and `tls`; what they all call: the data plane and the operations layer).
TRANSPORTS = {
    "grpc": [f"{S}.transport.grpc_service", f"{S}.transport.grpc_server"],
    "bulk": [f"{S}.transport.bulk"],
    "same_host": [f"{S}.transport.same_host"],
}


def _modules(package: str) -> dict[str, ast.Module]:
    """Every module of `package` and its subpackages, by dotted name."""
    folder = PACKAGES[package]
    found = {}
    for f in sorted(folder.rglob("*.py")):
        parts = list(f.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = ast.parse(f.read_text())
    return found


def _imports(module: str, tree: ast.Module, is_package: bool = False) -> set[str]:
    """Every module named by an import anywhere in `module` (lazy and TYPE_CHECKING ones too)."""
    found: set[str] = set()
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _all_imports(package: str) -> dict[str, set[str]]:
    folder = PACKAGES[package]
    packages = {
        ".".join([package, *f.relative_to(folder).parent.parts])
        for f in folder.rglob("__init__.py")
    }
    return {m: _imports(m, t, m in packages) for m, t in _modules(package).items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_walk_sees_every_layer() -> None:
    """The rules below check nothing if the walk misses subpackages: pin that it finds them."""
    modules = _modules("adamd.server")
    for layer in ("core", "cuda", "storage", "transport", "http", "cli"):
        inside = [m for m in modules if _under(m, f"{S}.{layer}") and m != f"{S}.{layer}"]
        assert len(inside) >= 2, f"found no modules under server/{layer}/"
    assert f"{S}.core.model" in modules
    assert f"{S}.transport.grpc_service" in modules
    client = _modules("adamd.client")
    assert "adamd.client._transport.bulk" in client


def test_nothing_imports_the_other_sides_private_modules() -> None:
    for module, imports in _all_imports("adamd.server").items():
        private = {i for i in imports if i.startswith("adamd.client._")}
        assert not private, f"{module} imports the client's private {sorted(private)}"
    for package in ("adamd.client", "adamd.protocol"):
        for module, imports in _all_imports(package).items():
            server = {i for i in imports if _under(i, S)}
            assert not server, f"{module} imports the server: {sorted(server)}"
    for module, imports in _all_imports("adamd.protocol").items():
        client = {i for i in imports if _under(i, "adamd.client")}
        assert not client, f"the protocol package's {module} imports the client: {sorted(client)}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_server_layers_import_only_downwards(layer: str) -> None:
    bad = []
    for module, imports in _all_imports("adamd.server").items():
        if not _under(module, layer):
            continue
        for imported in sorted(imports):
            if any(_under(imported, f) for f in FORBIDDEN[layer]):
                bad.append(f"{module} -> {imported}")
    assert not bad, f"{layer} imports a layer above it or beside it: {bad}"


def test_the_core_takes_no_wire_messages() -> None:
    for module, imports in _all_imports("adamd.server").items():
        if _under(module, f"{S}.core") or _under(module, f"{S}.cuda"):
            wire = sorted(i for i in imports if _under(i, "adamd.v1"))
            assert not wire, f"{module} imports the wire messages {wire}"


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_transports_do_not_import_each_other(transport: str) -> None:
    others = [m for name, ms in TRANSPORTS.items() if name != transport for m in ms]
    bad = []
    for module, imports in _all_imports("adamd.server").items():
        if module in TRANSPORTS[transport]:
            bad += [
                f"{module} -> {i}" for i in sorted(imports) if any(_under(i, o) for o in others)
            ]
    assert not bad, f"the {transport} transport imports another transport: {bad}"


def test_server_modules_import_no_cycle() -> None:
    every = _all_imports("adamd.server")
    modules = set(every)
    # `from pkg import x` names the package; the edge is to x. Packages' own __init__ re-exports
    # are left out (they import their children by design).
    leaves = {
        m
        for m in modules
        if not (ROOT / "server" / Path(*m.split(".")[2:]) / "__init__.py").exists()
    }
    graph = {m: {i for i in every[m] if i in leaves and i != m} for m in leaves}
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
    for package in ("adamd.client", "adamd.server", "adamd.protocol"):
        for module, tree in _modules(package).items():
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_hosted_model_and_server_modules_stay_readable() -> None:
    tree = _modules(S)[f"{S}.core.model"]
    (model,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HostedModel"]
    lines = (model.end_lineno or model.lineno) - model.lineno + 1
    assert lines <= MAX_HOSTED_MODEL_LINES, f"HostedModel has {lines} lines"
    long = [
        f"{f.relative_to(ROOT)}: {n} lines"
        for f in sorted((ROOT / "server").rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_SERVER_MODULE_LINES
    ]
    assert not long, f"server modules over {MAX_SERVER_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize(
    ("folder", "limit", "inside"),
    [
        # the walk reaches the subpackages (client/_transport/), not the top folder alone
        ("client", MAX_CLIENT_MODULE_LINES, "_transport/bulk.py"),
        ("bench", MAX_BENCH_MODULE_LINES, "two_host.py"),
    ],
)
def test_client_and_bench_modules_stay_readable(folder: str, limit: int, inside: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert ROOT / folder / inside in files
    long = [
        f"{f.relative_to(ROOT)}: {n} lines"
        for f in files
        if (n := len(f.read_text().splitlines())) > limit
    ]
    assert not long, f"{folder} modules over {limit} lines: {long}"


def test_every_package_folder_is_packaged() -> None:
    """A folder with an __init__.py that pyproject.toml does not list is left out of the wheel
    (the import works from a checkout, then fails where adamd was installed)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(folder).parts]))
    missing = sorted(found - set(setuptools["packages"]))
    assert not missing, f"package folders not in pyproject.toml's packages: {missing}"


C = "adamd.client"


@pytest.mark.parametrize(
    "module", [f"{C}._remote_adam", f"{C}._remote_state", f"{C}._param_groups"]
)
def test_remote_adam_uses_only_the_clients_public_api(module: str) -> None:
    """RemoteAdam (with its modules: state, param groups) talks to its client through the
    public calls (ModelClient, and Client's same_host / open_push / finish_push): no private
    attribute of it, no gRPC, no wire messages."""
    tree = _modules(C)[module]
    wire = sorted(i for i in _imports(module, tree) if i == "grpc" or _under(i, "adamd.v1"))
    assert not wire, f"{module} imports {wire}"
    private = sorted(
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and (
            (isinstance(node.value, ast.Name) and node.value.id == "client")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "_client")
        )
    )
    assert not private, f"{module} reaches into its client: {private}"


def test_sharded_client_composes_clients_and_one_route_picks_the_transport() -> None:
    """ShardedClient holds one Client per shard rather than being one; the transport fallback
    (Unreachable, SessionExpired) is handled in client/_transport/route.py alone (and by the
    overlap stream, which picks its channel once when it opens)."""
    modules = _modules(C)
    (sharded,) = [
        n
        for n in modules[f"{C}._sharding"].body
        if isinstance(n, ast.ClassDef) and n.name == "ShardedClient"
    ]
    assert not sharded.bases, "ShardedClient subclasses " + ast.unparse(sharded.bases[0])
    handlers = sorted(
        module
        for module, tree in modules.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ExceptHandler)
        and node.type is not None
        and any(w in ast.unparse(node.type) for w in ("Unreachable", "SessionExpired"))
    )
    assert set(handlers) <= {f"{C}._transport.route", f"{C}._overlap"}, handlers


def test_test_modules_import_helpers_not_other_test_modules() -> None:
    """Shared test set-up lives in helper modules (tests/processes.py, proxies.py, hosted.py,
    workers.py, conftest.py), so a test file can move between layers or go without breaking
    another one."""
    found = _all_imports("tests")
    assert "tests.system.test_cli" in found  # the walk sees the layer folders
    bad = {
        module: sorted(i for i in imports if i.rpartition(".")[2].startswith("test_"))
        for module, imports in found.items()
        if not module.startswith("tests.third_party")
    }
    bad = {m: i for m, i in bad.items() if i}
    assert not bad, f"test modules importing other test modules: {bad}"
