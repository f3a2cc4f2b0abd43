"""``rjem train``: build a Ray Train ``TorchTrainer`` from the config, run it, and write the run's outputs.

Outputs under ``OUT``: ``config.yaml``, ``checkpoint/`` (the final — or last good — checkpoint with the
Gaussian mixture beside it), ``samples/{energy,pgd,combined}.png`` and ``metrics.json``; Ray's own run
directory (every reported checkpoint) is ``OUT/ray/``. The MLflow run is created here, rank 0 logs step
metrics into it, and the artifacts are logged here at the end.

When the replay buffer is shared (``buffer.shared``; by default with more than one worker) the driver
creates its shard actors (``buffer_actor.create_buffer_shards``: one per alive node unless
``buffer.shards`` says otherwise, filled from the resumed checkpoint's snapshot when there is one), hands
their handles to the workers, and kills them when the trainer returns. While the run lasts each shard keeps
its last snapshot in ``OUT/buffer/shard-<j>.pt`` (on its own node) to come back from if it dies.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import copy_checkpoint, load_gmm_state, load_state
from .config import Config, ConfigError, dump_config
from .data import load_split
from .gmm import ClassConditionalGMM


class TrainingFailed(RuntimeError):
    """The run stopped with an error; ``OUT/checkpoint`` holds its last good checkpoint, if any."""


@dataclass
class TrainOutcome:
    out_dir: Path
    checkpoint: Path
    metrics: dict
    run_id: str | None


def merge_json(path: Path, update: dict) -> dict:
    """Update the JSON object in ``path`` with ``update`` (create it if absent), written atomically."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(update)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return data


def gmm_for_checkpoint(cfg: Config, checkpoint_dir: str | Path) -> ClassConditionalGMM:
    """The Gaussian mixture stored beside a checkpoint, or the cached/fitted one of its dataset."""
    state = load_gmm_state(checkpoint_dir)
    if state is not None:
        return ClassConditionalGMM.from_state_dict(state)
    from .train_worker import load_train_gmm

    return load_train_gmm(cfg)


def write_sample_grids(model, gmm, cfg: Config, out_dir: Path, n_per_class: int = 8, seed: int = 0) -> dict[str, Path]:
    """One PNG grid per generation mode: a row per class, ``n_per_class`` samples each, on the model's device."""
    from .generate import generate
    from .images import save_grid

    device = next(model.parameters()).device
    k = gmm.num_classes
    rows = min(k, 10)
    classes = torch.arange(rows).repeat_interleave(n_per_class)
    paths = {}
    for mode in ("energy", "pgd", "combined"):
        g = torch.Generator().manual_seed(seed)
        x, _ = generate(model, gmm, cfg.generate, mode=mode, n=len(classes), classes=classes, generator=g,
                        device=device)
        paths[mode] = save_grid(x, out_dir / f"{mode}.png", nrow=n_per_class)
    return paths


def grids_from_checkpoint(ckpt_dir: str | Path, gmm: ClassConditionalGMM, cfg: Config, out_dir: str | Path) -> dict:
    """:func:`write_sample_grids` of a checkpoint, on the device this process was given (``devices.py``)."""
    from .checkpoint import load_model
    from .devices import default_device

    model, _ = load_model(ckpt_dir, map_location=default_device())
    return write_sample_grids(model, gmm, cfg, Path(out_dir))


def _grids_on_training_device(ckpt_dir: Path, gmm: ClassConditionalGMM, cfg: Config, out_dir: Path,
                              use_gpu: bool) -> dict:
    """The end-of-run grids where training ran: a one-GPU Ray task when the workers had GPUs (the driver
    may sit on a GPU-less head), in this process otherwise."""
    if not use_gpu:
        return grids_from_checkpoint(ckpt_dir, gmm, cfg, out_dir)
    import ray

    task = ray.remote(grids_from_checkpoint).options(num_cpus=1, num_gpus=1)
    return ray.get(task.remote(str(ckpt_dir), gmm, cfg, str(out_dir)))


