"""The import arrows of the design, read from the source: cli -> evaluation -> scheduler -> {workers (by task
name and typed messages only), index, policy} -> facegate. Every import that runs counts, also one inside a
function; one under `if TYPE_CHECKING:` (an annotation only) does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("facegate", "policy", "index", "workers", "scheduler", "evaluation", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`: annotations only, never run, so no arrow."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for child in node.body for inner in ast.walk(child))
    return skipped


def _imports(path: Path) -> set[str]:
    """Every module `path` imports at run time, relative imports resolved to absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from cli import ops` imports the module cli.ops.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {i for i in _imports(path) if i in modules or i.split(".")[0] == "celery"}
            for name, path in modules.items()}


GRAPH = _graph()


def _top(module: str) -> str:
    return module.split(".")[0]


def _imports_of(package: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if _top(m) == package}


def _offending(package: str, forbidden: set[str]) -> list[str]:
    return sorted(f"{m} imports {d}" for m, deps in _imports_of(package).items() for d in deps
                  if _top(d) in forbidden)


def test_the_graph_is_read_at_all():
    # A parser that found nothing would pass every test below.
    assert "scheduler.dispatch" in GRAPH["scheduler.service"]
    assert "cli.common" in GRAPH["cli.app"]
    assert "celery" in GRAPH["workers.tasks"] or any(d.startswith("celery") for d in GRAPH["workers.tasks"])


@pytest.mark.parametrize(("package", "forbidden"), [
    # policy is pure: it imports nothing of ours.
    ("policy", set(PACKAGES) - {"policy"}),
    # facegate is the shared bottom layer.
    ("facegate", set(PACKAGES) - {"facegate"}),
    # index knows no Celery and nothing above it.
    ("index", {"celery", "workers", "scheduler", "evaluation", "cli"}),
    # workers and scheduler never import each other: they share task names and typed messages only.
    ("workers", {"scheduler", "evaluation", "cli"}),
    ("scheduler", {"workers", "evaluation", "cli"}),
    # evaluation is a client of the scheduler, below the CLI.
    ("evaluation", {"cli", "workers"}),
])
def test_layers_point_down(package, forbidden):
    assert _offending(package, forbidden) == []


def _cycles(package: str) -> list[list[str]]:
    edges = {m: {d for d in deps if _top(d) == package} for m, deps in _imports_of(package).items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return cycles


def _is_package_init(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").exists()


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package):
    # A package's __init__ re-exporting its modules is not a cycle worth reporting: a module importing
    # its own package's name does, so only module-to-module edges count.
    real = [c for c in _cycles(package) if not any(_is_package_init(m) for m in c)]
    assert real == []


def test_no_cycle_between_packages():
    edges = {p: {_top(d) for m, deps in _imports_of(p).items() for d in deps if _top(d) in PACKAGES} - {p}
             for p in PACKAGES}
    for package in PACKAGES:
        seen, todo = set(), list(edges[package])
        while todo:
            nxt = todo.pop()
            assert nxt != package, f"{package} reaches itself through {sorted(seen)}"
            if nxt not in seen:
                seen.add(nxt)
                todo.extend(edges[nxt])
