"""The layers of c2c_core hold, lazy (in-function) imports counted:
- the layer contract in `.importlinter` (import-linter): spec < io < report < measure < models
  < plan < engines < bench < frontends, each importing only those below it, and the eager and
  fast engines never importing each other; a broken contract fails naming the import chain;
- no import cycle among the modules, read from the source (ast), so it needs no torch and
  names the modules of any new cycle."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "c2c_core")
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the c2c_core modules it imports anywhere in its source."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                for a in node.names:
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                    if target in mods and target != m:
                        graph[m].add(target)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, ("import cycles (lazy imports count): "
                       + "; ".join(" <-> ".join(c) for c in found)
                       + ". Move what both sides need down a layer.")


def test_the_cycle_check_can_fail():
    g = import_graph()
    g["c2c_core.io.records"] = g["c2c_core.io.records"] | {"c2c_core.bench.runner"}  # an upward import
    assert any("c2c_core.io.records" in c and "c2c_core.bench.runner" in c for c in cycles(g))


def _lint(repo: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([LINT, "--no-cache", "--config", os.path.join(repo, ".importlinter")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_the_layer_contract_holds():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_every_subpackage_is_in_the_contract():
    with open(os.path.join(REPO, ".importlinter"), encoding="utf-8") as f:
        text = f.read()
    layers = text.split("layers =", 1)[1].split("[", 1)[0].split()
    named = {x.strip("()") for x in layers}
    packages = {d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))}
    assert packages <= named, f"subpackages missing from the layer contract: {packages - named}"
    flat = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    assert sorted(flat) == ["__init__.py", "__main__.py"], f"modules outside any layer: {flat}"


def _scratch(tmp_path, edit_file: str, line: str) -> str:
    repo = str(tmp_path / "repo")
    shutil.copytree(ROOT, os.path.join(repo, "c2c_core"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, ".importlinter"), repo)
    with open(os.path.join(repo, "c2c_core", edit_file), "a", encoding="utf-8") as f:
        f.write("\n" + line + "\n")
    return repo


def test_an_upward_import_breaks_the_contract(tmp_path):
    # a lazy one counts too: it sits in a function body
    repo = _scratch(tmp_path, "io/records.py",
                    "def _later():\n    from ..bench import runner  # noqa: F401")
    out = _lint(repo)
    assert out.returncode != 0
    assert "c2c_core.io.records -> c2c_core.bench.runner" in out.stdout, out.stdout[-3000:]


def test_an_engine_importing_the_other_breaks_the_contract(tmp_path):
    repo = _scratch(tmp_path, "engines/fast/engine.py", "from .. import eager  # noqa: F401,E402")
    out = _lint(repo)
    assert out.returncode != 0
    assert "c2c_core.engines.fast.engine -> c2c_core.engines.eager" in out.stdout, out.stdout[-3000:]


def test_a_long_module_says_why_at_its_top():
    """No module over ~500 lines without a reason written in its docstring ("over 500 lines")."""
    long = []
    for m, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            src = f.read()
        doc = (ast.get_docstring(ast.parse(src)) or "").lower()
        if src.count("\n") > 520 and "over 500 lines" not in doc:
            long.append(f"{m} ({src.count(chr(10))} lines)")
    assert not long, f"long modules without a reason at their top: {long}"
