"""The layer rule of docs/ARCHITECTURE.md: the folders are the layers, and a module imports only from its own
layer and those below it; the import graph has no circle; no module is over 500 lines.

The Ray-free layers (core, config, method, robustness, evaluation) import neither Ray nor MLflow, checked twice:
statically (every ``import`` statement, function-level ones included, of each module and of every ``rjem_ray``
module it imports, transitively) and dynamically (a fresh interpreter in which importing ``ray`` or ``mlflow``
raises imports every one of them, and neither appears in ``sys.modules`` afterwards). MLflow is imported by the
tracking layer only. An import inside a function says why it is not in the module's header.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rjem_ray"
FORBIDDEN = ("ray", "mlflow")
# The layers of docs/ARCHITECTURE.md, bottom up: a folder (or a top-level module) and the layers it may import.
# The package's __init__ (its Python API and the torchvision shim) runs first whenever a submodule is imported.
LAYERS = {
    "core": (),
    "config": ("core",),
    "api": ("core", "config", "method"),
    "method": ("core", "config"),
    "robustness": ("core", "config", "method"),
    "evaluation": ("core", "config", "method", "robustness"),
    "tracking": ("core", "config", "method"),
    "distributed": ("core", "config", "method", "robustness", "evaluation", "tracking"),
    "tune": ("core", "config", "method", "robustness", "evaluation", "tracking", "distributed"),
    "entry": ("api", "core", "config", "method", "robustness", "evaluation", "tracking", "distributed", "tune"),
}
RAY_FREE = ("core", "config", "api", "method", "robustness", "evaluation")  # run where neither Ray nor MLflow is installed
TOP_LEVEL = {"__init__": "api", "checkpoint": "api", "_torchvision_compat": "core", "tracking": "tracking",
             "cli": "entry", "__main__": "entry"}
# Each config section is declared beside the module it configures (config/root.py lists them), and the names
# its keys take live with the modules that use them: the config layer (the folder rjem_ray/config/) imports
# these modules of the layers above it, which must never import the config back when they run
# (test_the_modules_the_config_takes_sections_and_names_from_never_import_it; type annotations aside).
SECTION_HOMES = ("method.attacks", "method.ddp", "method.gradreg", "method.learner", "method.models",
                 "method.replay_buffer", "method.samplers", "method.scaling", "method.speed",
                 "robustness.autoattack", "robustness.minnorm",
                 "evaluation.generate", "evaluation.generation_metrics", "evaluation.ood", "evaluation.registry")


def layer_of(module: str) -> str:
    """The layer of ``rjem_ray.<module>``: its folder, or for a top-level module its entry in ``TOP_LEVEL``."""
    head = module.split(".")[0]
    return TOP_LEVEL[head] if head in TOP_LEVEL else head


def _package_modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE).with_suffix("")).replace(os.sep, ".").removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def _ray_free_modules() -> list[str]:
    return [m for m in _package_modules() if layer_of(m) in RAY_FREE]


def _module_file(module: str) -> Path:
    parts = module.split(".")
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _type_only(tree: ast.AST) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:``: imports the type checker reads and Python never runs."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return guarded


def _imports(module: str, runtime: bool = False) -> tuple[set[str], set[str]]:
    """(absolute modules imported anywhere in ``rjem_ray.<module>``, ``rjem_ray`` modules among them);
    ``runtime``: only the imports that run (module- and function-level), not those under ``if TYPE_CHECKING:``."""
    path = _module_file(module)
    tree = ast.parse(path.read_text(), str(path))
    package = list(path.parent.relative_to(PACKAGE).parts)  # what `from . import` is relative to
    absolute, internal = set(), set()
    skip = _type_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import y: resolve against the module's package
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else []
                names += [f"{target}.{a.name}" if target else a.name for a in node.names]  # y may be a module
                names = [f"rjem_ray.{n}" if n else "rjem_ray" for n in names]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "rjem_ray" or name.startswith("rjem_ray."):
                inner = name[len("rjem_ray."):] if name != "rjem_ray" else "__init__"
                if inner != "__init__" and not _module_file(inner).is_file():  # a name imported from a module
                    continue
                absolute.add(name)
                internal.add(inner)
            elif isinstance(node, ast.Import) or name == node.module:
                absolute.add(name)
    return absolute, internal


def _reach(module: str, runtime: bool = False, with_init: bool = True) -> set[str]:
    """``module`` and the package modules its imports reach, transitively. ``with_init``: the package's
    ``__init__`` (imported first by every submodule) and what it imports are in; else left out (it loads
    checkpoints inside a function, never at import). ``runtime``: only the imports that run."""
    seen, todo = set(), [module] + (["__init__"] if with_init else [])
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(m, runtime)[1] - (set() if with_init else {"__init__"}))
    return seen


def _forbidden_in(module: str) -> list[str]:
    return sorted(n for n in _imports(module)[0] if n.split(".")[0] in FORBIDDEN)


def test_every_module_is_in_a_layer():
    assert sorted(m for m in _package_modules() if layer_of(m) not in LAYERS) == []
    assert [m for m in SECTION_HOMES if not _module_file(m).is_file()] == []


def test_import_parser_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    # The checker itself: a planted lazy `import ray` inside a function, reached through a relative import,
    # and a module imported by name from its package (`from .pkg import mod`).
    fake = tmp_path / "rjem_ray"
    (fake / "pkg").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "pkg" / "__init__.py").write_text("")
    (fake / "alg.py").write_text("from .helper import f\n")
    (fake / "helper.py").write_text("from .pkg import mod\ndef f():\n    from ray import tune\n    return tune\n")
    (fake / "pkg" / "mod.py").write_text("from ..alg import nothing\n")
    (fake / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .alg import nothing\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert _reach("alg") == {"alg", "helper", "pkg", "pkg.mod", "__init__"}
    assert _forbidden_in("helper") == ["ray"]
    assert _circles() == [["alg", "helper", "pkg.mod"]]
    assert _imports("typed")[1] == {"alg"} and _imports("typed", runtime=True)[1] == set()


@pytest.mark.parametrize("module", _ray_free_modules())
def test_ray_free_module_imports_neither_ray_nor_mlflow_statically(module):
    offenders = {m: _forbidden_in(m) for m in sorted(_reach(module)) if _forbidden_in(m)}
    assert offenders == {}, (f"rjem_ray.{module} reaches Ray/MLflow through {offenders}; the layers "
                             f"{RAY_FREE} must stay importable and runnable without them (docs/ARCHITECTURE.md)")


def _layer_breaks(module: str) -> list[str]:
    mine = layer_of(module)
    allowed = {mine, *LAYERS[mine]}
    out = []
    for target in sorted(_imports(module)[1]):
        if target == "__init__" or layer_of(target) in allowed:
            continue
        if mine == "config" and target in SECTION_HOMES:
            continue
        out.append(f"{module} ({mine}) -> {target} ({layer_of(target)})")
    return out


def test_each_module_imports_only_its_own_layer_and_those_below():
    assert [b for m in _package_modules() for b in _layer_breaks(m)] == []


def test_the_modules_the_config_takes_sections_and_names_from_never_import_it():
    """What matters of a section's home is that running it never imports the config: then no circle closes
    through it (test_no_import_circle checks the graph as a whole) and the home runs without it. A home may
    import other modules of its layer (method/models.py imports method/energy.py); none of them may reach the
    config either. Annotations may name ``Config`` under ``if TYPE_CHECKING:``."""
    reach = {m: _reach(m, runtime=True, with_init=False) for m in SECTION_HOMES}
    assert {m: sorted(t for t in reach[m] if layer_of(t) == "config") for m in SECTION_HOMES} == \
        {m: [] for m in SECTION_HOMES}


def _circles() -> list[list[str]]:
    """Strongly connected groups (more than one module) of the graph of imports that run, function-level ones
    included (``if TYPE_CHECKING:`` imports are read by the type checker only: a module's annotations may name
    ``Config`` while the config imports the section declared in that module)."""
    graph = {m: sorted(_imports(m, runtime=True)[1] - {"__init__", m}) for m in _package_modules()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circle():
    assert _circles() == []


def test_no_module_over_500_lines():
    sizes = {m: len(_module_file(m).read_text().splitlines()) for m in _package_modules()}
    assert {m: n for m, n in sizes.items() if n > 500} == {}


def _bare_function_level_imports(module: str) -> list[str]:
    """``module:line`` of each import inside a function of ``rjem_ray.<module>`` that gives no reason: no comment
    on its line (a ``noqa`` directive is none) and no comment line right above it."""
    text = _module_file(module).read_text()
    lines = ["", *text.splitlines()]  # lines[n] is line n
    inner = {n.lineno for f in ast.walk(ast.parse(text)) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    said = {n for n in inner if re.sub(r"noqa(:\s*[A-Z]+\d+([,\s]+[A-Z]+\d+)*)?", "",
                                       lines[n].partition("#")[2]).strip(" #")}
    return [f"{module}:{n}" for n in sorted(inner - said) if not lines[n - 1].lstrip().startswith("#")]


def test_every_function_level_import_says_why_it_is_lazy(tmp_path, monkeypatch):
    """An import belongs in its module's header, which then shows what the module needs; one inside a function is
    there for a reason (an optional or heavy dependency, Ray or MLflow kept out of `rjem --help`, an order the module
    needs: docs/ARCHITECTURE.md), given in a comment on its line or on the line right above it."""
    assert [b for m in _package_modules() for b in _bare_function_level_imports(m)] == []
    # The check itself: bare, noqa-only, commented above, commented on the line.
    (tmp_path / "m.py").write_text("def f():\n    import json\n    import os  # noqa: F401\n"
                                   "    # lazy: why\n    import re\n    import sys  # lazy: why\n")
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    assert _bare_function_level_imports("m") == ["m:2", "m:3"]


def _module_paths_named_in(text: str, prefix: str = "") -> set[str]:
    """``rjem_ray`` module paths in backticks in ``text`` (``prefix`` is put before bare file names)."""
    names = set(re.findall(r"`(rjem_ray/[\w/]+\.py)`", text))
    if prefix:
        names |= {prefix + n for n in re.findall(r"`([\w]+\.py)`", text)}
    return names


FILE_MAP = "## Where things are"


def _split_file_map(doc: Path) -> tuple[str, str]:
    """``doc`` without its file-map section, and the file-map section (up to the next ``## `` heading)."""
    text = doc.read_text()
    start = text.index(FILE_MAP)
    end = text.find("\n## ", start + len(FILE_MAP))
    end = len(text) if end == -1 else end
    return text[:start] + text[end:], text[start:end]


def test_architecture_doc_layer_table_and_file_map_match_the_tree():
    tree = {str(p.relative_to(REPO)).replace(os.sep, "/") for p in PACKAGE.rglob("*.py")}
    layer_text, file_map_text = _split_file_map(REPO / "docs" / "ARCHITECTURE.md")
    layers = _module_paths_named_in(layer_text, prefix="rjem_ray/")
    file_map = _module_paths_named_in(file_map_text)
    assert sorted(tree - layers) == [], "modules missing from docs/ARCHITECTURE.md's layer table"
    assert sorted(layers - tree) == [], "docs/ARCHITECTURE.md names modules that do not exist"
    assert sorted(tree - file_map) == [], "modules missing from docs/ARCHITECTURE.md's file map (## Where things are)"
    assert sorted(file_map - tree) == [], "docs/ARCHITECTURE.md's file map names modules that do not exist"
    readme = (REPO / "README.md").read_text()
    for path in ("scripts", "tune_configs", "docs"):
        assert path in readme


def test_every_tests_subfolder_is_named_after_a_layer_folder():
    """tests/<layer>/ mirrors rjem_ray/<layer>/ (whole-project tests stay at tests/ root): the test tree cannot
    drift from the package tree."""
    layer_folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    test_folders = {p.name for p in (REPO / "tests").iterdir()
                    if p.is_dir() and p.name != "__pycache__" and not p.name.startswith(".")}
    wrong = sorted(test_folders - layer_folders)
    assert wrong == [], f"tests/ subfolders named after no layer folder of rjem_ray/ ({sorted(layer_folders)})"


def test_only_the_tracking_layer_imports_mlflow():
    users = sorted(m for m in _package_modules() if any(n.split(".")[0] == "mlflow" for n in _imports(m)[0]))
    assert users and {layer_of(m) for m in users} == {"tracking"}


_BLOCKER = """
import importlib, importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {forbidden!r}:
            raise ImportError(f"blocked by the boundary test: {{name}}")
        return None

sys.meta_path.insert(0, Blocked())
"""


def _run_blocked(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter (this checkout's package first) where importing Ray or MLflow raises."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = _BLOCKER.format(forbidden=FORBIDDEN) + body
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_ray_free_modules_import_with_ray_and_mlflow_blocked():
    proc = _run_blocked(
        f"for module in {_ray_free_modules()!r}:\n"
        "    importlib.import_module('rjem_ray.' + module)\n"
        f"print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))\n"
        "print('FROM', importlib.import_module('rjem_ray').__file__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout
    assert f"FROM {PACKAGE / '__init__.py'}" in proc.stdout  # this checkout, not another install
    # The blocker really blocks: Ray's own import fails under it.
    proc = _run_blocked("import ray.tune\n")
    assert proc.returncode != 0 and "blocked by the boundary test: ray" in proc.stderr


def test_the_old_load_model_path_of_logged_mlflow_models_still_resolves_and_nothing_else_uses_it():
    # MLflow models logged before the layers became folders import rjem_ray.checkpoint.load_model in their code.
    import rjem_ray.checkpoint
    import rjem_ray.method.restore

    assert rjem_ray.checkpoint.load_model is rjem_ray.method.restore.load_model
    assert [m for m in _package_modules() if "checkpoint" in _imports(m)[1]] == []
