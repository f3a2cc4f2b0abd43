"""``rjem tune``: Ray Tune sweeps with FID as the objective, one MLflow parent run per sweep.

A sweep file (``tune_configs/tune-*.yaml``) is an experiment config with five extra top-level keys::

    scope: sample | train     # what a trial is (below)
    base: demo.yaml           # scope train: the experiment config the sweep extends (relative to this file)
    checkpoint: runs/demo     # scope sample: the fixed checkpoint (a checkpoint dir or a `rjem train` OUT)
    search: {KEY: {choice|grid|uniform|loguniform|randint: [...]}}   # see rjem_ray/search_space.py
    tune: {metric: fid, mode: min, num_samples: 8, max_concurrent: 2, search: random, ...}   # see TuneSettings
    # every other key (name, eval, generate, tracking, ...) overrides the base experiment config

Two scopes:

* ``sample`` — the checkpoint's weights are fixed; a trial sets the searched ``generate.*`` knobs,
  draws ``eval.fid_samples`` images in one process (trials run side by side: that is where the
  parallelism is) and scores FID and IS against the cached reference statistics. Every trial uses the
  same generation seed (``tune.seed``), so trials differ only by their knobs. Accuracy and robust
  accuracy do not depend on those knobs: they are measured once per sweep and logged beside.
* ``train`` — a trial is a full ``TorchTrainer`` run (the Train V2 pattern: the trial function is a
  driver that builds and fits its trainer). Rank 0 evaluates ``train.eval_metrics`` every
  ``train.eval_every`` steps; those reports (only those) reach Tune through a ``TuneReportCallback``,
  and ASHA (``time_attr = step``) stops the poor trials early.

MLflow: the driver creates the sweep's parent run and, through a Tune callback (``SweepRuns``), one
child run per trial (``mlflow.parentRunId``): the trial's config as params, FID / IS / accuracy / robust
accuracy at their step, the sample grid, the status; at the end the best child is tagged ``rjem.best``
and the parent gets ``summary/trials.csv`` and ``summary/summary.png``. Trials never open MLflow
themselves, except that a train-scope trial's rank 0 logs its ``train/*`` step metrics into its child run.
Every value carries its FID protocol (extractor, sample count, reference set) as tags.

Outputs under ``--out DIR`` (default ``runs/tune/NAME``): ``sweep.yaml`` (the resolved sweep, for
``--resume``), ``sweep.json`` (the MLflow parent run), ``ray/NAME/`` (Tune's state), ``trials/ID/``
(per-trial outputs; scope train: Ray Train's run and the final checkpoint), ``trials.csv``,
``summary.png`` (the metric against each searched parameter) and ``best.yaml`` (a complete experiment
config: ``rjem train best.yaml``, or ``rjem sample CKPT --config best.yaml`` for scope sample).

Failures stay local: a trial that raises (a diverged run, non-finite samples, a bad value) reports
``metric = inf`` (``-inf`` when maximising) with ``failed = 1`` and its reason, its MLflow run ends
FAILED with the reason in the tag ``rjem.error``, and the sweep goes on.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import storage
from .config import Config, ConfigError, _build, apply_overrides, dump_config, read_yaml, with_tracking_env
from .devices import default_device
from .search_space import KINDS, Param, apply_params, base_point, num_trials, param_space, parse_search

SCOPES = ("sample", "train")
SCHEDULERS = ("fifo", "asha")
SEARCHERS = ("random", "optuna")
SWEEP_KEYS = ("scope", "base", "checkpoint", "search", "tune")
# Objective name → default mode, and the train.eval_metrics entry that produces it.
# robust_accuracy is AutoAttack's (eval metric autoattack); pgd_robust_accuracy is PGD's (eval metric robust),
# the cheap training-time signal.
METRIC_MODES = {"fid": "min", "inception_score": "max", "accuracy": "max", "robust_accuracy": "max",
                "pgd_robust_accuracy": "max", "ece": "min", "ood_auroc": "max"}
EVAL_METRIC_OF = {"fid": "fid", "inception_score": "is", "accuracy": "accuracy", "robust_accuracy": "autoattack",
                  "pgd_robust_accuracy": "robust", "ece": "ece", "ood_auroc": "ood"}
FIGURES = ("fid", "inception_score", "inception_score_std", "accuracy", "robust_accuracy", "pgd_robust_accuracy",
           "ece", "ood_auroc")
SAMPLE_METRICS = ("fid", "inception_score")
# Sample scope: the model is fixed, only these sections may be overridden by the sweep file.
SAMPLE_SECTIONS = ("name", "cache_dir", "data", "generate", "eval", "tracking")
NOT_SEARCHABLE = ("name", "cache_dir", "data.name", "data.data_dir", "data.download", "eval.", "tracking.", "trainer.",
                  "train.eval_every",
                  "train.eval_metrics", "train.log_every", "train.checkpoint_every", "generate.n",
                  "generate.batch_size")


@dataclass
class TuneSettings:
    """The ``tune:`` section of a sweep file."""

    # fid | inception_score (both scopes); accuracy | robust_accuracy (AutoAttack) | pgd_robust_accuracy | ece |
    # ood_auroc (train)
    metric: str = "fid"
    mode: str | None = None  # min | max; None: min for fid and ece, max for the others
    num_samples: int = 1  # trials drawn per grid point (search optuna: trials in all, the baseline included)
    # random: Tune's random draws and grids | optuna: Optuna's TPE (extra rjem-ray[optuna]; no grids), whose
    # first trial is the base config's own values of the searched keys
    search: str = "random"
    max_concurrent: int = 2  # trials running at once
    scheduler: str | None = None  # fifo | asha; None: asha for scope train, fifo for scope sample
    grace_period: int | None = None  # ASHA: optimiser steps before a trial may be stopped (None: train.eval_every)
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    trial_cpus: float = 1.0  # CPUs of the trial process (scope train: the driver; its workers take trainer.*)
    trial_gpus: float | None = None  # scope sample: GPUs per trial (None: 1 when the cluster has GPUs; 0.5 packs two)
    seed: int = 0  # random search, and the generation seed every sample-scope trial shares
    max_failures: int = 0  # Tune retries of a trial whose process crashed (diverged trials are results, never retried)


@dataclass
class Sweep:
    """A parsed, validated sweep file."""

    name: str
    scope: str
    cfg: Config  # the base experiment config (searched keys still at their base values)
    params: list[Param]
    settings: TuneSettings
    checkpoint: Path | None
    document: dict  # the resolved sweep file, written to DIR/sweep.yaml and compared on --resume

    @property
    def metric(self) -> str:
        return self.settings.metric

    @property
    def mode(self) -> str:
        return self.settings.mode or METRIC_MODES[self.settings.metric]

    @property
    def scheduler(self) -> str:
        return self.settings.scheduler or ("asha" if self.scope == "train" else "fifo")

    @property
    def worst(self) -> float:
        """The value a failed trial reports: never better than any real one."""
        return math.inf if self.mode == "min" else -math.inf

    def num_trials(self) -> int:
        return num_trials(self.params, self.settings.num_samples)


@dataclass
class SweepOutcome:
    out_dir: Path
    parent_run_id: str | None
    rows: list[dict]  # ranked, best first
    best: dict | None
    best_config: Path | None
    trials_csv: Path
    summary_plot: Path | None
    interrupted: bool


# ----------------------------------------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _flatten_search(node: Any, prefix: str = "") -> dict:
    """``{generate: {contrast: {uniform: [..]}}}`` → ``{"generate.contrast": {uniform: [..]}}``.

    Lets a search section be written nested, and lets ``--set search.generate.contrast.uniform=[0.4,0.8]``
    (which ``apply_overrides`` nests) replace a flat ``generate.contrast`` entry.
    """
    out: dict = {}
    if not isinstance(node, dict):
        raise ConfigError(f"search{'.' + prefix if prefix else ''}: expected a mapping, got {node!r}")
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        kinds = [kind for kind in v if kind in KINDS] if isinstance(v, dict) else []
        if len(kinds) > 1:
            raise ConfigError(f"search.{key}: give one distribution, got {', '.join(kinds)}")
        if isinstance(v, dict) and not kinds:
            out.update(_flatten_search(v, key))
        else:
            out.pop(key, None)
            out[key] = v
    return out


def _resolve_checkpoint(path: str | Path) -> Path:
    from .checkpoint import load_state

    p = Path(path).expanduser().resolve()
    if (p / "checkpoint").is_dir():
        p = p / "checkpoint"
    load_state(p)  # CheckpointError naming the path if it is not one
    return p


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file, apply ``--set`` overrides (to any key, e.g. ``tune.num_samples=8`` or
    ``eval.fid_samples=200``), and validate everything that can be checked before Ray starts."""
    from .checkpoint import config_from_state, load_state

    path = Path(path)
    # MLflow's variables enter the sweep's own tracking section, which wins over the base or checkpoint config.
    doc = apply_overrides(with_tracking_env(read_yaml(path)), overrides)
    scope = doc.get("scope")
    if scope not in SCOPES:
        raise ConfigError(f"scope: {scope!r} is not allowed; choose one of {', '.join(SCOPES)}")
    settings = _build(TuneSettings, doc.get("tune") or {}, "tune.")
    search = _flatten_search(doc.get("search") or {})
    experiment = {k: v for k, v in doc.items() if k not in SWEEP_KEYS}
    name = str(experiment.get("name") or path.stem)
    experiment["name"] = name

    checkpoint = None
    if scope == "sample":
        if doc.get("base") is not None:
            raise ConfigError("base: scope sample takes its base config from the checkpoint; remove base")
        if not doc.get("checkpoint"):
            raise ConfigError("checkpoint: scope sample needs the checkpoint to sample from, "
                              "e.g. checkpoint: runs/demo/checkpoint (or --set checkpoint=DIR)")
        checkpoint = _resolve_checkpoint(doc["checkpoint"])
        extra = sorted(set(experiment) - set(SAMPLE_SECTIONS))
        if extra:
            raise ConfigError(f"{extra[0]}: scope sample keeps the checkpoint's model and training settings; "
                              f"a sample sweep may override only {', '.join(SAMPLE_SECTIONS)}")
        base = config_from_state(load_state(checkpoint)).to_dict()
        if experiment.get("data", {}).get("name", base["data"]["name"]) != base["data"]["name"]:
            raise ConfigError(f"data.name: the checkpoint was trained on {base['data']['name']!r}")
    else:
        if doc.get("checkpoint") is not None:
            raise ConfigError("checkpoint: only scope sample takes a checkpoint; scope train trains each trial")
        base = {}
        if doc.get("base"):
            base_path = Path(doc["base"]).expanduser()
            if not base_path.is_absolute() and (path.parent / base_path).is_file():
                base_path = path.parent / base_path
            base = read_yaml(base_path)
            doc["base"] = str(base_path.resolve())
    cfg = Config.from_dict(_deep_merge(base, experiment))

    if settings.metric not in METRIC_MODES:
        raise ConfigError(f"tune.metric: {settings.metric!r} is not allowed; choose one of {', '.join(METRIC_MODES)}")
    if settings.mode is not None and settings.mode not in ("min", "max"):
        raise ConfigError(f"tune.mode: {settings.mode!r} is not allowed; choose one of min, max")
    if settings.scheduler is not None and settings.scheduler not in SCHEDULERS:
        raise ConfigError(f"tune.scheduler: {settings.scheduler!r} is not allowed; choose one of {', '.join(SCHEDULERS)}")
    if settings.search not in SEARCHERS:
        raise ConfigError(f"tune.search: {settings.search!r} is not allowed; choose one of {', '.join(SEARCHERS)}")
    for key in ("num_samples", "max_concurrent", "reduction_factor"):
        if getattr(settings, key) < 1 + (key == "reduction_factor"):
            raise ConfigError(f"tune.{key}: {getattr(settings, key)} is out of range; it must be >= "
                              f"{1 + (key == 'reduction_factor')}")
    if settings.trial_cpus < 0 or (settings.trial_gpus or 0) < 0 or settings.max_failures < 0:
        raise ConfigError("tune.trial_cpus, tune.trial_gpus and tune.max_failures must be >= 0")

    forbidden = NOT_SEARCHABLE
    if scope == "sample":
        if settings.metric not in SAMPLE_METRICS:
            raise ConfigError(f"tune.metric: scope sample scores generated images; choose one of {', '.join(SAMPLE_METRICS)}")
        if settings.scheduler == "asha":
            raise ConfigError("tune.scheduler: scope sample reports once per trial, so ASHA cannot stop anything; use fifo")
        params = parse_search(search, cfg.to_dict(), allowed_prefixes=("generate.",), forbidden=forbidden)
    else:
        t = cfg.train
        if t.eval_every <= 0 or t.eval_every > t.steps:
            raise ConfigError(f"train.eval_every: scope train reports {settings.metric} every train.eval_every "
                              f"steps; set it in 1..train.steps ({t.steps}), got {t.eval_every}")
        if EVAL_METRIC_OF[settings.metric] not in t.eval_metrics:
            raise ConfigError(f"train.eval_metrics: {t.eval_metrics} does not produce tune.metric {settings.metric!r}; "
                              f"add {EVAL_METRIC_OF[settings.metric]!r}")
        if (settings.scheduler or "asha") == "asha":
            forbidden = forbidden + ("train.steps",)
            grace = settings.grace_period or t.eval_every
            if not 1 <= grace <= t.steps:
                raise ConfigError(f"tune.grace_period: {grace} must be in 1..train.steps ({t.steps})")
        params = parse_search(search, cfg.to_dict(), forbidden=forbidden)
    if settings.search == "optuna":
        _check_optuna(params, cfg)

    doc = {**doc, "search": search, "tune": {**(doc.get("tune") or {})}}
    if checkpoint is not None:
        doc["checkpoint"] = str(checkpoint)
    return Sweep(name, scope, cfg, params, settings, checkpoint, doc)


