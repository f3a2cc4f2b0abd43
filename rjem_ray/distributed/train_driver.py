"""``rjem train``: build a Ray Train ``TorchTrainer`` from the config, run it, and write the run's outputs.

Outputs under ``OUT``: ``config.yaml``, ``checkpoint/`` (the final — or last good — checkpoint with the
Gaussian mixture beside it), ``samples/{energy,pgd,combined}.png`` and ``metrics.json``; Ray's own run
directory (every reported checkpoint) is ``OUT/ray/train``, or ``STORAGE/train`` where
``trainer.storage_path`` names another place (a directory or a URI such as ``s3://bucket/prefix``,
``storage.py``). The MLflow run is created here, rank 0 logs step
metrics into it, and the artifacts are logged here at the end.

The driver creates no replay-buffer actor: each worker creates its own shard beside it once Ray Train has
placed it (``buffer_actor.py``). A run may continue on another ``trainer.num_workers`` (or another
``trainer.scaling``): the workers re-derive batch, learning rate, data position and buffer layout from the
checkpoint's images seen (``train_worker.py``); with ``trainer.min_workers`` the worker group is elastic.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..core import storage
from ..method.checkpoint import GMM_FILE, STATE_FILE, copy_checkpoint, load_state
from ..method.restore import load_model, verify_checkpoint
from ..config import Config, ConfigError, dump_config, get_dotted
from ..core.data import load_split
from ..core.devices import default_device
from ..core.files import atomic_torch_save
from ..core.images import save_grid
from ..evaluation.generate import generate
from ..method.gmm import ClassConditionalGMM
from ..method.prior import gmm_for_checkpoint, load_train_gmm
from ..tracking.stores import store_uris
from ..tracking.tracker import RUN_FILE, Tracker, git_commit, tracker_for
from ..method.learner import DivergenceError
from .ray_setup import cluster_has_gpus, ensure_ray, scaling_config, train_logging_config

# Ray is imported inside the functions that call it (marked `# lazy: Ray, see top`): every `rjem` command imports
# this module (rjem_ray/cli.py: TrainingFailed; `rjem eval`: merge_json; the tune package), and `import ray.train`
# takes ~1.2 s; it loads when a run starts.


class TrainingFailed(RuntimeError):
    """The run stopped with an error; ``OUT/checkpoint`` holds its last good checkpoint, if any."""


@functools.cache
def _run_outcome_class():
    import ray  # lazy: Ray, see top

    @ray.remote(num_cpus=0)
    class RunOutcome:
        """What the workers tell the driver beyond Ray Train's result: a final divergence.

        A diverged run is an outcome, not a crash: its workers return normally (so neither Ray Train's
        ``FailureConfig`` nor Tune retries it) and rank 0 records the message here.
        """

        def __init__(self):
            self.diverged: str | None = None

        def set_diverged(self, message: str) -> None:
            self.diverged = message

        def get_diverged(self) -> str | None:
            return self.diverged

    return RunOutcome


def create_outcome():
    """A :class:`RunOutcome` actor for one trainer run (lives as long as the driver holds the handle)."""
    return _run_outcome_class().remote()


def diverged_message(outcome) -> str | None:
    import ray  # lazy: Ray, see top

    return ray.get(outcome.get_diverged.remote())


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


def write_sample_grids(model, gmm, cfg: Config, out_dir: Path, n_per_class: int = 8, seed: int = 0) -> dict[str, Path]:
    """One PNG grid per generation mode: a row per class, ``n_per_class`` samples each, on the model's device."""
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
    model, _ = load_model(ckpt_dir, map_location=default_device())
    return write_sample_grids(model, gmm, cfg, Path(out_dir))


def _grids_on_training_device(ckpt_dir: Path, gmm: ClassConditionalGMM, cfg: Config, out_dir: Path,
                              use_gpu: bool) -> dict:
    """The end-of-run grids where training ran: a one-GPU Ray task when the workers had GPUs (the driver
    may sit on a GPU-less head), in this process otherwise."""
    if not use_gpu:
        return grids_from_checkpoint(ckpt_dir, gmm, cfg, out_dir)
    import ray  # lazy: Ray, see top

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
    import ray  # lazy: Ray, see top

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
        "trainer.scaling": cfg.trainer.scaling,
        "mlflow.source.git.commit": git_commit(Path(__file__).resolve().parent),
    }


