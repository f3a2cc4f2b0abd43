"""A gradient-masking report: the checks that tell a robust model from one whose gradients hide attacks.

A model can look robust to gradient attacks only because its gradients are useless (zero, shattered,
or pointing away from the adversarial examples): Athalye, Carlini & Wagner 2018, "Obfuscated gradients
give a false sense of security"; Carlini et al. 2019, "On evaluating adversarial robustness". Three
symptoms are cheap to test, and each is one part of :func:`masking_report`:

(a) **ε grid.** PGD accuracy over ``ε × eps_factors`` and at the full range ε = 2 (L∞ in [-1, 1]
    units: the ball holds the whole input cube, so the attacker may output *any* image). Accuracy must
    fall as ε grows and reach ≈ 0 at the full range; if it does not, the attack is not following a
    useful gradient.
(b) **black-box against white-box.** Square (no gradients, from the AutoAttack library) against the
    gradient attacks APGD-CE and APGD-T at the evaluation ε. A black-box attack knows less; if it breaks
    more images, the gradients mislead the white-box attacks.
(c) **PGD against AutoAttack.** PGD-k accuracy minus AutoAttack accuracy on the same images. A large
    gap means the PGD figure overstates robustness.

Every ε is in the model's input space [-1, 1] (L∞ per pixel, L2 per flattened image); reports also give
the [0, 1]-scale value (half). Accuracies are fractions in [0, 1]. The thresholds below are module
constants, each with the reason for its value. Pure: torch, ``rjem_ray.evaluation.metrics`` and
``rjem_ray.robustness.autoattack`` (which imports the AutoAttack library lazily); no Ray, no MLflow.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..robustness.autoattack import autoattack_robust
from .metrics import accuracy, robust_accuracy

__all__ = ["EPS_FACTORS", "FULL_RANGE_ACCURACY_MAX", "MONOTONE_TOLERANCE", "PGD_GAP_MAX", "BLACKBOX_MARGIN",
           "WHITEBOX_ATTACKS", "full_range_eps", "masking_report"]

EPS_FACTORS = (0.5, 1.0, 2.0, 4.0)
"""Multiples of the evaluation ε for the PGD grid: half to four times the budget shows the accuracy
curve's shape (it should fall steadily), and 1.0 gives the PGD figure compared with AutoAttack in (c)."""

FULL_RANGE_ACCURACY_MAX = 0.05
"""Highest PGD accuracy allowed at the full-range ε. There every image is reachable, so an attack that
follows a useful gradient leaves none correct; 5 % allows for a few images on which a 20-step PGD from a
random start stalls. More than that means the gradients do not lead anywhere: masked."""

MONOTONE_TOLERANCE = 0.02
"""Largest rise of PGD accuracy from one grid ε to a larger one. A larger ball contains the smaller one,
so on the same images the true robust accuracy can only fall; a rise means the attack got weaker as it
got more room, the signature of masked or shattered gradients. 2 points absorbs random-start noise."""

PGD_GAP_MAX = 0.05
"""Largest PGD-minus-AutoAttack accuracy gap on the same images. Where gradients are informative,
PGD-20 and AutoAttack agree to a few points (published gaps for adversarially trained CIFAR-10 models
are 1–4 points); a larger gap says PGD overstates robustness, the usual cause being masking."""

BLACKBOX_MARGIN = 0.01
"""How much lower the black-box Square attack may leave accuracy than the white-box attacks before that
counts as masking. Square sees only outputs; when it beats gradient attacks by more than about one image
in a hundred (a few images of the usual 500–1,000), the gradients are misleading them."""

WHITEBOX_ATTACKS = ("apgd-ce", "apgd-t")
"""The gradient attacks of AutoAttack's standard suite (FAB-T is white-box too but minimises the
perturbation norm instead of maximising a loss, and costs more)."""


def full_range_eps(norm: str, x: Tensor) -> float:
    """Radius of the smallest ``norm`` ball around any image that holds the whole cube [-1, 1]^d.

    L∞: 2 (the cube's side). L2: ``2·√d`` (its diagonal), ``d`` the number of values per image.
    """
    if norm == "linf":
        return 2.0
    if norm == "l2":
        return 2.0 * math.sqrt(x[0].numel())
    raise ValueError(f"norm must be linf or l2, got {norm!r}")