def _check_optuna(params: list[Param], cfg: Config) -> None:
    grids = [p.key for p in params if p.kind == "grid"]
    if grids:
        raise ConfigError(f"search.{grids[0]}: tune.search optuna draws every value from its model, so it takes no "
                          "grid; use choice (with tune.num_samples trials in all) or tune.search random")
    base_point(params, cfg.to_dict())  # raises when the baseline trial would leave the search space
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("tune.search: optuna needs the package optuna: pip install 'rjem-ray[optuna]' "
                          "(or choose tune.search random)") from None


# ----------------------------------------------------------------------------------------------- FID setup


def fid_reference(cfg: Config) -> dict:
    """Where FID's reference statistics live for ``cfg`` — the same names ``evaluate_model`` uses, so
    the statistics are computed once per dataset and extractor and shared by every trial and eval."""
    from .evaluate import fid_extractor_for

    extractor = fid_extractor_for(cfg)
    return {
        "extractor": extractor,
        "cache_root": str(Path(cfg.cache_dir) / "fidelity"),
        "cache_name": f"{cfg.data.name}-train-{extractor}",
        "weights": cfg.eval.inception_weights,
    }


def _reference_weights(cfg: Config, train_imgs, train_labels) -> str | None:
    from .data import dataset_info

    ref = fid_reference(cfg)
    if ref["extractor"] != "reference-classifier":
        return ref["weights"]
    from .fidelity import load_or_train_reference_classifier

    return str(load_or_train_reference_classifier(
        Path(cfg.cache_dir), cfg.data.name, train_imgs, train_labels, dataset_info(cfg.data.name).num_classes))


