"""The sweep file: its keys, its validation, and the search algorithm and scheduler it asks for.

A sweep file (``tune_configs/tune-*.yaml``) is an experiment config with five extra top-level keys::

    scope: sample | train     # what a trial is (rjem_ray/tune/trials.py)
    base: demo.yaml           # scope train: the experiment config the sweep extends (relative to this file)
    checkpoint: runs/demo     # scope sample: the fixed checkpoint (a checkpoint dir or a `rjem train` OUT)
    search: {KEY: {choice|grid|uniform|loguniform|randint: [...]}}   # see rjem_ray/tune/search_space.py
    tune: {metric: fid, mode: min, num_samples: 8, max_concurrent: 2, search: random, ...}   # see TuneSettings
    # every other key (name, eval, generate, tracking, ...) overrides the base experiment config

:func:`load_sweep` checks everything that can be checked before Ray starts and returns a :class:`Sweep`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, apply_overrides, build, check, read_yaml, setting, with_tracking_env
from ..core.settings import check_choice
from ..method.checkpoint import load_state
from ..method.restore import config_from_state
from ..robustness.minnorm import RUNS as MIN_NORM_RUNS
from ..tracking.models import check_model_name
from .search_space import KINDS, Param, base_point, num_trials, parse_search

# Ray is imported inside the functions that call it (marked `# lazy: Ray, see top`): rjem_ray/cli.py's parser
# imports the tune package (`rjem --help`), and `import ray.tune` takes ~1.2 s; it loads when a sweep runs.

SCOPES = ("sample", "train")
SCHEDULERS = ("fifo", "asha")
SEARCHERS = ("random", "optuna")
SWEEP_KEYS = ("scope", "base", "checkpoint", "search", "tune")
# Objective name → default mode, and the train.eval_metrics entry that produces it. KID comes with FID (the eval
# metric fid computes both from the same samples). robust_accuracy is AutoAttack's (eval metric autoattack);
# pgd_robust_accuracy is PGD's (eval metric robust), the cheap training-time signal.
# The related-work metrics (issue 7): E[BR] (larger: confidence separates right from wrong better) and each
# minimum-norm run's median distance (larger: more robust), as evaluate.py reports them at the top level.
MIN_NORM_MEDIANS = tuple(f"min_norm_median_{run.replace('-', '_')}" for run in MIN_NORM_RUNS)
METRIC_MODES = {"fid": "min", "kid": "min", "inception_score": "max", "accuracy": "max", "robust_accuracy": "max",
                "pgd_robust_accuracy": "max", "ece": "min", "ood_auroc": "max", "ebr": "max",
                **{m: "max" for m in MIN_NORM_MEDIANS}}
EVAL_METRIC_OF = {"fid": "fid", "kid": "fid", "inception_score": "is", "accuracy": "accuracy",
                  "robust_accuracy": "autoattack", "pgd_robust_accuracy": "robust", "ece": "ece", "ood_auroc": "ood",
                  "ebr": "ebr", **{m: "min-norm" for m in MIN_NORM_MEDIANS}}
# What a trial's MLflow run and trials.csv carry when the trial reports it.
FIGURES = ("fid", "kid", "kid_std", "inception_score", "inception_score_std", "accuracy", "robust_accuracy",
           "pgd_robust_accuracy", "ece", "ood_auroc", "ebr", *MIN_NORM_MEDIANS)
SAMPLE_METRICS = ("fid", "kid", "inception_score")
# Sample scope: the model is fixed, only these sections may be overridden by the sweep file.
SAMPLE_SECTIONS = ("name", "cache_dir", "data", "generate", "eval", "tracking")
NOT_SEARCHABLE = ("name", "cache_dir", "data.name", "data.data_dir", "data.download", "eval.", "tracking.", "trainer.",
                  "train.eval_every",
                  "train.eval_metrics", "train.log_every", "train.checkpoint_every", "generate.n",
                  "generate.batch_size")


@dataclass
class TuneSettings:
    """The ``tune:`` section of a sweep file."""

    # fid | kid | inception_score (both scopes; KID for small eval.fid_samples, docs/TUNING.md); accuracy | robust_accuracy (AutoAttack) | pgd_robust_accuracy | ece |
    # ood_auroc (train)
    metric: str = setting("fid", choices=tuple(METRIC_MODES))
    mode: str | None = setting(None, choices=("min", "max"))  # None: min for fid, kid and ece, max for the others
    # trials drawn per grid point (search optuna: trials in all, the baseline included)
    num_samples: int = setting(1, ge=1)
    # random: Tune's random draws and grids | optuna: Optuna's TPE (extra rjem-ray[optuna]; no grids), whose
    # first trial is the base config's own values of the searched keys
    search: str = setting("random", choices=SEARCHERS)
    max_concurrent: int = setting(2, ge=1)  # trials running at once
    scheduler: str | None = setting(None, choices=SCHEDULERS)  # None: asha for scope train, fifo for scope sample
    # ASHA: optimiser steps before a trial may be stopped (None: train.eval_every)
    grace_period: int | None = setting(None, ge=1)
    reduction_factor: int = setting(2, ge=2)  # ASHA: keep the best 1/reduction_factor at each rung
    # CPUs of the trial process (scope train: the driver; its workers take trainer.*); Ray places no trial that
    # asks for nothing, so > 0 (0.5 lets two drivers share a core)
    trial_cpus: float = setting(1.0, gt=0)
    # scope sample: GPUs per trial (None: 1 when the cluster has GPUs; 0.5 packs two)
    trial_gpus: float | None = setting(None, ge=0)
    seed: int = 0  # random search, and the generation seed every sample-scope trial shares
    # Tune retries of a trial whose process crashed (diverged trials are results, never retried)
    max_failures: int = setting(0, ge=0)
    register_as: str | None = None  # scope train: register the best trial's model as models:/NAME/VERSION


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
    p = Path(path).expanduser().resolve()
    if (p / "checkpoint").is_dir():
        p = p / "checkpoint"
    load_state(p)  # CheckpointError naming the path if it is not one
    return p


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file, apply ``--set`` overrides (to any key, e.g. ``tune.num_samples=8`` or
    ``eval.fid_samples=200``), and validate everything that can be checked before Ray starts."""
    path = Path(path)
    # MLflow's variables enter the sweep's own tracking section, which wins over the base or checkpoint config.
    doc = apply_overrides(with_tracking_env(read_yaml(path)), overrides)
    scope = doc.get("scope")
    check_choice("scope", scope, SCOPES)
    settings = build(TuneSettings, doc.get("tune") or {}, "tune.")
    check(settings, "tune.")
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

    if settings.register_as is not None:
        check_model_name(settings.register_as, "tune.register_as",
                         "scope sample trains no model" if scope == "sample" else None, cfg.tracking.enabled)

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
        import optuna  # noqa: F401  lazy: the optional extra rjem-ray[optuna]; its absence is the ConfigError below
    except ImportError:
        raise ConfigError("tune.search: optuna needs the package optuna: pip install 'rjem-ray[optuna]' "
                          "(or choose tune.search random)") from None


