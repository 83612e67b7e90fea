"""The shape of the package: no import circle, small modules, light config checks.

An import circle hides behind imports inside functions until someone moves one; these tests read
the module-level imports (what runs when a module is imported) with `ast`, without importing.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sparse_detr"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_time_statements(body: list[ast.stmt], functions: bool = False):
    """The statements that run on import: the module's and its classes' bodies; with
    `functions`, the bodies of its functions too."""
    for node in body:
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not functions:
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from import_time_statements(getattr(node, field, None) or [], functions)


def imported_modules(name: str, path: Path, functions: bool = False) -> set[str]:
    """The package's modules that importing `name` imports (a package's `__init__` included);
    with `functions`, also those its functions import when called."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in import_time_statements(ast.parse(path.read_text(encoding="utf-8")).body, functions):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                prefix = ".".join(parts[:end])
                if prefix in MODULES and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_the_package_modules():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert graph["sparse_detr.config"] >= {"sparse_detr.checks", "sparse_detr.errors"}  # the reader sees edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_inside_a_function_hides_a_circle():
    """Imports inside functions may delay torch (entry points), never dodge a circle: lifted to
    the top of their modules, they still make none."""
    graph = {name: imported_modules(name, path, functions=True) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_check_helpers_and_errors_sit_on_the_lowest_floor():
    for leaf in ("sparse_detr.errors", "sparse_detr.signals"):
        assert imported_modules(leaf, MODULES[leaf]) == set(), leaf
    assert imported_modules("sparse_detr.checks", MODULES["sparse_detr.checks"]) == {"sparse_detr.errors"}
    for schema in ("sparse_detr.config", "sparse_detr.data.config", "sparse_detr.tracking"):
        assert not any(m.startswith("sparse_detr.engine") for m in imported_modules(schema, MODULES[schema])), schema


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_analysis_does_not_import_the_trainer():
    for name, path in MODULES.items():
        if name.startswith("sparse_detr.analysis"):
            assert "sparse_detr.engine.trainer" not in imported_modules(name, path), name


def test_checking_a_report_config_loads_neither_torch_nor_the_model(tmp_path):
    code = ("import sys\n"
            "from sparse_detr.config import load_config, validate\n"
            "import sparse_detr.report\n"
            f"validate(load_config(['sweep_dir={tmp_path}'], config_name='report'))\n"
            "print(sorted(m for m in ('torch', 'sparse_detr.models.detr') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