def _submission_id() -> str:
    """The `ray job submit` id of this driver, or "" outside a submitted job (Ray 2.60 passes it in JSON)."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    except ValueError:
        meta = {}
    return str(meta.get("job_submission_id", ""))


def _run_tags(cfg: Config) -> dict[str, str]:
    import ray

    from .tracking import git_commit

    res = ray.cluster_resources()
    return {
        "rjem.mode": cfg.train.mode,
        "rjem.dataset": cfg.data.name,
        "ray.job_id": ray.get_runtime_context().get_job_id(),
        "ray.submission_id": _submission_id(),
        "ray.nodes": str(len([n for n in ray.nodes() if n.get("Alive")])),
        "ray.cluster_cpus": str(res.get("CPU", 0)),
        "ray.cluster_gpus": str(res.get("GPU", 0)),
        "trainer.num_workers": str(cfg.trainer.num_workers),
        "mlflow.source.git.commit": git_commit(Path(__file__).resolve().parent),
    }


def run_training(cfg: Config, out_dir: str | Path, resume: str | Path | None = None, samples: bool = True) -> TrainOutcome:
    """Train ``cfg`` on Ray Train; ``resume`` continues from a checkpoint dir (or a previous ``OUT``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_setup import cluster_has_gpus, ensure_ray
    from .tracking import tracker_for

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resume_dir = None
    resume_buffer = None
    if resume is not None:
        resume_dir = Path(resume).resolve()
        if (resume_dir / "checkpoint").is_dir():
            resume_dir = resume_dir / "checkpoint"
        # Fail now, with a clear message, if it is not a checkpoint.
        resume_buffer = load_state(resume_dir).get("buffer")

    # Fail fast on the driver (missing data directory, unknown files) before any worker starts.
    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    gmm = None
    if cfg.uses_energy:
        from .train_worker import load_train_gmm

        gmm = load_train_gmm(cfg, images, labels)  # cached: workers read the file instead of refitting
    del images, labels
    cfg.cache_dir = str(Path(cfg.cache_dir).resolve())  # workers run in another working directory
    if cfg.data.data_dir:
        cfg.data.data_dir = str(Path(cfg.data.data_dir).resolve())

    ensure_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker)
    use_gpu = cluster_has_gpus() if cfg.trainer.use_gpu is None else cfg.trainer.use_gpu
    shards = None
    if cfg.uses_energy and cfg.buffer.is_shared(cfg.trainer.num_workers):
        shards = create_shards(cfg, gmm, out, resume_buffer)
    del resume_buffer

    dump_config(cfg, out / "config.yaml")
    tracker = tracker_for(cfg, tags=_run_tags(cfg))
    if tracker:
        tracker.log_params(cfg.to_dict())
        tracker.log_artifact(out / "config.yaml")
        print(f"[rjem] MLflow run {tracker.run_id} in experiment {cfg.tracking.experiment!r} "
              f"({tracker.tracking_uri})", flush=True)

    resources = {"CPU": cfg.trainer.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker=worker_entry,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "mlflow_run_id": tracker.run_id if tracker else None,
            "tracking_uri": tracker.tracking_uri if tracker else None,
            "resume_from": str(resume_dir) if resume_dir else None,
            "buffer_shards": shards.handles if shards else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.trainer.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    error = None
    try:
        result = trainer.fit()
        latest = result.checkpoint
        error = result.error
    except Exception as exc:  # Train V2 raises TrainingFailedError; keep what was saved
        error = exc
        latest = latest_checkpoint(out / "ray")
    except BaseException:  # `ray job stop`, SIGTERM, Ctrl-C: keep the last checkpoint, close the run, re-raise
        interrupted = latest_checkpoint(out / "ray")
        if interrupted is not None:
            with interrupted.as_directory() as d:
                copy_checkpoint(d, out / "checkpoint")
        if tracker:
            tracker.finish("KILLED")
        raise
    finally:
        if shards is not None:
            shards.shutdown()
    wall = time.time() - t0

    ckpt_dir = out / "checkpoint"
    if latest is not None:
        with latest.as_directory() as d:
            copy_checkpoint(d, ckpt_dir)
        if gmm is not None:
            save_checkpoint_gmm(ckpt_dir, gmm)
    if error is not None:
        if tracker:
            tracker.set_tags({"rjem.error": root_message(error)[:4000]})
            if latest is not None:
                tracker.log_artifacts(ckpt_dir, "checkpoint")
            tracker.finish("FAILED")
        kept = f"; last good checkpoint: {ckpt_dir}" if latest is not None else "; no checkpoint was saved"
        raise TrainingFailed(root_message(error) + kept)

    state = load_state(ckpt_dir)
    metrics = {"train": {"steps": int(state["step"]), "wall_s": round(wall, 1)}}
    if result.metrics:
        metrics["train"].update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})
    if samples:
        gmm = gmm or gmm_for_checkpoint(cfg, ckpt_dir)
        paths = _grids_on_training_device(ckpt_dir, gmm, cfg, out / "samples", use_gpu)
        if tracker:
            for p in paths.values():
                tracker.log_artifact(p, "samples")
    merge_json(out / "metrics.json", metrics)
    if tracker:
        tracker.log_metrics({"train/wall_s": wall})
        tracker.log_artifact(out / "metrics.json")
        tracker.log_artifacts(ckpt_dir, "checkpoint")
        tracker.finish()
    return TrainOutcome(out, ckpt_dir, metrics, tracker.run_id if tracker else None)


