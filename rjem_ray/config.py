"""One typed configuration for every command, loaded from YAML with dotted ``--set`` overrides.

Units: every ε and step size is in the model's input space [-1, 1] (0.1 there is 12.75/255 on the usual
[0, 1] scale). How batch, learning rate, buffer and schedules follow ``trainer.num_workers`` is
``trainer.scaling`` (``rjem_ray/method/scaling.py``): under ``weak`` (the default) ``train.batch_size`` and
``buffer.size`` are per worker and ``optim.lr`` is scaled by ``optim.lr_scaling``; under ``strong`` they are
global and nothing is rescaled. Step-valued keys count reference steps of ``train.batch_size`` images.

``load_config(path, overrides)`` is the edge: it reads YAML, applies ``key.sub=value`` overrides (values
parsed as YAML scalars), rejects unknown keys and out-of-range values with a :class:`ConfigError` that
names the key and what is allowed, and returns a frozen-in-shape :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .method.ddp import GRAD_COMPRESSIONS
from .method.scaling import LR_SCALINGS, SCALINGS
from .core.storage import check_storage_path


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and what is allowed."""


MODES = ("classifier", "robust-classifier", "jempp", "robust-jem")
GEN_MODES = ("energy", "pgd", "combined")
CONTRAST_CENTERS = ("floor", "class-mean", "image-mean")
SAMPLER_KINDS = ("sgld", "pyld")
NORMS = ("linf", "l2")
ROBUST_TERMS = ("pgd", "gradreg")
MODEL_NORMS = ("batch", "group", "none", "farkas")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
FID_EXTRACTORS = ("auto", "inception", "reference-classifier", "robust-reference-classifier")
SECOND_FID_EXTRACTORS = ("auto", "none") + FID_EXTRACTORS[1:]
# AutoAttack (rjem_ray/robustness/autoattack.py, library pyautoattack): every attack name its AutoAttack accepts,
# the standard version's list in its order, and the versions we offer (custom = a chosen sub-list).
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "fab")
AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_VERSIONS = ("standard", "custom")
# Minimum-norm attacks (rjem_ray/robustness/minnorm.py) as ATTACK-NORM names, and their public reference.
MIN_NORM_RUNS = ("logbarrier-l2", "logbarrier-linf", "proxlogbarrier-l0", "proxlogbarrier-l1", "proxlogbarrier-l2",
                 "proxlogbarrier-linf")
MIN_NORM_REFERENCES = ("fab", "none")
CERTIFY_METHODS = ("smoothing", "gaussian-average")
DATASET_NAMES = ("mnist5k", "cifar10", "cifar100", "svhn")
# OOD detection (rjem_ray/evaluation/ood.py describes each): synthetic shifts, then the datasets; scores
OOD_SHIFTS = ("uniform", "gaussian", "smooth", "constant", "photos", "inverted") + DATASET_NAMES
OOD_SCORES = ("logsumexp", "max_softmax", "grad_norm")
# keys that were renamed: the unknown-key error names the new one
RENAMED_KEYS = {"eval.ood_dataset": "eval.ood_shifts (a list, e.g. [svhn] or [auto])"}


@dataclass
class DataConfig:
    name: str = "mnist5k"
    data_dir: str | None = None  # holds the standard files (cifar-10-batches-py/, ...); not needed for mnist5k
    download: bool = False  # fetch through torchvision first (connected machines only)
    augment: bool = True
    pad: int = 4  # reflect padding before the random crop, pixels
    noise_std: float = 0.03  # Gaussian noise on the normalised image, [-1, 1] units


@dataclass
class ModelConfig:
    depth: int = 28  # 6n + 4
    widen: int = 10
    # batch | group (GroupNorm: no batch or train/eval dependence) | none | farkas (no normalisation; Farkas
    # layers keep at least one unit of every activation's input >= 0 at every pixel; models.py)
    norm: str = "batch"
    dropout: float = 0.0
    leak: float = 0.2  # LeakyReLU slope
    stem_stride: int = 1  # 2 halves the resolution after the first conv (cheap models for small CPUs)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1  # weak scaling: for one worker's batch, times the lr rule; strong: for the global batch
    # weak scaling's learning-rate rule for N workers: linear (× N) | sqrt (× √N) | none | auto (linear for
    # sgd, sqrt for adam); rjem_ray/method/scaling.py
    lr_scaling: str = "auto"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # constant | cosine | step
    warmup_steps: int = 0  # linear learning-rate warm-up, reference steps (scaling.py)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of train.steps (step schedule)
    gamma: float = 0.2  # step-schedule decay factor


