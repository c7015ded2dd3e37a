"""The house: one package per pipeline stage, no import cycle (imports inside functions included),
and stages that import only the stages below them. Read from the source with `ast`, so that a
lazy import inside a function counts like a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# repo folder -> package name (kernels/ and evals/ are packaged as qtulu.kernels and qtulu.evals)
FOLDERS = {"qtulu": "qtulu", "kernels": "qtulu.kernels", "evals": "qtulu.evals"}
LINKS = {"kernels", "evals", "builtin_recipes"}  # symlinks inside qtulu/ to the folders above

# The import order, lowest first: a module may import its own layer and the layers before it.
# Data flows recipe -> data -> model -> train -> adapter -> eval / merge; the adapter *format* and its
# writer sit below train, which writes an adapter (`adapters.store.save_adapter`) but is never
# imported by the adapter code.
LAYERS = [
    ["qtulu", "qtulu.errors", "qtulu.files", "qtulu.schema", "qtulu.yaml_io", "qtulu.hub"],
    ["qtulu.recipes", "qtulu.presets"],
    ["qtulu.data"],
    ["qtulu.kernels", "qtulu.model"],
    ["qtulu.adapters"],
    ["qtulu.preflight"],  # checks before a model loads: run names, base files, adapters
    ["qtulu.train"],
    ["qtulu.evals", "qtulu.plan", "qtulu.chat", "qtulu.merge_cli"],
    ["qtulu.bench", "qtulu.study", "qtulu.demo", "qtulu.recipe_cli"],
    ["qtulu.cli", "qtulu.__main__"],
]
MAX_TOP_MODULES = 15


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in FOLDERS.items():
        for p in sorted((REPO / folder).rglob("*.py")):
            rel = p.relative_to(REPO / folder)
            if folder == "qtulu" and rel.parts[0] in LINKS:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                o = owner(t)
                if o and o != m:
                    edges[m].add(o)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int:
    best, rank = "", None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > len(best):
                best, rank = n, i
    assert rank is not None, f"{module} is in no layer of tests/test_layout.py"
    return rank


def test_no_import_cycle_anywhere():
    assert _cycles(_imports(_modules())) == []


def test_every_module_imports_only_its_layer_and_those_below():
    upward = [f"{a} -> {b}" for a, deps in _imports(_modules()).items() for b in sorted(deps)
              if _layer(b) > _layer(a)]
    assert upward == []


def test_at_most_fifteen_modules_at_the_top_of_qtulu():
    top = sorted(p.name for p in (REPO / "qtulu").glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    stages = {"data", "model", "train", "adapters", "plan", "study", "bench", "demo"}
    assert stages <= {p.name for p in (REPO / "qtulu").iterdir() if (p / "__init__.py").is_file()}


def test_tests_mirror_the_packages():
    for pkg in ("data", "model", "train", "adapters", "plan", "study", "bench", "demo", "kernels", "evals"):
        assert list((REPO / "tests" / pkg).glob("test_*.py")), f"tests/{pkg}/ has no tests"


# Functions at most ~120 lines (the house rule), read with `ast` from every source folder. An entry
# here would be a function being split (none is); the test fails once an entry is short enough.
MAX_FUNCTION_LINES = 120
LONG_FUNCTIONS_ALLOWED: set[str] = set()
SOURCE_FOLDERS = ("qtulu", "kernels", "evals", "benchmarks")


def _long_functions() -> list[str]:
    out = []
    for folder in SOURCE_FOLDERS:
        for p in sorted((REPO / folder).rglob("*.py")):
            rel = p.relative_to(REPO)
            if folder == "qtulu" and rel.parts[1] in LINKS:
                continue  # the same files as kernels/ and evals/
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        out.append(f"{rel.as_posix()}:{node.name} ({lines} lines)")
    return out


def test_no_function_over_120_lines():
    found = _long_functions()
    long = [f for f in found if f.split(" (")[0] not in LONG_FUNCTIONS_ALLOWED]
    assert long == [], "split these into named stages or helpers"
    split = LONG_FUNCTIONS_ALLOWED - {f.split(" (")[0] for f in found}
    assert not split, f"split already: remove {sorted(split)} from LONG_FUNCTIONS_ALLOWED"
