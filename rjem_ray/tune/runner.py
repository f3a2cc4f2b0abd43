"""Running a sweep: :func:`run_sweep` starts (or continues) the Tuner, :func:`finalize` closes it.

Outputs under ``--out DIR`` (default ``runs/tune/NAME``): ``sweep.yaml`` (the resolved sweep, for
``--resume``), ``sweep.json`` (the MLflow parent run), ``ray/NAME/`` (Tune's state), ``trials/ID/``
(per-trial outputs; scope train: the ``rjem train`` outputs of the trial's run), ``trials.csv``,
``summary.png`` (the metric against each searched parameter) and ``best.yaml`` (a complete experiment
config: ``rjem train best.yaml``, or ``rjem sample CKPT --config best.yaml`` for scope sample).

Tune's state directory (``ray/NAME/``, or ``STORAGE/NAME/`` with ``trainer.storage_path``) also holds
``rjem-sweep.json``: the resolved sweep and its parent run id. With the state in shared or object storage,
``--resume`` therefore continues a sweep from another machine (a new head, an empty ``--out``): Tune
restores its trials from there, train trials continue from their checkpoints under ``STORAGE/trials/``, and
the parent run gets the remaining children. The tracking store may be reached at a new address
(``MLFLOW_TRACKING_URI`` of the new head's server); the sweep is otherwise the one it started as.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError
from ..core import storage
from ..distributed.ray_setup import cluster_has_gpus, ensure_ray
from ..distributed.train_driver import latest_checkpoint, latest_checkpoint_path, storage_root
from ..tracking.models import register_run_model
from ..tracking.stores import check_store, client_for, is_server_uri, resolve_tracking_uri, store_uris
from ..tracking.tracker import Tracker
from .search_space import param_space
from .report import plot_summary, print_ranking, rank_trials, write_best_config, write_trials_csv
from .runs import activate, child_runs, parent_run, sweep_runs, tracking_info
from .scoring import prepare
from .sweep import Sweep, comparable, resumable, search_algorithm, trial_scheduler
from .trials import TrialContext, run_trial, sample_grid, trial_dirname, trial_storage

# Ray is imported inside the functions that call it (marked `# lazy: Ray, see top`): rjem_ray/cli.py's parser
# imports the tune package (`rjem --help`), and `import ray.tune` takes ~1.2 s; it loads when a sweep runs.


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` returns."""

    out_dir: Path
    parent_run_id: str | None
    rows: list[dict]  # ranked, best first
    best: dict | None
    best_config: Path | None
    trials_csv: Path
    summary_plot: Path | None
    interrupted: bool



