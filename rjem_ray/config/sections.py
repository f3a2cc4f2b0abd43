"""Every configuration key: one frozen dataclass per section, each field with its default and its
constraints (``setting(...)``, checked by ``schema.check``), each section's rules that involve two keys in its
``cross_check`` beside its fields, and :class:`Config`, the whole tree.

Units: every ε and step size is in the model's input space [-1, 1] (0.1 there is 12.75/255 on the usual
[0, 1] scale). How batch, learning rate, buffer and schedules follow ``trainer.num_workers`` is
``trainer.scaling`` (``rjem_ray/method/scaling.py``): under ``weak`` (the default) ``train.batch_size`` and
``buffer.size`` are per worker and ``optim.lr`` is scaled by ``optim.lr_scaling``; under ``strong`` they are
global and nothing is rescaled. Step-valued keys count reference steps of ``train.batch_size`` images.

Lists of allowed names live with the module that uses them (the datasets in core/data.py, the model norms
in method/models.py, the attack norms in method/attacks.py, ...); the lists below are the config's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..core.data import DATASETS
from ..core.storage import check_storage_path
from ..method.attacks import NORMS as ATTACK_NORMS
from ..method.ddp import GRAD_COMPRESSIONS
from ..method.gradreg import NORMS as GRADREG_NORMS
from ..method.models import NORMS as MODEL_NORMS
from ..method.scaling import LR_SCALINGS, SCALINGS
from ..robustness.autoattack import ATTACKS as AUTOATTACK_ATTACKS
from ..robustness.autoattack import VERSIONS as AUTOATTACK_VERSIONS
from ..robustness.minnorm import RUNS as MIN_NORM_RUNS
from .overrides import apply_overrides, apply_values
from .schema import ConfigError, build, check, setting

DATASET_NAMES = tuple(DATASETS)
MODES = ("classifier", "robust-classifier", "jempp", "robust-jem")
GEN_MODES = ("energy", "pgd", "combined")
METRIC_NAMES = ("accuracy", "robust", "autoattack", "masking", "ece", "ebr", "min-norm", "certified", "fid", "is",
                "ood")
FID_EXTRACTORS = ("auto", "inception", "reference-classifier", "robust-reference-classifier")
# OOD detection (rjem_ray/evaluation/ood.py describes each): synthetic shifts, then the datasets; scores
OOD_SHIFTS = ("uniform", "gaussian", "smooth", "constant", "photos", "inverted") + DATASET_NAMES
OOD_SCORES = ("logsumexp", "max_softmax", "grad_norm")
SWITCH = ("auto", "true", "false")  # an on/off key whose auto depends on the run; YAML true/false load as strings
# keys that were renamed: the unknown-key error names the new one
RENAMED_KEYS = {"eval.ood_dataset": "eval.ood_shifts (a list, e.g. [svhn] or [auto])"}


@dataclass(frozen=True)
class DataConfig:
    name: str = setting("mnist5k", choices=DATASET_NAMES)
    # holds the standard files (cifar-10-batches-py/, ...); not needed for mnist5k. Made absolute at load
    # (training workers and tune trials run in other working directories).
    data_dir: str | None = setting(None, path=True)
    download: bool = False  # fetch through torchvision first (connected machines only)
    augment: bool = True
    pad: int = setting(4, ge=0)  # reflect padding before the random crop, pixels
    noise_std: float = setting(0.03, ge=0)  # Gaussian noise on the normalised image, [-1, 1] units


def _six_n_plus_four(key: str, depth: int) -> str | None:
    if (depth - 4) % 6 != 0 or depth < 10:
        return f"{key}: {depth} is not allowed; it must be 6n+4 (10, 16, 22, 28, ...)"
    return None


@dataclass(frozen=True)
class ModelConfig:
    depth: int = setting(28, check=_six_n_plus_four)  # 6n + 4
    widen: int = setting(10, ge=1)
    # batch | group (GroupNorm: no batch or train/eval dependence) | none | farkas (no normalisation; Farkas
    # layers keep at least one unit of every activation's input >= 0 at every pixel; models.py)
    norm: str = setting("batch", choices=MODEL_NORMS)
    dropout: float = setting(0.0, ge=0.0, le=0.99)
    leak: float = setting(0.2, ge=0)  # LeakyReLU slope
    stem_stride: int = setting(1, choices=(1, 2))  # 2 halves the resolution after the first conv (cheap models)


@dataclass(frozen=True)
class OptimConfig:
    name: str = setting("sgd", choices=("sgd", "adam"))
    lr: float = setting(0.1, gt=0)  # weak scaling: for one worker's batch, times the lr rule; strong: global batch
    # weak scaling's learning-rate rule for N workers: linear (× N) | sqrt (× √N) | none | auto (linear for
    # sgd, sqrt for adam); rjem_ray/method/scaling.py
    lr_scaling: str = setting("auto", choices=LR_SCALINGS)
    momentum: float = setting(0.9, ge=0.0, le=1.0)
    weight_decay: float = setting(5e-4, ge=0)
    schedule: str = setting("cosine", choices=("constant", "cosine", "step"))
    warmup_steps: int = setting(0, ge=0)  # linear learning-rate warm-up, reference steps (scaling.py)
    milestones: list[float] = setting([0.5, 0.75], ge=0.0, le=1.0)  # fractions of train.steps (step schedule)
    gamma: float = setting(0.2, ge=0.0, le=1.0)  # step-schedule decay factor


@dataclass(frozen=True)
class AttackConfig:
    """PGD used for adversarial training (robust modes)."""

    norm: str = setting("linf", choices=ATTACK_NORMS)
    eps: float = setting(0.1, ge=0)  # [-1, 1] units
    step_size: float = setting(0.02, ge=0)  # [-1, 1] units
    steps: int = setting(15, ge=1)
    random_start: bool = True
    eps_warmup_steps: int = setting(0, ge=0)  # ε grows linearly from 0 over this many optimiser steps
    # BatchNorm statistics the training attack sees: eval (running statistics, the evaluated function) |
    # train (the batch's own statistics, the function the loss then trains; running statistics frozen)
    bn_mode: str = setting("eval", choices=("eval", "train"))


@dataclass(frozen=True)
class SamplerConfig:
    """Langevin sampler for the negative samples (and for energy generation)."""

    kind: str = setting("pyld", choices=("sgld", "pyld"))
    steps: int = setting(10, ge=1)  # SGLD steps, or PYLD outer steps m
    inner_steps: int = setting(5, ge=1)  # PYLD inner steps n (ignored by SGLD)
    step_size: float = setting(0.2, gt=0)  # PYLD lr, or SGLD lr, [-1, 1] units per unit gradient
    noise_std: float = setting(0.01, ge=0)  # SGLD noise std, [-1, 1] units (PYLD adds none)
    # PYLD only: a plain gradient step x += outer_step_size · ∂(−E)/∂x before each outer step's inner
    # steps ([-1, 1] units per unit gradient). JEM++'s public code has both variants: 0 (inner steps
    # only) and 1.0 (its sgld_lr); 0 is the default here.
    outer_step_size: float = setting(0.0, ge=0)


@dataclass(frozen=True)
class BufferConfig:
    size: int = setting(10000, ge=1)  # slots per worker under weak scaling; of the whole buffer under strong
    reinit_freq: float = setting(0.05, ge=0.0, le=1.0)
    # Of the fresh chains (reinit_freq), the fraction that starts from uniform noise on [-1, 1] instead of the
    # Gaussian mixture (JEM starts every chain from noise, JEM++ none): negatives that also visit noise teach
    # the energy to rank it below data (docs/RESULTS.md "An energy that is also a density").
    noise_init: float = setting(0.0, ge=0.0, le=1.0)
    gmm_max_mb: int = setting(256, ge=1)  # memory bound for the class-conditional Gaussian mixture factors
    # Where each worker's slots live (rjem_ray/distributed/buffer_actor.py): true = in a shard actor the worker
    # creates on its own node (survives the worker's process; draws reinitialisations off the step); false =
    # inside the worker process; auto = true when trainer.num_workers > 1. YAML true/false load as "true"/"false".
    shared: str = setting("auto", choices=SWITCH, bools=True)

    def is_shared(self, num_workers: int) -> bool:
        """Whether ``num_workers`` training workers use the shared (actor-sharded) buffer."""
        return self.shared == "true" or (self.shared == "auto" and num_workers > 1)

    def cross_check(self, cfg: Config) -> None:
        if cfg.uses_energy and self.size < cfg.train.batch_size:
            raise ConfigError(f"buffer.size: {self.size} must be at least train.batch_size ({cfg.train.batch_size})")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = setting("robust-jem", choices=MODES)
    # reference steps of batch_size images (weak scaling: N per optimiser step on N workers)
    steps: int = setting(1000, ge=1)
    batch_size: int = setting(64, ge=1)  # weak scaling: per worker; strong: global, split evenly across workers
    energy_weight: float = setting(1.0, ge=0)  # w_px
    energy_l2: float = setting(0.0, ge=0)  # weight of (E(x_pos)^2 + E(x_q)^2).mean()
    divergence_threshold: float = setting(1e8, gt=0)  # |loss| above this (or non-finite) counts as divergence
    max_rollbacks: int = setting(3, ge=0)  # divergences rolled back to the last good checkpoint before the run stops
    rollback_lr_factor: float = setting(0.5, ge=0.0, le=1.0)  # learning rate multiplier applied at each rollback
    # BatchNorm statistics of the sampler's passes AND of the loss's view of x_q (one choice for both, so
    # the loss raises the energy the sampler lowered; running statistics never updated by x_q):
    # train (default) = the negative batch's own statistics; eval = running statistics. See method/batchnorm.py.
    sampler_bn_mode: str = setting("train", choices=("train", "eval"))
    # which training passes update BatchNorm's running statistics (what evaluation, PGD in eval mode and
    # generation normalise with): classification (default) = only the classification batch x_cls (x_adv in
    # robust modes) | classification+positive = x_cls and the clean positive batch x_pos of robust-jem (the
    # earlier behaviour: running statistics then average two distributions; docs/RESULTS.md). method/loss.py
    bn_running_stats: str = setting("classification", choices=("classification", "classification+positive"))
    # autocast of the network's passes (rjem_ray/method/speed.py): auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16;
    # weights, optimiser state, images and Langevin iterates stay fp32 in every case
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"))
    # NHWC memory layout / torch.compile of the network used by every pass: auto (on for CUDA) | true | false
    channels_last: str = setting("auto", choices=SWITCH, bools=True)
    compile: str = setting("auto", choices=SWITCH, bools=True)
    # PGD and sampler steps share one forward/backward of the concatenated batch; applies only with
    # attack.bn_mode = eval and sampler_bn_mode = eval (samples then independent; method/batchnorm.py)
    fuse_passes: bool = True
    # robust modes' classification term: pgd (CE at PGD's x_adv, the attack.* keys) | gradreg (CE at the
    # clean x + gradreg_strength * mean ||grad_x CE||_*^2 by finite differences, no PGD; rjem_ray/method/gradreg.py)
    robust_term: str = setting("pgd", choices=("pgd", "gradreg"))
    # lambda, in ([-1, 1] unit)^2 so that the penalty is a loss (1.0 stalled the demo)
    gradreg_strength: float = setting(0.01, ge=0)
    # finite-difference step h, [-1, 1] units (L-inf: per pixel; L2: per image)
    gradreg_step: float = setting(0.01, gt=0)
    # attack norm defended against; penalises its dual gradient norm (linf: L1, l2: L2)
    gradreg_norm: str = setting("linf", choices=GRADREG_NORMS)
    log_every: int = setting(20, ge=1)
    checkpoint_every: int = setting(200, ge=1)
    eval_every: int = setting(0, ge=0)  # evaluate eval_metrics on rank 0 every N steps and report them (0: never)
    eval_metrics: list[str] = setting(["fid"], choices=METRIC_NAMES)
    seed: int = 0


def _named_gpu_type(key: str, value: str | None) -> str | None:
    if value is not None and not value.strip():
        return f"{key}: empty; name a GPU type (A100, H100, A10G, ...) or leave it null"
    return None


@dataclass(frozen=True)
class TrainerConfig:
    num_workers: int = setting(1, ge=1)
    # weak (batch_size and buffer.size per worker, lr scaled by optim.lr_scaling) | strong (global batch);
    # rjem_ray/method/scaling.py
    scaling: str = setting("weak", choices=SCALINGS)
    # elastic training (Ray Train's num_workers=(min, max)): > 0 lets a run continue on as few as this many
    # workers when nodes are lost, and grow back up to num_workers; 0 = a fixed worker group
    min_workers: int = setting(0, ge=0)
    # one GPU type per DDP job: Ray's accelerator type (A100, H100, A10G, ...) every worker must run on; None: any
    accelerator_type: str | None = setting(None, check=_named_gpu_type)
    # DDP gradient all-reduce: none (fp32) | bf16 (compressed to bfloat16, half the bytes; torch's bf16 hook)
    grad_compression: str = setting("none", choices=GRAD_COMPRESSIONS)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = setting(1.0, gt=0)
    sync_batchnorm: bool = False
    max_failures: int = setting(0, ge=-1)
    # Where Ray keeps the run's checkpoints (and a sweep's Tune state): None = OUT/ray; a directory, or a URI
    # such as s3://bucket/prefix (rjem_ray/core/storage.py). One run per storage path: rerunning continues it.
    storage_path: str | None = setting(None, check=check_storage_path)

    def cross_check(self, cfg: Config) -> None:
        if self.min_workers > self.num_workers:
            raise ConfigError(f"trainer.min_workers: {self.min_workers} is out of range; it must be at most "
                              f"trainer.num_workers ({self.num_workers}), or 0 for a fixed worker group")
        if self.scaling == "strong":
            batch = cfg.train.batch_size
            bad = [n for n in range(self.min_workers or self.num_workers, self.num_workers + 1) if batch % n]
            if bad:
                raise ConfigError(
                    f"train.batch_size: {batch} is the global batch under trainer.scaling=strong and must be "
                    f"divisible by every worker count the run may have ({bad[0]} does not divide it; "
                    f"trainer.num_workers {self.num_workers}, trainer.min_workers {self.min_workers}); "
                    "use trainer.scaling=weak, or a batch divisible by each"
                )


@dataclass(frozen=True)
class GenerateConfig:
    """Inference-time generation (the paper's three modes)."""

    mode: str = setting("combined", choices=GEN_MODES)
    n: int = setting(100, ge=1)
    conditional: bool = True  # E(x, c) for a requested class; False samples E(x)
    # targeted-PGD ball: linf (the paper: sign steps, budget per pixel) | l2 (normalised-gradient steps,
    # budget per image: the change goes where the gradient is, not to every pixel alike); generate.py
    pgd_norm: str = setting("linf", choices=ATTACK_NORMS)
    pgd_eps: float = setting(0.5, ge=0)  # targeted-PGD budget, [-1, 1] units (per pixel for linf, per image for l2)
    pgd_steps: int = setting(40, ge=1)
    pgd_step_size: float = setting(0.05, ge=0)
    contrast: float = setting(0.7, ge=0.0, le=1.0)  # κ: x ← m + κ (x − m) before Langevin (combined mode)
    # m: floor (−1: black stays black, strokes dim) | class-mean (μ_c of the prior) | image-mean (x̄); generate.py
    contrast_center: str = setting("floor", choices=("floor", "class-mean", "image-mean"))
    # BatchNorm while generating: eval (running statistics) | train (the generated batch's statistics,
    # running statistics frozen: the training sampler's view under train.sampler_bn_mode = train); generate.py
    bn_mode: str = setting("eval", choices=("eval", "train"))
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=50, inner_steps=5, step_size=0.2))
    batch_size: int = setting(100, ge=1)


