"""The finite-difference input-gradient norm (rjem_ray/method/gradreg.py) against autograd on a smooth model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.method import gradreg


def _smooth_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()


@pytest.mark.parametrize("norm,dual", [("l2", 2), ("linf", 1)])
def test_finite_difference_norm_matches_autograd(norm, dual):
    model = _smooth_model()
    x = torch.randn(5, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    g = gradreg.loss_gradient(model, x, y)
    # autograd's per-sample gradient, one sample at a time
    rows = []
    for i in range(len(y)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        rows.append(gi)
    torch.testing.assert_close(g, torch.cat(rows))
    exact = torch.cat(rows).flatten(1).norm(p=dual, dim=1)
    d = gradreg.steepest_direction(g, norm)
    for h in (1e-3, 1e-5):
        with torch.no_grad():
            fd = gradreg.finite_difference_norm(F.cross_entropy(model(x), y, reduction="none"),
                                                F.cross_entropy(model(x + h * d), y, reduction="none"), h)
        torch.testing.assert_close(fd, exact, rtol=50 * h, atol=1e-8)


def test_penalty_is_strength_times_mean_square_and_differentiable_in_the_weights():
    model = _smooth_model()
    x = torch.randn(4, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 1])
    h = 1e-3
    xh = x + h * gradreg.steepest_direction(gradreg.loss_gradient(model, x, y), "l2")
    pen, fd = gradreg.gradreg_penalty(model(x), model(xh), y, h=h, strength=0.5)
    assert pen.item() == pytest.approx(0.5 * fd.pow(2).mean().item())
    pen.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError):
        gradreg.finite_difference_norm(pen, pen, 0.0)
