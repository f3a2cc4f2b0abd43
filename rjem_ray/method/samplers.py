"""MCMC samplers that draw negative samples ``x_q`` from a classifier's energy (JEM / JEM++).

* ``sgld`` — stochastic gradient Langevin dynamics in JEM's practical form of the paper's eq. 1,
  ``x ← x − α·∇_x E(x) + σ·N(0, I)`` (step and noise decoupled; JEM trains with α = 1, σ = 0.01).
* ``pyld`` — JEM++'s proximal YOPO-based Langevin dynamics, ``m`` outer × ``n`` inner steps without
  noise: the outer step evaluates the network once; the inner steps reuse that gradient through the
  linear first convolution (``model.stem``) and cost no network evaluation (JEM++ trains with lr = 0.2).
  JEM++'s public code exists in two variants: inner steps only (``sgld_lr = 0`` in one commit, our
  default ``outer_step_size = 0``) and an extra plain gradient step of ``sgld_lr = 1.0`` at the start of
  each outer step (another commit); ``outer_step_size`` selects between them.

Energies are ``E(x) = −logsumexp_y f(x)[y]`` or, given labels, ``E(x, y) = −f(x)[y]`` (nats). Step
sizes and noise standard deviations are in the model's input space [−1, 1].

All samplers take input gradients only (``torch.autograd.grad``), so parameters' ``.grad`` are left
untouched, and leave the model's train/eval mode to the caller (the reference samples in train mode;
BatchNorm then updates its running statistics on every sampler step). Pass the module itself, not
its DDP wrapper.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..core.settings import setting
from .energy import energy_fn as _energy_fn
from .energy import energy_of

__all__ = ["SamplerConfig", "SAMPLERS", "sgld", "pyld", "run_sampler", "sgld_update", "pyld_update"]

SAMPLERS = ("sgld", "pyld")


@dataclass(frozen=True)
class SamplerConfig:
    """The ``sampler.*`` section (and ``generate.sampler``): the Langevin sampler (:func:`run_sampler`) of the
    negative samples and of energy generation."""

    kind: str = setting("pyld", choices=SAMPLERS)
    steps: int = setting(10, ge=1)  # SGLD steps, or PYLD outer steps m
    inner_steps: int = setting(5, ge=1)  # PYLD inner steps n (ignored by SGLD)
    step_size: float = setting(0.2, gt=0)  # PYLD lr, or SGLD lr, [-1, 1] units per unit gradient
    noise_std: float = setting(0.01, ge=0)  # SGLD noise std, [-1, 1] units (PYLD adds none)
    # PYLD only: a plain gradient step x += outer_step_size · ∂(−E)/∂x before each outer step's inner
    # steps ([-1, 1] units per unit gradient). JEM++'s public code has both variants: 0 (inner steps
    # only) and 1.0 (its sgld_lr); 0 is the default here.
    outer_step_size: float = setting(0.0, ge=0)


def _check_steps(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_nonneg(name: str, value: float) -> None:
    # `not value >= 0` also refuses NaN.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's own device so a seeded generator reproduces the same draw wherever x lives.
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def sgld(
    energy_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    steps: int,
    step_size: float,
    noise_std: float,
    clamp: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``steps`` iterations of ``x ← x − step_size · ∇_x E(x) + noise_std · N(0, I)``.

    JEM's practical form of SGLD (paper eq. 1 with step and noise decoupled). ``energy_fn`` maps a
    batch to per-sample energies ``[B]`` in nats (e.g. ``energy.energy_fn(model, y)``); the gradient
    is that of their sum, so each sample's move does not depend on the batch size. With ``clamp`` the
    iterate is clamped to [−1, 1] after every step. ``step_size`` (per unit of energy gradient) and
    ``noise_std`` are in the input space [−1, 1]. Noise comes from ``generator`` when given. Returns a
    detached tensor; ``steps == 0`` returns ``x.detach().clone()``.
    """
    _check_steps("steps", steps)
    _check_nonneg("step_size", step_size)
    _check_nonneg("noise_std", noise_std)

    x = x.detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        # enable_grad: generation code often calls the sampler from inside torch.no_grad().
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(energy_fn(x).float().sum(), x)
        x = sgld_update(x, grad, step_size=step_size, noise_std=noise_std, clamp=clamp, generator=generator)
    return x.detach()