# One Ray Train run per output directory, OUT/ray/train (or per trainer.storage_path, STORAGE/train): running
# the same command again (a resubmitted job, a restarted driver) continues that run from its latest checkpoint
# through Ray's own restoration.
RUN_NAME = "train"
# With trainer.storage_path the run's config is kept in its run directory too: a driver on another machine
# (whose OUT is new) checks what it continues against it.
STORED_CONFIG = "rjem-config.yaml"
# What a continued run cannot change: the weights, optimiser state and replay buffer must fit.
CONTINUE_KEYS = ("model", "data.name", "train.mode", "optim.name", "buffer.size")


def storage_root(cfg: Config, out: Path) -> str | Path:
    """Ray's storage path for the run of ``OUT``: ``trainer.storage_path`` (a local ``Path`` or a URI), else
    ``OUT/ray``."""
    return storage.normalize(cfg.trainer.storage_path) if cfg.trainer.storage_path else out / "ray"


def _previous_config(cfg: Config, out: Path, run_dir: str | Path) -> str | None:
    """The YAML of the config that ran last in ``run_dir``: its stored copy, else ``OUT/config.yaml``."""
    stored = storage.join(run_dir, STORED_CONFIG)
    if cfg.trainer.storage_path and storage.is_file(stored):
        return storage.read_text(stored)
    previous = out / "config.yaml"
    return previous.read_text() if previous.is_file() else None


def prepare_run_dir(cfg: Config, out: Path, fresh: bool = False) -> bool:
    """Ready ``STORAGE/train`` (``OUT/ray/train`` by default) for this command; returns whether an earlier run
    there will be continued.

    ``fresh`` moves an earlier run aside (``STORAGE/train-replaced-TIMESTAMP``, nothing is deleted). Without
    it, a config that changed what the run's checkpoints hold (``CONTINUE_KEYS``) is refused in one line.
    """
    root = storage_root(cfg, out)
    run_dir = storage.join(root, RUN_NAME)
    if not storage.is_dir(run_dir):
        return False
    if fresh:
        aside = storage.join(root, f"{RUN_NAME}-replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        storage.move(run_dir, aside)
        print(f"[rjem] --fresh: the earlier run moved to {aside}; starting from step 0", flush=True)
        return False
    previous = _previous_config(cfg, out, run_dir)
    if previous is not None:
        old, new = yaml.safe_load(previous) or {}, cfg.to_dict()
        where, other = (run_dir, "trainer.storage_path") if cfg.trainer.storage_path else (out, "--out")
        for key in CONTINUE_KEYS:
            was, now = get_dotted(old, key, None), get_dotted(new, key, None)
            if was != now:
                raise ConfigError(
                    f"{key}: {where} holds a run with {key} = {was!r} and this command asks for "
                    f"{now!r}, which cannot continue it; add --fresh to start over (the earlier run "
                    f"is kept aside) or give another {other}")
    return True


def _close_stale_run(out: Path, tracker) -> None:
    """Mark OUT's previous MLflow run KILLED if its driver died (it is still RUNNING), and remember ours."""
    path = out / RUN_FILE
    if tracker is None:
        return
    try:
        prev = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        prev = {}
    if prev.get("run_id") and prev.get("tracking_uri") == tracker.tracking_uri and prev["run_id"] != tracker.run_id:
        old = Tracker(tracker.tracking_uri, prev["run_id"])
        try:
            if old.client.get_run(old.run_id).info.status == "RUNNING":
                old.finish("KILLED")
            tracker.set_tags({"rjem.continues_run": prev["run_id"]})
        except Exception:  # the old run is gone (another store, deleted): nothing to close
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri}))
    os.replace(tmp, path)