def _each_once(key: str, attacks: list[str]) -> str | None:
    return f"{key}: {attacks} repeats an attack; list each once" if len(set(attacks)) != len(attacks) else None


def _has_logsumexp(key: str, scores: list[str]) -> str | None:
    if "logsumexp" in scores:
        return None
    return f"{key}: must include logsumexp (ood_auroc, the headline figure, is its worst shift)"


@dataclass(frozen=True)
class EvalConfig:
    # robust = PGD (pgd_robust_accuracy, a cheap signal); autoattack = robust_accuracy (the reported figure)
    metrics: list[str] = setting(["accuracy", "robust", "autoattack", "ece", "fid", "is", "ood"], choices=METRIC_NAMES)
    robust_eps: float = setting(0.1, ge=0)  # [-1, 1] units; the evaluation ε of PGD, AutoAttack and the masking report
    robust_steps: int = setting(20, ge=1)
    robust_step_size: float | None = setting(None, ge=0)  # None: 2.5 ε / steps
    robust_restarts: int = setting(1, ge=1)
    robust_max_samples: int = setting(1000, ge=1)
    # standard (APGD-CE, APGD-T, FAB-T, Square) | custom
    autoattack_version: str = setting("standard", choices=AUTOATTACK_VERSIONS)
    # used with custom
    autoattack_attacks: list[str] = setting(["apgd-ce", "apgd-t"], choices=AUTOATTACK_ATTACKS, check=_each_once)
    autoattack_max_samples: int = setting(1000, ge=1)  # a seeded random subset when below the test size
    masking_eps_factors: list[float] = setting(  # PGD grid, × robust_eps
        [0.5, 1.0, 2.0, 4.0], gt=0, nonempty="list one or more factors > 0 of eval.robust_eps")
    ece_bins: int = setting(20, ge=1)  # equal-width confidence bins of ECE and of E[BR]'s histogram
    ebr_pseudo_count: float = setting(1.0, ge=0)  # E[BR]: added to each bin's correct and wrong counts (1 = Laplace)
    # auto: inception for natural images, reference-classifier for digits
    fid_extractor: str = setting("auto", choices=FID_EXTRACTORS)
    # FID/KID of the same samples in a second feature space, reported as fid_2/kid_2 beside fid/kid.
    # auto: robust-reference-classifier (an adversarially trained reference; measured: a plain classifier's targeted
    # PGD still lowers its FID below the seeds', docs/RESULTS.md) where fid_extractor is the
    # plain reference-classifier, none otherwise.
    fid_second_extractor: str = setting("auto", choices=("auto", "none") + FID_EXTRACTORS[1:])
    fid_samples: int = setting(1000, ge=2)
    inception_weights: str | None = None  # local Inception weights for offline clusters
    # OOD detection (rjem_ray/evaluation/ood.py): the test split against each shift, AUROC per score; auto = the
    # dataset's suite (ood.DEFAULT_SHIFTS). ood_auroc, the headline, is the worst shift under the logsumexp score.
    ood_shifts: list[str] = setting(["auto"], choices=("auto",) + OOD_SHIFTS,
                                    nonempty=f"list auto or one or more of {', '.join(OOD_SHIFTS)}")
    ood_scores: list[str] = setting(list(OOD_SCORES), choices=OOD_SCORES, nonempty=True, check=_has_logsumexp)
    ood_samples: int = setting(1000, ge=1)  # images per shift (at most the test split's size for `inverted`)
    # precision / recall (Kynkäänniemi et al. 2019, torch-fidelity's) of the FID samples against as many training
    # images drawn at random (seed 0), k-th nearest neighbour radii, in the FID's first feature space
    prc_neighborhood: int = setting(3, ge=1)
    # min-norm (rjem_ray/robustness/minnorm.py): per-image minimum-norm perturbations on a seeded subset; distances in
    # [-1, 1] units (L0: changed pixels); the curve and the plot also give them on the [0, 1] scale
    min_norm_runs: list[str] = setting(list(MIN_NORM_RUNS), choices=MIN_NORM_RUNS, nonempty=True)
    min_norm_max_samples: int = setting(100, ge=1)
    min_norm_outer_steps: int = setting(10, ge=1)  # barrier weights mu, mu*decay, ...
    min_norm_inner_steps: int = setting(20, ge=1)  # feasible steps per barrier weight
    # first barrier weight, unitless (relative to the start's distance); None: per norm, minnorm.MU_DEFAULT
    # (3 for L1/L2/L∞, 0.3 for L0: measured on the demo checkpoint); a number applies to every run
    min_norm_mu: float | None = setting(None, gt=0)
    min_norm_mu_decay: float = setting(0.5, gt=0, le=1)
    # the barrier also runs from a targeted start toward each of this many most likely wrong classes, keeping
    # the closest result (1 + targets runs per image; 0: the untargeted start only); rjem_ray/robustness/minnorm.py
    min_norm_targets: int = setting(3, ge=0)
    min_norm_reference: str = setting("fab", choices=("fab", "none"))  # fab (pyautoattack's FAB, L1/L2/Linf) | none
    min_norm_reference_iterations: int = setting(100, ge=1)
    min_norm_curve_points: int = setting(21, ge=2)  # eps grid of the robust-accuracy curve, 0 .. the largest distance
    # certified (rjem_ray/robustness/certify.py): L2 certificates; sigma and radii in [-1, 1] units (halve for [0, 1])
    certify_methods: list[str] = setting(["smoothing", "gaussian-average"], choices=("smoothing", "gaussian-average"),
                                         nonempty=True)
    certify_sigma: float = setting(0.5, gt=0)  # Gaussian noise std of the smoothed classifier (0.25 on [0, 1])
    certify_n0: int = setting(100, ge=1)  # noisy copies that choose the class
    certify_n: int = setting(1000, ge=1)  # noisy copies that bound its probability (Cohen et al. use 100,000)
    certify_alpha: float = setting(0.001, gt=0, lt=1)  # the certificate is wrong with probability at most alpha
    certify_radii: list[float] = setting([0.0, 0.25, 0.5, 1.0, 1.5, 2.0], ge=0,
                                         nonempty="list one or more radii >= 0 ([-1, 1] units)")
    certify_max_samples: int = setting(100, ge=1)
    # where min-norm writes min_norm.png and min_norm_distances.csv; None: PARENT/eval-NAME beside the checkpoint
    # PARENT/NAME (rjem eval also logs them to its MLflow run, under eval/)
    artifact_dir: str | None = None
    batch_size: int = setting(256, ge=1)

    def cross_check(self, cfg: Config) -> None:
        if self.autoattack_version == "custom" and not self.autoattack_attacks:
            raise ConfigError("eval.autoattack_attacks: empty, but eval.autoattack_version is custom; list one or more "
                              f"of {', '.join(AUTOATTACK_ATTACKS)}")
        if cfg.data.name in self.ood_shifts:
            raise ConfigError(f"eval.ood_shifts: {cfg.data.name!r} is the in-distribution dataset (data.name); "
                              "choose another")


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are resolved against the working dir
    registry_uri: str = ""  # the model registry's store; "" = the tracking store
    experiment: str = "rjem"
    artifact_location: str = "mlartifacts"
    run_name: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    name: str = "experiment"
    # GMM statistics, reference classifiers, FID reference statistics; made absolute at load
    cache_dir: str = setting(".rjem_cache", path=True)
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
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """The validated config of the mapping ``data`` (missing keys: the defaults; paths made absolute)."""
        cfg = build(cls, data, "", RENAMED_KEYS)
        check(cfg)
        return cfg

    def override(self, overrides: Iterable[str] | None) -> Config:
        """A new, validated config with ``--set`` items applied: ``cfg.override(["train.steps=10"])``."""
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))

    def replace(self, changes: Mapping[str, Any] | None = None, /, **top_level: Any) -> Config:
        """A new, validated config with dotted keys set to Python values: ``cfg.replace({"train.steps": 10})``,
        ``cfg.replace(name="best")``; a mapping value replaces a whole section."""
        return Config.from_dict(apply_values(self.to_dict(), {**(changes or {}), **top_level}))

    @property
    def robust(self) -> bool:
        return self.train.mode in ("robust-classifier", "robust-jem")

    @property
    def uses_energy(self) -> bool:
        return self.train.mode in ("jempp", "robust-jem")
