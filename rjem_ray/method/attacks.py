"""Projected gradient descent (Madry et al. 2018) against a classifier, one loop for every norm.

After MadryLab robustness (``attacker.py`` + ``attack_steps.py``): ``pgd`` is the only loop, and what
depends on the norm lives in a small step object with three operations,

* ``random_start(x0)`` — a point drawn uniformly from the ε-ball around ``x0``, clamped to [-1, 1];
* ``step(x, g)``       — one steepest-ascent step of length ``step_size`` in that norm;
* ``project(x, x0)``   — the nearest point of the ε-ball around ``x0``, then clamped to [-1, 1].

A new norm is a new ``AttackStep`` subclass registered in ``STEPS``, not a new loop.

Units: ``eps`` and ``step_size`` are distances in the model's input space [-1, 1] (per pixel for L∞,
over the whole flattened image for L2). ε = 0.1 there is 0.05 = 12.75/255 on the [0, 1] scale.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.settings import setting

__all__ = ["AttackConfig", "AttackStep", "LinfStep", "L2Step", "STEPS", "NORMS", "pgd", "pgd_start", "pgd_objective"]

_NORM_FLOOR = 1e-12  # keeps zero gradients and zero perturbations from dividing by zero


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped ``[B, 1, ..., 1]`` to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _random(kind: str, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's own device so a seeded generator reproduces the same draw wherever x lives.
    device = generator.device if generator is not None else like.device
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class AttackStep:
    """The norm-specific part of PGD: random start, ascent step and projection for one ε-ball.

    ``eps`` is the radius of the ball and ``step_size`` the length of one step, both in the model's
    input space [-1, 1]. Subclasses implement the three methods for their norm.
    """

    def __init__(self, eps: float, step_size: float):
        self.eps = float(eps)
        self.step_size = float(step_size)

    def random_start(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the ε-ball around ``x0``, clamped to [-1, 1]."""
        raise NotImplementedError

    def step(self, x: Tensor, grad: Tensor) -> Tensor:
        """``x + step_size · argmax_{‖v‖ ≤ 1} ⟨v, grad⟩``: one steepest-ascent step, per sample."""
        raise NotImplementedError

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        """Nearest point of the ε-ball around ``x0``, then clamped to [-1, 1]."""
        raise NotImplementedError

    def update(self, x: Tensor, grad: Tensor, x0: Tensor) -> Tensor:
        """One PGD iteration from ``x`` given ``grad = ∇_x L``: ``project(step(x, grad), x0)``, detached."""
        return self.project(self.step(x.detach(), grad), x0)


