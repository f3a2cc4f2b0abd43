"""The Ray Train per-worker function: ordinary PyTorch with ``ray.train`` calls at its edges.

Each worker loads the whole training split and reads its part of the run's one image sequence
(``data.ImageStream``), builds a :class:`~rjem_ray.method.learner.Learner` for the worker count it was started with
(``scaling.plan``: per-worker batch, scaled learning rate, buffer size) whose loss module is DDP-wrapped
(``ddp.wrap_ddp``: nccl on GPU, gloo on CPU, optional bf16 gradient compression) and steps it. Every
``train.log_every`` reference steps rank 0 logs the ranks' averaged metrics; every ``train.checkpoint_every``
(and at the end) every rank reports a checkpoint: rank 0 writes ``state.pt`` (model, optimiser, step,
images seen, worker count, its RNG), every other rank ``rank-K.pt`` (its RNG), and every rank's replay buffer
is ``buffer-K.pt`` — written by the worker's shard actor itself when the buffer lives in one
(``buffer_actor.py``). Ray merges the files into one checkpoint directory.

**Resize.** A checkpoint restores onto any worker count: the step and the data stream follow from the
images seen, the learning rate and batch from the new ``scaling.plan``, and the saved buffer parts are laid
out for the new workers by ``replay_buffer.regroup`` (every chain kept). A rank without its own RNG file
(there were fewer workers) is seeded from (seed, rank, images seen). Rank 0's first line says what changed.
This is also what an elastic run (``trainer.min_workers``) does when Ray Train restarts it on fewer or
more workers.

A divergence rolls back to the last good state in memory with a lower learning rate, at most
``train.max_rollbacks`` times; one more ends every worker normally, and rank 0 records the message in the
driver's :class:`~rjem_ray.distributed.train_driver.RunOutcome` actor (a divergence is a result, not a crash: no
``FailureConfig`` retry).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import zlib
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from ..core import storage
from ..core.files import atomic_torch_save
from ..method.checkpoint import BUFFER_FILE, buffer_parts, load_state, save_checkpoint
from ..config import Config
from ..core.data import load_split
from ..evaluation.evaluate import evaluate_model
from ..method.ddp import wrap_ddp
from ..method.gmm import as_init_fn
from ..method.prior import load_train_gmm
from ..method.replay_buffer import regroup
from ..method.scaling import ScalePlan, plan
from ..method.learner import DivergenceError, Learner
from ..method.loop import is_eval_step, run_loop
from ..tracking.tracker import Tracker
from .buffer_actor import SharedReplayBuffer, create_worker_shard

RANK_FILE = "rank-{rank}.pt"


def _stdout_line(msg: str) -> None:
    # Not print(): Ray Train V2 patches print() into a logger and tees it, so each line showed twice.
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def read_checkpoint(directory: str | Path, cfg: Config, rank: int, world: int, init_fn) -> tuple[dict, dict | None]:
    """``(state, buffer part)`` of worker ``rank`` of ``world`` from a checkpoint directory.

    ``state`` is rank 0's ``state.pt`` with this rank's RNG when the checkpoint has it for the same worker
    count (without it: no ``"rng"``); the buffer part is this worker's ``LocalReplayBuffer`` state, regrouped
    when the worker count or buffer size changed (``replay_buffer.regroup``), ``None`` without a buffer.
    """
    directory = Path(directory)
    state = load_state(directory)
    state.pop("buffer", None)  # checkpoints before buffer-K.pt kept rank 0's part here (buffer_parts reads it)
    same_world = int(state.get("world_size", -1)) == world
    if rank != 0:
        state.pop("rng", None)
        rank_file = directory / RANK_FILE.format(rank=rank)
        if same_world and rank_file.is_file():
            state["rng"] = torch.load(rank_file, map_location="cpu", weights_only=True)["rng"]
    elif not same_world:
        state.pop("rng", None)
    if not cfg.uses_energy:
        return state, None
    per_worker = plan(cfg, world).buffer_per_worker
    own = directory / BUFFER_FILE.format(rank=rank)
    if same_world and own.is_file() and len(list(directory.glob("buffer-*.pt"))) == world:
        part = torch.load(own, map_location="cpu", weights_only=True)
        if len(part["buffer"]) >= per_worker:
            return state, part
    parts = buffer_parts(directory)
    return state, (regroup(parts, per_worker, world, rank, init_fn, cfg.train.seed) if parts else None)


def resize_line(state: dict, now: ScalePlan) -> str:
    """What changed between the checkpoint's run and this one, "" if nothing did."""
    was_world, was_batch = state.get("world_size"), state.get("global_batch")
    if was_world is None or (int(was_world) == now.num_workers and int(was_batch) == now.global_batch
                             and state.get("scaling") == now.scaling):
        return ""
    return (f"; resized: {was_world} -> {now.num_workers} worker(s), global batch {was_batch} -> {now.global_batch} "
            f"({state.get('scaling', 'strong')} -> {now.scaling} scaling), lr now {now.lr:.4g}; the data stream, "
            "buffer layout and schedule continue from the images seen")


