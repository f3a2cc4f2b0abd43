"""Packaging: `rjem --version`, `python -m rjem_ray`, every imported package declared, the test timeout."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import rjem_ray

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rjem_ray"
# Needed at run time but imported by a dependency on our behalf, which does not declare it.
RUNTIME_ONLY = {"scipy": "torchvision.datasets.SVHN reads the .mat files with scipy.io"}


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: pip vendors the same parser
        from pip._vendor import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0)) for r in requirements}


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """``{top-level import name: {"file:line": imported at module level}}`` over every module of ``rjem_ray``."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("rjem_ray", "__future__"):
                    continue
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                found.setdefault(top, {})[where] = id(node) not in lazy
    return found


def test_every_imported_third_party_package_is_declared():
    project = _pyproject()["project"]
    main = _requirement_names(project["dependencies"])
    optional = {extra: _requirement_names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    extras = set().union(*(reqs for extra, reqs in optional.items() if extra != "test"))
    providers = packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "ray", "mlflow", "sklearn", "optuna"} <= set(imports)  # the parser sees lazy imports too
    problems = []
    for top, sites in sorted(imports.items()):
        dists = {_normalize(d) for d in providers.get(top, [])}
        if not dists:
            problems.append(f"{top} (imported at {', '.join(sites)}): no installed distribution provides it")
        elif not dists & (main | extras):
            problems.append(f"{top} (imported at {', '.join(sites)}): declare {sorted(dists)[0]} in pyproject.toml")
        elif not dists & main and any(sites.values()):
            problems.append(f"{top}: optional ({sorted(dists & extras)}) but imported at module level at "
                            + ", ".join(s for s, top_level in sites.items() if top_level))
    for name, why in RUNTIME_ONLY.items():
        if name not in main:
            problems.append(f"{name}: declare it in pyproject.toml ({why})")
    assert problems == []


def test_optuna_is_an_optional_extra_and_in_the_test_extra():
    project = _pyproject()["project"]
    assert "optuna" not in _requirement_names(project["dependencies"])
    assert "optuna" in _requirement_names(project["optional-dependencies"]["optuna"])
    assert "optuna" in _requirement_names(project["optional-dependencies"]["test"])  # the Optuna sweep test


def test_version_has_one_source():
    pyproject = _pyproject()
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rjem_ray.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-]\w+)*", rjem_ray.__version__)


def test_rjem_version_prints_the_package_version(capsys):
    from rjem_ray.cli import main

    assert _pyproject()["project"]["scripts"]["rjem"] == "rjem_ray.cli:main"  # what the `rjem` script runs
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"rjem {rjem_ray.__version__}"


def test_python_dash_m_rjem_ray_is_the_command_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = lambda *args: subprocess.run([sys.executable, "-m", "rjem_ray", *args], cwd=REPO, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    version = run("--version")
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip() == f"rjem {rjem_ray.__version__}"
    bare = run()
    assert bare.returncode == 2 and "usage: rjem" in bare.stderr and "train" in bare.stderr
    helped = run("eval", "--help")
    assert helped.returncode == 0 and "--metrics" in helped.stdout


def test_pytest_timeout_is_configured(pytestconfig):
    # A hung Ray test must fail, not hang CI: pytest-timeout is loaded and pyproject sets its limit.
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    ini = _pyproject()["tool"]["pytest"]["ini_options"]
    assert float(pytestconfig.getini("timeout")) == float(ini["timeout"]) > 0


def test_a_hung_test_fails_instead_of_hanging(tmp_path):
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(120)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=2",
                           "test_hang.py"], cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1 and "Timeout" in proc.stdout, proc.stdout[-2000:]