def run_training(cfg: Config, out_dir: str | Path, resume: str | Path | None = None, samples: bool = True,
                 fresh: bool = False, run_id: str | None = None, callbacks: list | None = None) -> TrainOutcome:
    """Train ``cfg`` on Ray Train; ``resume`` continues from a checkpoint dir (or a previous ``OUT``; a URI
    names a stored checkpoint, or a run or storage path whose latest checkpoint is taken).

    An earlier run in the same ``OUT`` (or ``trainer.storage_path``) is continued from its latest checkpoint
    (``fresh`` starts over). ``run_id`` logs into that open MLflow run instead of creating one (a sweep's
    trial: its child run); its creator logged its params and closes it. ``callbacks`` are Ray Train
    callbacks of the trainer's ``RunConfig`` (a sweep's trial: the one that forwards its evaluation reports
    to Tune).
    """
    import ray.train  # lazy: Ray, see top
    from ray.train.torch import TorchTrainer  # lazy: Ray, see top

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resume_dir = None
    if resume is not None:
        resume_dir = resolve_resume(resume)
        # Fail now, with a clear message, if it is not a checkpoint or any of its files is damaged.
        with storage.local_copy(resume_dir) as d:
            verify_checkpoint(d)
    continuing = prepare_run_dir(cfg, out, fresh)
    root = storage_root(cfg, out)
    run_dir = storage.join(root, RUN_NAME)

    # Fail fast on the driver (missing data directory, unknown files) before any worker starts.
    images, labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    gmm = None
    if cfg.uses_energy:
        gmm = load_train_gmm(cfg, images, labels)  # cached: workers read the file instead of refitting

    ensure_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker)
    use_gpu = cluster_has_gpus() if cfg.trainer.use_gpu is None else cfg.trainer.use_gpu
    found = latest_checkpoint_path(run_dir) if continuing else None
    if found is not None:
        # Ray hands its latest checkpoint to the workers (it wins over --resume).
        print(f"[rjem] continuing the run in {run_dir} from its latest checkpoint ({storage.name(found)}); "
              "--fresh starts over", flush=True)

    dump_config(cfg, out / "config.yaml")
    if cfg.trainer.storage_path:
        storage.write_text(storage.join(run_dir, STORED_CONFIG), (out / "config.yaml").read_text())
    owns_run = run_id is None  # a run given by the caller stays the caller's to close
    if owns_run:
        tracker = tracker_for(cfg, tags=_run_tags(cfg))
    else:
        uri, registry = store_uris(cfg.tracking)
        tracker = Tracker(uri, run_id, registry)
        tracker.set_tags(_run_tags(cfg))
    _close_stale_run(out, tracker)
    if tracker:
        if owns_run:
            tracker.log_params(cfg.to_dict())
        tracker.log_artifact(out / "config.yaml")
        tracker.log_dataset(cfg.data.name, images, labels, "train", cfg.data.data_dir or None)
        print(f"[rjem] MLflow run {tracker.run_id} in experiment {cfg.tracking.experiment!r} "
              f"({tracker.tracking_uri})", flush=True)
    del images, labels

    outcome = create_outcome()
    trainer = TorchTrainer(
        train_loop_per_worker=worker_entry,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "mlflow_run_id": tracker.run_id if tracker else None,
            "tracking_uri": tracker.tracking_uri if tracker else None,
            "resume_from": str(resume_dir) if resume_dir else None,
            "outcome": outcome,
        },
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            **storage.ray_storage(root),
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=train_logging_config(),
            callbacks=callbacks,
        ),
    )
    t0 = time.time()
    error = None
    try:
        result = trainer.fit()
        latest = result.checkpoint
        error = result.error
        if error is None:
            diverged = diverged_message(outcome)
            error = DivergenceError(diverged) if diverged else None
    except Exception as exc:  # Train V2 raises TrainingFailedError; keep what was saved
        error = exc
        latest = latest_checkpoint(run_dir)
    except BaseException:  # `ray job stop`, SIGTERM, Ctrl-C: keep the last checkpoint, close the run, re-raise
        interrupted = latest_checkpoint(run_dir)
        if interrupted is not None:
            with interrupted.as_directory() as d:
                copy_checkpoint(d, out / "checkpoint")
        if tracker and owns_run:
            tracker.finish("KILLED")
        raise
    wall = time.time() - t0

    ckpt_dir = out / "checkpoint"
    if latest is not None:
        with latest.as_directory() as d:
            copy_checkpoint(d, ckpt_dir)
        if gmm is not None:
            save_checkpoint_gmm(ckpt_dir, gmm)
    if error is not None:
        if tracker:
            if latest is not None:
                tracker.log_artifacts(ckpt_dir, "checkpoint")
            if owns_run:
                tracker.set_tags({"rjem.error": root_message(error)[:4000]})
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
        tracker.log_model(ckpt_dir, step=int(state["step"]))  # the Models tab; runs:/RUN_ID/model
        if owns_run:
            tracker.finish()
    return TrainOutcome(out, ckpt_dir, metrics, tracker.run_id if tracker else None)