@contextlib.contextmanager
def _checkpoint_dir(config: dict):
    """``(directory, label)`` of what this worker restores: Ray's checkpoint, ``--resume``, or ``(None, None)``."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            yield d, "ray-checkpoint"
    elif config.get("resume_from"):  # a local checkpoint directory or a URI (downloaded on this worker)
        with storage.local_copy(config["resume_from"]) as d:
            yield d, config["resume_from"]
    else:
        yield None, None


def _quiet_report_logs() -> None:
    """Ray 2.60 logs every report of every rank at INFO ("Reporting training result N: TrainingReport(...)")
    under a logger named after its file path rather than ``ray.train.*``, so RunConfig's LoggingConfig
    misses it; give that logger the same level (INFO again with RJEM_DEBUG)."""
    try:
        from ray.train.v2._internal.execution import context  # lazy: Ray's private module, absent from other versions
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.INFO if os.environ.get("RJEM_DEBUG") else logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    _quiet_report_logs()

    cfg = Config.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = max(1, int(cfg.trainer.cpus_per_worker))
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    log = _stdout_line if rank == 0 else (lambda msg: None)

    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    gmm = load_train_gmm(cfg, images, labels) if cfg.uses_energy else None
    with _checkpoint_dir(config) as (directory, resumed_from):
        state, part = (read_checkpoint(directory, cfg, rank, world, as_init_fn(gmm, cfg.buffer.noise_init) if gmm else None)
                       if directory is not None else (None, None))
    buffer = None
    if cfg.uses_energy and cfg.buffer.is_shared(world):
        p = plan(cfg, world)
        shard = create_worker_shard(gmm, p.buffer_per_worker, rank=rank, reinit_freq=cfg.buffer.reinit_freq,
                                    noise_init=cfg.buffer.noise_init,
                                    seed=cfg.train.seed + 104729 * rank, batch=p.batch_per_worker, initial_state=part)
        buffer = SharedReplayBuffer(shard, rank=rank)
    learner = Learner(
        cfg, images, labels, gmm, rank=rank, world_size=world, device=device, buffer=buffer,
        wrap=(lambda m: wrap_ddp(m, device, cfg.trainer.grad_compression)) if world > 1 else None,
    )
    del images, labels
    if state is not None:
        learner.load_state_dict(state, load_buffer=False)
        if part is not None and buffer is None:
            learner.buffer.load_state_dict(part)
        if "rng" not in state:  # more workers than the checkpoint's: a seed of its own, not step 0's again
            s = zlib.crc32(f"{cfg.train.seed}/{rank}/{learner.images_seen}".encode())
            torch.manual_seed(s)
            learner.gen.manual_seed(s + 1)

    tracker = None
    if rank == 0 and config.get("mlflow_run_id"):
        tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"])
        if resumed_from:
            tracker.set_tags({"resumed_at_step": learner.step_count})

    log_metrics = tracker.log_metrics if tracker else None
    if resumed_from:
        kept = "" if not cfg.uses_energy else (" with its replay buffer" if part is not None else " with a fresh replay buffer")
        log(f"[rjem] resumed from {resumed_from} at step {learner.step_count} ({learner.images_seen} images seen)"
            f"{kept}{resize_line(state, learner.plan)}")

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            if is_eval_step(int(metrics["step"]), cfg, learner.plan.step_increment):
                ray.train.report(metrics)
            return
        state = dict(state)
        buf = state.pop("buffer", None)
        with tempfile.TemporaryDirectory(prefix="rjem-ckpt-") as tmp:
            if rank == 0:
                save_checkpoint(tmp, state)
            else:
                atomic_torch_save({"rng": state["rng"]}, os.path.join(tmp, RANK_FILE.format(rank=rank)))
            if buf is not None:
                path = os.path.join(tmp, BUFFER_FILE.format(rank=rank))
                if buffer is not None:
                    buffer.save(path)  # the shard writes its kept snapshot: the contents skip this process
                else:
                    atomic_torch_save(buf, path)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint-{metrics['step']:08d}")

    def evaluate(lrn: Learner) -> dict:
        # Rank 0 evaluates; the others wait at the next report, which is a barrier.
        if rank != 0:
            return {}
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
            ray.get(outcome.set_diverged.remote(str(exc)))
    if buffer is not None:
        buffer.close()  # give back the prefetched lease and end the shard: the checkpoint holds the buffer
