"""Ray Train's per-step overhead: the same training loop bare and inside a 1-worker ``TorchTrainer``.

Both sides build the same :class:`rjem_ray.training.Learner` (same config, data, seed, one torch thread
per ``trainer.cpus_per_worker``), take ``--warmup`` untimed steps, then time ``run_loop`` over ``--steps``
steps with the real reporting schedule (metrics every ``train.log_every`` steps, a checkpoint every
``train.checkpoint_every`` steps and at the end):

* bare: ``report`` writes the checkpoint files the worker would write, to a local temp dir;
* Ray:  ``report`` is the worker's (``ray.train.report``: a barrier, the result queue polled by the
  controller, the checkpoint persisted to the run's storage).

Start-up (Ray, worker group, data, model) is outside the timed window. Prints one row per measurement and
the overhead of the median Ray time over the median bare time; the target is <= 5 %. Bare runs are taken
before and after the Ray runs so drift in the machine's load shows up in the bare column.

    python scripts/bench_overhead.py --steps 30 --repeats 2 [--set train.batch_size=32 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]


def build_learner(cfg_dict: dict):
    """The worker's learner for rank 0 of 1: its data, its GMM, its thread count."""
    import torch

    from rjem_ray.config import Config
    from rjem_ray.data import load_split
    from rjem_ray.train_worker import load_train_gmm
    from rjem_ray.training import Learner

    cfg = Config.from_dict(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    gmm = load_train_gmm(cfg, images, labels) if cfg.uses_energy else None
    return Learner(cfg, images, labels, gmm)


def timed_loop(learner, report, warmup: int, steps: int) -> float:
    """Seconds per step of ``run_loop`` over ``steps`` steps after ``warmup`` untimed ones."""
    from rjem_ray.training import run_loop

    for _ in range(warmup):
        learner.step()
    learner.cfg.train.steps = learner.step_count + steps
    t0 = time.perf_counter()
    run_loop(learner, report, log=lambda msg: None)
    return (time.perf_counter() - t0) / steps


def bare(cfg_dict: dict, warmup: int, steps: int) -> float:
    from rjem_ray.checkpoint import save_checkpoint

    learner = build_learner(cfg_dict)
    with tempfile.TemporaryDirectory(prefix="rjem-bench-") as tmp:
        def report(metrics: dict, state: dict | None) -> None:
            if state is not None:
                save_checkpoint(Path(tmp) / f"checkpoint-{metrics['step']:08d}", state)

        return timed_loop(learner, report, warmup, steps)


def ray_worker(config: dict) -> None:
    """Runs in the Ray Train worker: the same learner and loop, the worker's own ``report``."""
    import ray.train

    from rjem_ray.checkpoint import save_checkpoint

    learner = build_learner(config["cfg"])

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="rjem-ckpt-") as tmp:
            save_checkpoint(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{metrics['step']:08d}")

    per_step = timed_loop(learner, report, config["warmup"], config["steps"])
    Path(config["result"]).write_text(json.dumps({"per_step_s": per_step, "pid": os.getpid()}))


def in_ray_train(cfg_dict: dict, warmup: int, steps: int, storage: Path) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    result = storage / f"result-{time.time_ns()}.json"
    trainer = TorchTrainer(
        train_loop_per_worker=ray_worker,
        train_loop_config={"cfg": cfg_dict, "warmup": warmup, "steps": steps, "result": str(result)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=False, resources_per_worker={"CPU": cfg_dict["trainer"]["cpus_per_worker"]},
        ),
        run_config=ray.train.RunConfig(name=result.stem, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    return json.loads(result.read_text())["per_step_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "tune_configs" / "smoke.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--repeats", type=int, default=2, help="Ray measurements (bare: one more)")
    args = p.parse_args(argv)

    import torch

    import rjem_ray  # noqa: F401  (torchvision shim)
    from rjem_ray.config import load_config
    from rjem_ray.ray_setup import ensure_ray

    cfg = load_config(args.config, args.set + ["trainer.num_workers=1", "tracking.enabled=false"])
    cfg.cache_dir = str(Path(cfg.cache_dir).resolve())
    cfg_dict = cfg.to_dict()
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    build_learner(cfg_dict)  # fit/cache the GMM once, outside every timing

    print(f"config {args.config} {' '.join(args.set)}: {cfg.train.mode}, batch {cfg.train.batch_size}, "
          f"log every {cfg.train.log_every}, checkpoint every {cfg.train.checkpoint_every}; "
          f"{args.steps} timed steps after {args.warmup} warm-up, "
          f"{max(1, int(cfg.trainer.cpus_per_worker))} torch thread(s)", flush=True)
    rows: list[tuple[str, float]] = []
    rows.append(("bare", bare(cfg_dict, args.warmup, args.steps)))
    ensure_ray(min_cpus=cfg.trainer.cpus_per_worker)
    import ray

    try:
        with tempfile.TemporaryDirectory(prefix="rjem-bench-ray-") as storage:
            for _ in range(args.repeats):
                rows.append(("ray-train", in_ray_train(cfg_dict, args.warmup, args.steps, Path(storage))))
    finally:
        ray.shutdown()
    for _ in range(max(1, args.repeats - 1)):
        rows.append(("bare", bare(cfg_dict, args.warmup, args.steps)))

    print(f"\n{'run':<10} {'ms/step':>9}")
    for name, s in rows:
        print(f"{name:<10} {1000 * s:9.1f}")
    b = statistics.median(s for n, s in rows if n == "bare")
    r = statistics.median(s for n, s in rows if n == "ray-train")
    overhead = 100 * (r - b) / b
    print(f"\n{'median':<10} {'bare':>9} {'ray-train':>10} {'overhead':>9}")
    print(f"{'ms/step':<10} {1000 * b:9.1f} {1000 * r:10.1f} {overhead:8.1f}%   (target <= 5 %: "
          f"{'met' if overhead <= 5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
