"""One trial of a sweep, for each scope: the Tune trial function and what it runs.

* ``sample`` — the checkpoint's weights are fixed; a trial sets the searched ``generate.*`` knobs, draws
  ``eval.fid_samples`` images in one process (trials run side by side: that is where the parallelism is)
  and scores FID, KID and IS against the cached reference statistics. Every trial uses the same generation
  seed (``tune.seed``), so trials differ only by their knobs. Accuracy and robust accuracy do not depend on
  those knobs: they are measured once per sweep (``scoring.prepare``) and reported beside.
* ``train`` — a trial is ``train_driver.run_training``, the same run ``rjem train`` makes (the Train V2
  pattern: the trial function is a driver that builds and fits its trainer), in ``trials/ID/`` and logging
  into the trial's MLflow child run. Rank 0 evaluates ``train.eval_metrics`` every ``train.eval_every``
  steps; those reports (only those) reach Tune through :func:`eval_reports`, and ASHA (``time_attr = step``)
  stops the poor trials early.

A trial that raises (a diverged run, non-finite samples, a bad value) reports ``metric = worst`` with
``failed = 1`` and its reason: the failure stays local and the sweep goes on.
"""

from __future__ import annotations

import functools
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import storage
from ..config import Config
from ..core.devices import default_device
from ..core.images import save_grid
from ..distributed.train_driver import RUN_NAME, latest_checkpoint_path, root_message, run_training
from ..evaluation.evaluate import evaluate_model
from ..evaluation.generate import generate
from ..method.prior import gmm_for_checkpoint
from ..method.restore import load_model
from ..tracking.tracker import RUN_FILE, Tracker
from .scoring import score_samples
from .sweep import FIGURES, trial_params

# Ray is imported inside the functions that call it (marked `# lazy: Ray, see top`): rjem_ray/cli.py's parser
# imports the tune package (`rjem --help`), and `import ray.tune` takes ~1.2 s; it loads when a sweep runs.


@dataclass
class TrialContext:
    """What every trial of a sweep shares (passed with ``tune.with_parameters``)."""

    scope: str
    cfg: dict
    checkpoint: str | None
    out_dir: str
    metric: str
    worst: float
    seed: int
    trial_cpus: float
    use_gpu: bool
    checkpoint_metrics: dict = field(default_factory=dict)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune trial function of both scopes; a failure becomes a reported worst value, not an exception.

    A sample-scope trial does not talk to MLflow (the driver's ``SweepRuns`` callback does, from its
    reports); a train-scope trial's ``run_training`` logs into the child run ``SweepRuns`` opened for it.
    When the scheduler stops a trial, Tune ends its process and ignores anything it reports after that.
    """
    from ray import tune  # lazy: Ray, see top

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(ctx.out_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = Config.from_dict(ctx.cfg).replace(trial_params(config))
        (_sample_trial if ctx.scope == "sample" else _train_trial)(cfg, ctx, trial_dir)
    except Exception as exc:
        reason = root_message(exc)
        print(f"[rjem] trial {trial_id} ended with an error: {reason}", flush=True)
        (trial_dir / "error.txt").write_text(reason + "\n\n" + traceback.format_exc())
        tune.report({ctx.metric: ctx.worst, "failed": 1, "error": reason[:1000]})


def _sample_trial(cfg: Config, ctx: TrialContext, trial_dir: Path) -> None:
    """Generate ``eval.fid_samples`` images with this trial's knobs and report FID, KID and IS."""
    from ray import tune  # lazy: Ray, see top

    torch.set_num_threads(max(1, int(ctx.trial_cpus)))
    device = default_device()  # the GPU Ray assigned this trial, else CPU
    model, _ = load_model(ctx.checkpoint, map_location=device)
    gmm = gmm_for_checkpoint(cfg, ctx.checkpoint)
    n = cfg.eval.fid_samples
    x, _ = generate(model, gmm, cfg.generate, n=n, generator=torch.Generator().manual_seed(ctx.seed), device=device)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FloatingPointError(f"generation diverged: {bad} of {x.numel()} pixel values are not finite")
    scores = score_samples(x, cfg, ("fid", "kid", "is"))
    scores.pop("protocol")
    save_grid(x[: min(n, 100)], trial_dir / "samples.png", nrow=10)  # classes cycle: a column per class
    tune.report({**scores, **ctx.checkpoint_metrics, "failed": 0})