def score_samples(x, cfg: Config, metrics: tuple[str, ...] = ("fid", "is")) -> dict:
    """FID and IS of generated images ``x`` (``[N, C, H, W]`` in [-1, 1]) with the protocol of ``cfg``.

    Returns the figures and ``protocol`` (extractor, sample and reference counts, reference set,
    weights digest, generation knobs).
    """
    from .data import load_split, to_uint8
    from .fidelity import fidelity_metrics

    train_imgs, train_labels = load_split(cfg.data.name, "train", cfg.data.data_dir)
    ref = fid_reference(cfg)
    res = fidelity_metrics(
        to_uint8(x), train_imgs, extractor=ref["extractor"], weights_path=_reference_weights(cfg, train_imgs, train_labels),
        cache_root=ref["cache_root"], reference_cache_name=ref["cache_name"],
        fid="fid" in metrics, isc="is" in metrics, isc_splits=min(10, len(x)),
    )
    proto = dict(res.pop("protocol"))
    proto["reference_set"] = f"{cfg.data.name} train split ({len(train_imgs)} images)"
    s = cfg.generate.sampler
    proto.update(generation_mode=cfg.generate.mode, conditional=cfg.generate.conditional,
                 sampler=f"{s.kind} steps={s.steps} inner={s.inner_steps} lr={s.step_size} noise={s.noise_std}")
    return {**res, "protocol": proto}


