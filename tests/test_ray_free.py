"""The Ray-free core (learner.Learner, attacks, samplers, generation, metrics) imports and runs where Ray
and MLflow are not installed, as on the GPU check machine (scripts/gpu_check.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKER = '''
import sys

BLOCKED = ("ray", "mlflow")


class _Blocked:
    """Makes `import ray` / `import mlflow` fail as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''

SCRIPT = '''
import sys
import torch

torch.set_num_threads(1)
for name in ("ray", "mlflow"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the blocker let {name} import")

import rjem_ray.method.learner, rjem_ray.method.loop, rjem_ray.method.attacks, rjem_ray.method.samplers, rjem_ray.evaluation.generate, rjem_ray.evaluation.metrics
from rjem_ray.config import load_config
from rjem_ray.core.data import to_model_space
from rjem_ray.evaluation.generate import generate
from rjem_ray.method.gmm import fit_class_gmm
from rjem_ray.evaluation.metrics import accuracy
from rjem_ray.method.learner import Learner

cfg = load_config("tune_configs/smoke.yaml", ["buffer.size=32", "train.batch_size=8"])
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (100, 1, 28, 28), generator=g, dtype=torch.uint8)
y = torch.arange(100) % 10
gmm = fit_class_gmm(to_model_space(x), y, 10)
learner = Learner(cfg, x, y, gmm)
m = learner.step()
assert learner.step_count == 1 and m["loss"] == m["loss"], m
for mode in ("energy", "pgd", "combined"):
    imgs, _ = generate(learner.model, gmm, cfg.generate, mode=mode, n=4)
    assert imgs.shape == (4, 1, 28, 28)
accuracy(learner.model.eval(), to_model_space(x[:16]), y[:16])
leaked = sorted(n for n in sys.modules if n.split(".")[0] in ("ray", "mlflow"))
assert not leaked, leaked
print("ray-free ok", round(m["loss"], 4))
'''


def test_core_imports_and_steps_without_ray_and_mlflow(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ray-free ok" in proc.stdout


def test_the_blocker_really_blocks(tmp_path):
    # Without this, a broken blocker would let the test above pass in an environment that has Ray.
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", "import ray"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "blocked for this test" in proc.stderr
