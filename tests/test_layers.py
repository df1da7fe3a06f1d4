"""The imports match the layer drawing (docs/architecture.md), read from the source with ast.

* Layers, lowest first: ``core`` < ``converters``, ``parallel`` < ``backends`` < the
  application (``glm_runtime.api``, ``.cli``, ``.training``, ``.conformance``). A module
  imports only from its own layer or below; ``backends`` may read ``converters``' format
  descriptions (the onnx backend runs what the exporter writes), never the reverse.
* No import cycle between the project's files (every import statement counts, at module
  level or inside a function).
* Imports inside functions are there only for optional dependencies: an optional
  third-party package, or a project module that imports one at its top. Documented
  exceptions keep start-up cheap: the package root resolves its public names lazily, the
  conformance kit's pytest plugin imports the kit only when it is used, and training
  imports torch's pipelining schedules (and with them torch's compiler stack, ~3 s per
  process) only for a pipelined run, so that no other glmrt command pays for them.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> import name (pyproject.toml's package-dir)
FOLDERS = {"glm_runtime": "glm_runtime", "glm_core": "glm_runtime.core", "backends": "glm_runtime.backends",
           "parallel": "glm_runtime.parallel", "converters": "glm_runtime.converters"}
LAYER = {"glm_runtime.core": 0, "glm_runtime.converters": 1, "glm_runtime.parallel": 1, "glm_runtime.backends": 2}
APP = 3
ALLOWED_SIDEWAYS = {("glm_runtime.backends", "glm_runtime.converters")}
# optional packages (extras) and heavy ones only some commands need (onnx: the exporter and
# the onnx backend), imported where the feature needing them runs
OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "triton", "transformers", "torch_npu", "mpi4py", "matplotlib",
            "yaml", "regex", "llama_cpp", "fastapi", "starlette", "uvicorn", "sse_starlette", "prometheus_client"}
LAZY_BY_DESIGN = {("glm_runtime.conformance.plugin", "glm_runtime.conformance.target"),
                  ("glm_runtime.training.distributed", "glm_runtime.parallel.pipeline")}


@dataclass
class Imp:
    target: str       # module imported (project module resolved to a file, else the top-level name)
    line: int
    in_function: bool


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for folder, name in FOLDERS.items():
        for p in (root / folder).rglob("*.py"):
            rel = p.relative_to(root / folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((name, *rel))] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, path: Path, known: set[str]) -> list[Imp]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out: list[Imp] = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Imp(a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(mod, is_pkg, child)
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{a.name}"
                    out.append(Imp(sub if sub in known else base, child.lineno, in_function))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # annotations only, never executed
            visit(child, nested)

    visit(tree, False)
    return out


def _is_type_checking(test) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _project(target: str, known: set[str]) -> str | None:
    """The project module ``target`` names (its longest known prefix), or None."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in known:
            return name
    return None


def layer_of(mod: str) -> tuple[int, str]:
    for pkg, n in LAYER.items():
        if mod == pkg or mod.startswith(pkg + "."):
            return n, pkg
    return APP, "glm_runtime (application)"


def graph(root: Path = ROOT) -> tuple[dict[str, list[Imp]], set[str]]:
    files = module_files(root)
    known = set(files)
    return {m: imports(m, p, known) for m, p in files.items()}, known


def layer_violations(g, known) -> list[str]:
    bad = []
    for mod, imps in g.items():
        lm, pm = layer_of(mod)
        for i in imps:
            tgt = _project(i.target, known)
            if tgt is None:
                continue
            lt, pt = layer_of(tgt)
            if lt > lm or (lt == lm and pt != pm and lm != APP and (pm, pt) not in ALLOWED_SIDEWAYS):
                bad.append(f"{mod}:{i.line} ({pm}) imports {tgt} ({pt})")
    return bad


def cycles(g, known) -> list[list[str]]:
    edges = {m: sorted({t for i in imps if (t := _project(i.target, known)) and t != m}) for m, imps in g.items()}
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def needs_optional(mod: str, g, known, seen=None) -> bool:
    """Does importing ``mod`` (its module-level imports, transitively) need an optional package?"""
    seen = set() if seen is None else seen
    if mod in seen:
        return False
    seen.add(mod)
    for i in g.get(mod, ()):
        if i.in_function:
            continue
        if i.target.split(".")[0] in OPTIONAL:
            return True
        tgt = _project(i.target, known)
        if tgt is not None and needs_optional(tgt, g, known, seen):
            return True
    return False


def function_level_violations(g, known) -> list[str]:
    bad = []
    for mod, imps in g.items():
        for i in imps:
            if not i.in_function or i.target.split(".")[0] in OPTIONAL:
                continue
            tgt = _project(i.target, known)
            if tgt is not None and ((mod, tgt) in LAZY_BY_DESIGN or needs_optional(tgt, g, known)):
                continue
            bad.append(f"{mod}:{i.line} imports {i.target} inside a function")
    return bad


@pytest.fixture(scope="module")
def project():
    return graph()


def test_the_scan_sees_the_whole_project(project):
    g, known = project
    for m in ("glm_runtime.core.model", "glm_runtime.parallel.model", "glm_runtime.converters.sat",
              "glm_runtime.backends.cpu.plugin", "glm_runtime.api", "glm_runtime.cli.main"):
        assert m in known
    assert sum(len(v) for v in g.values()) > 300


def test_imports_point_down(project):
    assert layer_violations(*project) == []


def test_no_import_cycles(project):
    assert cycles(*project) == []


def test_function_level_imports_only_for_optional_dependencies(project):
    assert function_level_violations(*project) == []


def test_entry_points_import_without_optional_dependencies(project):
    """The glmrt command, ``load_model``, the conformance kit's pytest plugin and every
    in-tree backend plugin (imported at discovery) must import with the required
    dependencies only: an optional one is imported where the feature needing it runs."""
    g, known = project
    entries = ["glm_runtime.cli.main", "glm_runtime.api", "glm_runtime.conformance.plugin"]
    entries += [m for m in known if m.startswith("glm_runtime.backends.") and m.endswith(".plugin")]
    assert [m for m in entries if needs_optional(m, g, known)] == []


def test_the_checks_catch_planted_problems(tmp_path):
    """The checker itself: an upward import, a cycle and a function-level project import."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "glm_core" / "a.py").write_text("from glm_runtime.parallel import b\n")
    (tmp_path / "parallel" / "b.py").write_text("from glm_runtime.core import a\n")
    (tmp_path / "converters" / "c.py").write_text("def f():\n    from glm_runtime.core import a\n")
    (tmp_path / "backends" / "d.py").write_text("def f():\n    import onnxruntime\n")
    g, known = graph(tmp_path)
    assert layer_violations(g, known) == ["glm_runtime.core.a:1 (glm_runtime.core) imports glm_runtime.parallel.b "
                                          "(glm_runtime.parallel)"]
    assert cycles(g, known) == [["glm_runtime.core.a", "glm_runtime.parallel.b"]]
    assert function_level_violations(g, known) == ["glm_runtime.converters.c:2 imports glm_runtime.core.a inside "
                                                   "a function"]
