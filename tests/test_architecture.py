"""The map is checked: every import in src/batchfit against the layer table (batchfit/_layers.py, the one place it
is written down; docs/architecture.md shows it).

Every import is read with ``ast``: at module level, inside functions (a lazy import that dodges a loop is still the
loop), under ``TYPE_CHECKING``, and ``importlib.import_module("batchfit....")`` with a literal name. An import may
go to its own layer or below; no chain of imports may come back to its start; no module imports another module's
private (``_name``) names. The checks are plain functions over a package directory, so the tests at the end feed
them small made-up packages with a violation each and see them fail.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchfit import _layers

SRC = Path(__file__).resolve().parent.parent / "src" / "batchfit"
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
LAYER_NAMES = list(_layers.LAYERS)


@dataclass(frozen=True)
class Import:
    importer: str  # module path under batchfit ("study.trial"; "__init__" for the package)
    target: str  # the module it loads
    name: str | None  # the name taken from it (None: the module itself)
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.importer}:{self.line}{' (inside a function)' if self.lazy else ''}"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` (a ``batchfit`` directory), by its path under ``batchfit``."""
    return {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def _under_package(dotted: str) -> str | None:
    """``batchfit.study.trial`` -> ``study.trial``; ``batchfit`` -> ``__init__``; another package -> None."""
    if dotted == "batchfit":
        return "__init__"
    if dotted.startswith("batchfit."):
        return dotted[len("batchfit."):]
    return None


class _Reader(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, name: str | None, node: ast.AST) -> None:
        self.found.append(Import(self.module, target, name, node.lineno, self.depth > 0))  # type: ignore[attr-defined]

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _under_package(alias.name)
            if target is not None:
                self._add(target, None, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the importer's package, up level - 1
            package = [] if self.module == "__init__" else self.module.split(".")
            if not self.is_package:
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
            base = base or "__init__"
        else:
            found = _under_package(node.module or "")
            if found is None:
                return
            base = found
        for alias in node.names:
            sub = alias.name if base == "__init__" else f"{base}.{alias.name}"
            if sub in self.known:  # `from batchfit import checks`: the submodule itself
                self._add(sub, None, node)
            else:
                self._add(base, alias.name, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            target = _under_package(node.args[0].value)
            if target is not None:
                self._add(target, None, node)
        self.generic_visit(node)


def imports(root: Path) -> list[Import]:
    """Every import of a ``batchfit`` module by a module of the package at ``root``."""
    mods = modules(root)
    out: list[Import] = []
    for name, path in mods.items():
        reader = _Reader(name, path.name == "__init__.py", set(mods))
        reader.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out.extend(reader.found)
    return out


def unlisted(root: Path) -> list[str]:
    """Modules the layer table does not place."""
    return [m for m in modules(root) if _layers.layer_of(m) is None]


def upward(found: list[Import]) -> list[str]:
    """Imports that run up a layer, one line each."""
    out = []
    for imp in found:
        low, high = _layers.layer_of(imp.importer), _layers.layer_of(imp.target)
        if low is not None and high is not None and high > low:
            out.append(f"{imp.where()} imports {imp.target} ({LAYER_NAMES[low]} -> {LAYER_NAMES[high]}, up a layer)")
    return out


def loops(found: list[Import]) -> list[list[str]]:
    """Every set of modules that import one another in a circle (strongly connected components of two or more, or
    a module importing itself), each as a cycle ``[a, b, ..., a]`` through the imports that close it."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package has ~100 modules, so recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle(graph, set(c)) for c in components]


def _cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through a component's first module (breadth-first, so the shortest)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError("a strongly connected component without a cycle")  # pragma: no cover


def private_names(found: list[Import]) -> list[str]:
    """Imports of another module's private names (``_name``; dunders such as ``__version__`` are not private)."""
    return [f"{imp.where()} imports {imp.name} from {imp.target}" for imp in found
            if imp.name is not None and imp.name.startswith("_") and not imp.name.startswith("__")
            and imp.target != imp.importer]


# ---------------------------------------------------------------------------------------------------------------
# The package as it is


@pytest.fixture(scope="module")
def found() -> list[Import]:
    return imports(SRC)


def test_every_module_has_a_layer() -> None:
    assert unlisted(SRC) == [], "give each new module a row in src/batchfit/_layers.py (and the map)"


def test_the_table_names_only_modules_that_exist() -> None:
    existing = set(modules(SRC))
    listed = [name for _, names in _layers.LAYERS.values() for name in names]
    assert sorted(n for n in listed if n not in existing and not any(m.startswith(n + ".") for m in existing)) == []
    assert len(listed) == len(set(listed)), "a module is in two layers"


def test_no_import_runs_up_a_layer(found: list[Import]) -> None:
    assert upward(found) == []


def test_no_import_closes_a_loop(found: list[Import]) -> None:
    assert loops(found) == []


def test_no_module_imports_another_modules_private_names(found: list[Import]) -> None:
    assert private_names(found) == []


def test_the_loops_of_issue_20_stay_open(found: list[Import]) -> None:
    """The edges that made the loops and the up-imports issue 20 found, named one by one."""
    edges = {(imp.importer, imp.target) for imp in found}
    for edge in [("branching", "engine"), ("branching", "noise"), ("finder", "engine"), ("workload", "demos"),
                 ("demos", "loading"), ("study.trial", "recommend"), ("study.trial", "__init__"),
                 ("study.runner", "__init__"), ("steptime", "finder"), ("tuning", "decide")]:
        if edge == ("tuning", "decide"):  # allowed, but only public names (was decide._sampling_interval)
            assert not [i for i in found if (i.importer, i.target) == edge and (i.name or "").startswith("_")]
            continue
        assert edge not in edges, f"{edge[0]} imports {edge[1]} again"


def test_the_map_shows_the_table() -> None:
    """docs/architecture.md shows the layer table exactly as _layers.render() prints it, and names every module
    of the package."""
    text = DOC.read_text(encoding="utf-8")
    assert _layers.render() in text, "paste _layers.render() into docs/architecture.md's layer block"
    owns = text.split("## What each module owns", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip() for line in owns.splitlines() if line.startswith("| `")}
    missing = [m for m in modules(SRC) if "." not in m and m not in ("__init__", "__main__")
               and f"`{m}.py`" not in rows and f"`{m}/`" not in rows]
    assert missing == [], "docs/architecture.md's 'What each module owns' has no row for these modules"


# ---------------------------------------------------------------------------------------------------------------
# The checks can fail: made-up packages with one violation each


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "batchfit"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def test_an_import_up_a_layer_fails_even_inside_a_function(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "errors.py": """
            def helper():
                from batchfit.engine import train  # foundation -> measurement
                return train
        """,
        "engine.py": "def train(): ...\n",
    })
    found = imports(root)
    assert found == [Import("errors", "engine", "train", 3, True)]
    assert upward(found) == ["errors:3 (inside a function) imports engine (foundation -> measurement, up a layer)"]
    with pytest.raises(AssertionError):
        test_no_import_runs_up_a_layer(found)


def test_a_loop_within_a_layer_fails_even_when_one_side_is_lazy(tmp_path: Path) -> None:
    """branching -> engine -> noise -> engine, as issue 20 found it: all in one layer, so only the loop check sees
    it."""
    root = _package(tmp_path, {
        "branching.py": "from batchfit.engine import resolve_device\n",
        "engine.py": "from batchfit import noise\n\ndef resolve_device(d): ...\n",
        "noise.py": "def probe():\n    from batchfit.engine import resolve_device\n    return resolve_device\n",
    })
    found = imports(root)
    assert upward(found) == []
    assert loops(found) == [["engine", "noise", "engine"]]
    with pytest.raises(AssertionError):
        test_no_import_closes_a_loop(found)


def test_a_loop_through_the_package_init_and_type_checking_imports_are_seen(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from batchfit.study import sweep
        """,
        "study/__init__.py": "from batchfit.study.runner import sweep\n",
        "study/runner.py": "from batchfit import __version__, checks\n\ndef sweep(): ...\n",
        "checks.py": "",
        "loading.py": "import importlib\nimportlib.import_module('batchfit.cli')\n",
        "cli/__init__.py": "",
    })
    found = imports(root)
    assert Import("study.runner", "checks", None, 1, False) in found  # a submodule, not the package's __init__
    assert sorted(upward(found)) == ["loading:2 imports cli (loading -> cli, up a layer)",
                                     "study.runner:1 imports __init__ (study -> api, up a layer)"]
    assert loops(found) == [["__init__", "study", "study.runner", "__init__"]]


def test_a_private_name_from_another_module_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "finder.py": "class _ModelKeeper: ...\n",
        "steptime.py": "def calibrate():\n    from batchfit.finder import _ModelKeeper\n    return _ModelKeeper\n",
        "study/__init__.py": "",
        "study/runner.py": "from .keys import _KEY\nfrom .. import __version__\n",
        "study/keys.py": "_KEY = 1\n",
    })
    found = imports(root)
    assert Import("study.runner", "__init__", "__version__", 2, False) in found  # relative, two dots: the package
    assert private_names(found) == ["steptime:2 (inside a function) imports _ModelKeeper from finder",
                                    "study.runner:1 imports _KEY from study.keys"]
    with pytest.raises(AssertionError):
        test_no_module_imports_another_modules_private_names(found)


def test_a_module_without_a_layer_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {"newthing.py": "", "errors.py": ""})
    assert unlisted(root) == ["newthing"]


def test_no_function_in_the_package_is_over_120_lines() -> None:
    """Issue 20: a function a newcomer can read (docstring included); ``tune`` is the recipe's phases."""
    import ast
    from pathlib import Path

    import batchfit

    root = Path(batchfit.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_every_progress_event_names_a_stage_of_the_one_vocabulary() -> None:
    """Issue 20.6: every literal stage an ``emit``/``run.emit`` call sends is in :data:`batchfit.progress.STAGES`,
    and tune's stages are among them (the tune display shows only tune's stages)."""
    import ast
    from pathlib import Path

    import batchfit
    from batchfit.progress import STAGES
    from batchfit.tuning import STAGES as TUNE_STAGES

    root = Path(batchfit.__file__).parent
    used: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name != "emit" or not node.args:
                continue
            arg = node.args[0] if isinstance(node.func, ast.Attribute) else (node.args[1] if len(node.args) > 1
                                                                               else None)
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                used[arg.value] = f"{path.relative_to(root)}:{node.lineno}"
    assert len(used) >= 10  # the scan sees the calls
    assert not {s: where for s, where in used.items() if s not in STAGES}
    assert set(TUNE_STAGES) <= set(STAGES)