def _whitebox_prefix(protocol: dict) -> tuple[list[str], float | None]:
    """The leading white-box attacks of an AutoAttack cascade and the accuracy left after them."""
    names: list[str] = []
    acc = None
    for step in protocol.get("accuracy_after", []):
        if step["attack"] == "square":
            break
        names.append(step["attack"])
        acc = step["accuracy"]
    return names, acc


def masking_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    eps_factors: tuple[float, ...] | list[float] = EPS_FACTORS,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    autoattack: tuple[Tensor | float, dict] | None = None,
    whitebox_attacks: tuple[str, ...] | list[str] = WHITEBOX_ATTACKS,
    square_queries: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Checks (a)–(c) of the module docstring on ``(x, y)``; returns the numbers and a list of warnings.

    ``x`` is NCHW in [-1, 1], ``eps`` the evaluation radius in that space (``norm`` ball). PGD (our
    ``rjem_ray.method.attacks.pgd`` through ``metrics.robust_accuracy``: ``pgd_steps`` steps of ``2.5 ε/steps``,
    random start, ``pgd_restarts`` restarts) runs at ``ε·f`` for each ``f`` in ``eps_factors`` (capped at
    the full range) and at the full range (:func:`full_range_eps`). ``autoattack`` is an earlier ``autoattack_robust`` /
    ``autoattack_accuracy`` result ``(robust mask or accuracy, protocol)`` *on the same images and ε*;
    when given, its accuracy is the AutoAttack figure of (c) and its leading white-box attacks give the
    white-box figure of (b). Otherwise ``whitebox_attacks`` run here, and the AutoAttack figure is the
    ensemble "robust to the white-box attacks and to Square". Square always runs alone (custom version,
    ``square_queries`` queries, 5,000 by default as in the standard suite).

    The result (JSON-ready) holds ``clean_accuracy``, ``pgd_grid`` (``eps``, ``eps_01_scale``,
    ``accuracy`` per ε, ascending, the full range last), ``full_range_accuracy``, ``pgd_accuracy``,
    ``autoattack_accuracy``, ``pgd_autoattack_gap``, ``whitebox_accuracy``, ``square_accuracy``, the
    protocol of each part, the thresholds, and ``warnings``: one sentence per symptom found (empty when
    the model passes), plus the AutoAttack library's own warnings.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"masking_report needs matching, non-empty x and y, got {x.shape[0]} and {y.shape[0]}")
    if not eps > 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not eps_factors or any(not f > 0 for f in eps_factors):
        raise ValueError(f"eps_factors must be non-empty and > 0, got {list(eps_factors)}")
    say = progress or (lambda s: None)
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    full = full_range_eps(norm, x)
    # Beyond the full range every ball is the whole cube: those grid points are the full-range one.
    grid_eps = sorted({min(float(eps * f), full) for f in eps_factors} | {float(eps), full})
    say(f"masking: PGD-{pgd_steps} over eps {', '.join(f'{e:g}' for e in grid_eps)}")
    clean = accuracy(model, x, y, batch_size)
    grid = []
    for e in grid_eps:
        a = robust_accuracy(model, x, y, eps=e, steps=pgd_steps, norm=norm, restarts=pgd_restarts,
                            batch_size=batch_size, generator=g)
        grid.append({"eps": e, "eps_01_scale": e / 2, "accuracy": a})
    at = {p["eps"]: p["accuracy"] for p in grid}
    pgd_acc, full_acc = at[float(eps)], at[full]

    aa_kw = dict(eps=eps, norm=norm, seed=seed, batch_size=batch_size, progress=progress)
    library_warnings: list[str] = []
    wb_names, wb_acc = (_whitebox_prefix(autoattack[1]) if autoattack is not None else ([], None))
    wb_mask = None
    if wb_acc is None:
        wb_names = list(whitebox_attacks)
        say(f"masking: white-box {', '.join(wb_names)}")
        wb_mask, wb_proto = autoattack_robust(model, x, y, version="custom", attacks=wb_names, **aa_kw)
        wb_acc = wb_mask.double().mean().item()
        library_warnings += wb_proto["library_warnings"]
    say("masking: black-box Square")
    sq_mask, sq_proto = autoattack_robust(model, x, y, version="custom", attacks=["square"],
                                          square_queries=square_queries, **aa_kw)
    sq_acc = sq_mask.double().mean().item()
    library_warnings += sq_proto["library_warnings"]
    if autoattack is not None:
        robust, aa_proto = autoattack
        aa_acc = robust.double().mean().item() if isinstance(robust, Tensor) else float(robust)
        aa_desc = f"{aa_proto['version']} ({', '.join(aa_proto['attacks'])}), given"
        library_warnings += aa_proto.get("library_warnings", [])
        cascade = aa_proto.get("accuracy_after", [])
        square_in_cascade = [i for i, s in enumerate(cascade) if s["attack"] == "square"]
    else:
        aa_acc = (wb_mask & sq_mask.to(wb_mask.device)).double().mean().item()
        aa_desc = f"ensemble of {', '.join(wb_names)} and square, computed here"
        cascade, square_in_cascade = [], []

    warnings: list[str] = []
    unit = "in [-1, 1]"
    if full_acc > FULL_RANGE_ACCURACY_MAX:
        warnings.append(f"accuracy at ε={full:g} {unit} (the whole input range) is {full_acc:.2f} > "
                        f"{FULL_RANGE_ACCURACY_MAX}: gradients look masked")
    for lo, hi in zip(grid, grid[1:]):
        if hi["accuracy"] > lo["accuracy"] + MONOTONE_TOLERANCE:
            warnings.append(f"PGD accuracy rises from {lo['accuracy']:.2f} at ε={lo['eps']:g} to {hi['accuracy']:.2f} "
                            f"at ε={hi['eps']:g} {unit}: a larger ball cannot make the model more robust, so the "
                            "attack is failing (masked or shattered gradients)")
    if sq_acc < wb_acc - BLACKBOX_MARGIN:
        warnings.append(f"Square (black-box) finds more adversarial examples than the white-box attacks: accuracy "
                        f"{sq_acc:.2f} under Square vs {wb_acc:.2f} under {', '.join(wb_names)} at ε={eps:g} {unit}")
    if square_in_cascade and square_in_cascade[0] > 0:
        i = square_in_cascade[0]
        drop = cascade[i - 1]["accuracy"] - cascade[i]["accuracy"]
        if drop > BLACKBOX_MARGIN:
            warnings.append(f"Square broke {drop:.2f} of the images that survived the white-box attacks of AutoAttack "
                            f"({', '.join(s['attack'] for s in cascade[:i])}): their gradients are unreliable")
    gap = pgd_acc - aa_acc
    if gap > PGD_GAP_MAX:
        warnings.append(f"PGD-{pgd_steps} overstates robustness by {gap:.2f} against AutoAttack "
                        f"({pgd_acc:.2f} vs {aa_acc:.2f} at ε={eps:g} {unit})")
    seen = set()
    for msg in library_warnings:
        if msg not in seen:
            seen.add(msg)
            warnings.append(f"pyautoattack: {msg}")

    return {
        "norm": norm,
        "eps": eps,
        "eps_unit": "model input space [-1, 1]",
        "eps_01_scale": eps / 2,
        "num_samples": n,
        "seed": seed,
        "clean_accuracy": clean,
        "pgd": {"steps": pgd_steps, "step_size": "2.5 eps / steps", "restarts": pgd_restarts,
                "random_start": True},
        "pgd_grid": grid,
        "full_range_eps": full,
        "full_range_accuracy": full_acc,
        "pgd_accuracy": pgd_acc,
        "autoattack_accuracy": aa_acc,
        "autoattack": aa_desc,
        "pgd_autoattack_gap": gap,
        "whitebox_attacks": wb_names,
        "whitebox_accuracy": wb_acc,
        "square_accuracy": sq_acc,
        "square_queries": sq_proto["attack_settings"]["square"]["queries"],
        "thresholds": {"full_range_accuracy_max": FULL_RANGE_ACCURACY_MAX, "monotone_tolerance": MONOTONE_TOLERANCE,
                       "pgd_gap_max": PGD_GAP_MAX, "blackbox_margin": BLACKBOX_MARGIN},
        "warnings": warnings,
    }
