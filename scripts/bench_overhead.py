"""Ray Train's per-step overhead: the same training loop bare and inside a 1-worker ``TorchTrainer``.

Every measurement builds the same :class:`rjem_ray.method.learner.Learner` (same config, data, seed, one torch
thread per ``trainer.cpus_per_worker``), takes ``--warmup`` untimed steps, then times each iteration of
``run_loop`` (one optimiser step plus its share of the real reporting schedule: metrics every
``train.log_every`` steps, a checkpoint every ``train.checkpoint_every`` steps and at the end). Rows:

* bare PyTorch: in this process, no Ray; ``report`` writes the checkpoint files a worker would write to a
  local temp dir. Measured before and after every Ray run, so drift in the machine's load shows.
* Ray Train worker, ray.train.report: inside a 1-worker ``TorchTrainer``, with the worker's ``report``
  (a barrier, the result queue the controller polls, the checkpoint persisted to the run's storage).
* Ray Train worker, local ckpt: the same worker process, alternating blocks of ``--block`` steps with the
  row above, with the bare loop's ``report`` — separates the cost of reporting from that of running
  inside a Ray actor.

Start-up (Ray, the worker group, data, model) is outside every timed window, and every window starts and
ends on the reporting schedule's period. The mean time per step (throughput) is compared; quartiles show
how bursty a shared machine was. The target is an overhead <= 5 %.

``ray.train.report`` puts each report in a one-slot queue that Ray Train's controller empties once per
poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default 2 s, printed in the header): a worker that
reports more often than that waits in ``report``.

    python scripts/bench_overhead.py --steps 24 --repeats 2 [--set train.batch_size=32 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]


def build_learner(cfg_dict: dict):
    """The worker's learner for rank 0 of 1: its data, its GMM, its thread count."""
    import torch

    from rjem_ray.config import Config
    from rjem_ray.core.data import load_split
    from rjem_ray.method.prior import load_train_gmm
    from rjem_ray.method.learner import Learner

    cfg = Config.from_dict(cfg_dict)
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    gmm = load_train_gmm(cfg, images, labels) if cfg.uses_energy else None
    return Learner(cfg, images, labels, gmm)


def timed_loop(learner, report, steps: int) -> list[float]:
    """Seconds of each of the next ``steps`` iterations of ``run_loop`` (step + its reporting).

    An iteration runs from the start of one optimiser step to the start of the next (the last one to the
    loop's return), so it includes the metric averaging, ``report`` and checkpoint writing of its step.
    """
    from rjem_ray.method.loop import run_loop

    starts: list[float] = []
    step = learner.step

    def clocked_step():
        starts.append(time.perf_counter())
        return step()

    learner.step = clocked_step
    learner.cfg = learner.cfg.replace({"train.steps": learner.step_count + steps})
    try:
        run_loop(learner, report, log=lambda msg: None)
    finally:
        del learner.step
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]


def local_report(directory: str):
    """The bare loop's ``report``: the checkpoint files the worker would write, to a local directory."""
    from rjem_ray.method.checkpoint import save_checkpoint

    def report(metrics: dict, state: dict | None) -> None:
        if state is not None:
            save_checkpoint(Path(directory) / f"checkpoint-{metrics['step']:08d}", state)

    return report


def bare(cfg_dict: dict, warmup: int, steps: int) -> list[float]:
    learner = build_learner(cfg_dict)
    for _ in range(warmup):
        learner.step()
    with tempfile.TemporaryDirectory(prefix="rjem-bench-") as tmp:
        return timed_loop(learner, local_report(tmp), steps)


