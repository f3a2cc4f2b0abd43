"""The layer rule of docs/ARCHITECTURE.md: algorithm modules import neither Ray nor MLflow.

Checked twice: statically (every ``import`` statement, function-level ones included, of each algorithm
module and of every ``rjem_ray`` module it imports, transitively) and dynamically (a fresh interpreter in
which importing ``ray`` or ``mlflow`` raises imports every algorithm module, and neither appears in
``sys.modules`` afterwards). Also: MLflow is imported by the tracking module only.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rjem_ray"
FORBIDDEN = ("ray", "mlflow")
# Layer 1 of docs/ARCHITECTURE.md: pure functions of tensors and a model, the Ray-free training step and evaluation,
# the prior and checkpoint files.
ALGORITHMS = ("attacks", "samplers", "energy", "training", "metrics", "gmm", "prior", "generate", "masking",
              "autoattack", "fidelity", "evaluate", "replay_buffer", "models", "data", "checkpoint", "speed",
              "devices", "minnorm", "certify", "gradreg", "ood")
TRACKING = ("tracking",)  # the one module that talks to MLflow
BASE = ("_torchvision_compat", "config", "ddp", "images", "scaling", "storage")
PACKAGE_API = ("__init__",)  # layer 1 too; runs first whenever a submodule is imported


def _module_file(module: str) -> Path:
    parts = module.split(".")
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(absolute modules imported anywhere in ``rjem_ray.<module>``, ``rjem_ray`` modules among them)."""
    path = _module_file(module)
    tree = ast.parse(path.read_text(), str(path))
    package = list(path.parent.relative_to(PACKAGE).parts)  # what `from . import` is relative to
    absolute, internal = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import y: resolve against the module's package
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" if target else a.name for a in node.names]
                names = [f"rjem_ray.{n}" if n else "rjem_ray" for n in names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            absolute.add(name)
            if name == "rjem_ray" or name.startswith("rjem_ray."):
                inner = name[len("rjem_ray."):] if name != "rjem_ray" else "__init__"
                if inner != "__init__" and not _module_file(inner).is_file():  # from rjem_ray import function
                    inner = inner.rsplit(".", 1)[0] if "." in inner else "__init__"
                internal.add(inner)
    return absolute, internal


def _closure(module: str) -> set[str]:
    """``module``, the package's ``__init__`` (imported first by every submodule) and what they import, transitively."""
    seen, todo = set(), [module, "__init__"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(m)[1])
    return seen


def _forbidden_in(module: str) -> list[str]:
    return sorted(n for n in _imports(module)[0] if n.split(".")[0] in FORBIDDEN)


def test_algorithm_modules_exist():
    assert [m for m in ALGORITHMS if not _module_file(m).is_file()] == []


def test_import_parser_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    # The checker itself: a planted lazy `import ray` inside a function, reached through a relative import.
    fake = tmp_path / "rjem_ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "alg.py").write_text("from .helper import f\n")
    (fake / "helper.py").write_text("def f():\n    from ray import tune\n    return tune\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert _closure("alg") == {"alg", "helper", "__init__"}
    assert _forbidden_in("helper") == ["ray"]


@pytest.mark.parametrize("module", ALGORITHMS)
def test_algorithm_module_imports_neither_ray_nor_mlflow_statically(module):
    offenders = {m: _forbidden_in(m) for m in sorted(_closure(module)) if _forbidden_in(m)}
    assert offenders == {}, (f"rjem_ray.{module} reaches Ray/MLflow through {offenders}; algorithm modules "
                             "must stay importable and runnable without them (docs/ARCHITECTURE.md)")


@pytest.mark.parametrize("module", ALGORITHMS)
def test_algorithm_module_reaches_only_base_and_algorithm_modules(module):
    assert sorted(_closure(module) - set(BASE) - set(ALGORITHMS) - set(PACKAGE_API)) == []


def _package_modules() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE).with_suffix("")).replace(os.sep, ".") for p in PACKAGE.rglob("*.py"))


def _module_paths_named_in(text: str, prefix: str = "") -> set[str]:
    """``rjem_ray`` module paths in backticks in ``text`` (``prefix`` is put before bare file names)."""
    import re

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
    tree = {f"rjem_ray/{m.replace('.', '/')}.py" for m in _package_modules()}
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


def test_only_the_tracking_module_imports_mlflow():
    users = sorted(m for m in _package_modules() if any(n.split(".")[0] == "mlflow" for n in _imports(m)[0]))
    assert users == list(TRACKING)


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


def test_algorithm_modules_import_with_ray_and_mlflow_blocked():
    proc = _run_blocked(
        f"for module in {ALGORITHMS!r}:\n"
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
