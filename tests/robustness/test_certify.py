"""Certified radii (rjem_ray/robustness/certify.py) against their closed forms on linear models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.robustness import certify

NORMAL = torch.distributions.Normal(0.0, 1.0)


class Binary(nn.Module):
    """Two classes split by the hyperplane ``w·x + b = 0``: logits ``[s, −s]``, ``s = w·x + b``."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([s, -s], 1)


class ExactAverage(Binary):
    """The Gaussian average at σ of ``Binary``'s hard classifier, in closed form: ``P(class 0) = Φ(s/(σ‖w‖))``;
    logits are its log-probabilities."""

    def __init__(self, w, b, sigma):
        super().__init__(w, b)
        self.sigma = sigma

    def forward(self, x):
        s = (x.flatten(1) @ self.w + self.b) / (self.sigma * self.w.norm())
        return torch.stack([NORMAL.cdf(s), NORMAL.cdf(-s)], 1).clamp_min(1e-30).log()


def _setup():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, generator=g)
    x = torch.randn(8, 1, 2, 3, generator=g) * 0.4
    b = 0.1
    s = x.flatten(1) @ w + b
    y = (s < 0).long()  # the linear model is right on every image
    dist = s.abs() / w.norm()  # L2 distance to the decision boundary
    return w, b, x, y, dist


def test_smoothed_linear_classifier_certifies_the_distance_to_its_boundary():
    # For h(x) = 1[w·x + b > 0], P(h(x + ε) = h(x)) = Φ(|w·x + b| / (σ‖w‖)), so σ Φ⁻¹(p_A) is exactly the
    # distance to the hyperplane. CERTIFY's radius uses a lower bound on p_A: never above it (with
    # probability 1 − α per image), and close to it with many samples.
    w, b, x, y, dist = _setup()
    sigma, n = 0.5, 20000
    res = certify.certify_smoothed(Binary(w, b), x, sigma=sigma, n0=100, n=n, alpha=0.001, num_classes=2,
                                   batch_size=5000, generator=torch.Generator().manual_seed(1))
    p_true = NORMAL.cdf(dist / sigma).double()
    closed = sigma * torch.special.ndtri(p_true)
    torch.testing.assert_close(closed, dist.double(), atol=1e-5, rtol=1e-5)
    ok = res["prediction"] == y
    assert ok.sum() >= 6  # abstains only very near the boundary
    assert (res["radius"][ok] <= closed[ok] + 1e-9).all()
    assert (res["radius"][ok] >= closed[ok] - 0.25 * sigma).all()
    # the lower bound is the Clopper-Pearson one: Beta⁻¹(α; k, n − k + 1)
    k = torch.tensor([n - 30.0])
    from scipy.stats import beta

    assert certify.clopper_pearson_lower(k, n, 0.001).item() == pytest.approx(beta.ppf(0.001, n - 30, 31))


def test_gaussian_average_certificate_of_an_exact_average_is_the_distance():
    # R = (σ/2)(Φ⁻¹(p_A) − Φ⁻¹(p_B)) with p_A = Φ(d/σ), p_B = 1 − p_A gives R = d exactly.
    w, b, x, y, dist = _setup()
    sigma = 0.5
    model = ExactAverage(w, b, sigma)
    pred, radius = certify.gaussian_average_radius(model(x).softmax(1), sigma)
    assert torch.equal(pred, y)
    torch.testing.assert_close(radius, dist.double(), atol=1e-4, rtol=1e-4)


def test_certified_accuracy_counts_right_predictions_with_radius_at_least_r():
    pred = torch.tensor([0, 1, -1, 2])
    radius = torch.tensor([0.5, 0.1, 0.0, 2.0])
    y = torch.tensor([0, 1, 1, 0])
    assert certify.certified_accuracy(pred, radius, y, [0.0, 0.1, 0.2, 1.0]) == [0.5, 0.5, 0.25, 0.0]
    assert certify.smoothing_radius(torch.tensor([0.4, 0.5, NORMAL.cdf(torch.tensor(1.0)).item()]), 0.5).tolist() \
        == pytest.approx([0.0, 0.0, 0.5])
    assert not math.isnan(certify.smoothing_radius(torch.tensor([1.0]), 0.5).item())