def comparable(doc: dict) -> dict:
    """The sweep document as YAML round-trips it (what sweep.yaml holds)."""
    return yaml.safe_load(yaml.safe_dump(doc, sort_keys=False))


def resumable(doc: dict) -> dict:
    """What ``--resume`` must find unchanged in a sweep document: all of it but the tracking store's address
    (a new head's MLflow server is the same store at a new URL)."""
    doc = copy.deepcopy(doc)
    if isinstance(doc.get("tracking"), dict):
        for key in ("tracking_uri", "registry_uri"):
            doc["tracking"].pop(key, None)
    return doc


def search_algorithm(sweep: Sweep):
    """The sweep's search algorithm: Tune's random/grid generator, or seeded Optuna TPE."""
    st = sweep.settings
    if st.search == "optuna":  # TPE, seeded; the base config's values first, as the baseline trial
        from ray.tune.search import ConcurrencyLimiter  # lazy: Ray, see top
        from ray.tune.search.optuna import OptunaSearch  # lazy: Ray, see top

        baseline = base_point(sweep.params, sweep.cfg.to_dict())
        return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[baseline], seed=st.seed),
                                  max_concurrent=st.max_concurrent)
    # Tune ignores TuneConfig.max_concurrent_trials when a BasicVariantGenerator is passed: set it here.
    from ray.tune.search.basic_variant import BasicVariantGenerator  # lazy: Ray, see top

    return BasicVariantGenerator(random_state=st.seed, max_concurrent=st.max_concurrent)


def trial_scheduler(sweep: Sweep):
    """None (FIFO) or ASHA on ``step``, Ray Tune's own schedulers."""
    if sweep.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler  # lazy: Ray, see top

    t = sweep.cfg.train
    # stop_last_trials=False: a trial that reaches max_t finishes on its own (copies its checkpoint, draws
    # its grid) instead of being stopped by the scheduler at its last report.
    return ASHAScheduler(time_attr="step", max_t=t.steps, grace_period=sweep.settings.grace_period or t.eval_every,
                         reduction_factor=sweep.settings.reduction_factor, stop_last_trials=False)


def plain(v: Any) -> Any:
    """A Tune-drawn value as plain Python (numpy scalars become int/float)."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


def trial_params(config: dict) -> dict:
    """A trial's config (searched key → value) as plain Python values."""
    return {k: plain(v) for k, v in config.items()}


