"""The paper's three generation modes (Table 1), each seeded from the class-conditional Gaussian mixture.

For a requested class ``c`` and a seed ``x0 ~ N(μ_c, Σ_c)`` (clamped to [-1, 1]):

* ``pgd``      (Single Robust Classifier): targeted PGD toward ``c`` — minimise ``CE(f(x), c)`` inside
  the ball of radius ``generate.pgd_eps`` around ``x0`` ([-1, 1] units) in ``generate.pgd_norm``: ``linf``
  (the paper, ε = 0.5 per pixel) or ``l2`` (ε per image, as Santurkar et al. generate with a robust
  classifier). L∞ sign steps move every pixel by the full step whatever its gradient, so a black
  background that can only brighten collects salt-and-pepper noise; an L2 step is the normalised
  gradient and leaves pixels of small gradient nearly still. On the demo checkpoint (docs/RESULTS.md)
  pgd-mode FID was 63.0 at L∞ 0.5 and 22.1 at L2 8 (seeds alone 47.1).
* ``energy``   (Robust JEM-Energy): Langevin dynamics (SGLD or PYLD) on ``E(x, c)`` (or ``E(x)`` when
  ``generate.conditional`` is false) from ``x0``.
* ``combined`` (Robust JEM): the PGD prior, then contrast reduction ``x ← m + κ (x − m)`` with
  ``κ = generate.contrast``, then Langevin dynamics on ``E(x, c)``.

What the contrast is reduced about (``generate.contrast_center``) decides what it does to a background:

* ``floor`` (default): ``m = −1``, the black end of the pixel range. Every pixel's distance above black
  shrinks by κ: black stays exactly black (``−1 + κ·0 = −1``), white strokes dim to ``2κ − 1``, which
  leaves the headroom the paper wants (the sampler can brighten without leaving [−1, 1]). It cannot
  grey a black background, whatever the image.
* ``class-mean``: ``m = μ_c``, the Gaussian mixture's mean image of the requested class, per pixel.
  The prior's deviation from its class prototype shrinks. Pixels black in every training image of the
  class (a digit's border) stay black, but a black pixel where ``μ_c`` is grey (inside a digit's
  blurry mean) is pulled up to ``(1 − κ) μ_c − κ``: for natural images, where no level is background.
* ``image-mean``: ``m = x̄``, each image's mean over channels and pixels (a literal reading of the
  paper's "decrease contrast"). It pulls a black background up to ``−1 + (1 − κ)(1 + x̄)``: on digits,
  whose mean is about −0.75, κ = 0.7 greys the background to −0.93 before the sampler starts, which the
  combined-mode grids showed as grey, speckled backgrounds.

All three are convex combinations of ``x`` and ``m``, so pixels stay in [−1, 1].

BatchNorm during generation (``generate.bn_mode``): ``eval`` normalises by the running statistics, so
each sample is independent of the others in its batch; ``train`` normalises every layer by the statistics
of the batch being generated (running statistics frozen), the view in which the training sampler draws
its negatives under ``train.sampler_bn_mode = train``, so generation walks the energy the model was
trained to shape. Measured on the demo-scale digit model, ``train`` was worse in every mode (energy-mode
FID 54.3 against 35.9, docs/RESULTS.md), so ``eval`` is the default. Everything else (Dropout) is in eval
mode either way; the model's modes are restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.settings import setting
from ..method.attacks import NORMS as ATTACK_NORMS
from ..method.attacks import pgd
from ..method.batchnorm import running_stats_frozen
from ..method.gmm import ClassConditionalGMM
from ..method.samplers import SamplerConfig, run_sampler
from ..method.speed import FastNet

GEN_MODES = ("energy", "pgd", "combined")  # generate.mode: the paper's three ways to generate


@dataclass(frozen=True)
class GenerateConfig:
    """The ``generate.*`` section: inference-time generation (the paper's three modes, :func:`generate`)."""

    mode: str = setting("combined", choices=GEN_MODES)
    n: int = setting(100, ge=1)
    conditional: bool = True  # E(x, c) for a requested class; False samples E(x)
    # targeted-PGD ball: linf (the paper: sign steps, budget per pixel) | l2 (normalised-gradient steps,
    # budget per image: the change goes where the gradient is, not to every pixel alike)
    pgd_norm: str = setting("linf", choices=ATTACK_NORMS)
    pgd_eps: float = setting(0.5, ge=0)  # targeted-PGD budget, [-1, 1] units (per pixel for linf, per image for l2)
    pgd_steps: int = setting(40, ge=1)
    pgd_step_size: float = setting(0.05, ge=0)
    contrast: float = setting(0.7, ge=0.0, le=1.0)  # κ: x ← m + κ (x − m) before Langevin (combined mode)
    # m: floor (−1: black stays black, strokes dim) | class-mean (μ_c of the prior) | image-mean (x̄); reduce_contrast
    contrast_center: str = setting("floor", choices=("floor", "class-mean", "image-mean"))
    # BatchNorm while generating: eval (running statistics) | train (the generated batch's statistics,
    # running statistics frozen: the training sampler's view under train.sampler_bn_mode = train)
    bn_mode: str = setting("eval", choices=("eval", "train"))
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=50, inner_steps=5, step_size=0.2))
    batch_size: int = setting(100, ge=1)