def _train_trial(cfg: Config, ctx: TrialContext, trial_dir: Path) -> None:
    """``run_training`` of the trial's config in ``trial_dir``, its evaluation reports forwarded to Tune.

    The MLflow run is the trial's child run (its id in ``trial_dir/mlflow_run.json``, written by the driver's
    ``SweepRuns``, which also closes it); without one (tracking off, or MLflow unreachable) the trial logs
    nothing. Ray Train's run lives in ``trial_storage(cfg, trial_dir)/train`` (``trial_dir/ray/train``, or
    ``STORAGE/trials/<trial>/train`` with ``trainer.storage_path``): a trial restarted by ``--resume`` reuses it,
    so Train V2 continues from the trial's last checkpoint instead of step 0. The final checkpoint (with
    its Gaussian mixture) is ``trial_dir/checkpoint``.
    """
    from ray import tune  # lazy: Ray, see top

    stored = latest_checkpoint_path(trial_storage(cfg, trial_dir))
    last = checkpoint_report(storage.join(trial_storage(cfg, trial_dir), RUN_NAME)) if stored is not None else {}
    step = int(last.get("step") or (storage.name(stored).rsplit("-", 1)[-1] if stored is not None else 0))
    trained = step >= cfg.train.steps
    run_file = trial_dir / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    run_id = run.get("run_id")
    if stored is not None and run_id and run.get("tracking_uri"):
        backfill_evaluations(run["tracking_uri"], run_id, upto=step)
    if ctx.metric in last and not trained:
        # Continuing from a checkpoint of an evaluation step: report that evaluation again first, for Tune's
        # scheduler (the trial will not evaluate that step again); SweepRuns logs only what its run lacks.
        tune.report(last)
    changes = {"trainer.storage_path": str(trial_storage(cfg, trial_dir)) if cfg.trainer.storage_path else None}
    if run.get("tracking_uri"):
        # The store the driver resolved: Tune runs a trial in its own working directory, where a relative
        # sqlite:///mlflow.db (the shipped configs' default) would name a new, empty store.
        changes["tracking.tracking_uri"] = run["tracking_uri"]
    if run_id is None:
        changes["tracking.enabled"] = False  # never a stray top-level run: a sweep's runs are children of its parent
    cfg = cfg.replace(changes)
    outcome = run_training(cfg, trial_dir, samples=False, run_id=run_id, callbacks=[eval_reports(ctx.metric)])
    if trained:
        # Trained to the end on a head that was lost before Tune heard of it: nothing ran here, so nothing was
        # reported. Report the final evaluation (the one the last checkpoint carries, else evaluated again).
        tune.report(last if ctx.metric in last else _evaluate_final(cfg, outcome.checkpoint))
    sample_grid(outcome.checkpoint, cfg, trial_dir / "samples.png", ctx.seed)


def backfill_evaluations(tracking_uri: str, run_id: str, upto: int) -> list[tuple[str, int]]:
    """Give a resumed trial's run, under the sweep's names (``fid``, ``accuracy``, ...), every evaluation up to
    step ``upto`` that its rank 0 logged itself (``train/fid`` ... at the step it ran, before the checkpoint)
    and the run lacks. The sweep's names are logged by the driver from Tune's results: a head lost between an
    evaluation and its driver's logging of it would leave holes in the objective's history, and the resumed
    trial evaluates only the steps after ``upto``. Returns the (name, step) pairs it logged."""
    tracker = Tracker(tracking_uri, run_id)
    logged = set(tracker.client.get_run(run_id).data.metrics)
    added = []
    for name in FIGURES:
        if f"train/{name}" not in logged:
            continue
        have = {m.step for m in tracker.client.get_metric_history(run_id, name)} if name in logged else set()
        for m in tracker.client.get_metric_history(run_id, f"train/{name}"):
            if m.step <= upto and m.step not in have:
                tracker.log_metrics({name: m.value}, step=m.step)
                have.add(m.step)
                added.append((name, m.step))
    return added


def checkpoint_report(run_dir: str | Path) -> dict:
    """What the newest checkpoint Ray Train registered in ``run_dir`` was reported with: its ``step`` and, when
    it was an evaluation step, the figures (``ray.train.Result.from_path``); {} when there is none."""
    from ray.train import Result  # lazy: Ray, see top

    where = storage.ray_storage(run_dir)
    try:
        metrics = Result.from_path(where["storage_path"], where.get("storage_filesystem")).metrics or {}
    except Exception:  # no run there, or no registered checkpoint
        return {}
    return {k: v for k, v in metrics.items() if (k in FIGURES or k == "step") and isinstance(v, (int, float))}


def _evaluate_final(cfg: Config, checkpoint: Path) -> dict:
    """``train.eval_metrics`` of a finished trial's final checkpoint, at step ``train.steps``."""
    model, _ = load_model(checkpoint, map_location=default_device())
    res = evaluate_model(model, cfg, cfg.train.eval_metrics, gmm=gmm_for_checkpoint(cfg, checkpoint))
    return {**{k: float(v) for k, v in res.items() if k in FIGURES and isinstance(v, (int, float))},
            "step": cfg.train.steps}


def trial_storage(cfg: Config, trial_dir: Path) -> str | Path:
    """Ray Train's storage of a train trial: ``trial_dir/ray``, or ``STORAGE/trials/<trial>`` when the sweep's
    ``trainer.storage_path`` is set (a URI such as s3://bucket/prefix; ``storage.py``), so trials never share
    one run directory."""
    if not cfg.trainer.storage_path:
        return trial_dir / "ray"
    return storage.join(storage.normalize(cfg.trainer.storage_path), "trials", trial_dir.name)


@functools.cache
def _eval_reports_class():
    """Built on first use, so that importing this module (for the CLI's parser) does not import Ray."""
    from ray.tune.integration.ray_train import TuneReportCallback  # lazy: Ray, see top

    class EvalReports(TuneReportCallback):
        """Ray Train → Tune: forward only the reports that carry the objective (rank 0's evaluation
        steps). Tune insists every result holds the metric, and ASHA needs nothing else."""

        def __init__(self, metric: str):
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            found = next((m for m in metrics if self.metric in m), None)
            if found is not None:
                super().after_report(run_context, [found], checkpoint)

    return EvalReports


def eval_reports(metric: str):
    """The Ray Train callback of a train-scope trial (Ray's ``TuneReportCallback``, filtered to ``metric``)."""
    return _eval_reports_class()(metric)


def sample_grid(checkpoint: str | Path, cfg: Config, path: Path, seed: int = 0) -> Path:
    """A grid of ``cfg.generate.mode`` samples from ``checkpoint``: a column per class, 8 rows."""
    device = default_device()  # the GPU Ray assigned this trial, else CPU
    model, _ = load_model(checkpoint, map_location=device)
    gmm = gmm_for_checkpoint(cfg, checkpoint)
    k = min(gmm.num_classes, 10)
    x, _ = generate(model, gmm, cfg.generate, n=8 * k, classes=torch.arange(k).repeat(8),
                    generator=torch.Generator().manual_seed(seed), device=device)
    return save_grid(x, path, nrow=k)