@dataclass
class AttackConfig:
    """PGD used for adversarial training (robust modes)."""

    norm: str = "linf"
    eps: float = 0.1  # [-1, 1] units
    step_size: float = 0.02  # [-1, 1] units
    steps: int = 15
    random_start: bool = True
    eps_warmup_steps: int = 0  # ε grows linearly from 0 over this many optimiser steps
    # BatchNorm statistics the training attack sees: eval (running statistics, the evaluated function) |
    # train (the batch's own statistics, the function the loss then trains; running statistics frozen)
    bn_mode: str = "eval"


@dataclass
class SamplerConfig:
    """Langevin sampler for the negative samples (and for energy generation)."""

    kind: str = "pyld"  # sgld | pyld
    steps: int = 10  # SGLD steps, or PYLD outer steps m
    inner_steps: int = 5  # PYLD inner steps n (ignored by SGLD)
    step_size: float = 0.2  # PYLD lr, or SGLD lr, [-1, 1] units per unit gradient
    noise_std: float = 0.01  # SGLD noise std, [-1, 1] units (PYLD adds none)
    # PYLD only: a plain gradient step x += outer_step_size · ∂(−E)/∂x before each outer step's inner
    # steps ([-1, 1] units per unit gradient). JEM++'s public code has both variants: 0 (inner steps
    # only) and 1.0 (its sgld_lr); 0 is the default here.
    outer_step_size: float = 0.0


BUFFER_SHARED = ("auto", "true", "false")


@dataclass
class BufferConfig:
    size: int = 10000  # slots per worker under weak scaling; of the whole buffer under strong
    reinit_freq: float = 0.05
    # Of the fresh chains (reinit_freq), the fraction that starts from uniform noise on [-1, 1] instead of the
    # Gaussian mixture (JEM starts every chain from noise, JEM++ none): negatives that also visit noise teach
    # the energy to rank it below data (docs/RESULTS.md "An energy that is also a density").
    noise_init: float = 0.0
    gmm_max_mb: int = 256  # memory bound for the class-conditional Gaussian mixture factors
    # Where each worker's slots live (rjem_ray/distributed/buffer_actor.py): true = in a shard actor the worker creates on
    # its own node (survives the worker's process; draws reinitialisations off the step); false = inside the
    # worker process; auto = true when trainer.num_workers > 1. YAML booleans are normalised to "true"/"false".
    shared: Literal["auto", "true", "false"] | bool = "auto"

    def is_shared(self, num_workers: int) -> bool:
        """Whether ``num_workers`` training workers use the shared (actor-sharded) buffer."""
        shared = {True: "true", False: "false"}.get(self.shared, self.shared)
        return shared == "true" or (shared == "auto" and num_workers > 1)


