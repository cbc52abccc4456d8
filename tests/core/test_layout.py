"""The rules docs/layout.md states, checked on every kesi_dist/**/*.py with `ast`.

- only kesi_dist/runtime/ imports Ray;
- the plain-PyTorch packages (models/, pruning/, train/, distill/, data/) import nothing from runtime/,
  runs/, stages/, methods/ or the root config (kesi_dist/config.py), directly or through any other
  kesi_dist module they import;
- stages/ and runs/ never import the root config (they take specs);
- no import circle: no kesi_dist module reaches itself through the modules it imports (a package's own
  `__init__` loading first is Python's order, not a circle);
- no module is over 350 lines.

Every import counts: at module level, inside functions and classes, under `if TYPE_CHECKING:`, `import x`,
`from x import y` (y may be a submodule: `from kesi_dist import config`), relative imports resolved
against the module's package, and `importlib.import_module` / `__import__` with a literal name (or an
f-string's literal prefix). A failure names the file, the line and the import as written.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kesi_dist"
PLAIN_TORCH = ("models", "pruning", "train", "distill", "data")
NOT_FOR_PLAIN_TORCH = ("kesi_dist.runtime", "kesi_dist.runs", "kesi_dist.stages", "kesi_dist.methods",
                       "kesi_dist.config")
MAX_LINES = 350


@dataclass(frozen=True)
class Import:
    line: int
    text: str                  # the import as written
    targets: tuple[str, ...]   # absolute dotted names it may load


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    base = package.split(".")
    if level - 1 > len(base) - 1:
        raise ValueError(f"relative import beyond the top package from {package}")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _literal_prefix(node: ast.expr) -> str | None:
    """The module name a dynamic import call loads: a string literal, or an f-string's leading literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value).rstrip(".") or None
    return None


def imports_of(source: str, module: str, is_package: bool) -> list[Import]:
    """Every import in `source` (the module `module`), at any nesting depth."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, f"import {a.name}", (a.name,)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, package)
            written = "." * node.level + (node.module or "")
            found += [Import(node.lineno, f"from {written} import {a.name}",
                             (base,) if a.name == "*" else (base, f"{base}.{a.name}")) for a in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                target = _literal_prefix(node.args[0])
                if target:
                    found.append(Import(node.lineno, ast.unparse(node), (target,)))
    return sorted(found, key=lambda i: i.line)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _sources() -> dict[str, Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} modules under {PACKAGE}"
    return {module_name(p): p for p in files}


SOURCES = _sources()
IMPORTS = {m: imports_of(p.read_text(encoding="utf-8"), m, p.name == "__init__.py") for m, p in SOURCES.items()}


def _where(module: str, imp: Import) -> str:
    return f"{SOURCES[module].relative_to(ROOT)}:{imp.line}: {imp.text}"


def _breaking(modules, forbidden) -> list[str]:
    return [_where(m, imp) for m in modules for imp in IMPORTS[m]
            if any(within(t, f) for t in imp.targets for f in forbidden)]


def _in(package: str):
    return [m for m in SOURCES if within(m, f"kesi_dist.{package}")]


def _loaded(target: str) -> list[str]:
    """The kesi_dist modules importing `target` executes: the module (or package) and every package above."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in SOURCES]


# ---- the checker itself finds what it must (on a crafted module, so the rules below are not vacuous)

def test_the_checker_sees_nested_relative_aliased_and_dynamic_imports():
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from kesi_dist import config\n"
        "def f():\n"
        "    import ray.train as rt\n"
        "    from ..runtime import trainer\n"
        "class C:\n"
        "    def g(self):\n"
        "        from . import sibling\n"
        "        return importlib.import_module(f'kesi_dist.stages.{x}')\n"
    )
    got = {(i.line, i.text): i.targets for i in imports_of(source, "kesi_dist.data.loaders", is_package=False)}
    assert got[(4, "from kesi_dist import config")] == ("kesi_dist", "kesi_dist.config")
    assert got[(6, "import ray.train")] == ("ray.train",)
    assert got[(7, "from ..runtime import trainer")] == ("kesi_dist.runtime", "kesi_dist.runtime.trainer")
    assert got[(10, "from . import sibling")] == ("kesi_dist.data", "kesi_dist.data.sibling")
    assert got[(11, "importlib.import_module(f'kesi_dist.stages.{x}')")] == ("kesi_dist.stages",)
    # In a package's __init__.py, "." is the package itself.
    (init,) = imports_of("from .cache import local_copy\n", "kesi_dist.storage", is_package=True)
    assert init.targets == ("kesi_dist.storage.cache", "kesi_dist.storage.cache.local_copy")
    assert not within("kesi_dist.runs_helper", "kesi_dist.runs") and within("kesi_dist.runs.context", "kesi_dist.runs")


