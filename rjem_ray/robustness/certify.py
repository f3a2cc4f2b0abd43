"""Certified L2 robustness: randomized smoothing and the deterministic Gaussian-average certificate.

**Randomized smoothing** (Cohen, Rosenfeld & Kolter 2019). The smoothed classifier of a base classifier
``h(x) = argmax_k f(x)[k]`` is ``g(x) = argmax_c P_{ε ~ N(0, σ² I)}[h(x + ε) = c]``. If the top class has
probability ``p_A > ½`` then ``g`` is constant on the L2 ball of radius ``R = σ Φ⁻¹(p_A)`` around ``x``
(``Φ⁻¹``: the standard normal quantile). ``CERTIFY`` estimates this with a guarantee: ``n0`` noisy copies
pick the candidate class ``ĉ_A`` (their most frequent prediction), ``n`` fresh copies count ``n_A`` votes for
it, and ``p_A`` is replaced by its one-sided Clopper–Pearson lower bound at level ``1 − α``,
``p̲_A = Beta⁻¹(α; n_A, n − n_A + 1)``; if ``p̲_A ≤ ½`` the prediction abstains, otherwise
``g(x) = ĉ_A`` with certified radius ``σ Φ⁻¹(p̲_A)``, wrong with probability at most ``α``. The certified
accuracy at radius ``r`` is ``mean[ĉ_A = y ∧ not abstained ∧ R ≥ r]``.

**Deterministic Gaussian-average certificate** (Campbell, Finlay & Oberman, "Deterministic Gaussian
averaged neural networks"; the abstracts' "certification ... based on an equivalence between training with
a particular regularized loss and the expected values of Gaussian averages"). If the model's class
probabilities ``p(x) = softmax f(x)`` *are* a Gaussian average ``p = E_ε[q(x + ε)]`` of some
``q: R^d → Δ_K`` at noise σ (what that loss trains a model to be, to first order ``E[q(x+ε)] ≈ q(x) +
(σ²/2) Δq(x)``), then each ``Φ⁻¹(p_k(x))`` is ``1/σ``-Lipschitz in L2 (Salman et al. 2019), so the
prediction is constant on the ball of radius

    ``R = (σ / 2) (Φ⁻¹(p_A(x)) − Φ⁻¹(p_B(x)))``     (``p_A``, ``p_B``: the two largest probabilities),

computed from **one** evaluation and no sampling. It is a certificate of the model only as far as the
model is such an average; for a network not trained for it, it is a heuristic radius, and the protocol
says so.

Units: ``x`` in the model's [-1, 1] space; ``σ`` and every radius are L2 distances there (halve them for
the [0, 1] pixel scale). Noisy copies are not clamped to the box (Cohen et al. do not). Pure: torch and
scipy (Beta quantile); no Ray, no MLflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["clopper_pearson_lower", "smoothing_radius", "sample_counts", "certify_smoothed",
           "gaussian_average_radius", "certified_accuracy"]


def clopper_pearson_lower(successes: Tensor, trials: int, alpha: float) -> Tensor:
    """One-sided ``1 − α`` Clopper–Pearson lower bound on a binomial proportion:
    ``Beta⁻¹(α; k, n − k + 1)``, and 0 where ``k = 0``."""
    from scipy.stats import beta  # lazy: scipy.stats (~1.5 s), only certification needs it

    k = successes.detach().cpu().double().numpy()
    low = beta.ppf(alpha, k, trials - k + 1)
    return torch.from_numpy(low).nan_to_num(0.0).where(torch.from_numpy(k) > 0, torch.tensor(0.0, dtype=torch.float64))


def smoothing_radius(p_lower: Tensor, sigma: float) -> Tensor:
    """``R = σ Φ⁻¹(p̲_A)`` (L2, the units of σ); ``-inf``-free: 0 where ``p̲_A ≤ ½`` (abstain)."""
    p = p_lower.double()
    return torch.where(p > 0.5, sigma * torch.special.ndtri(p.clamp(max=1 - 1e-16)), torch.zeros_like(p))


def sample_counts(model: nn.Module, x: Tensor, sigma: float, num: int, num_classes: int, batch_size: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """Votes ``[N, K]``: how many of ``num`` copies ``x + ε``, ``ε ~ N(0, σ² I)``, the base classifier puts
    in each class. Copies are drawn ``batch_size`` at a time from ``generator`` (CPU draws, so a seed
    gives the same noise on any device)."""
    device = next(model.parameters(), x).device
    counts = torch.zeros(len(x), num_classes, dtype=torch.long)
    with torch.no_grad():
        for i in range(len(x)):
            left = num
            while left > 0:
                b = min(batch_size, left)
                noise = torch.randn((b,) + tuple(x.shape[1:]), generator=generator) * sigma
                pred = model((x[i : i + 1].cpu() + noise).to(device)).argmax(1).cpu()
                counts[i] += torch.bincount(pred, minlength=num_classes)
                left -= b
    return counts


def certify_smoothed(model: nn.Module, x: Tensor, *, sigma: float, n0: int, n: int, alpha: float,
                     num_classes: int, batch_size: int = 256, generator: torch.Generator | None = None) -> dict:
    """Cohen et al.'s ``CERTIFY`` per image: ``{"prediction": [N] (−1 = abstain), "radius": [N],
    "p_lower": [N]}`` (radius 0 where abstained)."""
    if not sigma > 0 or n0 < 1 or n < 1 or not 0 < alpha < 1:
        raise ValueError(f"need sigma > 0, n0 >= 1, n >= 1 and 0 < alpha < 1; got {sigma}, {n0}, {n}, {alpha}")
    guess = sample_counts(model, x, sigma, n0, num_classes, batch_size, generator).argmax(1)
    counts = sample_counts(model, x, sigma, n, num_classes, batch_size, generator)
    n_a = counts.gather(1, guess[:, None]).squeeze(1)
    p_lower = clopper_pearson_lower(n_a, n, alpha)
    certified = p_lower > 0.5
    return {"prediction": torch.where(certified, guess, torch.full_like(guess, -1)),
            "radius": smoothing_radius(p_lower, sigma), "p_lower": p_lower}


def gaussian_average_radius(probs: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """The deterministic certificate: ``(prediction, R = (σ/2)(Φ⁻¹(p_A) − Φ⁻¹(p_B)))`` per row of
    ``probs`` ``[N, K]`` (class probabilities of one evaluation; module docstring for when it holds)."""
    top = probs.detach().double().topk(2, dim=1)
    p = top.values.clamp(1e-16, 1 - 1e-16)
    radius = 0.5 * sigma * (torch.special.ndtri(p[:, 0]) - torch.special.ndtri(p[:, 1]))
    return top.indices[:, 0], radius.clamp_min(0)


def certified_accuracy(prediction: Tensor, radius: Tensor, y: Tensor, radii: list[float]) -> list[float]:
    """``mean[prediction = y ∧ R ≥ r]`` for each ``r`` of ``radii`` (an abstention, −1, is never right)."""
    right = prediction.cpu() == y.cpu()
    r = radius.cpu().double()
    return [(right & (r >= float(rr))).double().mean().item() for rr in radii]


def _finite(t: Tensor) -> list:
    return [v if math.isfinite(v) else None for v in t.double().tolist()]


def certified_report(model: nn.Module, x: Tensor, y: Tensor, *, sigma: float, n0: int, n: int, alpha: float,
                     radii: list[float], methods: list[str], num_classes: int, batch_size: int = 256,
                     seed: int = 0, progress=lambda s: None) -> dict:
    """Both certificates on ``(x, y)`` (``methods`` ⊆ {smoothing, gaussian-average}): per method the
    certified accuracy at each radius of ``radii`` (L2, [-1, 1] units; ``radii_01`` on [0, 1]), the
    per-image radii and predictions, and the median radius of the correctly certified images."""
    out: dict = {}
    radii_01 = [r / 2 for r in radii]
    if "smoothing" in methods:
        progress(f"certified: randomized smoothing, sigma {sigma}, n0 {n0}, n {n} on {len(y)} images")
        res = certify_smoothed(model, x, sigma=sigma, n0=n0, n=n, alpha=alpha, num_classes=num_classes,
                               batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
        out["smoothing"] = _summary(res["prediction"], res["radius"], y, radii, radii_01)
        out["smoothing"].update(abstained=int((res["prediction"] == -1).sum()), p_lower=_finite(res["p_lower"]))
    if "gaussian-average" in methods:
        progress(f"certified: Gaussian-average certificate, sigma {sigma} on {len(y)} images")
        device = next(model.parameters(), x).device
        with torch.no_grad():
            probs = torch.cat([model(x[s : s + batch_size].to(device)).float().softmax(1).cpu()
                               for s in range(0, len(y), batch_size)])
        pred, radius = gaussian_average_radius(probs, sigma)
        out["gaussian_average"] = _summary(pred, radius, y, radii, radii_01)
    return out


def _summary(pred: Tensor, radius: Tensor, y: Tensor, radii: list[float], radii_01: list[float]) -> dict:
    right = pred.cpu() == y.cpu()
    return {
        "radii": list(radii), "radii_01": radii_01, "certified_accuracy": certified_accuracy(pred, radius, y, radii),
        "clean_accuracy_of_certifier": right.double().mean().item(),
        "median_radius_correct": radius[right].double().median().item() if right.any() else None,
        "prediction": pred.cpu().tolist(), "radius": _finite(radius),
    }
