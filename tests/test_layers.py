"""The import-layer check: each layer imports only the layers below it, and no package cycle exists.

Reads every module's imports with `ast` (function-level imports included: a lazy import is still a
dependency), so an upward import fails the test command, not a code review. The layers, top to bottom,
are the ones README's "Layout" section draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "tuning")

# Top to bottom. A module belongs to the first layer whose prefix it starts with; a layer may import any layer
# below it and its own layer, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.cli",),
    ("pipeline.ops",),
    ("pipeline.run", "tuning"),
    (
        "pipeline.curate",
        "pipeline.train",
        "pipeline.train_loop",
        "pipeline.evaluate",
        "pipeline.report",
        "pipeline.demo_data",
        "pipeline.tracking",
    ),
    ("stages",),
    ("pipeline.models",),
    ("pipeline.core", "pipeline"),  # `pipeline` itself: the package's __init__ (its version)
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of `module` (0 is the top); the longest matching prefix wins."""
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def project_imports(path: Path) -> set[str]:
    """The maskdiet modules that `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.core import storage` names the module pipeline.core.storage
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module that an imported name lives in (`pipeline.core.storage.join` → pipeline.core.storage)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_no_import_runs_upward() -> None:
    modules = all_modules()
    upward = set()
    for module, path in modules.items():
        for name in project_imports(path):
            target = resolve(name, modules)
            if target is not None and layer_of(target) < layer_of(module):
                upward.add(f"{module} imports {target}")
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def test_no_cycle_between_packages() -> None:
    """Cycles between the layers' groups (cli, ops, run/tuning, flows, stages, models, core) are caught above;
    this checks the finer grain: no two modules that import each other, directly or through others."""
    modules = all_modules()
    graph = {
        m: {t for n in project_imports(p) if (t := resolve(n, modules)) not in (None, m)}
        for m, p in modules.items()
    }
    # packages' __init__ modules re-export their children by design; only real modules form cycles
    graph = {m: {t for t in ts if t in graph and not m.startswith(t + ".")} for m, ts in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        visiting.add(node)
        for nxt in sorted(graph[node]):
            if nxt in visiting:
                cycles.append(" → ".join([*trail[trail.index(nxt) :], nxt]))
            elif nxt not in done:
                visit(nxt, [*trail, nxt])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "imported", "allowed"),
    [
        ("stages.read", "pipeline.core.storage", True),
        ("stages.read", "pipeline.evaluate", False),
        ("pipeline.core.config", "pipeline.models.mae", False),
        ("pipeline.cli.run", "tuning.sweep", True),
        ("tuning.sweep", "pipeline.cli.common", False),
    ],
)
def test_the_layer_rule_itself(module: str, imported: str, allowed: bool) -> None:
    """The check above would pass vacuously if layer_of put everything in one layer."""
    assert (layer_of(imported) >= layer_of(module)) is allowed
