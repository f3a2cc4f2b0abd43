"""Input-gradient regularisation by finite differences (Finlay & Oberman 2019, "Scaleable input gradient
regularization for adversarial robustness"): a robustness term without PGD and without double
backpropagation.

For the per-sample loss ``ℓ_i(x) = CE(f(x_i), y_i)`` the penalty is ``λ · mean_i ‖∇_x ℓ_i(x)‖_*²``, where
``‖·‖_*`` is the dual norm of the attack's: ``‖g‖_1`` against L∞ attacks, ``‖g‖_2`` against L2. Taking the
gradient of ``‖∇ℓ‖²`` with respect to the weights would need a second backward through the first one;
instead the gradient norm is a directional finite difference along the (detached) steepest direction:

    ``d_i = argmax_{‖v‖ ≤ 1} ⟨v, g_i⟩``  (``sign(g_i)`` for L∞, ``g_i / ‖g_i‖_2`` for L2), ``g_i = ∇_x ℓ_i``,
    ``‖g_i‖_* = ⟨d_i, g_i⟩ ≈ (ℓ_i(x_i + h d_i) − ℓ_i(x_i)) / h``,

exact to ``O(h)`` for a smooth loss. ``d`` costs one input-gradient pass (no weight gradients); the
penalty then needs one more forward at ``x + h d``, and its weight gradient flows through both losses by
ordinary backpropagation.

Units: ``h`` is in the model's input space [-1, 1] — the L∞ length of the step (per pixel) for
``norm = "linf"``, its L2 length (per image) for ``"l2"``; ``‖∇ℓ‖_*`` is in loss units per [-1, 1] unit
(on the [0, 1] scale it is twice that); ``λ`` then has units of ([-1, 1] unit)², so the penalty is a
loss. Pure: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import NORMS  # the attack norm defended against; the penalised gradient norm is its dual

__all__ = ["NORMS", "loss_gradient", "steepest_direction", "finite_difference_norm", "gradreg_penalty"]


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``g = ∇_x Σ_i CE(f(x_i), y_i)`` (row ``i`` is ``∇ℓ_i``: samples do not interact in eval-mode
    models), detached; weights' ``.grad`` untouched. The model's mode is the caller's."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def steepest_direction(g: Tensor, norm: str) -> Tensor:
    """``d = argmax_{‖v‖ ≤ 1} ⟨v, g⟩`` per sample: ``sign(g)`` (L∞ ball) or ``g / ‖g‖_2`` (L2 ball);
    ``⟨d, g⟩`` is then ``‖g‖_1`` or ``‖g‖_2``."""
    if norm == "linf":
        return g.sign()
    if norm == "l2":
        n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
        return g / n.view(-1, *([1] * (g.dim() - 1)))
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def finite_difference_norm(loss_x: Tensor, loss_xh: Tensor, h: float) -> Tensor:
    """``(ℓ(x + h d) − ℓ(x)) / h`` per sample: the dual-norm gradient estimate (loss per [-1, 1] unit)."""
    if not h > 0:
        raise ValueError(f"the difference step h must be > 0, got {h}")
    return (loss_xh - loss_x) / h


def gradreg_penalty(logits_x: Tensor, logits_xh: Tensor, y: Tensor, *, h: float, strength: float) -> tuple[Tensor, Tensor]:
    """``(λ · mean_i FD_i², FD)`` with ``FD_i = (CE(f(x_i + h d_i)) − CE(f(x_i))) / h`` from the logits of
    both passes; differentiable with respect to the weights through both."""
    fd = finite_difference_norm(F.cross_entropy(logits_x.float(), y, reduction="none"),
                                F.cross_entropy(logits_xh.float(), y, reduction="none"), h)
    return strength * fd.pow(2).mean(), fd.detach()
