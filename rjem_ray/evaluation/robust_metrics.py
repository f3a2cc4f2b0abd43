"""The robustness metrics of ``rjem eval``: ``robust``, ``autoattack``, ``masking``, ``min-norm``, ``certified``.

Every distance is in the model's input space [-1, 1] and, in every protocol, on the [0, 1] pixel scale too
(half of it). Each metric runs on a seeded random subset of the test split (``EvalContext.subset``: one
permutation per seed, so metrics of equal sizes share their images).

``robust``, ``autoattack`` and ``masking`` attack in the evaluation's one threat model
(``rjem_ray/evaluation/threat.py``: the norm ball of radius ε and its PGD). The reported robust accuracy is
AutoAttack's (``robust_accuracy``, ``rjem_ray/robustness/autoattack.py``), the figure the field accepts;
``pgd_robust_accuracy`` is our PGD, a cheap signal that overstates robustness when gradients are masked;
``masking`` holds the gradient-masking report (``rjem_ray/evaluation/masking.py``) and its warnings.
``min-norm`` measures each image's smallest adversarial perturbation per norm (``rjem_ray/robustness/minnorm.py``),
``certified`` the L2 certificates of randomized smoothing and Gaussian averaging (``rjem_ray/robustness/certify.py``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.data import dataset_info
from ..robustness.autoattack import FAB_NORMS, autoattack_robust, fab_min_norm
from ..robustness.certify import certified_report
from ..robustness.minnorm import MU_DEFAULT, min_norm_report, robust_curve
from .masking import masking_report
from .metric_base import Metric, MetricResult
from .metrics import robust_accuracy

if TYPE_CHECKING:
    from .metric_base import EvalContext


class PGDRobustAccuracy(Metric):
    """``robust`` → ``pgd_robust_accuracy``: the fraction in [0, 1] of ``eval.robust_max_samples`` test images
    classified correctly on the clean input and after every restart of untargeted PGD with random start in
    the threat model's ball (its steps, step size and restarts). A cheap signal (and the training-time one),
    not the reported robust accuracy. Protocol: the attack, norm, ε on both scales, steps, step size,
    restarts, the images."""

    name = "robust"
    protocol_key = "pgd_robust_accuracy"
    config_keys = ("eval.robust_eps", "eval.robust_steps", "eval.robust_step_size", "eval.robust_restarts",
                   "eval.robust_max_samples")

    def run(self, ctx: EvalContext) -> MetricResult:
        t, e = ctx.threat, ctx.cfg.eval
        g = torch.Generator().manual_seed(ctx.seed)
        sub, how = ctx.subset(e.robust_max_samples)
        n = len(sub)
        ctx.progress(f"PGD robust accuracy: PGD-{t.pgd_steps} at eps {t.eps} on {n} images")
        acc = robust_accuracy(ctx.model, ctx.x[sub], ctx.y[sub], eps=t.eps, steps=t.pgd_steps,
                              step_size=t.pgd_step_size, norm=t.norm, restarts=t.pgd_restarts,
                              batch_size=ctx.batch_size, generator=g)
        return MetricResult({"pgd_robust_accuracy": acc}, {
            "attack": "PGD, untargeted, random start", **t.describe(), "steps": t.pgd_steps,
            "step_size": t.pgd_step_size, "restarts": t.pgd_restarts, "num_samples": n, "subset": how,
        })


def _autoattack_images(ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The ``eval.autoattack_max_samples`` images AutoAttack and the masking report share: ``(x, y, how)``."""
    def draw():
        sub, how = ctx.subset(ctx.cfg.eval.autoattack_max_samples)
        return ctx.x[sub], ctx.y[sub], how

    return ctx.once("autoattack_images", draw)


