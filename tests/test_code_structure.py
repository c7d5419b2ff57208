"""How pipeline/ is put together, read with `ast` (nothing imported): library modules never import a
phase, no module imports another module's private names, no import cycle (function-level imports
count), one log-softmax (pipeline/agreement.py) for every model-against-model measurement, and
ruff's configuration (pyproject.toml) holds for the whole project."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
ENTRY_POINTS = {"pipeline.cli", "pipeline.__main__"}  # may run phases; nothing imports them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every pipeline import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return [(t, names, line) for t, names, line in found if t == "pipeline" or t.startswith("pipeline.")]


def edges() -> dict[str, set[str]]:
    """module -> pipeline modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        out = graph.setdefault(name, set())
        for target, names, _ in imports(path, name):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out.update(subs or ([target] if target in known else []))
    return graph


def is_phase(name: str) -> bool:
    return name.startswith("pipeline.phases.") and name != "pipeline.phases.common"


def test_library_modules_import_no_phase():
    bad = [f"{name} imports {t}" for name, targets in edges().items()
           if not name.startswith("pipeline.phases") and name not in ENTRY_POINTS for t in targets if is_phase(t)]
    assert not bad, "library modules must not import phases (move the shared code into a library module):\n" + \
        "\n".join(bad)


def test_no_module_imports_private_names():
    known = modules()
    bad = []
    for name, path in known.items():
        for target, names, line in imports(path, name):
            private = [n for n in names
                       if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in known]
            bad += [f"{name}:{line} imports {target}.{n}" for n in private]
    assert not bad, "a module's _private names are its own:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package importing its own submodules (pipeline/arch/__init__.py registering them) is not a cycle
    # unless a submodule imports the package back for something the package defines.
    assert not cycles, "import cycles (function-level imports included):\n" + \
        "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("pattern", ["log_softmax", "logsumexp"])
def test_one_log_softmax(pattern):
    """Every KL, perplexity and top-1 in pipeline/ goes through agreement.log_softmax."""
    defining = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and pattern in node.name:
                defining.append(f"{name}.{node.name}")
            # exp(x).sum(-1): a softmax normaliser written inline
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "sum"
                    and isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "attr", "") == "exp"
                    and name != "pipeline.agreement"):
                defining.append(f"{name}:{node.lineno} exp(...).sum(...)")
    assert defining in ([], ["pipeline.agreement.log_softmax"]), defining


def test_ruff_passes():
    """The ruff configuration in pyproject.toml holds for the whole project (ruff is in the test extra)."""
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.is_file(), f"{ruff} is missing: `make setup` installs the test extra, which has ruff"
    proc = subprocess.run([str(ruff), "check", "--no-cache", str(PACKAGE.parent)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