def test_the_checker_reads_the_real_package():
    # The Ray rule has something to allow: the runtime does import Ray (else the rules could pass on nothing).
    ray_in_runtime = [imp for m in _in("runtime") for imp in IMPORTS[m] if any(within(t, "ray") for t in imp.targets)]
    assert len(ray_in_runtime) >= 5, ray_in_runtime
    for package in (*PLAIN_TORCH, "stages", "runs", "runtime"):
        assert _in(package), f"kesi_dist/{package}/ has no modules: the layout changed, update this test"


# ---- the rules

def test_only_runtime_imports_ray():
    outside = [m for m in SOURCES if not within(m, "kesi_dist.runtime")]
    bad = _breaking(outside, ("ray",))
    assert not bad, "only kesi_dist/runtime/ may import Ray:\n" + "\n".join(bad)


def test_plain_pytorch_packages_import_nothing_from_the_orchestration_layers():
    modules = [m for p in PLAIN_TORCH for m in _in(p)]
    bad = _breaking(modules, NOT_FOR_PLAIN_TORCH)
    assert not bad, ("models/, pruning/, train/, distill/ and data/ import nothing from runtime/, runs/, stages/, "
                     "methods/ or config.py:\n" + "\n".join(bad))


def test_plain_pytorch_packages_reach_neither_ray_nor_those_layers_through_other_modules():
    """Transitively: what a plain-PyTorch module imports from kesi_dist (errors, storage, checkpoint, ...)
    may not itself pull in Ray or the orchestration layers."""
    forbidden = (*NOT_FOR_PLAIN_TORCH, "ray")
    bad = []
    for start in (m for p in PLAIN_TORCH for m in _in(p)):
        seen, todo = {start: [start]}, [start]
        while todo:
            current = todo.pop()
            for imp in IMPORTS[current]:
                hit = [t for t in imp.targets if any(within(t, f) for f in forbidden)]
                if hit:
                    bad.append(" -> ".join(seen[current]) + f" ({_where(current, imp)})")
                    continue
                for target in imp.targets:
                    for loaded in _loaded(target):
                        if loaded not in seen:
                            seen[loaded] = seen[current] + [loaded]
                            todo.append(loaded)
    assert not bad, "a plain-PyTorch module reaches a forbidden import:\n" + "\n".join(sorted(set(bad)))


def test_stages_and_runs_never_import_the_root_config():
    bad = _breaking(_in("stages") + _in("runs"), ("kesi_dist.config",))
    assert not bad, "stages/ and runs/ take specs, never the root config (kesi_dist/config.py):\n" + "\n".join(bad)


def _edges() -> dict[str, set[str]]:
    """module -> the kesi_dist modules its imports name (the deepest module of each import's targets; a
    dynamic import's literal prefix naming the importing package itself is left out: it loads a child)."""
    graph = {}
    for m, imps in IMPORTS.items():
        graph[m] = set()
        for imp in imps:
            found = [t for t in imp.targets if t in SOURCES and t != "kesi_dist"]
            if found and max(found, key=len) != m:
                graph[m].add(max(found, key=len))
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import graph's circles: each strongly connected component of more than one module (or a module
    importing itself), as a path that closes on its first module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph.get(v, ()):
                out.append(_closing_path(graph, set(part)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _closing_path(graph: dict[str, set[str]], part: set[str]) -> list[str]:
    """A shortest path inside `part` from its first module back to itself."""
    start = min(part)
    paths, todo = {start: [start]}, [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & part):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    return sorted(part)


def test_the_cycle_finder_finds_a_crafted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(import_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    # on the real package: its two-module circle (config -> methods -> ...) would be found
    graph = _edges()
    assert "kesi_dist.methods" in graph["kesi_dist.config"] and "kesi_dist.config" in graph["kesi_dist.launch"]
    assert import_cycles({**graph, "kesi_dist.methods": graph["kesi_dist.methods"] | {"kesi_dist.config"}})
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    cycles = import_cycles(_edges())
    assert not cycles, "import circles (break each one):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_the_root_config_from_below():
    """Only the CLI's layer sees the whole config: stages/, runs/ and the plain-PyTorch packages reach
    config.py through no chain of imports either."""
    graph, bad = _edges(), []
    for start in [m for p in (*PLAIN_TORCH, "stages", "runs") for m in _in(p)]:
        seen, todo = {start: [start]}, [start]
        while todo:
            v = todo.pop()
            for w in graph[v]:
                if w == "kesi_dist.config":
                    bad.append(" -> ".join(seen[v] + [w]))
                elif w not in seen:
                    seen[w] = seen[v] + [w]
                    todo.append(w)
    assert not bad, "reaches kesi_dist/config.py from below:\n" + "\n".join(sorted(bad))


def test_no_module_is_over_350_lines():
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in SOURCES.values()}
    bad = [f"{p.relative_to(ROOT)}: {n} lines" for p, n in sorted(sizes.items()) if n > MAX_LINES]
    assert not bad, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(bad)