def _prepare(cfg_dict: dict, scope: str, checkpoint: str | None, num_threads: int) -> dict:
    """Once per sweep, before any trial: the reference classifier, FID reference statistics and GMM
    are computed and cached, so concurrent trials only read them. Scope sample also measures the
    checkpoint's accuracy, robust accuracy (AutoAttack) and PGD robust accuracy here (the searched knobs
    cannot change them)."""
    import torch

    from .data import load_split

    torch.set_num_threads(max(1, num_threads))
    cfg = Config.from_dict(cfg_dict)
    test_imgs, _ = load_split(cfg.data.name, "test", cfg.data.data_dir, cfg.data.download)
    train_imgs, train_labels = load_split(cfg.data.name, "train", cfg.data.data_dir, cfg.data.download)
    from .fidelity import fidelity_metrics

    ref = fid_reference(cfg)
    warm = fidelity_metrics(  # a few real test images as "samples": what is cached is the reference side
        test_imgs[:64], train_imgs, extractor=ref["extractor"],
        weights_path=_reference_weights(cfg, train_imgs, train_labels),
        cache_root=ref["cache_root"], reference_cache_name=ref["cache_name"], fid=True, isc=False)
    protocol = {
        "extractor": ref["extractor"], "num_samples": cfg.eval.fid_samples,
        "reference_set": f"{cfg.data.name} train split ({len(train_imgs)} images)",
        "reference_cache": ref["cache_name"], "weights": warm["protocol"]["weights"],
    }
    e = cfg.eval
    pgd = {"attack": "PGD, untargeted, random start", "norm": "linf", "eps": e.robust_eps,
           "eps_unit": "model input space [-1, 1]", "steps": e.robust_steps,
           "step_size": e.robust_step_size or 2.5 * e.robust_eps / e.robust_steps, "restarts": e.robust_restarts,
           "num_samples": min(e.robust_max_samples, len(test_imgs)), "split": f"{cfg.data.name} test"}
    from .config import AUTOATTACK_STANDARD

    aa = {"attack": "AutoAttack (pyautoattack, the fra31/auto-attack code)", "version": e.autoattack_version,
          "attacks": list(AUTOATTACK_STANDARD) if e.autoattack_version == "standard" else e.autoattack_attacks,
          "norm": "linf", "eps": e.robust_eps, "eps_unit": "model input space [-1, 1]",
          "eps_01_scale": e.robust_eps / 2, "num_samples": min(e.autoattack_max_samples, len(test_imgs)),
          "split": f"{cfg.data.name} test"}
    robust = {"robust_accuracy": aa, "pgd_robust_accuracy": pgd}
    out: dict = {"protocol": protocol, "robust_protocol": robust, "checkpoint_metrics": {}}
    if scope == "train" and cfg.uses_energy:
        from .prior import load_train_gmm

        load_train_gmm(cfg, train_imgs, train_labels)
    if scope == "sample":
        from .checkpoint import load_model
        from .evaluate import evaluate_model

        device = default_device()  # the GPU Ray assigned this trial, else CPU
        model, _ = load_model(checkpoint, map_location=device)
        res = evaluate_model(model, cfg, ["accuracy", "robust", "autoattack"])
        out["checkpoint_metrics"] = {k: res[k] for k in ("accuracy", "robust_accuracy", "pgd_robust_accuracy")}
    return out


# ----------------------------------------------------------------------------------------------- trials

RUN_FILE = "mlflow_run.json"  # written into the trial's directory by the driver before the trial starts


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


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def _trial_params(config: dict) -> dict:
    return {k: _plain(v) for k, v in config.items()}


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def root_message(exc: BaseException) -> str:
    from .train_driver import root_message as root

    try:
        return root(exc)
    except Exception:  # never let the reason hide the failure
        return f"{type(exc).__name__}: {exc}"