def ray_worker(config: dict) -> None:
    """Runs in the Ray Train worker: the same learner and loop, alternating blocks of ``config["block"]``
    steps with the worker's own ``report`` (``ray.train.report``) and with the bare loop's local one, so
    both see the same load on the machine."""
    import ray.train

    from rjem_ray.method.checkpoint import save_checkpoint
    from rjem_ray.method.loop import is_eval_step

    learner = build_learner(config["cfg"])
    for _ in range(config["warmup"]):
        learner.step()

    def ray_report(metrics: dict, state: dict | None) -> None:  # as in rjem_ray.distributed.train_worker
        if state is None:
            if is_eval_step(int(metrics["step"]), learner.cfg):
                ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="rjem-ckpt-") as tmp:
            save_checkpoint(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{metrics['step']:08d}")

    times: dict[str, list[float]] = {"ray-train": [], "in-worker": []}
    with tempfile.TemporaryDirectory(prefix="rjem-bench-") as tmp:
        done = 0
        while done < config["steps"]:
            n = min(config["block"], config["steps"] - done)
            times["ray-train"] += timed_loop(learner, ray_report, n)
            times["in-worker"] += timed_loop(learner, local_report(tmp), n)
            done += n
    Path(config["result"]).write_text(json.dumps(times))


def in_ray_train(cfg_dict: dict, warmup: int, steps: int, block: int, storage: Path) -> dict[str, list[float]]:
    import ray.train
    from ray.train.torch import TorchTrainer

    result = storage / f"result-{time.time_ns()}.json"
    trainer = TorchTrainer(
        train_loop_per_worker=ray_worker,
        train_loop_config={"cfg": cfg_dict, "warmup": warmup, "steps": steps, "block": block, "result": str(result)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=False, resources_per_worker={"CPU": cfg_dict["trainer"]["cpus_per_worker"]},
        ),
        run_config=ray.train.RunConfig(name=result.stem, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "tune_configs" / "smoke.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=36, help="timed steps per measurement (rounded up to --block)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps before each measurement (rounded up to the reporting period)")
    p.add_argument("--repeats", type=int, default=2, help="TorchTrainer runs (each followed by a bare run)")
    p.add_argument("--block", type=int, default=6, help="steps per alternating block inside the Ray worker")
    args = p.parse_args(argv)

    import torch

    import rjem_ray  # noqa: F401  (torchvision shim)
    from rjem_ray.config import load_config
    from rjem_ray.distributed.ray_setup import ensure_ray

    cfg = load_config(args.config, args.set + ["trainer.num_workers=1", "tracking.enabled=false"])
    # Align every timed window with the reporting schedule, so that the bare run and each block inside the
    # worker see the same pattern of metric reports and checkpoints (run_loop checkpoints at its last step).
    period = math.lcm(cfg.train.log_every, cfg.train.checkpoint_every)
    args.warmup = -(-args.warmup // period) * period
    args.block = max(1, -(-args.block // period)) * period
    args.steps = max(1, -(-args.steps // args.block)) * args.block
    cfg_dict = cfg.to_dict()
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    build_learner(cfg_dict)  # fit/cache the GMM once, outside every timing

    times: dict[str, list[float]] = {"bare": [], "in-worker": [], "ray-train": []}
    times["bare"] += bare(cfg_dict, args.warmup, args.steps)
    ensure_ray(min_cpus=cfg.trainer.cpus_per_worker)  # sets rjem's default report poll unless already set
    print(f"config {args.config} {' '.join(args.set)}: {cfg.train.mode}, batch {cfg.train.batch_size}, "
          f"log every {cfg.train.log_every}, checkpoint every {cfg.train.checkpoint_every}; "
          f"{args.steps} timed steps per run after {args.warmup} warm-up, "
          f"{max(1, int(cfg.trainer.cpus_per_worker))} torch thread(s); RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="
          f"{os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', 'unset (Ray default 2.0 s)')}", flush=True)
    import ray

    try:
        with tempfile.TemporaryDirectory(prefix="rjem-bench-ray-") as storage:
            for _ in range(args.repeats):
                for k, v in in_ray_train(cfg_dict, args.warmup, args.steps, args.block, Path(storage)).items():
                    times[k] += v
                times["bare"] += bare(cfg_dict, args.warmup, args.steps)
    finally:
        ray.shutdown()

    def ms(xs: list[float], q: int | None = None) -> float:
        return 1000 * (statistics.fmean(xs) if q is None else statistics.quantiles(xs, n=4)[q])

    base = ms(times["bare"])
    print(f"\n{'loop (ms per step)':<44} {'steps':>5} {'mean':>7} {'q1':>7} {'median':>7} {'q3':>7}  mean vs bare")
    labels = {
        "bare": "bare PyTorch (driver process, local ckpt)",
        "in-worker": "Ray Train worker, local ckpt (no report)",
        "ray-train": "Ray Train worker, ray.train.report",
    }
    for key, label in labels.items():
        xs = times[key]
        print(f"{label:<44} {len(xs):5d} {ms(xs):7.1f} {ms(xs, 0):7.1f} {ms(xs, 1):7.1f} {ms(xs, 2):7.1f}  "
              f"{100 * (ms(xs) - base) / base:+6.1f} %")
    overhead = 100 * (ms(times["ray-train"]) - base) / base
    report_only = 100 * (ms(times["ray-train"]) - ms(times["in-worker"])) / ms(times["in-worker"])
    print(f"\nRay Train step overhead (mean time per step, ray.train.report vs bare): {overhead:+.1f} %; "
          f"reporting alone (vs the same worker, interleaved): {report_only:+.1f} %. "
          f"Target <= 5 %: {'met' if max(overhead, report_only) <= 5 else 'NOT met'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