def sgld_update(x: Tensor, grad: Tensor, *, step_size: float, noise_std: float, clamp: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """One SGLD step given ``grad = ∇_x Σ E(x)``: ``x − step_size · grad + noise_std · N(0, I)`` (clamped)."""
    x = x.detach() - step_size * grad
    if noise_std > 0:
        x = x + noise_std * _randn(x, generator)
    return x.clamp(-1, 1) if clamp else x


def pyld(
    model: nn.Module,
    x: Tensor,
    *,
    outer_steps: int,
    inner_steps: int,
    step_size: float,
    y: Tensor | None = None,
    outer_step_size: float = 0.0,
) -> Tensor:
    """JEM++ PYLD: ``outer_steps`` × ``inner_steps`` noise-free steps that lower ``E(x)`` (or ``E(x, y)``).

    Each outer step evaluates the network once at the current ``x``, split as
    ``f(x) = model.head(h)``, ``h = model.stem(x)``, and forms the co-state ``p = ∂(−E)/∂h``. Each of the
    ``inner_steps`` inner steps is

        ``x ← clamp(x + step_size · clamp(∂⟨stem(x), p⟩/∂x, −1, 1), −1, 1)``.

    ``stem`` is linear, so ``∂⟨stem(x), p⟩/∂x = stemᵀ p`` does not depend on ``x`` and equals the
    chain rule's ``∂(−E)/∂x``: one autograd call per outer step gives it, and the inner steps reuse it
    without evaluating the network. ``step_size`` is in the input space [−1, 1] (the per-pixel move of
    one inner step is at most ``step_size``). With ``outer_step_size = η > 0`` (JEM++'s ``sgld_lr``
    variant) each outer step first moves ``x ← clamp(x + η · ∂(−E)/∂x, −1, 1)`` with the same gradient,
    then runs the inner steps; η is in [−1, 1] units per unit of energy gradient. Energies: marginal ``E(x) = −logsumexp f(x)``, or joint
    ``E(x, y) = −f(x)[y]`` when ``y`` is given. Returns a detached tensor; zero outer or inner steps
    return ``x.detach().clone()``.
    """
    _check_steps("outer_steps", outer_steps)
    _check_steps("inner_steps", inner_steps)
    _check_nonneg("step_size", step_size)
    _check_nonneg("outer_step_size", outer_step_size)
    for part in ("stem", "head"):
        if not callable(getattr(model, part, None)):
            raise TypeError(
                f"pyld needs a model split as head(stem(x)) with a linear stem (e.g. models.WideResNet); "
                f"{type(model).__name__} has no {part!r} (pass the module, not its DDP wrapper)"
            )

    x = x.detach().clone()
    if outer_steps == 0 or inner_steps == 0:
        return x
    for _ in range(outer_steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            # model(x) is head(stem(x)); through the linear stem, ∂(−E)/∂x is exactly stemᵀ p with
            # p = ∂(−E)/∂h, so one backward gives it (no separate pass with p as the stem's cotangent),
            # and calling the module itself keeps its speed settings (autocast, compilation; speed.py).
            neg_energy = -energy_of(model(x), y).float().sum()
            (stem_t_p,) = torch.autograd.grad(neg_energy, x)
        x = pyld_update(x, stem_t_p, step_size=step_size, inner_steps=inner_steps, outer_step_size=outer_step_size)
    return x.detach()


def pyld_update(x: Tensor, grad: Tensor, *, step_size: float, inner_steps: int, outer_step_size: float = 0.0) -> Tensor:
    """One PYLD outer step given ``grad = ∂(−Σ E)/∂x = stemᵀ p``: the optional plain step
    ``x ← clamp(x + outer_step_size · grad, −1, 1)``, then ``inner_steps`` times
    ``x ← clamp(x + step_size · clamp(grad, −1, 1), −1, 1)``. No network evaluation."""
    move = step_size * grad.clamp(-1, 1)
    x = x.detach()
    if outer_step_size > 0:
        x = (x + outer_step_size * grad).clamp(-1, 1)
    for _ in range(inner_steps):
        x = (x + move).clamp(-1, 1)
    return x


def run_sampler(
    model: nn.Module,
    x: Tensor,
    *,
    kind: str,
    steps: int,
    inner_steps: int,
    step_size: float,
    noise_std: float,
    y: Tensor | None = None,
    generator: torch.Generator | None = None,
    outer_step_size: float = 0.0,
) -> Tensor:
    """Run the sampler named ``kind`` on the energy of ``model`` (marginal, or joint when ``y`` is given).

    ``"sgld"``: ``steps`` SGLD steps of size ``step_size`` with noise ``noise_std`` (``inner_steps``
    unused). ``"pyld"``: ``steps`` outer × ``inner_steps`` inner PYLD steps of size ``step_size``,
    each outer step led by a plain gradient step of ``outer_step_size`` (0: none), (``noise_std`` and
    ``generator`` unused: PYLD has no noise; ``outer_step_size`` unused by SGLD). Units as in ``sgld`` and ``pyld``.
    """
    if kind not in SAMPLERS:
        raise ValueError(f"kind must be one of {SAMPLERS}, got {kind!r}")
    _check_steps("steps", steps)
    _check_steps("inner_steps", inner_steps)
    _check_nonneg("step_size", step_size)
    _check_nonneg("noise_std", noise_std)
    _check_nonneg("outer_step_size", outer_step_size)
    if kind == "sgld":
        return sgld(
            _energy_fn(model, y), x, steps=steps, step_size=step_size, noise_std=noise_std, generator=generator
        )
    return pyld(model, x, outer_steps=steps, inner_steps=inner_steps, step_size=step_size, y=y,
                outer_step_size=outer_step_size)
