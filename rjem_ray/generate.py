"""The paper's three generation modes (Table 1), each seeded from the class-conditional Gaussian mixture.

For a requested class ``c`` and a seed ``x0 ~ N(μ_c, Σ_c)`` (clamped to [-1, 1]):

* ``pgd``      (Single Robust Classifier): targeted PGD toward ``c`` — minimise ``CE(f(x), c)`` inside
  the L∞ ball of radius ``generate.pgd_eps`` around ``x0`` ([-1, 1] units; the paper uses 0.5).
* ``energy``   (Robust JEM-Energy): Langevin dynamics (SGLD or PYLD) on ``E(x, c)`` (or ``E(x)`` when
  ``generate.conditional`` is false) from ``x0``.
* ``combined`` (Robust JEM): the PGD prior, then contrast reduction about each image's mean,
  ``x ← x̄ + κ (x − x̄)`` with ``κ = generate.contrast``, then Langevin dynamics on ``E(x, c)``.

The model is put in eval mode (BatchNorm uses its running statistics) and restored afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from .attacks import pgd
from .config import GEN_MODES, GenerateConfig
from .gmm import ClassConditionalGMM
from .samplers import run_sampler


def reduce_contrast(x: torch.Tensor, kappa: float) -> torch.Tensor:
    """``x̄ + κ (x − x̄)`` with ``x̄`` the per-image mean over channels and pixels; stays in [-1, 1]."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + kappa * (x - mean)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` images (``[n, C, H, W]`` in [-1, 1]) and their classes with the given mode.

    ``classes``: one class for all, a tensor of ``n`` classes, or None (classes cycle 0..K-1 so a grid
    shows every class).
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
    outs = []
    try:
        for start in range(0, n, gen.batch_size):
            yb = y[start : start + gen.batch_size]
            x0, _ = gmm.sample(len(yb), classes=yb, generator=generator)
            outs.append(_generate_batch(model, x0.to(device), yb.to(device), gen, mode).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs), y


def _generate_batch(model, x0, y, gen: GenerateConfig, mode: str) -> torch.Tensor:
    x = x0
    if mode in ("pgd", "combined"):
        x = pgd(model, x, y, eps=gen.pgd_eps, steps=gen.pgd_steps, step_size=gen.pgd_step_size,
                norm="linf", targeted=True, random_start=False)
    if mode == "combined":
        x = reduce_contrast(x, gen.contrast)
    if mode in ("energy", "combined"):
        s = gen.sampler
        x = run_sampler(model, x, kind=s.kind, steps=s.steps, inner_steps=s.inner_steps, step_size=s.step_size,
                        noise_std=s.noise_std, y=y if gen.conditional else None)
    return x.clamp(-1, 1)