def reduce_contrast(x: torch.Tensor, kappa: float, center: torch.Tensor | None = None) -> torch.Tensor:
    """``m + κ (x − m)``: the deviation of ``x`` from ``m`` scaled by ``κ`` ∈ [0, 1].

    ``center`` is ``m`` (broadcast against ``x``, e.g. the class-mean images ``[B, C, H, W]``); None uses
    each image's mean over channels and pixels, ``x̄``. Pixels equal to ``m`` do not move, and the result
    stays in [-1, 1] when ``x`` and ``m`` do.
    """
    m = x.mean(dim=(1, 2, 3), keepdim=True) if center is None else center
    return m + kappa * (x - m)


def generate(
    model: nn.Module,
    gmm: ClassConditionalGMM,
    gen: GenerateConfig,
    *,
    mode: str | None = None,
    n: int | None = None,
    classes: torch.Tensor | int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` images (``[n, C, H, W]`` in [-1, 1]) and their classes with the given mode.

    ``classes``: one class for all, a tensor of ``n`` classes, or None (classes cycle 0..K-1 so a grid
    shows every class). ``precision`` (``speed.PRECISIONS``): autocast of the network's passes; the
    images and every PGD/Langevin iterate stay fp32. ``progress`` (optional) is called with one line after
    each batch of ``generate.batch_size`` images when there is more than one batch.
    """
    mode = mode or gen.mode
    if mode not in GEN_MODES:
        raise ValueError(f"generation mode {mode!r} is not allowed; choose one of {', '.join(GEN_MODES)}")
    n = n or gen.n
    if classes is None:
        y = torch.arange(n) % gmm.num_classes
    elif isinstance(classes, int):
        if not 0 <= classes < gmm.num_classes:
            raise ValueError(f"class {classes} is out of range; allowed 0..{gmm.num_classes - 1}")
        y = torch.full((n,), classes, dtype=torch.long)
    else:
        y = classes.long()
    was_training = model.training
    model.eval()
    if gen.bn_mode == "train":  # batch statistics, running statistics left alone
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    net = FastNet(model, precision=precision, device=device)
    outs = []
    try:
        for start in range(0, n, gen.batch_size):
            yb = y[start : start + gen.batch_size]
            x0, _ = gmm.sample(len(yb), classes=yb, generator=generator)
            center = None  # image-mean
            if gen.contrast_center == "class-mean":
                center = gmm.means[yb].reshape(len(yb), *gmm.shape).to(device)
            elif gen.contrast_center == "floor":
                center = torch.full((1, 1, 1, 1), -1.0, device=device)
            with running_stats_frozen(model) if gen.bn_mode == "train" else contextlib.nullcontext():
                outs.append(_generate_batch(net, x0.to(device), yb.to(device), gen, mode, center).cpu())
            if progress is not None and n > gen.batch_size:
                progress(f"{mode} mode: {min(start + gen.batch_size, n)}/{n} images")
    finally:
        model.train(was_training)
    return torch.cat(outs), y


def _generate_batch(model, x0, y, gen: GenerateConfig, mode: str, center=None) -> torch.Tensor:
    x = x0
    if mode in ("pgd", "combined"):
        x = pgd(model, x, y, eps=gen.pgd_eps, steps=gen.pgd_steps, step_size=gen.pgd_step_size,
                norm=gen.pgd_norm, targeted=True, random_start=False)
    if mode == "combined":
        x = reduce_contrast(x, gen.contrast, center)
    if mode in ("energy", "combined"):
        s = gen.sampler
        x = run_sampler(model, x, kind=s.kind, steps=s.steps, inner_steps=s.inner_steps, step_size=s.step_size,
                        noise_std=s.noise_std, y=y if gen.conditional else None, outer_step_size=s.outer_step_size)
    return x.clamp(-1, 1)
