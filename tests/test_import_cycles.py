"""No import cycles among the project's modules (exporter/, runtime/, benchmarks/, lama/).

The map is read from the source with `ast` (nothing is imported, so no torch): every `import`
and `from ... import` counts, the ones inside functions too, since a lazy import is still a
dependency a reader has to follow; only those under `if TYPE_CHECKING:` (annotations, never
run) are left out. An import of a package counts as an import of its
`__init__.py`; `from pkg import name` counts as the submodule `pkg.name` when that file
exists. Importing a submodule does not add an edge to its parent package's `__init__.py`
(Python runs it, but that is the language's order, not a design choice).

benchmarks/ is a package like the others: its scripts run as modules from the repository root
(`python -m benchmarks.run`) and import each other as `benchmarks.X`, never by editing sys.path
(checked below).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "runtime", "benchmarks", "lama")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else ():
            rel = path.relative_to(ROOT).parts
            if not any(part.startswith(".") or part in ("results", "__pycache__") for part in rel):
                mods[module_name(path)] = path  # (benchmarks' .venv-* folders hold other venvs)
    return mods


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        return target if target in mods else None

    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import a.b.c` imports a.b.c (and its parents, which we leave out, as above)
                target = resolve(alias.name)
                if target:
                    out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = resolve(f"{base_name}.{alias.name}")  # `from pkg import submodule`
                target = sub or resolve(base_name)
                if target and target != name:
                    out.append((target, node.lineno))
    return out


def _type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): annotations only, never run."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    where: dict[tuple[str, str], int] = {}
    for name, path in mods.items():
        for target, line in imports(name, path, mods):
            graph[name].add(target)
            where.setdefault((name, target), line)
    return graph, where


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one cycle
    through its members found by a walk inside the component."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # iterative Tarjan: the graph has a few hundred nodes, recursion would do, but be safe
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for comp in comps:  # the shortest cycle through the component's first module (BFS)
        members, start = set(comp), comp[0]
        parent, queue = {}, [start]
        while queue and start not in parent:
            node = queue.pop(0)
            for t in sorted(graph[node]):
                if t in members and t not in parent:
                    parent[t] = node
                    queue.append(t)
        path, node = [start], parent[start]
        while node != start:
            path.append(node)
            node = parent[node]
        found.append([start] + path[:0:-1] + [start])
    return found


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    graph, _ = import_graph()
    assert "runtime.manifest" in graph["runtime.runtime"]  # `from .manifest import ...`
    assert "exporter.placement" in graph["exporter.api"]  # inside a function
    assert "runtime.manifest" in graph["runtime.tensorrt.backend"]  # `from ..manifest import ...`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    graph, where = import_graph()
    found = cycles(graph)
    lines = []
    for cyc in found:
        steps = [f"{a} (line {where[(a, b)]}) -> {b}" for a, b in zip(cyc, cyc[1:])]
        lines.append("; ".join(steps))
    assert not found, "import cycles:\n" + "\n".join(lines)


def test_runtime_never_imports_the_exporter_or_torch():
    """The device side stands alone: runtime/ imports neither exporter/ nor lama/ nor torch."""
    mods = project_modules()
    bad = []
    for name, path in mods.items():
        if name.split(".")[0] != "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for t in targets:
                if t.split(".")[0] in ("exporter", "lama", "torch", "transformers"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t}")
    assert not bad, "\n".join(bad)


def test_benchmarks_never_edit_sys_path():
    """No benchmarks/ file puts a folder on sys.path (`sys.path.insert`, `.append`, slicing): the
    scripts run as modules of the benchmarks package (`python -m benchmarks.run`, the studies as
    `python -m benchmarks.studies.NAME`) and the workers that run in other venvs are started the
    same way with the repository root on PYTHONPATH (benchmarks/timing.py: module_command,
    worker_env). Strings count too: a script handed to `python -c` is code as well."""
    edit = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[|\+=|=[^=])")
    found = []
    for path in sorted((ROOT / "benchmarks").rglob("*")):
        rel = path.relative_to(ROOT)
        if path.suffix not in (".py", ".sh") or any(p.startswith(".") or p in ("results", "__pycache__")
                                                     for p in rel.parts):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if edit.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert (ROOT / "benchmarks" / "__init__.py").is_file() and (ROOT / "benchmarks" / "studies" / "__init__.py").is_file()
    assert not found, "benchmarks/ edits sys.path (run it as a module instead):\n" + "\n".join(found)