def run_trial(config: dict, ctx: TrialContext) -> None:
    """The Tune trial function of both scopes; a failure becomes a reported worst value, not an exception.

    Trials do not talk to MLflow (the driver's ``SweepRuns`` callback does, from their reports); only a
    train-scope trial hands its run id to Ray Train's rank 0, which logs the step metrics into it.
    """
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(ctx.out_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    try:
        cfg = Config.from_dict(apply_params(ctx.cfg, _trial_params(config)))
        (_sample_trial if ctx.scope == "sample" else _train_trial)(cfg, ctx, trial_dir)
    except Exception as exc:
        if _stopped_by_tune():  # ASHA stopped the trial: its trainer was torn down under it
            print(f"[rjem] trial {trial_id} stopped early by the scheduler", flush=True)
            return
        reason = root_message(exc)
        print(f"[rjem] trial {trial_id} failed: {reason}", flush=True)
        (trial_dir / "error.txt").write_text(reason + "\n\n" + traceback.format_exc())
        tune.report({ctx.metric: ctx.worst, "failed": 1, "error": reason[:1000]})


def _stopped_by_tune() -> bool:
    """Whether Tune has asked this trial to stop (the scheduler's decision, or the end of the sweep)."""
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except Exception:
        return False


def _sample_trial(cfg: Config, ctx: TrialContext, trial_dir: Path) -> None:
    """Generate ``eval.fid_samples`` images with this trial's knobs and report FID and IS."""
    import torch
    from ray import tune

    from .checkpoint import load_model
    from .generate import generate
    from .images import save_grid
    from .prior import gmm_for_checkpoint

    torch.set_num_threads(max(1, int(ctx.trial_cpus)))
    device = default_device()  # the GPU Ray assigned this trial, else CPU
    model, _ = load_model(ctx.checkpoint, map_location=device)
    gmm = gmm_for_checkpoint(cfg, ctx.checkpoint)
    n = cfg.eval.fid_samples
    x, _ = generate(model, gmm, cfg.generate, n=n, generator=torch.Generator().manual_seed(ctx.seed), device=device)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FloatingPointError(f"generation diverged: {bad} of {x.numel()} pixel values are not finite")
    scores = score_samples(x, cfg, ("fid", "is"))
    scores.pop("protocol")
    save_grid(x[: min(n, 100)], trial_dir / "samples.png", nrow=10)  # classes cycle: a column per class
    tune.report({**scores, **ctx.checkpoint_metrics, "failed": 0})


def _train_trial(cfg: Config, ctx: TrialContext, trial_dir: Path) -> None:
    """Driver of one trial: a ``TorchTrainer`` run whose evaluation reports reach Tune.

    Ray Train's run lives in ``trial_dir/ray/train``: a trial restarted by ``--resume`` reuses that name
    and storage path, so Train V2 continues from the trial's last checkpoint instead of step 0.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from .train_driver import (copy_checkpoint, create_outcome, create_shards, diverged_message, save_checkpoint_gmm,
                               worker_entry)
    from .ray_setup import train_logging_config
    from .training import DivergenceError
    from .prior import load_train_gmm

    run = json.loads((trial_dir / RUN_FILE).read_text()) if (trial_dir / RUN_FILE).is_file() else {}
    gmm = load_train_gmm(cfg) if cfg.uses_energy else None  # cached by the sweep's preparation
    shards = None
    if gmm is not None and cfg.buffer.is_shared(cfg.trainer.num_workers):
        shards = create_shards(cfg, gmm, trial_dir, None)
    resources = {"CPU": cfg.trainer.cpus_per_worker}
    if ctx.use_gpu:
        resources["GPU"] = 1
    outcome = create_outcome()  # a divergence ends the workers normally (no retry) and is recorded here
    trainer = TorchTrainer(
        train_loop_per_worker=worker_entry,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "mlflow_run_id": run.get("run_id"),
            "tracking_uri": run.get("tracking_uri"),
            "resume_from": None,
            "buffer_shards": shards.handles if shards else None,
            "outcome": outcome,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.trainer.num_workers, use_gpu=ctx.use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="train",
            **storage.ray_storage(_trial_storage(cfg, trial_dir)),
            failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_callback_classes()[1](ctx.metric)],
            logging_config=train_logging_config(),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if shards is not None:
            shards.shutdown()
    if result.error is not None:
        raise result.error
    diverged = diverged_message(outcome)
    if diverged:
        raise DivergenceError(diverged)
    ckpt = trial_dir / "checkpoint"
    with result.checkpoint.as_directory() as d:
        copy_checkpoint(d, ckpt)
    if gmm is not None:
        save_checkpoint_gmm(ckpt, gmm)
    sample_grid(ckpt, cfg, trial_dir / "samples.png", ctx.seed)


def _trial_storage(cfg: Config, trial_dir: Path) -> str | Path:
    """Ray Train's storage of a train trial: ``trial_dir/ray``, or ``STORAGE/trials/<trial>`` when
    ``trainer.storage_path`` is set (a URI such as s3://bucket/prefix; ``storage.py``)."""
    if not cfg.trainer.storage_path:
        return trial_dir / "ray"
    return storage.join(storage.normalize(cfg.trainer.storage_path), "trials", trial_dir.name)


@functools.cache
def _callback_classes():
    """The two callback classes, built on first use so that importing this module (for the CLI's parser)
    does not import Ray. Instances pickle by value (cloudpickle), which is what Ray and Tune do with them."""
    from ray.tune import Callback
    from ray.tune.integration.ray_train import TuneReportCallback

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

    class SweepRuns(Callback):
        """Driver side: one MLflow child run per trial under the sweep's parent run.

        ``on_trial_start`` creates the run (or reopens it when a resumed sweep reruns the trial), logs the
        trial's full config as params and writes its id into the trial directory; ``on_trial_result``
        logs the figures at their step (FID over time); ``on_trial_complete`` / ``on_trial_error`` log
        the sample grid and close the run, FAILED with the reason in ``rjem.error`` for a failed trial.
        Tracking trouble is printed, never raised: it must not stop the sweep.
        """

        def __init__(self, info: dict):
            self.info = info
            self.runs: dict[str, str] | None = None

        def __getstate__(self):
            return {"info": self.info, "runs": None}

        def _tracker(self, run_id: str):
            from .tracking import Tracker

            return Tracker(self.info["uri"], run_id)

        def _known(self) -> dict[str, str]:
            if self.runs is None:
                self.runs = {k: r.info.run_id for k, r in _child_runs(self.info, self.info["parent_run_id"]).items()}
            return self.runs

        def _safely(self, what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:
                print(f"[rjem] MLflow: could not {what}: {exc}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._safely(f"open the run of trial {trial.trial_id}", lambda: self._start(trial))

        def _start(self, trial) -> None:
            from .tracking import Tracker

            i = self.info
            run_id = self._known().get(trial.trial_id)
            if run_id:
                self._tracker(run_id).client.update_run(run_id, status="RUNNING")
            else:
                proto = i["protocol"]
                child = Tracker.create(
                    i["uri"], i["experiment"], i["artifact_location"], run_name=f"{i['sweep']}-{trial.trial_id}",
                    parent_run_id=i["parent_run_id"],
                    tags={"rjem.trial_id": trial.trial_id, "rjem.scope": i["scope"], "rjem.searched": ",".join(i["searched"]),
                          "rjem.fid.protocol": json.dumps(proto, sort_keys=True)[:4900],
                          "rjem.fid.extractor": proto["extractor"], "rjem.fid.num_samples": proto["num_samples"],
                          "rjem.fid.reference": proto["reference_set"],
                          "rjem.robust.protocol": json.dumps(i["robust_protocol"], sort_keys=True)},
                )
                run_id = self.runs[trial.trial_id] = child.run_id
                try:
                    params = Config.from_dict(apply_params(i["cfg"], _trial_params(trial.config))).to_dict()
                except ConfigError:  # the trial will fail on it and report why
                    params = _trial_params(trial.config)
                child.log_params(params)
            d = Path(i["out_dir"]) / "trials" / trial.trial_id
            d.mkdir(parents=True, exist_ok=True)
            (d / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": i["uri"]}))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            run_id = self._known().get(trial.trial_id)
            if run_id is None or result.get("failed"):
                return
            figures = {k: result[k] for k in FIGURES if isinstance(result.get(k), (int, float))}
            self._safely(f"log the results of trial {trial.trial_id}",
                         lambda: self._tracker(run_id).log_metrics(figures, step=int(result.get("step", 0))))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._safely(f"close the run of trial {trial.trial_id}", lambda: self._complete(trial))

        def _complete(self, trial) -> None:
            i = self.info
            run_id = self._known().get(trial.trial_id)
            last = trial.last_result or {}
            if run_id is None or i["metric"] not in last:
                return
            child = self._tracker(run_id)
            if last.get("failed"):
                child.set_tags({"rjem.trial_status": "failed", "rjem.error": str(last.get("error", ""))[:4000]})
                child.finish("FAILED")
                return
            grid = Path(i["out_dir"]) / "trials" / trial.trial_id / "samples.png"
            if grid.is_file():
                child.log_artifact(grid, "samples")
            stopped = i["scope"] == "train" and int(last.get("step", 0)) < i["steps"]
            child.set_tags({"rjem.trial_status": "stopped" if stopped else "finished"})
            if not stopped:  # a stopped trial's grid is drawn by finalize(), which then closes the run
                child.finish()

        def on_trial_error(self, iteration, trials, trial, **info):
            def fail():
                run_id = self._known().get(trial.trial_id)
                if run_id:
                    child = self._tracker(run_id)
                    err = trial.get_error()
                    reason = root_message(err) if err is not None else "the trial process crashed"
                    child.set_tags({"rjem.trial_status": "failed", "rjem.error": reason[:4000]})
                    child.finish("FAILED")

            self._safely(f"close the run of trial {trial.trial_id}", fail)

    return SweepRuns, EvalReports


def sample_grid(checkpoint: str | Path, cfg: Config, path: Path, seed: int = 0) -> Path:
    """A grid of ``cfg.generate.mode`` samples from ``checkpoint``: a column per class, 8 rows."""
    import torch

    from .checkpoint import load_model
    from .generate import generate
    from .images import save_grid
    from .prior import gmm_for_checkpoint

    device = default_device()  # the GPU Ray assigned this trial, else CPU
    model, _ = load_model(checkpoint, map_location=device)
    gmm = gmm_for_checkpoint(cfg, checkpoint)
    k = min(gmm.num_classes, 10)
    x, _ = generate(model, gmm, cfg.generate, n=8 * k, classes=torch.arange(k).repeat(8),
                    generator=torch.Generator().manual_seed(seed), device=device)
    return save_grid(x, path, nrow=k)


# ----------------------------------------------------------------------------------------------- driver


def _tracking_info(cfg: Config) -> dict | None:
    from .tracking import resolve_artifact_location, resolve_tracking_uri

    t = cfg.tracking
    if not t.enabled:
        return None
    uri = resolve_tracking_uri(t.tracking_uri)
    return {"uri": uri, "experiment": t.experiment,
            "artifact_location": resolve_artifact_location(t.artifact_location, tracking_uri=uri)}


def _parent_run(sweep: Sweep, out: Path, state: dict, prepared: dict):
    """The sweep's MLflow parent run: created on the first start, reopened by ``--resume``."""
    from .tracking import Tracker, git_commit

    info = _tracking_info(sweep.cfg)
    if info is None:
        return None
    if state.get("parent_run_id"):
        parent = Tracker(info["uri"], state["parent_run_id"])
        parent.client.update_run(parent.run_id, status="RUNNING")
        parent.set_tags({"rjem.resumed": time.strftime("%Y-%m-%d %H:%M:%S")})
        return parent
    proto = prepared["protocol"]
    parent = Tracker.create(
        info["uri"], info["experiment"], info["artifact_location"], run_name=sweep.name,
        tags={"rjem.sweep": "true", "rjem.scope": sweep.scope, "rjem.metric": sweep.metric, "rjem.mode": sweep.mode,
              "rjem.scheduler": sweep.scheduler, "rjem.sweep_dir": str(out),
              "rjem.checkpoint": str(sweep.checkpoint or ""), "rjem.dataset": sweep.cfg.data.name,
              "rjem.fid.protocol": json.dumps(proto, sort_keys=True)[:4900],
              "rjem.fid.extractor": proto["extractor"], "rjem.fid.num_samples": proto["num_samples"],
              "rjem.fid.reference": proto["reference_set"],
              "rjem.robust.protocol": json.dumps(prepared["robust_protocol"], sort_keys=True),
              "mlflow.source.git.commit": git_commit(Path(__file__).resolve().parent)},
    )
    parent.log_params({**{f"search.{p.key}": p.describe() for p in sweep.params},
                       **{f"tune.{k}": v for k, v in vars(sweep.settings).items()}})
    if prepared["checkpoint_metrics"]:
        parent.log_metrics(prepared["checkpoint_metrics"])
    return parent


def run_sweep(sweep: Sweep, out_dir: str | Path | None = None, resume: bool = False,
              callbacks: list | None = None, progress=print) -> SweepOutcome:
    """Run (or, with ``resume``, continue) ``sweep``; returns the ranked trials and where the outputs are.

    ``callbacks`` are extra ``ray.tune.Callback`` objects (used by the tests to interrupt a sweep).
    """
    import ray
    from ray import tune

    from .ray_setup import cluster_has_gpus, ensure_ray

    out = Path(out_dir or Path("runs") / "tune" / sweep.name).resolve()
    from .train_driver import storage_root

    root = storage_root(sweep.cfg, out)  # OUT/ray, or trainer.storage_path (Tune state in remote storage)
    exp_path = storage.join(root, sweep.name)
    state_file = out / "sweep.json"
    restorable = tune.Tuner.can_restore(str(exp_path))
    state: dict = {}
    if resume:
        if not restorable:
            raise ConfigError(f"--resume: {out} holds no sweep to resume (no Tune state under {exp_path})")
        saved = yaml.safe_load((out / "sweep.yaml").read_text())
        if saved != _comparable(sweep.document):
            raise ConfigError(f"--resume: the sweep in {out} was started from a different configuration; "
                              "resume with the same TUNE_CONFIG and --set values (see its sweep.yaml)")
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    elif restorable:
        raise ConfigError(f"--out {out} already holds a sweep; pass --resume to continue it, "
                          "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    cfg = sweep.cfg
    cfg.cache_dir = str(Path(cfg.cache_dir).resolve())  # trials run in other working directories
    if cfg.data.data_dir:
        cfg.data.data_dir = str(Path(cfg.data.data_dir).resolve())
    st = sweep.settings
    trial_need = st.trial_cpus + (cfg.trainer.num_workers * cfg.trainer.cpus_per_worker if sweep.scope == "train" else 0)
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
    prepare = ray.remote(_prepare).options(num_cpus=max(st.trial_cpus, 1), num_gpus=1 if use_gpu else 0)
    try:
        prepared = ray.get(prepare.remote(cfg.to_dict(), sweep.scope, str(sweep.checkpoint) if sweep.checkpoint else None,
                                          int(max(st.trial_cpus, 1))))
    except ray.exceptions.RayTaskError as exc:  # e.g. a DataError: report it as itself, not as Ray's wrapper
        raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
    (out / "sweep.yaml").write_text(yaml.safe_dump(_comparable(sweep.document), sort_keys=False))
    parent = _parent_run(sweep, out, state, prepared)
    if parent:
        state["parent_run_id"] = parent.run_id
        parent.log_artifact(out / "sweep.yaml")
    state_file.write_text(json.dumps(state, indent=2))
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
        info = {**_tracking_info(cfg), "parent_run_id": parent.run_id, "sweep": sweep.name, "scope": sweep.scope,
                "metric": sweep.metric, "steps": cfg.train.steps, "cfg": cfg.to_dict(), "out_dir": str(out),
                "protocol": prepared["protocol"], "robust_protocol": prepared["robust_protocol"],
                "searched": [p.key for p in sweep.params]}
        all_callbacks.insert(0, _callback_classes()[0](info))
    resources = {"cpu": st.trial_cpus}
    if trial_gpus:
        resources["gpu"] = trial_gpus
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    if resume:
        progress(f"[rjem] resuming {exp_path}")
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep.params),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=st.num_samples,
                scheduler=_scheduler(sweep), search_alg=_search_alg(sweep),
                trial_dirname_creator=trial_dirname,
                reuse_actors=sweep.scope == "sample",
            ),
            run_config=tune.RunConfig(
                name=sweep.name, **storage.ray_storage(root),
                failure_config=tune.FailureConfig(max_failures=st.max_failures),
                callbacks=all_callbacks,
            ),
        )
    if resume and getattr(tuner, "_local_tuner", None) is not None:
        # A restored Tuner unpickles the callbacks of the first start; use this start's instead.
        tuner._local_tuner.get_run_config().callbacks = all_callbacks
    results = tuner.fit()
    return finalize(sweep, out, results, parent, progress, use_gpu)


def _comparable(doc: dict) -> dict:
    """The sweep document as YAML round-trips it (what sweep.yaml holds)."""
    return yaml.safe_load(yaml.safe_dump(doc, sort_keys=False))


def _search_alg(sweep: Sweep):
    st = sweep.settings
    if st.search == "optuna":  # TPE, seeded; the base config's values first, as the baseline trial
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        baseline = base_point(sweep.params, sweep.cfg.to_dict())
        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[baseline], seed=st.seed),
                                  max_concurrent=st.max_concurrent)
    # Tune ignores TuneConfig.max_concurrent_trials when a BasicVariantGenerator is passed: set it here.
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=st.seed, max_concurrent=st.max_concurrent)


