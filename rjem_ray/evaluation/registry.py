"""The metrics of ``rjem eval``, one object per ``--metrics`` name, in the order they are computed.

:data:`METRICS` fixes the order (it fixes which images and random draws each metric sees: AutoAttack runs
before the masking report, which compares against it; the generation metrics run last), whatever the order of
``--metrics``. To add a metric: a :class:`~rjem_ray.evaluation.metric_base.Metric` subclass (its ``name``,
``protocol_key``, ``config_keys`` and ``run``; its docstring says what it measures, its protocol and units) in
the module of its kind, its instance in :data:`METRICS` where it should run, and its name in
:data:`METRIC_NAMES` (which validates ``eval.metrics`` and ``train.eval_metrics``).

:class:`EvalConfig` is the ``eval.*`` section of the config: the settings of these metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.settings import ConfigError, check_choice, setting
from ..robustness.autoattack import ATTACKS as AUTOATTACK_ATTACKS
from ..robustness.autoattack import VERSIONS as AUTOATTACK_VERSIONS
from ..robustness.minnorm import RUNS as MIN_NORM_RUNS
from .classification_metrics import Accuracy, ExpectedBayesRatio, ExpectedCalibrationError
from .generation_metrics import FID_EXTRACTORS, FrechetInceptionDistance, InceptionScore
from .metric_base import Metric
from .ood import SCORE_NAMES as OOD_SCORES
from .ood import SHIFT_NAMES as OOD_SHIFTS
from .ood import OODDetection
from .robust_metrics import AutoAttackRobustAccuracy, Certified, GradientMasking, MinimumNorm, PGDRobustAccuracy

if TYPE_CHECKING:
    from ..config import Config

METRICS: tuple[Metric, ...] = (
    Accuracy(), ExpectedCalibrationError(), ExpectedBayesRatio(),
    PGDRobustAccuracy(), AutoAttackRobustAccuracy(), GradientMasking(), MinimumNorm(), Certified(),
    OODDetection(),
    FrechetInceptionDistance(), InceptionScore(),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
# the names eval.metrics and train.eval_metrics take, in the order error messages list them
METRIC_NAMES = ("accuracy", "robust", "autoattack", "masking", "ece", "ebr", "min-norm", "certified", "fid", "is",
                "ood")
assert set(METRIC_NAMES) == set(BY_NAME), "METRIC_NAMES must name each registered metric once"


def check_metric_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as a list, or a ConfigError naming the first one that is not a metric and the allowed ones."""
    for name in names:
        if name not in BY_NAME:
            raise ConfigError(f"--metrics: {name!r} is not a metric; choose from {', '.join(METRIC_NAMES)}")
    return list(names)


def selected(names: list[str] | tuple[str, ...]) -> list[Metric]:
    """The metrics named in ``names`` (checked), in the order they are computed."""
    wanted = set(check_metric_names(names))
    return [m for m in METRICS if m.name in wanted]


def _each_once(key: str, attacks: list[str]) -> str | None:
    return f"{key}: {attacks} repeats an attack; list each once" if len(set(attacks)) != len(attacks) else None


def _has_logsumexp(key: str, scores: list[str]) -> str | None:
    if "logsumexp" in scores:
        return None
    return f"{key}: must include logsumexp (ood_auroc, the headline figure, is its worst shift)"


@dataclass(frozen=True)
class EvalConfig:
    """The ``eval.*`` section: the settings of the metrics in :data:`METRICS` (each metric lists the keys it
    reads in its ``config_keys``)."""

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
        for name in cfg.train.eval_metrics:  # the training loop's periodic evaluation runs these metrics
            check_choice("train.eval_metrics", name, METRIC_NAMES)
        if self.autoattack_version == "custom" and not self.autoattack_attacks:
            raise ConfigError("eval.autoattack_attacks: empty, but eval.autoattack_version is custom; list one or more "
                              f"of {', '.join(AUTOATTACK_ATTACKS)}")
        if cfg.data.name in self.ood_shifts:
            raise ConfigError(f"eval.ood_shifts: {cfg.data.name!r} is the in-distribution dataset (data.name); "
                              "choose another")
