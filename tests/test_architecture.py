"""The package's shape: rooms (subpackages) in one layer order, no import cycles, the runtime never imports the
training package, the training package shares only the ml room (and the package's ground floor) with the runtime
and never imports a DICOM library (a GPU host has only torch), and long modules and functions say why.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at module level, inside
a function (a lazy import is still a dependency) or under ``if TYPE_CHECKING:`` (an annotation is a dependency
of the reader's understanding too: a cycle through one is still a cycle). docs/ARCHITECTURE.md draws the rooms.
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


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
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


GROUND = ("cxr_triage", "cxr_triage.files")
"""The package's ground floor, below every room: its constants (``CLASS_NAMES``, ``PRECISIONS``, ``BUNDLED_MODEL``,
``log_name``) and the atomic file write that checkpoints, gate files, packs and reports share."""

ROOMS = ("core", "queue", "dicom", "ml", "outputs", "triage", "retrain", "ops", "web", "commands")
"""The rooms of ``cxr_triage`` from the bottom up: a module imports from its own room, the ground and the rooms below
it, never from one above (docs/ARCHITECTURE.md says why this order)."""

ENTRY_POINTS = ("cxr_triage.cli", "cxr_triage.__main__")
"""Above every room: the ``cxr-triage`` command, which imports its subcommand's module by name."""

TRAINING_MAY_USE = set(GROUND) | {_module_name(p) for p in (REPO / "cxr_triage" / "ml").glob("*.py")}
"""What the training package shares with the runtime: the ml room (the model, the pixel steps, checkpoints,
precision, the typicality gate's features, fitted by ``training.gate`` with the code the runtime scores with) and
the ground floor; nothing that reads the configuration, the database or DICOM."""


def test_training_shares_only_the_ml_room_with_the_runtime() -> None:
    graph = import_graph()
    for path in (REPO / "training").rglob("*.py"):
        name = _module_name(path)
        roots = {m.split(".")[0] for m in _imports(ast.parse(path.read_text(encoding="utf-8")), name)}
        assert not roots & {"pydicom", "pynetdicom", "highdicom", "pylibjpeg"}, path
        shared = {m for m in graph[name] if m.startswith("cxr_triage")}
        assert shared <= TRAINING_MAY_USE, (name, sorted(shared - TRAINING_MAY_USE))


def room_of(module: str) -> int | None:
    """A runtime module's floor: 0 the ground, 1.. its room's place in ROOMS, one above them the entry points; None
    outside the layers (the test support, the training package)."""
    if module in GROUND:
        return 0
    if module in ENTRY_POINTS:
        return len(ROOMS) + 1
    parts = module.split(".")
    if parts[0] == "cxr_triage" and len(parts) > 1 and parts[1] in ROOMS:
        return ROOMS.index(parts[1]) + 1
    return None


def test_every_runtime_module_stands_in_a_room() -> None:
    runtime = [m for m in import_graph() if m.startswith("cxr_triage") and not m.startswith("cxr_triage.testing")]
    assert [m for m in runtime if room_of(m) is None] == []


def test_no_room_imports_from_a_room_above_it() -> None:
    graph = import_graph()
    upward = sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if (floor := room_of(module)) is not None
        for dep in deps
        if (other := room_of(dep)) is not None and other > floor
    )
    assert upward == []


def test_the_package_keeps_few_top_level_modules() -> None:
    assert len(list((REPO / "cxr_triage").glob("*.py"))) <= 12


def test_the_runtime_never_imports_its_test_support() -> None:
    graph = import_graph()
    runtime = {m: deps for m, deps in graph.items() if m.startswith("cxr_triage") and ".testing" not in m}
    offenders = {m: sorted(d for d in deps if d.startswith("cxr_triage.testing")) for m, deps in runtime.items()}
    assert {m: d for m, d in offenders.items() if d} == {}


LONG_FUNCTION = 60
"""Lines (signature, docstring and body) over which a function must say, in a comment at the top of its body, why."""


def long_functions_without_a_reason(sources: list[Path], root: Path = REPO) -> list[str]:
    """``path:name (lines)`` of every function over ``LONG_FUNCTION`` lines whose body does not open with a comment."""
    found = []
    for path in sources:
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if length <= LONG_FUNCTION:
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            first = body[0].lineno - 1  # 0-based index of the first statement after the docstring
            previous = lines[first - 1].strip() if first > 0 else ""
            if not previous.startswith("#"):
                found.append(f"{path.relative_to(root)}:{node.name} ({length} lines)")
    return found


def test_long_functions_say_why() -> None:
    sources = [p for folder in (*PACKAGES, "bench", "tests") for p in sorted((REPO / folder).rglob("*.py"))]
    assert long_functions_without_a_reason(sources) == []


def test_the_long_function_check_finds_one(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LONG_FUNCTION))
    (tmp_path / "long.py").write_text(f'def long():\n    """Doc."""\n{body}\n')
    (tmp_path / "reason.py").write_text(f'def reason():\n    """Doc."""\n    # why it is long\n{body}\n')
    found = long_functions_without_a_reason([tmp_path / "long.py", tmp_path / "reason.py"], root=tmp_path)
    assert found == [f"long.py:long ({LONG_FUNCTION + 2} lines)"]


LONG_MODULE = 600
"""Lines over which a module must have its reason in ``LONG_MODULES``."""

LONG_MODULES = {
    "cxr_triage/core/db.py": "the schema in one namespace: every table, its states and the engine and revision "
    "helpers are read as ``db.<name>`` by every room and the tests; a split would make ``db`` a facade of re-exports",
    "cxr_triage/testing/peers.py": "test support, not the runtime: every real DICOM peer the tests start, in one place",
}
"""Modules over ``LONG_MODULE`` lines, each with why (the reason a long function writes in a comment)."""


def test_long_modules_say_why() -> None:
    lengths = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
        for pkg in PACKAGES
        for p in sorted((REPO / pkg).rglob("*.py"))
        if "migrations" not in p.parts
    }
    assert sorted(path for path, n in lengths.items() if n > LONG_MODULE and path not in LONG_MODULES) == []
    assert sorted(path for path in LONG_MODULES if lengths.get(path, 0) <= LONG_MODULE) == [], "no longer long"