@dataclass
class TrainConfig:
    mode: str = "robust-jem"
    steps: int = 1000  # reference steps of batch_size images (weak scaling: N per optimiser step on N workers)
    batch_size: int = 64  # weak scaling: per worker; strong: global, split evenly across workers
    energy_weight: float = 1.0  # w_px
    energy_l2: float = 0.0  # weight of (E(x_pos)^2 + E(x_q)^2).mean()
    divergence_threshold: float = 1e8  # |loss| above this (or non-finite) counts as divergence
    max_rollbacks: int = 3  # divergences rolled back to the last good checkpoint before the run stops
    rollback_lr_factor: float = 0.5  # learning rate multiplier applied at each rollback
    # BatchNorm statistics of the sampler's passes AND of the loss's view of x_q (one choice for both, so
    # the loss raises the energy the sampler lowered; running statistics never updated by x_q):
    # train (default) = the negative batch's own statistics; eval = running statistics. See training.py.
    sampler_bn_mode: str = "train"
    # which training passes update BatchNorm's running statistics (what evaluation, PGD in eval mode and
    # generation normalise with): classification (default) = only the classification batch x_cls (x_adv in
    # robust modes) | classification+positive = x_cls and the clean positive batch x_pos of robust-jem (the
    # earlier behaviour: running statistics then average two distributions; docs/RESULTS.md). training.py
    bn_running_stats: str = "classification"
    # autocast of the network's passes (rjem_ray/method/speed.py): auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16;
    # weights, optimiser state, images and Langevin iterates stay fp32 in every case
    precision: str = "auto"
    # NHWC memory layout / torch.compile of the network used by every pass: auto (on for CUDA) | true | false
    channels_last: Literal["auto", "true", "false"] | bool = "auto"
    compile: Literal["auto", "true", "false"] | bool = "auto"
    # PGD and sampler steps share one forward/backward of the concatenated batch; applies only with
    # attack.bn_mode = eval and sampler_bn_mode = eval (samples then independent; training.py)
    fuse_passes: bool = True
    # robust modes' classification term: pgd (CE at PGD's x_adv, the attack.* keys) | gradreg (CE at the
    # clean x + gradreg_strength * mean ||grad_x CE||_*^2 by finite differences, no PGD; rjem_ray/method/gradreg.py)
    robust_term: str = "pgd"
    gradreg_strength: float = 0.01  # lambda, in ([-1, 1] unit)^2 so that the penalty is a loss (1.0 stalled the demo)
    gradreg_step: float = 0.01  # finite-difference step h, [-1, 1] units (L-inf: per pixel; L2: per image)
    gradreg_norm: str = "linf"  # attack norm defended against; penalises its dual gradient norm (linf: L1, l2: L2)
    log_every: int = 20
    checkpoint_every: int = 200
    eval_every: int = 0  # evaluate eval_metrics on rank 0 every N steps and report them (0: never)
    eval_metrics: list[str] = field(default_factory=lambda: ["fid"])
    seed: int = 0


@dataclass
class TrainerConfig:
    num_workers: int = 1
    # weak (batch_size and buffer.size per worker, lr scaled by optim.lr_scaling) | strong (global batch);
    # rjem_ray/method/scaling.py
    scaling: str = "weak"
    # elastic training (Ray Train's num_workers=(min, max)): > 0 lets a run continue on as few as this many
    # workers when nodes are lost, and grow back up to num_workers; 0 = a fixed worker group
    min_workers: int = 0
    # one GPU type per DDP job: Ray's accelerator type (A100, H100, A10G, ...) every worker must run on; None: any
    accelerator_type: str | None = None
    # DDP gradient all-reduce: none (fp32) | bf16 (compressed to bfloat16, half the bytes; torch's bf16 hook)
    grad_compression: str = "none"
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    sync_batchnorm: bool = False
    max_failures: int = 0
    # Where Ray keeps the run's checkpoints (and a sweep's Tune state): None = OUT/ray; a directory, or a URI
    # such as s3://bucket/prefix (rjem_ray/core/storage.py). One run per storage path: rerunning continues it.
    storage_path: str | None = None


@dataclass
class GenerateConfig:
    """Inference-time generation (the paper's three modes)."""

    mode: str = "combined"
    n: int = 100
    conditional: bool = True  # E(x, c) for a requested class; False samples E(x)
    # targeted-PGD ball: linf (the paper: sign steps, budget per pixel) | l2 (normalised-gradient steps,
    # budget per image: the change goes where the gradient is, not to every pixel alike); generate.py
    pgd_norm: str = "linf"
    pgd_eps: float = 0.5  # targeted-PGD budget, [-1, 1] units (per pixel for linf, per image for l2)
    pgd_steps: int = 40
    pgd_step_size: float = 0.05
    contrast: float = 0.7  # κ: x ← m + κ (x − m) before Langevin (combined mode)
    # m: floor (−1: black stays black, strokes dim) | class-mean (μ_c of the prior) | image-mean (x̄); generate.py
    contrast_center: str = "floor"
    # BatchNorm while generating: eval (running statistics) | train (the generated batch's statistics,
    # running statistics frozen: the training sampler's view under train.sampler_bn_mode = train); generate.py
    bn_mode: str = "eval"
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=50, inner_steps=5, step_size=0.2))
    batch_size: int = 100