def save_checkpoint_gmm(ckpt_dir: Path, gmm: ClassConditionalGMM) -> None:
    atomic_torch_save(gmm.state_dict(), ckpt_dir / GMM_FILE)


def latest_checkpoint_path(ray_dir: str | Path) -> str | Path | None:
    """The newest complete checkpoint directory of a Ray Train run directory (or of the runs under
    ``ray_dir``), in ``ray_dir``'s form (a ``Path`` or a URI); None when there is none."""
    found = [storage.join(ray_dir, n) for n in storage.subdirs(ray_dir, "checkpoint-")]
    if not found:
        found = [storage.join(ray_dir, run, n) for run in storage.subdirs(ray_dir)
                 for n in storage.subdirs(storage.join(ray_dir, run), "checkpoint-")]
    found = sorted((p for p in found if storage.is_file(storage.join(p, STATE_FILE))),
                   key=lambda p: (storage.name(p), str(p)))
    return found[-1] if found else None


def checkpoint_at(path: str | Path):
    """A ``ray.train.Checkpoint`` of the directory at ``path``; ``as_directory`` downloads a remote one."""
    import ray.train  # lazy: Ray, see top

    if not storage.is_uri(path):
        return ray.train.Checkpoint.from_directory(str(path))
    fs, fs_path = storage.filesystem(path)
    return ray.train.Checkpoint(fs_path, filesystem=fs)


def latest_checkpoint(ray_dir: str | Path):
    """The newest complete checkpoint of a Ray Train run directory (or of the runs under ``ray_dir``)."""
    path = latest_checkpoint_path(ray_dir)
    return checkpoint_at(path) if path is not None else None


def resolve_resume(resume: str | Path) -> str | Path:
    """The checkpoint directory ``--resume`` names: a checkpoint, or ``OUT`` (its ``checkpoint/``); a URI may
    also name a run or storage path, whose latest checkpoint is taken."""
    if not storage.is_uri(resume):
        path = storage.local_path(resume)
        return path / "checkpoint" if (path / "checkpoint").is_dir() else path
    uri = storage.normalize(resume)
    for candidate in (uri, storage.join(uri, "checkpoint")):
        if storage.is_file(storage.join(candidate, STATE_FILE)):
            return candidate
    # A storage path's own run first, then a run directory's checkpoints (or the runs under it).
    latest = latest_checkpoint_path(storage.join(uri, RUN_NAME)) or latest_checkpoint_path(uri)
    if latest is None:
        raise FileNotFoundError(f"--resume {resume!r} holds no checkpoint (no {STATE_FILE} in it, nor a Ray "
                                "Train run with a complete checkpoint-* under it)")
    return latest


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
    # lazy: Ray Train runs this in its worker; train_worker imports Ray Train (~1.2 s) and the buffer actors at
    # import, which the driver's importers (every `rjem` command) must not pay
    from rjem_ray.distributed.train_worker import train_loop_per_worker

    train_loop_per_worker(config)