class AutoAttackRobustAccuracy(Metric):
    """``autoattack`` → ``robust_accuracy``: the fraction in [0, 1] of ``eval.autoattack_max_samples`` test
    images that survive AutoAttack (Croce & Hein 2020, ``eval.autoattack_version``: standard = APGD-CE,
    APGD-T, FAB-T, Square; custom = ``eval.autoattack_attacks``) in the threat model's ball. Protocol: the
    library and its version, the attacks and their settings, ε on both scales, the images, the accuracy
    left after each attack, the library's warnings (``autoattack.autoattack_robust``)."""

    name = "autoattack"
    protocol_key = "robust_accuracy"
    config_keys = ("eval.robust_eps", "eval.autoattack_max_samples", "eval.autoattack_version",
                   "eval.autoattack_attacks")

    def run(self, ctx: EvalContext) -> MetricResult:
        t, e = ctx.threat, ctx.cfg.eval
        x, y, how = _autoattack_images(ctx)
        attacks = e.autoattack_attacks if e.autoattack_version == "custom" else None
        ctx.progress(f"robust accuracy: AutoAttack ({e.autoattack_version}) at eps {t.eps} on {len(y)} images")
        result = autoattack_robust(ctx.model, x, y, eps=t.eps, norm=t.norm, version=e.autoattack_version,
                                   attacks=attacks, seed=ctx.seed, batch_size=ctx.batch_size, subset=how,
                                   progress=ctx.progress)
        ctx.shared["autoattack"] = result  # the masking report compares against it
        return MetricResult({"robust_accuracy": result[0].double().mean().item()}, result[1])


class GradientMasking(Metric):
    """``masking``: the gradient-masking report (``masking.masking_report``) on AutoAttack's images in the
    threat model's ball: PGD accuracy over ε × ``eval.masking_eps_factors`` and at the full input range,
    Square against the white-box attacks, the PGD–AutoAttack gap (against ``autoattack``'s result when it
    ran too), accuracies as fractions in [0, 1], and one warning per symptom found. The report is its own
    protocol (``masking.subset`` names the images)."""

    name = "masking"
    config_keys = ("eval.robust_eps", "eval.robust_steps", "eval.robust_restarts", "eval.autoattack_max_samples",
                   "eval.masking_eps_factors")

    def run(self, ctx: EvalContext) -> MetricResult:
        t = ctx.threat
        x, y, how = _autoattack_images(ctx)
        report = masking_report(ctx.model, x, y, eps=t.eps, norm=t.norm, eps_factors=ctx.cfg.eval.masking_eps_factors,
                                pgd_steps=t.pgd_steps, pgd_restarts=t.pgd_restarts,
                                autoattack=ctx.shared.get("autoattack"), seed=ctx.seed, batch_size=ctx.batch_size,
                                progress=ctx.progress)
        report["subset"] = how
        return MetricResult({"masking": report})