@dataclass
class EvalConfig:
    # robust = PGD (pgd_robust_accuracy, a cheap signal); autoattack = robust_accuracy (the reported figure)
    metrics: list[str] = field(default_factory=lambda: ["accuracy", "robust", "autoattack", "ece", "fid", "is", "ood"])
    robust_eps: float = 0.1  # [-1, 1] units; the evaluation ε of PGD, AutoAttack and the masking report
    robust_steps: int = 20
    robust_step_size: float | None = None  # None: 2.5 ε / steps
    robust_restarts: int = 1
    robust_max_samples: int = 1000
    autoattack_version: str = "standard"  # standard (APGD-CE, APGD-T, FAB-T, Square) | custom
    autoattack_attacks: list[str] = field(default_factory=lambda: ["apgd-ce", "apgd-t"])  # used with custom
    autoattack_max_samples: int = 1000  # a seeded random subset when below the test size
    masking_eps_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # PGD grid, × robust_eps
    ece_bins: int = 20  # equal-width confidence bins of ECE and of E[BR]'s histogram
    ebr_pseudo_count: float = 1.0  # E[BR]: added to each bin's correct and wrong counts (1 = Laplace's rule)
    fid_extractor: str = "auto"  # auto: inception for natural images, reference-classifier for digits
    # FID/KID of the same samples in a second feature space, reported as fid_2/kid_2 beside fid/kid.
    # auto: robust-reference-classifier (an adversarially trained reference; measured: a plain classifier's targeted
    # PGD still lowers its FID below the seeds', docs/RESULTS.md) where fid_extractor is the
    # plain reference-classifier, none otherwise.
    fid_second_extractor: str = "auto"
    fid_samples: int = 1000
    inception_weights: str | None = None  # local Inception weights for offline clusters
    # OOD detection (rjem_ray/evaluation/ood.py): the test split against each shift, AUROC per score; auto = the dataset's
    # suite (ood.DEFAULT_SHIFTS). ood_auroc, the headline, is the worst shift under the logsumexp score.
    ood_shifts: list[str] = field(default_factory=lambda: ["auto"])
    ood_scores: list[str] = field(default_factory=lambda: list(OOD_SCORES))
    ood_samples: int = 1000  # images per shift (at most the test split's size for `inverted`)
    # precision / recall (Kynkäänniemi et al. 2019, torch-fidelity's) of the FID samples against as many training
    # images drawn at random (seed 0), k-th nearest neighbour radii, in the FID's first feature space
    prc_neighborhood: int = 3
    # min-norm (rjem_ray/robustness/minnorm.py): per-image minimum-norm perturbations on a seeded subset; distances in
    # [-1, 1] units (L0: changed pixels); the curve and the plot also give them on the [0, 1] scale
    min_norm_runs: list[str] = field(default_factory=lambda: list(MIN_NORM_RUNS))
    min_norm_max_samples: int = 100
    min_norm_outer_steps: int = 10  # barrier weights mu, mu*decay, ...
    min_norm_inner_steps: int = 20  # feasible steps per barrier weight
    # first barrier weight, unitless (relative to the start's distance); None: per norm, minnorm.MU_DEFAULT
    # (3 for L1/L2/L∞, 0.3 for L0: measured on the demo checkpoint); a number applies to every run
    min_norm_mu: float | None = None
    min_norm_mu_decay: float = 0.5
    # the barrier also runs from a targeted start toward each of this many most likely wrong classes, keeping
    # the closest result (1 + targets runs per image; 0: the untargeted start only); rjem_ray/robustness/minnorm.py
    min_norm_targets: int = 3
    min_norm_reference: str = "fab"  # fab (pyautoattack's FAB, L1/L2/Linf runs) | none
    min_norm_reference_iterations: int = 100
    min_norm_curve_points: int = 21  # eps grid of the robust-accuracy curve, 0 .. the largest finite distance
    # certified (rjem_ray/robustness/certify.py): L2 certificates; sigma and radii in [-1, 1] units (halve for [0, 1])
    certify_methods: list[str] = field(default_factory=lambda: ["smoothing", "gaussian-average"])
    certify_sigma: float = 0.5  # Gaussian noise std of the smoothed classifier (0.25 on [0, 1])
    certify_n0: int = 100  # noisy copies that choose the class
    certify_n: int = 1000  # noisy copies that bound its probability (Cohen et al. use 100,000)
    certify_alpha: float = 0.001  # the certificate is wrong with probability at most alpha
    certify_radii: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    certify_max_samples: int = 100
    # where min-norm writes min_norm.png and min_norm_distances.csv; None: PARENT/eval-NAME beside the checkpoint
    # PARENT/NAME (rjem eval also logs them to its MLflow run, under eval/)
    artifact_dir: str | None = None
    batch_size: int = 256


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are resolved against the working dir
    registry_uri: str = ""  # the model registry's store; "" = the tracking store
    experiment: str = "rjem"
    artifact_location: str = "mlartifacts"
    run_name: str | None = None
    enabled: bool = True