def run_sweep(sweep: Sweep, out_dir: str | Path | None = None, resume: bool = False,
              callbacks: list | None = None, progress=print) -> SweepOutcome:
    """Run (or, with ``resume``, continue) ``sweep``; returns the ranked trials and where the outputs are.

    ``callbacks`` are extra ``ray.tune.Callback`` objects of the first start (the tests interrupt a sweep
    with one). Tune keeps a sweep's callbacks in its state: a resumed sweep runs with the callbacks it was
    started with, each restored through its ``get_state``/``set_state``, so ``resume`` takes none.
    """
    import ray  # lazy: Ray, see top
    from ray import tune  # lazy: Ray, see top

    if resume and callbacks:
        raise ValueError("callbacks: a resumed sweep runs with the callbacks of its first start (Tune restores them)")

    out = Path(out_dir or Path("runs") / "tune" / sweep.name).resolve()
    root = storage_root(sweep.cfg, out)  # OUT/ray, or trainer.storage_path (Tune state in remote storage)
    exp_path = storage.join(root, sweep.name)
    state_file = out / "sweep.json"
    restorable = tune.Tuner.can_restore(str(exp_path))
    state: dict = {}
    if resume:
        if not restorable:
            raise ConfigError(f"--resume: {out} holds no sweep to resume (no Tune state under {exp_path})")
        saved, state = _saved_sweep(out, exp_path)
        if saved is None or resumable(saved) != resumable(comparable(sweep.document)):
            raise ConfigError(f"--resume: the sweep in {exp_path} was started from a different configuration; "
                              "resume with the same TUNE_CONFIG and --set values (see its sweep.yaml)")
    elif restorable:
        raise ConfigError(f"--out {out} already holds a sweep; pass --resume to continue it, "
                          "or choose another --out")
    if sweep.cfg.tracking.enabled:  # an unreachable store fails now, in one line, before Ray starts
        check_store(resolve_tracking_uri(sweep.cfg.tracking.tracking_uri))
    out.mkdir(parents=True, exist_ok=True)

    cfg = sweep.cfg  # cache_dir and data.data_dir are absolute (load): trials run in other working directories
    st = sweep.settings
    workers = cfg.trainer.num_workers * cfg.trainer.cpus_per_worker if sweep.scope == "train" else 0
    trial_need = st.trial_cpus + workers
    ensure_ray(min_cpus=trial_need)
    gpus = cluster_has_gpus()
    if sweep.scope == "sample":
        trial_gpus = st.trial_gpus if st.trial_gpus is not None else (1.0 if gpus else 0.0)
        use_gpu = trial_gpus > 0
    else:
        trial_gpus = 0.0
        use_gpu = gpus if cfg.trainer.use_gpu is None else cfg.trainer.use_gpu

    progress(f"[rjem] sweep {sweep.name}: scope {sweep.scope}, {sweep.num_trials()} trial(s), "
             f"{sweep.mode}imise {sweep.metric}; caching the FID reference statistics")
    task = ray.remote(prepare).options(num_cpus=max(st.trial_cpus, 1), num_gpus=1 if use_gpu else 0)
    try:
        prepared = ray.get(task.remote(cfg.to_dict(), sweep.scope, str(sweep.checkpoint) if sweep.checkpoint else None,
                                       int(max(st.trial_cpus, 1))))
    except ray.exceptions.RayTaskError as exc:  # e.g. a DataError: report it as itself, not as Ray's wrapper
        raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
    (out / "sweep.yaml").write_text(yaml.safe_dump(comparable(sweep.document), sort_keys=False))
    parent = parent_run(sweep, out, state, prepared)
    if parent:
        state["parent_run_id"] = parent.run_id
        parent.log_artifact(out / "sweep.yaml")
    state_file.write_text(json.dumps(state, indent=2))
    storage.write_text(storage.join(exp_path, SWEEP_STATE),
                       json.dumps({"sweep": comparable(sweep.document), "state": state}, indent=2))
    if parent:
        progress(f"[rjem] MLflow parent run {parent.run_id} in experiment {cfg.tracking.experiment!r} "
                 f"({parent.tracking_uri})")

    ctx = TrialContext(
        scope=sweep.scope, cfg=cfg.to_dict(), checkpoint=str(sweep.checkpoint) if sweep.checkpoint else None,
        out_dir=str(out), metric=sweep.metric, worst=sweep.worst, seed=st.seed, trial_cpus=st.trial_cpus,
        use_gpu=use_gpu, checkpoint_metrics=prepared["checkpoint_metrics"],
    )
    all_callbacks = list(callbacks or [])
    if parent:
        info = {**tracking_info(cfg), "parent_run_id": parent.run_id, "sweep": sweep.name, "scope": sweep.scope,
                "metric": sweep.metric, "steps": cfg.train.steps, "cfg": cfg.to_dict(), "out_dir": str(out),
                "protocol": prepared["protocol"], "robust_protocol": prepared["robust_protocol"],
                "searched": [p.key for p in sweep.params]}
        if resume:  # Tune restores the first start's SweepRuns; it logs with this start's store and --out
            activate(info)
        else:
            all_callbacks.insert(0, sweep_runs(info))
    resources = {"cpu": st.trial_cpus}
    if trial_gpus:
        resources["gpu"] = trial_gpus
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    if resume:
        progress(f"[rjem] resuming {exp_path}")
        # The trainable is this start's (same sweep.yaml, so the same trials); the search algorithm, scheduler
        # and callbacks are the first start's, with their saved state.
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep.params),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=st.num_samples,
                scheduler=trial_scheduler(sweep), search_alg=search_algorithm(sweep),
                trial_dirname_creator=trial_dirname,
                reuse_actors=sweep.scope == "sample",
            ),
            run_config=tune.RunConfig(
                name=sweep.name, **storage.ray_storage(root),
                failure_config=tune.FailureConfig(max_failures=st.max_failures),
                callbacks=all_callbacks,
            ),
        )
    results = tuner.fit()
    return finalize(sweep, out, results, parent, progress, use_gpu)


SWEEP_STATE = "rjem-sweep.json"  # in Tune's state directory: the resolved sweep and its parent run id


def _saved_sweep(out: Path, exp_path) -> tuple[dict | None, dict]:
    """The sweep document and state (parent run id) of the first start: from Tune's state directory, which a
    new head shares through ``trainer.storage_path``, else from ``OUT`` (sweeps started before it was kept there)."""
    stored = storage.join(exp_path, SWEEP_STATE)
    if storage.is_file(stored):
        data = json.loads(storage.read_text(stored))
        return data.get("sweep"), data.get("state") or {}
    doc = yaml.safe_load((out / "sweep.yaml").read_text()) if (out / "sweep.yaml").is_file() else None
    state = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    return doc, state