class MinimumNorm(Metric):
    """``min-norm`` → ``min_norm``: per run of ``eval.min_norm_runs`` (LogBarrier / ProxLogBarrier, one norm
    each) the per-image minimum-norm adversarial distances on ``eval.min_norm_max_samples`` test images, their
    median over the broken images and the robust-accuracy curve against ε, FAB (pyautoattack) as the reference
    where ``eval.min_norm_reference`` is fab. L1/L2/L∞ distances in [-1, 1] units (suffix ``_01``: [0, 1]),
    L0 in changed pixels. Also flat ``min_norm_median_<run>`` figures (train.eval_metrics and MLflow keep
    numbers only). Protocol: the attacks and their settings, the images, units; with an artifact folder,
    ``min_norm.png`` and ``min_norm_distances.csv`` there (``files``)."""

    name = "min-norm"
    protocol_key = "min_norm"
    config_keys = ("eval.min_norm_runs", "eval.min_norm_max_samples", "eval.min_norm_outer_steps",
                   "eval.min_norm_inner_steps", "eval.min_norm_mu", "eval.min_norm_mu_decay", "eval.min_norm_targets",
                   "eval.min_norm_reference", "eval.min_norm_reference_iterations", "eval.min_norm_curve_points",
                   "eval.artifact_dir")

    def run(self, ctx: EvalContext) -> MetricResult:
        e = ctx.cfg.eval
        sub, how = ctx.subset(e.min_norm_max_samples)
        xs, ys = ctx.x[sub], ctx.y[sub]
        reference = None
        if e.min_norm_reference == "fab":
            def reference(norm):
                if norm not in FAB_NORMS:
                    return None
                ctx.progress(f"min-norm reference: FAB {norm} on {len(ys)} images")
                return fab_min_norm(ctx.model, xs, ys, norm=norm, iterations=e.min_norm_reference_iterations,
                                    seed=ctx.seed, batch_size=ctx.batch_size)
        runs = min_norm_report(
            ctx.model, xs, ys, runs=e.min_norm_runs, outer_steps=e.min_norm_outer_steps,
            inner_steps=e.min_norm_inner_steps, mu=e.min_norm_mu, mu_decay=e.min_norm_mu_decay,
            targets=e.min_norm_targets, curve_points=e.min_norm_curve_points, batch_size=ctx.batch_size,
            seed=ctx.seed, reference=reference, progress=ctx.progress,
        )
        protocol = {
            "attacks": "LogBarrier (Finlay et al. 2019), ProxLogBarrier (Pooladian et al. 2019); "
                       "rjem_ray/robustness/minnorm.py",
            "runs": list(e.min_norm_runs), "outer_steps": e.min_norm_outer_steps, "inner_steps": e.min_norm_inner_steps,
            "mu": e.min_norm_mu if e.min_norm_mu is not None else {"per norm": dict(MU_DEFAULT)},
            "mu_decay": e.min_norm_mu_decay,
            "targets": e.min_norm_targets, "starts": "the untargeted start (noise / margin ascent, bisected) and a "
                       "targeted margin-ascent start toward each of the `targets` most likely wrong classes; the "
                       "closest result kept; L0's ascent moves the 1 % of entries of largest gradient (sparse), the "
                       "others' are L2 / sign steps",
            "num_samples": len(ys), "subset": how, "seed": ctx.seed,
            "test_indices": sub.cpu().tolist(), "labels": ys.cpu().tolist(),
            "units": "L1/L2/Linf distances in the model's [-1, 1] space (fields without suffix) and on the [0, 1] "
                     "scale (suffix _01, half); L0 counts changed pixels (any channel) on both",
            "median_over": "images the attack broke (finite, non-zero distance)",
            "reference": e.min_norm_reference,
        }
        if ctx.artifact_dir is not None:
            protocol["files"] = write_min_norm_artifacts(runs, protocol, Path(ctx.artifact_dir))
        figures = {"min_norm": runs}
        for run, r in runs.items():  # flat scalars beside the block, for train.eval_metrics / MLflow
            if r["median"] is not None:
                figures[f"min_norm_median_{run.replace('-', '_')}"] = r["median"]
        return MetricResult(figures, protocol)