def create_shards(cfg: Config, gmm: ClassConditionalGMM, out: Path, resume_buffer: dict | None):
    """The shared buffer's shard actors, filled from ``resume_buffer`` when it is a shared snapshot."""
    from .buffer_actor import create_buffer_shards, is_shared_state

    initial = resume_buffer if is_shared_state(resume_buffer) and "shards" in resume_buffer else None
    if resume_buffer is not None and initial is None:
        print("[rjem] the resumed checkpoint holds per-worker replay buffers; the shared buffer starts fresh",
              flush=True)
    try:
        shards = create_buffer_shards(
            gmm, cfg.buffer.size, out / "buffer", reinit_freq=cfg.buffer.reinit_freq, seed=cfg.train.seed,
            num_shards=cfg.buffer.shards, initial_state=initial,
            batch_per_worker=cfg.train.batch_size // cfg.trainer.num_workers, num_workers=cfg.trainer.num_workers,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    nodes = len(set(shards.node_ids))
    print(f"[rjem] shared replay buffer: {sum(shards.sizes)} slots in {len(shards.sizes)} shard actor(s) on "
          f"{nodes} node(s)" + (" (restored from the checkpoint)" if initial is not None else ""), flush=True)
    return shards


def save_checkpoint_gmm(ckpt_dir: Path, gmm: ClassConditionalGMM) -> None:
    from .checkpoint import GMM_FILE, atomic_torch_save

    atomic_torch_save(gmm.state_dict(), ckpt_dir / GMM_FILE)


def latest_checkpoint(ray_dir: Path):
    import ray.train

    found = sorted(ray_dir.glob("*/checkpoint-*"))
    found = [p for p in found if (p / "state.pt").is_file()]
    return ray.train.Checkpoint.from_directory(str(found[-1])) if found else None


def root_message(error: BaseException) -> str:
    """The innermost error's message: Ray wraps the worker's exception in several layers."""
    seen = error
    while True:
        nxt = getattr(seen, "__cause__", None) or getattr(seen, "cause", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    lines = [ln for ln in text if ln.strip()]
    for ln in reversed(lines):
        if "DivergenceError" in ln or "Error:" in ln:
            return ln.split("Error: ", 1)[-1] if "Error: " in ln else ln
    return lines[-1] if lines else type(seen).__name__


def worker_entry(config: dict) -> None:
    # Imported inside the worker so the package (and its torchvision shim) loads there first.
    from rjem_ray.train_worker import train_loop_per_worker

    train_loop_per_worker(config)
