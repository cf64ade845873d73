"""The house rules of the package layout, checked on the source (``ast``), so a change that breaks them fails here:

- no import cycle among the library's modules, counting imports inside functions;
- ``tokenizer_bridge`` (the library) imports nothing from ``mllm`` (the recipes, data and training built on it);
- nothing imports the demo or the command line (``mllm.demo``, ``mllm.cli``) except the command line itself, and no
  library module imports ``bench/`` or ``eval/``;
- modules import their siblings, never their package root (whose ``__init__`` imports them: a hidden cycle, and
  remote code cannot be exported from it);
- ``mllm.training.stage`` (what the loop runs) is a leaf; no module grows past ``MAX_LINES``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizer_bridge", "mllm")
MAX_LINES = 550


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules ``name`` imports anywhere in its source (top level or inside functions), plus external
    top-level names such as ``bench``; ``from pkg import submodule`` counts the submodule, not ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(target)
    return found - {name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def first_party(graph, deps: set[str]) -> set[str]:
    return {d for d in deps if d in graph}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path ``[a, b, ..., a]``, or ``[]``."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(first_party(graph, graph[node])):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "x.external"}, "b": set()}) == []


def test_the_library_does_not_import_the_layers_above(graph):
    upward = {name: sorted(d for d in deps if d.split(".")[0] == "mllm")
              for name, deps in graph.items() if name.split(".")[0] == "tokenizer_bridge"}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def test_nothing_imports_the_demo_the_cli_bench_or_eval(graph):
    allowed = {"mllm.cli": {"mllm.demo"}}
    bad = {}
    for name, deps in graph.items():
        offending = {d for d in deps if d in ("mllm.demo", "mllm.cli") or d.split(".")[0] in ("bench", "eval")}
        offending -= allowed.get(name, set())
        if offending:
            bad[name] = sorted(offending)
    assert bad == {}


def test_modules_never_import_their_package_root(graph):
    bad = sorted(name for name, deps in graph.items() for root in PACKAGES
                 if name.startswith(root + ".") and root in deps)
    assert bad == []


def test_the_stage_interface_is_a_leaf(graph):
    assert first_party(graph, graph["mllm.training.stage"]) == set()


def test_no_module_outgrows_one_sitting():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_files().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_import_parser_resolves_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    source = "from . import sibling\nfrom ..other import thing\n\ndef f():\n    from .sibling import x\n"
    (pkg / "sub" / "mod.py").write_text(source)
    known = {"pkg.sub.sibling", "pkg.other", "pkg.sub.mod"}
    assert imported_modules("pkg.sub.mod", pkg / "sub" / "mod.py", known) == {"pkg.sub.sibling", "pkg.other"}