def write_min_norm_artifacts(runs: dict, protocol: dict, directory: Path) -> list[str]:
    """``min_norm.png`` (robust accuracy vs ε on the [0, 1] scale, one panel per norm, FAB dashed) and
    ``min_norm_distances.csv`` (one row per image: test index, label, each run's distance in [-1, 1] units)."""
    import matplotlib  # lazy: matplotlib (~0.5 s), only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg") above

    directory.mkdir(parents=True, exist_ok=True)
    norms = list(dict.fromkeys(r["norm"] for r in runs.values()))
    fig, axes = plt.subplots(1, len(norms), figsize=(4 * len(norms), 3.2), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for name, r in runs.items():
            if r["norm"] != norm:
                continue
            ax.plot(r["curve"]["eps_01"], r["curve"]["robust_accuracy"], label=r["attack"])
            if "reference_distances" in r and not any("FAB" in line.get_label() for line in ax.lines):
                d = torch.tensor([math.inf if v is None else v for v in r["reference_distances"]])
                ax.plot(r["curve"]["eps_01"], robust_curve(d, r["curve"]["eps"]), "--", label="FAB (pyautoattack)")
        ax.set_xlabel("ε, changed pixels" if norm == "l0" else f"ε ({norm}, [0, 1] scale)")
        ax.set_ylabel("robust accuracy (upper bound)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle(f"minimum-norm attacks, {protocol['num_samples']} images", fontsize=9)
    fig.tight_layout()
    png = directory / "min_norm.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    path = directory / "min_norm_distances.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_index", "label"] + list(runs))
        cols = [r["distances"] for r in runs.values()]
        for i, (idx, lab) in enumerate(zip(protocol["test_indices"], protocol["labels"])):
            w.writerow([idx, lab] + ["inf" if c[i] is None else c[i] for c in cols])
    return [str(png), str(path)]


class Certified(Metric):
    """``certified``: per method of ``eval.certify_methods`` the certified accuracy (a fraction in [0, 1]) at
    each L2 radius of ``eval.certify_radii`` on ``eval.certify_max_samples`` test images: randomized smoothing
    (Cohen et al. 2019, CERTIFY with ``eval.certify_n0`` / ``eval.certify_n`` noisy copies at ``eval.certify_sigma``,
    confidence 1 − ``eval.certify_alpha``) and the one-evaluation Gaussian-average radius. σ and radii in
    [-1, 1] units (``*_01``: [0, 1]). Not the threat model's ball: an L2 certificate by construction. Also
    flat ``certified_accuracy_<method>_r<radius>`` figures. Protocol: both methods, σ, the images."""

    name = "certified"
    protocol_key = "certified"
    config_keys = ("eval.certify_methods", "eval.certify_sigma", "eval.certify_n0", "eval.certify_n",
                   "eval.certify_alpha", "eval.certify_radii", "eval.certify_max_samples")

    def run(self, ctx: EvalContext) -> MetricResult:
        e = ctx.cfg.eval
        sub, how = ctx.subset(e.certify_max_samples)
        report = certified_report(
            ctx.model, ctx.x[sub], ctx.y[sub], sigma=e.certify_sigma, n0=e.certify_n0, n=e.certify_n,
            alpha=e.certify_alpha, radii=e.certify_radii, methods=e.certify_methods,
            num_classes=dataset_info(ctx.cfg.data.name).num_classes, batch_size=ctx.batch_size, seed=ctx.seed,
            progress=ctx.progress,
        )
        figures = {"certified": report}
        for method, block in report.items():  # flat scalars, as for min-norm
            for r, acc in zip(block["radii"], block["certified_accuracy"]):
                figures[f"certified_accuracy_{method}_r{r:g}"] = acc
        return MetricResult(figures, {
            "norm": "l2", "sigma": e.certify_sigma, "sigma_01": e.certify_sigma / 2,
            "units": "sigma and radii in the model's [-1, 1] space; *_01 on the [0, 1] scale (half)",
            "methods": list(e.certify_methods), "num_samples": len(sub), "subset": how, "seed": ctx.seed,
            "test_indices": sub.cpu().tolist(),
            "smoothing": {"method": "CERTIFY (Cohen et al. 2019): n0 copies choose the class, n copies bound its "
                                    "probability (one-sided Clopper-Pearson), radius sigma * Phi^-1(p_lower), "
                                    "abstain if p_lower <= 1/2", "n0": e.certify_n0, "n": e.certify_n,
                          "alpha": e.certify_alpha, "noise": "N(0, sigma^2 I), not clamped"},
            "gaussian_average": {"method": "one evaluation: R = sigma/2 (Phi^-1(p_A) - Phi^-1(p_B)) of the softmax, "
                                           "a certificate only if the model is a Gaussian average at sigma (trained "
                                           "for it, Campbell et al.); a heuristic radius otherwise"},
        })
