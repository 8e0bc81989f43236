"""The package's shape: no import cycles between its modules, the runtime never imports the training package, and
the training package never imports a DICOM library (a GPU host has only torch).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at module level or inside
a function (a lazy import is still a dependency), except those under ``if TYPE_CHECKING:`` (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cxr_triage", "training")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = {
        _module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "migrations" not in p.parts
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), name)
        graph[name] = {m for m in imported if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_runtime_never_imports_training() -> None:
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("training")) for m, deps in graph.items()}
    assert {m: d for m, d in offenders.items() if m.startswith("cxr_triage") and d} == {}


TRAINING_MAY_USE = {"cxr_triage", "cxr_triage.model", "cxr_triage.imaging", "cxr_triage.checkpoint",
                    "cxr_triage.precision", "cxr_triage.files"}  # fmt: skip
"""What the training package shares with the runtime: the model, the last pixel steps, checkpoints, precision."""


def test_training_shares_only_the_model_pixels_and_checkpoints_with_the_runtime() -> None:
    graph = import_graph()
    for path in (REPO / "training").rglob("*.py"):
        name = _module_name(path)
        roots = {m.split(".")[0] for m in _imports(ast.parse(path.read_text(encoding="utf-8")), name)}
        assert not roots & {"pydicom", "pynetdicom", "highdicom", "pylibjpeg"}, path
        shared = {m for m in graph[name] if m.startswith("cxr_triage")}
        assert shared <= TRAINING_MAY_USE, (name, sorted(shared - TRAINING_MAY_USE))


def test_the_runtime_never_imports_its_test_support() -> None:
    graph = import_graph()
    runtime = {m: deps for m, deps in graph.items() if m.startswith("cxr_triage") and ".testing" not in m}
    offenders = {m: sorted(d for d in deps if d.startswith("cxr_triage.testing")) for m, deps in runtime.items()}
    assert {m: d for m, d in offenders.items() if d} == {}