def _scheduler(sweep: Sweep):
    if sweep.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    t = sweep.cfg.train
    # stop_last_trials=False: a trial that reaches max_t finishes on its own (copies its checkpoint, draws
    # its grid) instead of being stopped by the scheduler at its last report.
    return ASHAScheduler(time_attr="step", max_t=t.steps, grace_period=sweep.settings.grace_period or t.eval_every,
                         reduction_factor=sweep.settings.reduction_factor, stop_last_trials=False)


# ----------------------------------------------------------------------------------------------- results


def _trial_statuses(exp_path: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_path)).trials}
    except Exception:
        return {}


def _rows(sweep: Sweep, out: Path, results) -> tuple[list[dict], bool]:
    from .train_driver import storage_root

    statuses = _trial_statuses(storage.join(storage_root(sweep.cfg, out), sweep.name))
    rows = []
    for res in results:
        if not res.path:  # created but never started (an interrupted sweep): counted as missing below
            continue
        trial_id = Path(res.path).name.removeprefix("trial_")
        m = res.metrics or {}
        row: dict = {"trial_id": trial_id}
        row.update({p.key: _plain(res.config.get(p.key)) for p in sweep.params})
        tune_status = statuses.get(trial_id, "TERMINATED" if m else "UNKNOWN")
        error = ""
        if res.error is not None:
            status, error = "failed", root_message(res.error)
        elif m.get("failed"):
            status, error = "failed", str(m.get("error", ""))
        elif tune_status not in ("TERMINATED", "ERROR") or sweep.metric not in m:
            status = "interrupted"
        elif sweep.scope == "train" and int(m.get("step", 0)) < sweep.cfg.train.steps:
            status = "stopped"  # by ASHA
        else:
            status = "finished"
        value = m.get(sweep.metric)
        row["status"] = status
        row[sweep.metric] = sweep.worst if status == "failed" or value is None else float(value)
        for k in FIGURES:
            if k not in row and k in m and not m.get("failed"):
                row[k] = float(m[k])
        if sweep.scope == "train":
            row["step"] = int(m.get("step", 0)) if m and not m.get("failed") else ""
        row["error"] = error
        rows.append(row)
    interrupted = (len(rows) < sweep.num_trials()) or any(r["status"] == "interrupted" for r in rows)
    order = {"finished": 0, "stopped": 1, "interrupted": 2, "failed": 3}
    sign = 1 if sweep.mode == "min" else -1
    rows.sort(key=lambda r: (order[r["status"]], sign * r[sweep.metric] if r["status"] != "interrupted" else 0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows, interrupted


def _child_runs(tracking: dict, parent_run_id: str) -> dict[str, Any]:
    from .tracking import runs_of

    runs = runs_of(tracking["uri"], tracking["experiment"], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags.get("rjem.trial_id"): r for r in runs}


def finalize(sweep: Sweep, out: Path, results, parent, progress=print, use_gpu: bool = False) -> SweepOutcome:
    """Rank the trials, write ``trials.csv``, ``summary.png`` and ``best.yaml``, and close the MLflow runs."""
    from .tracking import Tracker

    rows, interrupted = _rows(sweep, out, results)
    finished = [r for r in rows if r["status"] in ("finished", "stopped")]
    best = finished[0] if finished and not interrupted else None
    runs = _child_runs(_tracking_info(sweep.cfg), parent.run_id) if parent else {}
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
    if interrupted:
        progress(f"[rjem] the sweep was interrupted; continue it with the same command and --resume --out {out}")
    if best is not None:
        progress(f"[rjem] best trial {best['trial_id']}: {sweep.metric} {best[sweep.metric]:.4g}; config {best_path}")
    if parent:
        progress(f"[rjem] MLflow parent run {parent.run_id}; browse with `rjem ui`")
    return SweepOutcome(out, parent.run_id if parent else None, rows, best, best_path, trials_csv, plot, interrupted)


def _grid_for_stopped(sweep: Sweep, out: Path, row: dict, child, use_gpu: bool) -> None:
    """ASHA ends a trial's process mid-run: draw its sample grid from its last checkpoint (a Ray task,
    on a GPU when the trials had one)."""
    import ray

    from .train_driver import latest_checkpoint

    trial_dir = out / "trials" / row["trial_id"]
    grid = trial_dir / "samples.png"
    try:
        ckpt = latest_checkpoint(_trial_storage(sweep.cfg, trial_dir))
        if ckpt is not None and not grid.exists():
            cfg = Config.from_dict(apply_params(sweep.cfg.to_dict(), {p.key: row[p.key] for p in sweep.params}))
            task = ray.remote(sample_grid).options(num_cpus=1, num_gpus=1 if use_gpu else 0)
            ray.get(task.remote(ckpt.path, cfg, grid, sweep.settings.seed))
            child.set_tags({"rjem.checkpoint": ckpt.path})
        if grid.exists():
            child.log_artifact(grid, "samples")
    except Exception as exc:  # a missing grid must not lose the sweep's results
        print(f"[rjem] no sample grid for stopped trial {row['trial_id']}: {exc}", flush=True)


def _columns(sweep: Sweep, rows: list[dict]) -> list[str]:
    cols = ["rank", "trial_id", "status", sweep.metric]
    cols += [k for k in FIGURES if k != sweep.metric and any(k in r for r in rows)]
    if "fid" not in cols:
        cols.insert(4, "fid")
    if sweep.scope == "train":
        cols.append("step")
    return cols + [p.key for p in sweep.params] + ["error", "run_id", "fid_extractor", "fid_samples", "fid_reference"]


def write_trials_csv(sweep: Sweep, rows: list[dict], path: Path) -> Path:
    """One row per trial: rank, status, the metric (inf for failed trials), the other figures, the
    parameters, the failure reason and the FID protocol."""
    from .evaluate import fid_extractor_for

    cols = _columns(sweep, rows)
    extra = {"fid_extractor": fid_extractor_for(sweep.cfg), "fid_samples": sweep.cfg.eval.fid_samples,
             "fid_reference": f"{sweep.cfg.data.name} train split"}
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**extra, **{c: r.get(c, "") for c in cols if c in r}})
    return path


