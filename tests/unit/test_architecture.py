"""The layout's rules, computed from the source: no import cycles in
``gateway/`` or ``bench/`` (every import counts, ``TYPE_CHECKING`` and
function-level ones included), each subpackage imports only the layers
below it, modules stay small, and every subpackage says what it owns."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 450

# Which gateway subpackages each may import (itself always).  Top-level
# modules (cli, __main__, __init__) are the entry point and may import all.
LAYERS: dict[str, frozenset[str]] = {
    "config": frozenset(),
    "telemetry": frozenset(),
    "policy": frozenset({"config"}),
    "datapath": frozenset({"config", "policy", "telemetry"}),
    "admin": frozenset({"telemetry"}),
    "process": frozenset({"config", "policy", "telemetry", "datapath", "admin"}),
}
# Never imported by the data path of a worker; only these modules may import
# them at all (ruff's TID253 keeps the imports below module level elsewhere).
HEAVY = ("aiohttp", "prometheus_client", "jwt", "cryptography")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()

    def add(name: str) -> None:
        # ``from pkg import mod`` names a module; ``from mod import func`` does not.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                add(f"{node.module}.{alias.name}")
    return found


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_count(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from x.y import Z\n")
    assert imports_of(src, {"x.y"}) == {"x.y"}


@pytest.mark.parametrize("package", ["gateway", "bench"])
def test_no_import_cycles(package: str) -> None:
    assert cycles(graph(package)) == []


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_each_subpackage_imports_only_layers_below_it() -> None:
    problems = []
    for module, deps in graph("gateway").items():
        layer = _layer(module)
        if layer is None:
            continue  # cli, __main__: the entry point
        allowed = LAYERS[layer] | {layer}
        for dep in sorted(deps):
            dep_layer = _layer(dep)
            if dep_layer is None and dep != "gateway":
                problems.append(f"{module} imports the entry point {dep}")
            elif dep_layer is not None and dep_layer not in allowed:
                problems.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    assert problems == []


def test_every_subpackage_says_what_it_owns() -> None:
    for layer in LAYERS:
        init = ROOT / "gateway" / layer / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc, f"gateway/{layer}/__init__.py needs its rule"
        assert len(doc.split()) > 15, f"gateway/{layer}/__init__.py: say what it owns"
    assert {p.name for p in (ROOT / "gateway").iterdir() if p.is_dir() and p.name[0] != "_"} == set(
        LAYERS
    ), "a new subpackage needs its place in LAYERS"


def test_modules_stay_small() -> None:
    big = {
        name: n
        for name, path in modules("gateway").items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert big == {}


def test_heavy_libraries_only_where_allowed() -> None:
    """aiohttp and prometheus-client only in admin; pyjwt and cryptography
    only where JWT keys are read and checked."""
    allowed = {
        "aiohttp": ("gateway.admin.",),
        "prometheus_client": ("gateway.admin.",),
        "jwt": ("gateway.config.credentials", "gateway.policy.auth"),
        "cryptography": ("gateway.config.credentials", "gateway.policy.auth"),
    }
    problems = [
        f"{name} imports {dep}"
        for name, path in modules("gateway").items()
        for dep in imports_of(path, set(HEAVY))
        if not name.startswith(allowed[dep])
    ]
    assert problems == []


def test_a_worker_loads_no_admin_or_jwt_library() -> None:
    """What a worker process imports to serve: none of the heavy libraries
    (about 25 MB of resident memory each for aiohttp and prometheus-client)."""
    code = (
        "import sys\n"
        "import gateway.cli, gateway.process.worker\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_a_worker_loads_h2_only_with_its_first_http2_connection() -> None:
    """h2 (~1 MiB resident) is imported by the switch to HTTP/2, not by the
    modules a worker loads to serve HTTP/1.1."""
    code = (
        "import sys\n"
        "import gateway.cli, gateway.process.worker, gateway.process.gateway\n"
        "import gateway.datapath.connection, gateway.datapath.shared\n"
        "print(sorted(m for m in ('h2', 'hpack', 'hyperframe') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