def finalize(sweep: Sweep, out: Path, results, parent, progress=print, use_gpu: bool = False) -> SweepOutcome:
    """Rank the trials, write ``trials.csv``, ``summary.png`` and ``best.yaml``, and close the MLflow runs."""
    rows, interrupted = rank_trials(sweep, out, results)
    finished = [r for r in rows if r["status"] in ("finished", "stopped")]
    best = finished[0] if finished and not interrupted else None
    runs = child_runs(tracking_info(sweep.cfg), parent.run_id) if parent else {}
    for r in rows:
        run = runs.get(r["trial_id"])
        r["run_id"] = run.info.run_id if run else ""
        if run is None:
            continue
        child = Tracker(parent.tracking_uri, run.info.run_id)
        tags = {"rjem.trial_status": r["status"], "rjem.rank": r["rank"]}
        if r["status"] == "failed" and r["error"]:
            tags["rjem.error"] = r["error"][:4000]
        if best is not None and r is best:
            tags["rjem.best"] = "true"
        child.set_tags(tags)
        if r["status"] == "stopped":
            _grid_for_stopped(sweep, out, r, child, use_gpu)
        if run.info.status == "RUNNING" and r["status"] != "interrupted":
            child.finish("FAILED" if r["status"] == "failed" else "FINISHED")

    trials_csv = write_trials_csv(sweep, rows, out / "trials.csv")
    plot = plot_summary(sweep, rows, out / "summary.png")
    best_path = None
    if best is not None:
        best_path = write_best_config(sweep, best, out / "best.yaml")
    print_ranking(sweep, rows, progress)
    if parent:
        parent.log_artifact(trials_csv, "summary")
        if plot:
            parent.log_artifact(plot, "summary")
        n = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped", "failed")}
        parent.log_metrics({"num_trials": len(rows), **{f"num_{k}": v for k, v in n.items()}})
        if best is not None:
            parent.log_artifact(best_path)
            parent.log_metrics({f"best_{sweep.metric}": best[sweep.metric]})
            parent.set_tags({"rjem.best_trial_id": best["trial_id"], "rjem.best_run_id": best["run_id"]})
        if not interrupted:
            parent.finish("FINISHED" if best is not None else "FAILED")
        if best is not None and sweep.settings.register_as:  # the best trial's model: models:/NAME/VERSION
            trial = out / "trials" / best["trial_id"]  # a trial stopped by ASHA has only its Ray checkpoints
            stored = trial / "checkpoint" if (trial / "checkpoint").is_dir() else (
                latest_checkpoint_path(trial_storage(sweep.cfg, trial)))
            with storage.local_copy(stored) as ckpt:
                version = register_run_model(client_for(*store_uris(sweep.cfg.tracking)), best["run_id"],
                                             sweep.settings.register_as, ckpt)
            progress(f"[rjem] the best trial's model is models:/{version.name}/{version.version}")
    if interrupted:
        progress(f"[rjem] the sweep was interrupted; continue it with the same command and --resume --out {out}")
    if best is not None:
        progress(f"[rjem] best trial {best['trial_id']}: {sweep.metric} {best[sweep.metric]:.4g}; config {best_path}")
    if parent:
        browse = f"open {parent.tracking_uri}" if is_server_uri(parent.tracking_uri) else "browse with `rjem ui`"
        progress(f"[rjem] MLflow parent run {parent.run_id}; {browse}")
    return SweepOutcome(out, parent.run_id if parent else None, rows, best, best_path, trials_csv, plot, interrupted)


def _grid_for_stopped(sweep: Sweep, out: Path, row: dict, child, use_gpu: bool) -> None:
    """ASHA ends a trial's process mid-run: draw its sample grid from its last checkpoint (a Ray task,
    on a GPU when the trials had one)."""
    import ray  # lazy: Ray, see top

    trial_dir = out / "trials" / row["trial_id"]
    grid = trial_dir / "samples.png"
    try:
        ckpt = latest_checkpoint(trial_storage(sweep.cfg, trial_dir))
        if ckpt is not None and not grid.exists():
            cfg = sweep.cfg.replace({p.key: row[p.key] for p in sweep.params})
            task = ray.remote(sample_grid).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
            ray.get(task.remote(ckpt.path, cfg, grid, sweep.settings.seed))
            child.set_tags({"rjem.checkpoint": ckpt.path})
        if grid.exists():
            child.log_artifact(grid, "samples")
    except Exception as exc:  # a missing grid must not lose the sweep's results
        print(f"[rjem] no sample grid for stopped trial {row['trial_id']}: {exc}", flush=True)