def plot_summary(sweep: Sweep, rows: list[dict], path: Path) -> Path | None:
    """The metric against each searched parameter, one panel each; failed trials drawn as red crosses
    above the finite values, the best trial as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.metric
    finite = [r[metric] for r in rows if r["status"] in ("finished", "stopped") and math.isfinite(r[metric])]
    top = max(finite) if finite else 1.0
    low = min(finite) if finite else 0.0
    fail_y = top + 0.1 * (top - low if top > low else abs(top) or 1.0)
    n = len(sweep.params)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, sweep.params):
        cats = [str(v) for v in p.values] if p.kind in ("grid", "choice") else None  # evenly spaced, labelled
        for r in rows:
            v = r.get(p.key)
            if r["status"] == "interrupted" or v is None or v == "":
                continue
            x = cats.index(str(v)) if cats else v
            if r["status"] == "failed":
                ax.scatter([x], [fail_y], marker="x", color="tab:red", zorder=3)
            else:
                star = r["rank"] == 1 and r["status"] == "finished"
                ax.scatter([x], [r[metric]], marker="*" if star else "o", s=140 if star else 30,
                           color="tab:orange" if star else ("tab:blue" if r["status"] == "finished" else "tab:gray"),
                           zorder=3)
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        if p.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(f"{p.key}  [{p.kind}]")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    from .evaluate import fid_extractor_for

    fig.suptitle(f"{sweep.name}: {metric} ({sweep.mode}imised); FID: {fid_extractor_for(sweep.cfg)} features, "
                 f"{sweep.cfg.eval.fid_samples} samples vs {sweep.cfg.data.name} train\n"
                 "red x = failed, grey = stopped early by ASHA, star = best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_best_config(sweep: Sweep, best: dict, path: Path) -> Path:
    """A complete experiment config with the best trial's values (``rjem train`` / ``rjem sample --config``)."""
    cfg = Config.from_dict(apply_params(sweep.cfg.to_dict(), {p.key: best[p.key] for p in sweep.params}))
    cfg.name = f"{sweep.name}-best"
    dump_config(cfg, path)
    values = ", ".join(f"{p.key}={best[p.key]}" for p in sweep.params)
    if sweep.scope == "sample":
        use = f"rjem sample {sweep.checkpoint} --config {path}"
    else:
        use = f"rjem train {path}   (the trial's own checkpoint: {path.parent / 'trials' / best['trial_id'] / 'checkpoint'})"
    head = (f"# Best trial {best['trial_id']} of sweep {sweep.name} (scope {sweep.scope}): {sweep.metric} "
            f"{best[sweep.metric]:.6g} ({sweep.mode}imised)\n# Searched values: {values}\n# Use: {use}\n")
    path.write_text(head + path.read_text())
    return path


