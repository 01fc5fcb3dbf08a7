"""The package's layering (docs/architecture.md, "Layout"), read from the imports with ast.

A module may import modules of its own layer or below, never above; siblings of
one layer that must stay apart (stages and evals) never import each other; the
command line is imported by nothing; and no chain of imports closes a circle.
Imports inside functions count as much as those at the top of a file: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600

# Longest prefix wins. Equal numbers may import each other unless they are in ISOLATED.
LAYERS: dict[str, int] = {
    "mmrec.version": 0,
    "mmrec.utils": 0,
    "mmrec.config": 1,
    "mmrec.tokenizer": 1,
    "mmrec.ops": 2,
    "mmrec.layers": 3,
    "mmrec.models": 4,
    "mmrec.data": 5,
    "mmrec.evals": 6,
    "mmrec.stages": 6,
    "mmrec.train": 7,
    "mmrec": 8,  # the package root (its public API) and the thin command modules beside the CLI
    "mmrec.cli": 9,
}
ISOLATED = [("mmrec.evals", "mmrec.stages")]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "mmrec").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _group(module: str) -> str:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best


def _resolve(name: str) -> str | None:
    """The mmrec module that an imported dotted name lands in (a name may be a function inside one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from mmrec.models import state` imports the submodule; `... import MMRecLM` the package.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name == "mmrec" or name.startswith("mmrec."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_no_import_goes_up_a_layer() -> None:
    bad = []
    for module, targets in GRAPH.items():
        if module.endswith(".__main__"):
            continue  # `python -m mmrec` and `torchrun -m mmrec.train` are entry points: they run the CLI
        src = _group(module)
        for target in sorted(targets):
            dst = _group(target)
            if LAYERS[dst] > LAYERS[src]:
                bad.append(f"{module} ({src}) imports {target} ({dst}), a layer above")
            elif any({src, dst} == {a, b} for a, b in ISOLATED):
                bad.append(f"{module} imports {target}: {src} and {dst} must not import each other")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli() -> None:
    users = [m for m, targets in GRAPH.items() if any(_group(t) == "mmrec.cli" for t in targets)]
    users = [m for m in users if _group(m) != "mmrec.cli" and not m.endswith(".__main__")]
    assert users == [], users


def test_no_import_cycle() -> None:
    # Depth-first search with colours; report the first cycle found with its path.
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if colour.get(t) == 1:
                return [*stack[stack.index(t) :], t]
            if colour.get(t) is None:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(GRAPH):
        if colour.get(m) is None:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_file_is_not_too_long(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines (at most {MAX_LINES})"


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    # The rules above must be able to fail: an upward import and a cycle in a made-up graph.
    assert LAYERS[_group("mmrec.models.mmrec")] < LAYERS[_group("mmrec.train.trainer")]
    assert _group("mmrec.cli") == "mmrec.cli" and _group("mmrec.compare") == "mmrec"
    assert _resolve("mmrec.models.state.StateError") == "mmrec.models.state"
