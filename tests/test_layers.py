"""The shape of the code: imports flow one way through the layers, and no module imports itself
back through others (every import counts, at module level or inside a function).

    common <- data <- evaluation <- baselines <- e2e <- orchestration <- cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "baselines", "e2e")
# (module prefix, layer); the longest matching prefix wins
LAYERS = (
    ("bench", 0),  # bench/__init__.py: the version only
    ("bench.common", 0),
    ("bench.data", 1),
    ("bench.evaluation", 2),
    ("baselines", 3),
    ("e2e", 4),
    ("bench.orchestration", 5),
    ("bench.cli", 6),
)
LAYER_NAMES = {0: "common", 1: "data", 2: "evaluation", 3: "baselines", 4: "e2e", 5: "orchestration", 6: "cli"}


def layer_of(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its file (resolved to the deepest known module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in known:
                return candidate
            parts.pop()
        return None

    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            target = resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    known = set(mods)
    graph = {m: imports_of(p, m, known) for m, p in mods.items()}
    # `from pkg import name` resolves to `pkg` itself when `name` is not a module; a package's
    # __init__ importing nothing keeps that harmless
    return graph


def test_every_module_has_a_layer():
    for module in project_modules():
        assert layer_of(module) in LAYER_NAMES


def test_imports_flow_down_the_layers():
    bad = []
    for module, targets in import_graph().items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} ({LAYER_NAMES[layer_of(module)]}) imports {target} "
                           f"({LAYER_NAMES[layer_of(target)]})")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = import_graph()
    # a package's __init__ that only documents it is not an edge back to its modules
    cycles = _cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_circles_and_upward_imports():
    # the two circles this project had, as a graph: the checker must find them
    graph = {"bench.orchestration.runner": {"bench.evaluation.leaderboard"},
             "bench.evaluation.leaderboard": {"bench.orchestration.sweep"},
             "bench.orchestration.sweep": {"bench.orchestration.runner"},
             "e2e.train": {"e2e.loop"}, "e2e.loop": {"e2e.train"}, "e2e.sampling": set()}
    assert sorted(_cycles(graph)) == [["bench.evaluation.leaderboard", "bench.orchestration.runner",
                                       "bench.orchestration.sweep"], ["e2e.loop", "e2e.train"]]
    assert layer_of("bench.evaluation.leaderboard") < layer_of("bench.orchestration.sweep")
    assert layer_of("bench.data.cohort") < layer_of("bench.evaluation.tasks")
    assert layer_of("bench") == 0 and layer_of("bench.cli.commands.run") == 6


@pytest.mark.parametrize("module", ["bench.data.cohort", "e2e.gma.trainer", "bench.cli.commands.run"])
def test_imports_are_found_inside_functions(module):
    mods = project_modules()
    found = imports_of(mods[module], module, set(mods))
    assert found, module
    assert all(t in mods for t in found)