class LinfStep(AttackStep):
    """L∞ ball ``‖x − x0‖_∞ ≤ ε``: signed-gradient steps, per-pixel clipping."""

    def random_start(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``clamp(x0 + U[−ε, ε]^d, −1, 1)``."""
        noise = (2 * _random("uniform", x0, generator) - 1) * self.eps
        return (x0 + noise).clamp(-1, 1)

    def step(self, x: Tensor, grad: Tensor) -> Tensor:
        """``x + step_size · sign(grad)``."""
        return x + self.step_size * grad.sign()

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        """``clamp(x0 + clamp(x − x0, −ε, ε), −1, 1)``."""
        return (x0 + (x - x0).clamp(-self.eps, self.eps)).clamp(-1, 1)


class L2Step(AttackStep):
    """L2 ball ``‖x − x0‖_2 ≤ ε`` per flattened sample: normalised-gradient steps, radial scaling."""

    def random_start(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``clamp(x0 + ε · U^{1/d} · z/‖z‖_2, −1, 1)``, ``z ~ N(0, I_d)`` and ``U ~ U[0, 1]`` per sample.

        A uniform direction with radius ``ε·U^{1/d}`` is uniform in volume over the d-dimensional ball.
        """
        z = _random("normal", x0, generator)
        direction = z / _per_sample_norm(z).clamp_min(_NORM_FLOOR)
        d = x0[0].numel() if x0.dim() > 0 and x0.shape[0] > 0 else 1
        u = _random("uniform", x0.new_empty((x0.shape[0],) + (1,) * (x0.dim() - 1)), generator)
        return (x0 + self.eps * u.pow(1.0 / d) * direction).clamp(-1, 1)

    def step(self, x: Tensor, grad: Tensor) -> Tensor:
        """``x + step_size · grad / ‖grad‖_2`` per sample (no move where ``grad`` is zero)."""
        return x + self.step_size * grad / _per_sample_norm(grad).clamp_min(_NORM_FLOOR)

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        """``clamp(x0 + δ · min(1, ε / ‖δ‖_2), −1, 1)`` with ``δ = x − x0`` per sample."""
        delta = x - x0
        scale = (self.eps / _per_sample_norm(delta).clamp_min(_NORM_FLOOR)).clamp(max=1.0)
        return (x0 + delta * scale).clamp(-1, 1)


STEPS: dict[str, type[AttackStep]] = {"linf": LinfStep, "l2": L2Step}
NORMS = tuple(STEPS)  # the attack norms (attack.norm, generate.pgd_norm and train.gradreg_norm take one)


@dataclass(frozen=True)
class AttackConfig:
    """The ``attack.*`` section: PGD (:func:`pgd`) of adversarial training (robust modes)."""

    norm: str = setting("linf", choices=NORMS)
    eps: float = setting(0.1, ge=0)  # [-1, 1] units
    step_size: float = setting(0.02, ge=0)  # [-1, 1] units
    steps: int = setting(15, ge=1)
    random_start: bool = True
    eps_warmup_steps: int = setting(0, ge=0)  # ε grows linearly from 0 over this many optimiser steps
    # BatchNorm statistics the training attack sees: eval (running statistics, the evaluated function) |
    # train (the batch's own statistics, the function the loss then trains; running statistics frozen)
    bn_mode: str = setting("eval", choices=("eval", "train"))


def _check_nonneg(name: str, value: float) -> None:
    # `not value >= 0` also refuses NaN.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "linf",
    targeted: bool = False,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the cross-entropy inside the ε-ball around ``x``.

    Untargeted (``y`` = true labels):  ``x' = argmax_{‖x' − x‖ ≤ ε, x' ∈ [−1, 1]^d}  CE(f(x'), y)``.
    Targeted   (``y`` = target labels): ``x' = argmin_{‖x' − x‖ ≤ ε, x' ∈ [−1, 1]^d} CE(f(x'), y)``.

    Each of ``steps`` iterations is ``x' ← Π(x' + step_size · s(∇_{x'} L))`` where ``s`` is the norm's
    steepest-ascent direction (``sign`` for L∞, ``g/‖g‖_2`` for L2), ``L = ±CE`` and ``Π`` the projection
    onto the ball followed by a clamp to [−1, 1]. With ``random_start`` the first iterate is uniform in
    the ball (drawn from ``generator`` when given).

    ``eps`` and ``step_size`` are in the model's input space [−1, 1] (L∞: per pixel; L2: per image).
    ``x`` should itself lie in [−1, 1]: the final clamp wins over the ball, so entries of ``x`` outside
    [−1, 1] by more than ε leave the result outside the ball by that excess.

    ``model`` maps ``x`` to logits ``[B, K]``; pass the module itself, not its DDP wrapper. Only the
    input's gradient is taken (``torch.autograd.grad``): parameters' ``.grad`` are left untouched, and
    the model's train/eval mode is the caller's choice (BatchNorm in train mode updates its running
    statistics on every attack step). Returns a detached tensor of ``x``'s shape, dtype and device;
    ``eps == 0`` or ``steps == 0`` returns ``x.detach().clone()``.
    """
    attack, x0, x_adv, steps = pgd_start(x, eps=eps, steps=steps, step_size=step_size, norm=norm,
                                         random_start=random_start, generator=generator)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        # enable_grad: evaluation code often calls the attack from inside torch.no_grad().
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(pgd_objective(model(x_adv), y, targeted), x_adv)
        x_adv = attack.update(x_adv, grad, x0)
    return x_adv.detach()


def pgd_start(
    x: Tensor, *, eps: float, steps: int, step_size: float, norm: str = "linf", random_start: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[AttackStep, Tensor, Tensor, int]:
    """Validate the arguments of :func:`pgd` and return ``(step object, x0, first iterate, steps to run)``.

    The pieces of the PGD loop, for callers that share its network passes with other work
    (``inputs.attack_and_sample_fused``): ``steps`` is 0 when there is no budget (``eps`` or ``steps``
    zero), the first iterate is the random start (or ``x0``), and each iteration is
    ``x ← attack.update(x, ∇_x pgd_objective(f(x), y), x0)``.
    """
    if norm not in STEPS:
        raise ValueError(f"norm must be one of {sorted(STEPS)}, got {norm!r}")
    _check_nonneg("eps", eps)
    _check_nonneg("step_size", step_size)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    x0 = x.detach()
    attack = STEPS[norm](eps, step_size)
    if eps == 0 or steps == 0:
        return attack, x0, x0.clone(), 0
    return attack, x0, attack.random_start(x0, generator) if random_start else x0.clone(), int(steps)


def pgd_objective(logits: Tensor, y: Tensor, targeted: bool = False) -> Tensor:
    """``±Σ_i CE(f(x_i), y_i)``: ascended by PGD (``−`` when targeted). Summed, not averaged, so each
    sample's step does not depend on the batch size; computed in fp32 whatever the logits' dtype."""
    return (-1.0 if targeted else 1.0) * F.cross_entropy(logits.float(), y, reduction="sum")
