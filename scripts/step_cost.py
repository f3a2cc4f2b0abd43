"""Seconds per optimiser step of the Ray-free training step (``learner.Learner``) for a few config variants.

A quick cost comparison, not a robustness measurement: e.g. ``train.robust_term`` pgd vs gradreg, or
``model.norm`` batch vs farkas, on the demo config, with the training accuracy reached in those steps.

    python scripts/step_cost.py --config tune_configs/demo.yaml --steps 20 \\
        --variant pgd= --variant gradreg=train.robust_term=gradreg
"""

from __future__ import annotations

import argparse
import time

import torch

import rjem_ray  # noqa: F401
from rjem_ray.config import load_config
from rjem_ray.core.data import load_split, to_model_space
from rjem_ray.method.gmm import fit_class_gmm
from rjem_ray.method.learner import Learner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tune_configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=key=value[,key=value...] (NAME= for the config as it is)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_split("mnist5k", "train")
    gmm = fit_class_gmm(to_model_space(x), y, 10)
    for v in args.variant:
        name, _, sets = v.partition("=")
        overrides = [s for s in sets.split(",") if s] + [f"train.steps={args.steps}"]
        learner = Learner(load_config(args.config, overrides), x, y, gmm)
        learner.step()  # first step apart: allocations
        t0, c0 = time.time(), time.process_time()
        accs = [learner.step()["acc"] for _ in range(args.steps - 1)]
        wall, cpu = time.time() - t0, time.process_time() - c0
        print(f"{name}: {wall / (args.steps - 1):.3f} s/step wall, {cpu / (args.steps - 1):.3f} s/step CPU; "
              f"train acc over the last 5 steps {sum(accs[-5:]) / 5:.3f} ({' '.join(overrides)})", flush=True)


if __name__ == "__main__":
    main()