def print_ranking(sweep: Sweep, rows: list[dict], say=print) -> None:
    cols = ["rank", "trial_id", "status", sweep.metric] + [
        k for k in ("inception_score", "accuracy", "robust_accuracy", "pgd_robust_accuracy")
        if k != sweep.metric and any(k in r for r in rows)]
    keys = [p.key for p in sweep.params]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [cols + keys] + [[fmt(r.get(c, "")) for c in cols + keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    say(f"[rjem] trials ranked by {sweep.metric} ({sweep.mode}):")
    for row in table:
        say("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    for r in rows:
        if r["status"] == "failed":
            say(f"  trial {r['trial_id']} failed: {r['error']}")


# ----------------------------------------------------------------------------------------------- CLI


def cmd_tune(args) -> int:
    import sys

    sweep = load_sweep(args.config, args.set)
    outcome = run_sweep(sweep, args.out, resume=args.resume)
    print(f"[rjem] trials: {outcome.trials_csv}" + (f", summary: {outcome.summary_plot}" if outcome.summary_plot else ""))
    if outcome.parent_run_id:
        print(f"[rjem] MLflow parent run id: {outcome.parent_run_id}")
    if outcome.interrupted:
        return 130
    if outcome.best is None:
        print(f"rjem tune: every trial failed; reasons in {outcome.trials_csv}", file=sys.stderr)
        return 1
    print(f"[rjem] best config: {outcome.best_config}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``rjem tune`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "tune", help="Ray Tune sweep minimising FID (scope sample: inference knobs of a checkpoint; "
                     "scope train: training knobs, ASHA), tracked as one MLflow parent run")
    p.add_argument("config", help="sweep YAML, e.g. tune_configs/tune-smoke-sample.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a sweep or experiment key, e.g. --set tune.num_samples=8 (repeatable)")
    p.add_argument("--out", help="sweep directory (default runs/tune/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    p.set_defaults(func=cmd_tune)