@dataclass
class Config:
    name: str = "experiment"
    cache_dir: str = ".rjem_cache"  # GMM statistics, reference classifiers, FID reference statistics
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        cfg = _build(cls, data, "")
        validate(cfg)
        return cfg

    @property
    def robust(self) -> bool:
        return self.train.mode in ("robust-classifier", "robust-jem")

    @property
    def uses_energy(self) -> bool:
        return self.train.mode in ("jempp", "robust-jem")


# ----------------------------------------------------------------------------------------------- building


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for key in unknown:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise ConfigError(f"{prefix}{key} was renamed {RENAMED_KEYS[prefix + key]}")
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; allowed keys under {prefix.rstrip('.') or 'the top level'}: "
            + ", ".join(sorted(names))
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; it must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _at_least(key: str, value: float | None, low: float, strict: bool = False) -> None:
    if value is None:
        return
    if value < low or (strict and value == low):
        raise ConfigError(f"{key}: {value!r} is out of range; it must be {'>' if strict else '>='} {low}")


def _between(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}: {value!r} is out of range; it must be in [{low}, {high}]")


def _validate_sampler(prefix: str, s: SamplerConfig) -> None:
    _choice(f"{prefix}.kind", s.kind, SAMPLER_KINDS)
    _at_least(f"{prefix}.steps", s.steps, 1)
    _at_least(f"{prefix}.inner_steps", s.inner_steps, 1)
    _at_least(f"{prefix}.step_size", s.step_size, 0, strict=True)
    _at_least(f"{prefix}.noise_std", s.noise_std, 0)
    _at_least(f"{prefix}.outer_step_size", s.outer_step_size, 0)


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first invalid key and its allowed values."""
    _choice("data.name", cfg.data.name, DATASET_NAMES)
    _at_least("data.pad", cfg.data.pad, 0)
    _at_least("data.noise_std", cfg.data.noise_std, 0)
    if (cfg.model.depth - 4) % 6 != 0 or cfg.model.depth < 10:
        raise ConfigError(f"model.depth: {cfg.model.depth} is not allowed; it must be 6n+4 (10, 16, 22, 28, ...)")
    _at_least("model.widen", cfg.model.widen, 1)
    _choice("model.norm", cfg.model.norm, MODEL_NORMS)
    _between("model.dropout", cfg.model.dropout, 0.0, 0.99)
    _at_least("model.leak", cfg.model.leak, 0)
    _choice("model.stem_stride", cfg.model.stem_stride, (1, 2))  # type: ignore[arg-type]
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _at_least("optim.lr", cfg.optim.lr, 0, strict=True)
    _between("optim.momentum", cfg.optim.momentum, 0.0, 1.0)
    _at_least("optim.weight_decay", cfg.optim.weight_decay, 0)
    _choice("optim.lr_scaling", cfg.optim.lr_scaling, LR_SCALINGS)
    _choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _at_least("optim.warmup_steps", cfg.optim.warmup_steps, 0)
    for m in cfg.optim.milestones:
        _between("optim.milestones", m, 0.0, 1.0)
    _between("optim.gamma", cfg.optim.gamma, 0.0, 1.0)
    _choice("attack.norm", cfg.attack.norm, NORMS)
    _at_least("attack.eps", cfg.attack.eps, 0)
    _at_least("attack.step_size", cfg.attack.step_size, 0)
    _at_least("attack.steps", cfg.attack.steps, 1)
    _at_least("attack.eps_warmup_steps", cfg.attack.eps_warmup_steps, 0)
    _choice("attack.bn_mode", cfg.attack.bn_mode, ("eval", "train"))
    _validate_sampler("sampler", cfg.sampler)
    _at_least("buffer.size", cfg.buffer.size, 1)
    _between("buffer.reinit_freq", cfg.buffer.reinit_freq, 0.0, 1.0)
    _between("buffer.noise_init", cfg.buffer.noise_init, 0.0, 1.0)
    _at_least("buffer.gmm_max_mb", cfg.buffer.gmm_max_mb, 1)
    if isinstance(cfg.buffer.shared, bool):
        cfg.buffer.shared = "true" if cfg.buffer.shared else "false"
    _choice("buffer.shared", cfg.buffer.shared, BUFFER_SHARED)
    _choice("train.mode", cfg.train.mode, MODES)
    _at_least("train.steps", cfg.train.steps, 1)
    _at_least("train.batch_size", cfg.train.batch_size, 1)
    _at_least("train.energy_weight", cfg.train.energy_weight, 0)
    _at_least("train.energy_l2", cfg.train.energy_l2, 0)
    _at_least("train.divergence_threshold", cfg.train.divergence_threshold, 0, strict=True)
    _at_least("train.max_rollbacks", cfg.train.max_rollbacks, 0)
    _between("train.rollback_lr_factor", cfg.train.rollback_lr_factor, 0.0, 1.0)
    _choice("train.sampler_bn_mode", cfg.train.sampler_bn_mode, ("train", "eval"))
    _choice("train.bn_running_stats", cfg.train.bn_running_stats, ("classification", "classification+positive"))
    _choice("train.precision", cfg.train.precision, ("auto", "fp32", "bf16"))
    for key in ("channels_last", "compile"):
        value = getattr(cfg.train, key)
        if isinstance(value, bool):
            setattr(cfg.train, key, value := "true" if value else "false")
        _choice(f"train.{key}", value, ("auto", "true", "false"))
    _choice("train.robust_term", cfg.train.robust_term, ROBUST_TERMS)
    _at_least("train.gradreg_strength", cfg.train.gradreg_strength, 0)
    _at_least("train.gradreg_step", cfg.train.gradreg_step, 0, strict=True)
    _choice("train.gradreg_norm", cfg.train.gradreg_norm, NORMS)
    _at_least("train.log_every", cfg.train.log_every, 1)
    _at_least("train.checkpoint_every", cfg.train.checkpoint_every, 1)
    _at_least("train.eval_every", cfg.train.eval_every, 0)
    for m in cfg.train.eval_metrics:
        _choice("train.eval_metrics", m, METRIC_NAMES)
    _at_least("trainer.num_workers", cfg.trainer.num_workers, 1)
    _choice("trainer.scaling", cfg.trainer.scaling, SCALINGS)
    _at_least("trainer.min_workers", cfg.trainer.min_workers, 0)
    if cfg.trainer.min_workers > cfg.trainer.num_workers:
        raise ConfigError(f"trainer.min_workers: {cfg.trainer.min_workers} is out of range; it must be at most "
                          f"trainer.num_workers ({cfg.trainer.num_workers}), or 0 for a fixed worker group")
    _choice("trainer.grad_compression", cfg.trainer.grad_compression, GRAD_COMPRESSIONS)
    if cfg.trainer.accelerator_type is not None and not cfg.trainer.accelerator_type.strip():
        raise ConfigError("trainer.accelerator_type: empty; name a GPU type (A100, H100, A10G, ...) or leave it null")
    _at_least("trainer.cpus_per_worker", cfg.trainer.cpus_per_worker, 0, strict=True)
    _at_least("trainer.max_failures", cfg.trainer.max_failures, -1)
    bad_storage = check_storage_path("trainer.storage_path", cfg.trainer.storage_path)
    if bad_storage:
        raise ConfigError(bad_storage)
    if cfg.trainer.scaling == "strong":
        sizes = range(cfg.trainer.min_workers or cfg.trainer.num_workers, cfg.trainer.num_workers + 1)
        bad = [n for n in sizes if cfg.train.batch_size % n]
        if bad:
            raise ConfigError(
                f"train.batch_size: {cfg.train.batch_size} is the global batch under trainer.scaling=strong and must "
                f"be divisible by every worker count the run may have ({bad[0]} does not divide it; "
                f"trainer.num_workers {cfg.trainer.num_workers}, trainer.min_workers {cfg.trainer.min_workers}); "
                "use trainer.scaling=weak, or a batch divisible by each"
            )
    if cfg.uses_energy and cfg.buffer.size < cfg.train.batch_size:
        raise ConfigError(
            f"buffer.size: {cfg.buffer.size} must be at least train.batch_size ({cfg.train.batch_size})"
        )
    g = cfg.generate
    _choice("generate.mode", g.mode, GEN_MODES)
    _at_least("generate.n", g.n, 1)
    _choice("generate.pgd_norm", g.pgd_norm, ("linf", "l2"))
    _at_least("generate.pgd_eps", g.pgd_eps, 0)
    _at_least("generate.pgd_steps", g.pgd_steps, 1)
    _at_least("generate.pgd_step_size", g.pgd_step_size, 0)
    _between("generate.contrast", g.contrast, 0.0, 1.0)
    _choice("generate.contrast_center", g.contrast_center, CONTRAST_CENTERS)
    _choice("generate.bn_mode", g.bn_mode, ("eval", "train"))
    _validate_sampler("generate.sampler", g.sampler)
    _at_least("generate.batch_size", g.batch_size, 1)
    e = cfg.eval
    for m in e.metrics:
        _choice("eval.metrics", m, METRIC_NAMES)
    _at_least("eval.robust_eps", e.robust_eps, 0)
    _at_least("eval.robust_steps", e.robust_steps, 1)
    _at_least("eval.robust_step_size", e.robust_step_size, 0)
    _at_least("eval.robust_restarts", e.robust_restarts, 1)
    _at_least("eval.robust_max_samples", e.robust_max_samples, 1)
    _choice("eval.autoattack_version", e.autoattack_version, AUTOATTACK_VERSIONS)
    for a in e.autoattack_attacks:
        _choice("eval.autoattack_attacks", a, AUTOATTACK_ATTACKS)
    if len(set(e.autoattack_attacks)) != len(e.autoattack_attacks):
        raise ConfigError(f"eval.autoattack_attacks: {e.autoattack_attacks} repeats an attack; list each once")
    if e.autoattack_version == "custom" and not e.autoattack_attacks:
        raise ConfigError("eval.autoattack_attacks: empty, but eval.autoattack_version is custom; list one or more "
                          f"of {', '.join(AUTOATTACK_ATTACKS)}")
    _at_least("eval.autoattack_max_samples", e.autoattack_max_samples, 1)
    if not e.masking_eps_factors:
        raise ConfigError("eval.masking_eps_factors: empty; list one or more factors > 0 of eval.robust_eps")
    for f in e.masking_eps_factors:
        _at_least("eval.masking_eps_factors", f, 0, strict=True)
    _at_least("eval.ece_bins", e.ece_bins, 1)
    _at_least("eval.ebr_pseudo_count", e.ebr_pseudo_count, 0)
    _choice("eval.fid_extractor", e.fid_extractor, FID_EXTRACTORS)
    _choice("eval.fid_second_extractor", e.fid_second_extractor, SECOND_FID_EXTRACTORS)
    _at_least("eval.fid_samples", e.fid_samples, 2)
    if not e.ood_shifts:
        raise ConfigError(f"eval.ood_shifts: empty; list auto or one or more of {', '.join(OOD_SHIFTS)}")
    for name in e.ood_shifts:
        _choice("eval.ood_shifts", name, ("auto",) + OOD_SHIFTS)
        if name == cfg.data.name:
            raise ConfigError(f"eval.ood_shifts: {name!r} is the in-distribution dataset (data.name); choose another")
    if not e.ood_scores:
        raise ConfigError(f"eval.ood_scores: empty; list one or more of {', '.join(OOD_SCORES)}")
    for name in e.ood_scores:
        _choice("eval.ood_scores", name, OOD_SCORES)
    if "logsumexp" not in e.ood_scores:
        raise ConfigError("eval.ood_scores: must include logsumexp (ood_auroc, the headline figure, is its worst shift)")
    _at_least("eval.ood_samples", e.ood_samples, 1)
    _at_least("eval.prc_neighborhood", e.prc_neighborhood, 1)
    if not e.min_norm_runs:
        raise ConfigError(f"eval.min_norm_runs: empty; list one or more of {', '.join(MIN_NORM_RUNS)}")
    for r in e.min_norm_runs:
        _choice("eval.min_norm_runs", r, MIN_NORM_RUNS)
    _at_least("eval.min_norm_max_samples", e.min_norm_max_samples, 1)
    _at_least("eval.min_norm_outer_steps", e.min_norm_outer_steps, 1)
    _at_least("eval.min_norm_inner_steps", e.min_norm_inner_steps, 1)
    _at_least("eval.min_norm_targets", e.min_norm_targets, 0)
    if e.min_norm_mu is not None:
        _at_least("eval.min_norm_mu", e.min_norm_mu, 0, strict=True)
    if not 0 < e.min_norm_mu_decay <= 1:
        raise ConfigError(f"eval.min_norm_mu_decay: {e.min_norm_mu_decay!r} is out of range; it must be in (0, 1]")
    _choice("eval.min_norm_reference", e.min_norm_reference, MIN_NORM_REFERENCES)
    _at_least("eval.min_norm_reference_iterations", e.min_norm_reference_iterations, 1)
    _at_least("eval.min_norm_curve_points", e.min_norm_curve_points, 2)
    if not e.certify_methods:
        raise ConfigError(f"eval.certify_methods: empty; list one or more of {', '.join(CERTIFY_METHODS)}")
    for m in e.certify_methods:
        _choice("eval.certify_methods", m, CERTIFY_METHODS)
    _at_least("eval.certify_sigma", e.certify_sigma, 0, strict=True)
    _at_least("eval.certify_n0", e.certify_n0, 1)
    _at_least("eval.certify_n", e.certify_n, 1)
    if not 0 < e.certify_alpha < 1:
        raise ConfigError(f"eval.certify_alpha: {e.certify_alpha!r} is out of range; it must be in (0, 1)")
    if not e.certify_radii:
        raise ConfigError("eval.certify_radii: empty; list one or more radii >= 0 ([-1, 1] units)")
    for r in e.certify_radii:
        _at_least("eval.certify_radii", r, 0)
    _at_least("eval.certify_max_samples", e.certify_max_samples, 1)
    _at_least("eval.batch_size", e.batch_size, 1)


METRIC_NAMES = ("accuracy", "robust", "autoattack", "masking", "ece", "ebr", "min-norm", "certified", "fid", "is",
                "ood")


# ----------------------------------------------------------------------------------------------- loading


_REQUIRED = object()


def get_dotted(data: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """``data["a"]["b"]`` for ``key = "a.b"``; a missing key raises ``KeyError`` unless ``default`` is given."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _REQUIRED:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"attack.eps=0.3"`` → ``(["attack", "eps"], 0.3)``; the value is parsed as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value, e.g. attack.eps=0.3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: cannot parse value: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (unknown keys are caught by validation)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (configs live in tune_configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


# MLflow's own variables. Precedence: --set tracking.KEY > the variable > the config file > the default.
TRACKING_ENV = {"tracking_uri": "MLFLOW_TRACKING_URI", "registry_uri": "MLFLOW_REGISTRY_URI",
                "experiment": "MLFLOW_EXPERIMENT_NAME"}


def with_tracking_env(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` whose tracking keys are replaced by MLflow's environment variables where set."""
    import copy
    import os

    env = {key: os.environ[var] for key, var in TRACKING_ENV.items() if os.environ.get(var)}
    if not env:
        return data
    data = copy.deepcopy(data)
    tracking = data.get("tracking")
    if tracking is None:
        tracking = data["tracking"] = {}
    if not isinstance(tracking, dict):
        raise ConfigError(f"tracking: expected a mapping, got {type(tracking).__name__}")
    tracking.update(env)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (or the defaults), apply MLflow's environment variables, then ``overrides``, and validate."""
    data = read_yaml(path) if path is not None else {}
    return Config.from_dict(apply_overrides(with_tracking_env(data), overrides))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
