"""The Ray Train per-worker function: ordinary PyTorch with ``ray.train`` calls at its edges.

Each worker loads the training split, keeps its own shard (``data.shard_indices``), builds a
:class:`~rjem_ray.training.Learner` whose :class:`~rjem_ray.training.JointForward` is wrapped by
``ray.train.torch.prepare_model`` (DDP: nccl on GPU, gloo on CPU) and steps it. Every
``train.log_every`` steps the ranks average their metrics and report; every ``train.checkpoint_every``
steps (and at the end) they report a checkpoint: rank 0 writes ``state.pt`` (model, optimiser, step,
its RNG/stream/buffer), every other rank ``rank-K.pt`` (its RNG/stream/buffer); Ray merges the files
into one checkpoint directory. A divergence rolls back to the last good state in memory with a lower
learning rate, at most ``train.max_rollbacks`` times; one more ends every worker normally, and rank 0
records the message in the driver's :class:`~rjem_ray.train_driver.RunOutcome` actor (a divergence is a
result, not a crash: no ``FailureConfig`` retry).

With a shared replay buffer (``config["buffer_shards"]``: the shard actors the driver created, see
``buffer_actor.py``) every rank leases from the same shards; rank 0's ``state.pt`` holds the snapshot of
all of them and the rank files hold no buffer. Rank 0 restores the shards from a checkpoint (or, starting
without one, revokes leases left by a previous worker group) before any rank leases: the ranks wait for
it at a barrier.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from . import storage
from .checkpoint import atomic_torch_save, load_state, save_checkpoint
from .config import Config
from .data import load_split, shard_indices
from .prior import load_train_gmm
from .training import DivergenceError, Learner, Reducer, is_eval_step, run_loop

RANK_FILE = "rank-{rank}.pt"
RANK_KEYS = ("rng", "stream", "buffer")


class _BufferFencedReducer(Reducer):
    """Waits for this rank's shared-buffer write-backs before every cross-rank reduction.

    Rank 0 snapshots the shared buffer right after such a reduction (the checkpoint's metrics average),
    so every rank's write-backs of that step are in the snapshot.
    """

    def __init__(self, world_size: int, buffer, device: torch.device | None = None):
        super().__init__(world_size, device)
        self.buffer = buffer

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        self.buffer.flush()
        return super().mean(values)

    def max(self, value: float) -> float:
        self.buffer.flush()
        return super().max(value)


def _uses_shared_buffer(learner: Learner) -> bool:
    from .buffer_actor import SharedReplayBuffer

    return isinstance(learner.buffer, SharedReplayBuffer)


def _stdout_line(msg: str) -> None:
    # Not print(): Ray Train V2 patches print() into a logger and tees it, so each line showed twice.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _restore(learner: Learner, directory: str | Path, rank: int, log=lambda msg: None) -> bool:
    """Load a checkpoint into ``learner``; returns whether its replay buffer was restored too."""
    from .buffer_actor import is_shared_state

    state = load_state(directory)
    rank_file = Path(directory) / RANK_FILE.format(rank=rank)
    if rank != 0:
        if rank_file.is_file():
            state.update(torch.load(rank_file, map_location="cpu", weights_only=True))
        else:  # the checkpoint came from fewer workers: keep this rank's fresh stream and buffer
            state = {k: v for k, v in state.items() if k not in RANK_KEYS}
    if "buffer" in state and is_shared_state(state["buffer"]) != _uses_shared_buffer(learner):
        # Per-worker buffers and one shared buffer cannot stand in for each other: keep the fresh one.
        log("[rjem] the checkpoint's replay buffer is " + ("shared" if is_shared_state(state["buffer"]) else
            "per-worker") + " and this run's is not; starting with a fresh buffer")
        del state["buffer"]
    learner.load_state_dict(state, load_buffer="buffer" in state)
    return "buffer" in state


def _quiet_report_logs() -> None:
    """Ray 2.60 logs every report of every rank at INFO ("Reporting training result N: TrainingReport(...)")
    under a logger named after its file path rather than ``ray.train.*``, so RunConfig's LoggingConfig
    misses it; give that logger the same level (INFO again with RJEM_DEBUG)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.INFO if os.environ.get("RJEM_DEBUG") else logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_logs()

    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = max(1, int(cfg.trainer.cpus_per_worker))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    gmm = load_train_gmm(cfg, images, labels) if cfg.uses_energy else None
    idx = torch.from_numpy(shard_indices(len(labels), rank, world))
    buffer = None
    if cfg.uses_energy and config.get("buffer_shards"):
        from .buffer_actor import SharedReplayBuffer

        buffer = SharedReplayBuffer(config["buffer_shards"], rank=rank, owner=rank == 0)
    learner = Learner(
        cfg, images[idx], labels[idx], gmm, rank=rank, world_size=world, device=device, buffer=buffer,
        wrap=ray.train.torch.prepare_model if world > 1 else None,
    )
    if buffer is not None:
        learner.reducer = _BufferFencedReducer(world, buffer, learner.device)
    log = _stdout_line if rank == 0 else (lambda msg: None)

    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    buffer_restored = False
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            buffer_restored = _restore(learner, d, rank, log)
        resumed_from = "ray-checkpoint"
    elif config.get("resume_from"):  # a local checkpoint directory or a URI (downloaded on this worker)
        with storage.local_copy(config["resume_from"]) as d:
            buffer_restored = _restore(learner, d, rank, log)
        resumed_from = config["resume_from"]
    if buffer is not None:
        if rank == 0 and not buffer_restored:
            buffer.reset_leases()  # leases of a worker group that died before its first checkpoint
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no rank leases before rank 0 has restored or reset the shards

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        from .tracking import Tracker

        tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"])
        if resumed_from:
            tracker.set_tags({"resumed_at_step": learner.step_count})

    log_metrics = tracker.log_metrics if tracker else None
    if resumed_from:
        kept = "" if not cfg.uses_energy else (" with its replay buffer" if buffer_restored else " with a fresh replay buffer")
        log(f"[rjem] resumed from {resumed_from} at step {learner.step_count}{kept}")

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            if is_eval_step(int(metrics["step"]), cfg):
                ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="rjem-ckpt-") as tmp:
            if rank == 0:
                save_checkpoint(tmp, state)
            else:  # a shared buffer is in rank 0's state.pt only
                keep = [k for k in RANK_KEYS if k in state and not (k == "buffer" and buffer is not None)]
                atomic_torch_save({k: state[k] for k in keep}, os.path.join(tmp, RANK_FILE.format(rank=rank)))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{metrics['step']:08d}")

    def evaluate(lrn: Learner) -> dict:
        # Rank 0 evaluates; the others wait at the next report, which is a barrier.
        if rank != 0:
            return {}
        from .evaluate import evaluate_model

        res = evaluate_model(lrn.model, cfg, cfg.train.eval_metrics, gmm=gmm)
        lrn.model.train()
        return {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}

    try:
        run_loop(learner, report, log=log, log_metrics=log_metrics, evaluate=evaluate)
    except DivergenceError as exc:
        # Final: every rank took the same decision (the ranks' largest loss). Raising would make Ray
        # Train's FailureConfig retry it from the last checkpoint with a fresh rollback budget, so the
        # workers end normally and rank 0 tells the driver, which fails the run once.
        outcome = config.get("outcome")
        if outcome is None:
            raise
        if rank == 0:
            import ray

            ray.get(outcome.set_diverged.remote(str(exc)))
    if buffer is not None:
        buffer.close()  # give back the prefetched lease
