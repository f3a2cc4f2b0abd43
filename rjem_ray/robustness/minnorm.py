"""Minimum-norm adversarial perturbations: the LogBarrier and ProxLogBarrier attacks.

For an image ``x0`` of label ``y`` the attacks solve

    ``min_δ  d(δ)   subject to   c(x0 + δ) > 0,   x0 + δ ∈ [−1, 1]^d``,

where ``c(x) = max_{j ≠ y} f(x)[j] − f(x)[y]`` is the logit margin of the best wrong class (``c > 0``:
misclassified) and ``d`` a distance. Each image then has its own distance to misclassification, so one
run gives the whole robust-accuracy-vs-ε curve (``robust at ε`` ⇔ ``d > ε``) and the median distance.

Both follow the logarithmic barrier method (Finlay, Pooladian & Oberman 2019, "The LogBarrier adversarial
attack"; Pooladian, Finlay, Hoheisel & Oberman 2019, "A principled approach for generating adversarial
images under non-smooth dissimilarity metrics"): start from a misclassified point (uniform noise, or a
margin-ascent iterate, pulled back towards ``x0`` by bisection along the segment to the decision
boundary; ``_start``), then for a decreasing
barrier weight ``μ_k = μ0 · β^k`` (``k = 0 … outer_steps − 1``) take ``inner_steps`` steps on

    ``Φ_μ(δ) = d(δ) − μ · d(δ_start) · log c(x0 + δ)``

that stay feasible: a step is accepted only if ``c > 0`` at the new point and ``Φ_μ`` did not increase;
otherwise the step length halves (backtracking), and it grows by ``GROW`` after every accepted step.
``d(δ_start)`` (the distance of the starting point) makes ``μ`` unitless. Every iterate is misclassified,
so the attack's output always is; the smallest-distance iterate is returned.

* **LogBarrier** (``logbarrier``; L2, L∞): L2 takes gradient steps ``δ ← Π(δ − t ∇Φ/‖∇Φ‖_2)`` on
  ``d = ‖δ‖_2`` (``Π``: clamp to the box). L∞ is not smooth; it is written in epigraph form, the barrier
  method's own way: minimise ``τ`` over ``(δ, τ)`` subject to ``c > 0`` and ``|δ_i| < τ``, i.e.
  ``Φ_μ = τ − μ d(δ_start) [log c + (1/n) Σ_i log(τ² − δ_i²)]``, with ``τ`` one more coordinate, and the
  steps are L∞'s steepest descent ``(δ, τ) ← (Π(δ − t sign ∇_δ Φ), τ − t sign ∂_τ Φ)`` (every coordinate
  moves by ``t``, first ``t`` a tenth of ``‖δ_start‖_∞``). An L2-normalised step over the ``n + 1``
  coordinates moves each entry by about ``t/√n`` and ``τ`` hardly at all: measured on the demo
  checkpoint, that variant never left its start (median ×1.25 FAB's, against ×1.09 with sign steps).
* **ProxLogBarrier** (``proxlogbarrier``; L0, L1, L2, L∞): proximal-gradient steps
  ``δ ← Π(prox_{t d}(δ − t ∇B))`` on the barrier ``B = −μ d(δ_start) log c`` alone, with the closed-form
  proximal operators: L0 — keep a pixel's change ``v_p`` (all its channels) iff ``‖v_p‖²_2 > 2t``, else 0
  (hard thresholding, so ``d`` counts changed pixels); L1 — ``sign(v) max(|v| − t, 0)``; L2 —
  ``v max(1 − t/‖v‖_2, 0)``; L∞ — ``clamp(v, −θ, θ)`` with ``θ`` solving ``Σ max(|v_i| − θ, 0) = t``
  (Moreau: ``v − Π_{‖·‖_1 ≤ t}(v)``).

Units: ``x`` in the model's input space [−1, 1]; L1, L2 and L∞ distances are in that space (halve them
for the [0, 1] scale, as :data:`SCALE_TO_01` says), L0 counts changed pixels (any channel) and does not
depend on the scale. An image already misclassified has distance 0; one for which no misclassified
starting point was found has distance ``inf`` (robust at every ε, as far as this attack can tell).

Pure: torch only (no Ray, no MLflow).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ATTACKS", "RUNS", "NORMS", "LOGBARRIER_NORMS", "PROX_NORMS", "SCALE_TO_01", "MU_DEFAULT", "margin",
           "distance", "prox", "min_norm_attack", "robust_curve"]

LOGBARRIER_NORMS = ("l2", "linf")
PROX_NORMS = ("l0", "l1", "l2", "linf")
NORMS = PROX_NORMS
ATTACKS = {"logbarrier": LOGBARRIER_NORMS, "proxlogbarrier": PROX_NORMS}
# Every run as ATTACK-NORM (eval.min_norm_runs takes a list of these), in the order ATTACKS lists them.
RUNS = tuple(f"{attack}-{norm}" for attack, norms in ATTACKS.items() for norm in norms)
# A distance in [-1, 1] units times this factor is the distance on the [0, 1] pixel scale (u = (x + 1)/2).
SCALE_TO_01 = {"l0": 1.0, "l1": 0.5, "l2": 0.5, "linf": 0.5}
GROW = 1.2  # step-length growth after an accepted step
# First barrier weight μ by norm when none is given (unitless; it then decays by mu_decay per outer step).
# Measured on the demo checkpoint (100 test digits against FAB's median, docs/RESULTS.md): μ 0.1 -> 3 moved
# the medians L2 ×1.08 -> ×0.94-0.96, L∞ ×1.03-1.08 -> ×0.98-1.05, L1 ×1.30 -> ×1.00 (10: ×0.97); a large
# first μ keeps the early iterates inside the misclassified region, where the steps reshape δ freely,
# before the decay brings them to the boundary. L0 went the other way (median 14 pixels at 0.1, 13 at
# 0.3, 15 at 1, 17 at 3).
MU_DEFAULT = {"l0": 0.3, "l1": 3.0, "l2": 3.0, "linf": 3.0}


def first_mu(norm: str, mu: float | None = None) -> float:
    """The first barrier weight a run of ``norm`` uses: ``mu``, or :data:`MU_DEFAULT` where it is None."""
    return MU_DEFAULT[norm] if mu is None else mu
START_ASCENT_STEP = 0.02  # margin-ascent start: L2 step a·√n, [-1, 1] units per entry
START_ASCENT_STEPS = 100
# L0 margin-ascent start: each step moves the SPARSE_ASCENT_FRACTION of entries with the largest |∇c|
# (those the box still lets move that way) by SPARSE_ASCENT_STEP each, [-1, 1] units
SPARSE_ASCENT_FRACTION = 0.01
SPARSE_ASCENT_STEP = 0.25
_FLOOR = 1e-12


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``c = max_{j ≠ y} f[j] − f[y]`` per sample (logit units); ``c > 0`` iff the prediction is wrong
    (ties count as correct)."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true


def distance(delta: Tensor, norm: str) -> Tensor:
    """``d(δ)`` per sample, shape ``[B]``: L1/L2/L∞ of the flattened ``δ``; L0 = pixels (spatial positions)
    where any channel changed."""
    if norm == "l0":
        return (delta != 0).any(dim=1).flatten(1).sum(1).to(delta.dtype) if delta.dim() == 4 \
            else (delta != 0).flatten(1).sum(1).to(delta.dtype)
    flat = delta.flatten(1)
    if norm == "l1":
        return flat.abs().sum(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "linf":
        return flat.abs().amax(1)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def _view(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def prox(v: Tensor, t: Tensor, norm: str) -> Tensor:
    """``prox_{t d}(v) = argmin_u d(u) + ‖u − v‖²_2 / (2t)`` per sample (``t``: shape ``[B]``, > 0)."""
    tt = _view(t, v)
    if norm == "l0":
        # per pixel: keeping v_p costs 1, zeroing it costs ‖v_p‖²/(2t)
        energy = v.pow(2).sum(1, keepdim=True) if v.dim() == 4 else v.pow(2)
        return v * (energy > 2 * tt)
    if norm == "l1":
        return v.sign() * (v.abs() - tt).clamp_min(0)
    if norm == "l2":
        n = _view(v.flatten(1).norm(dim=1), v)
        return v * (1 - tt / n.clamp_min(_FLOOR)).clamp_min(0)
    if norm == "linf":
        # θ solving Σ_i max(|v_i| − θ, 0) = t (0 when ‖v‖_1 ≤ t): the sorted-threshold rule of the
        # projection onto the L1 ball (Duchi et al. 2008), prox = v − Π = clamp(v, −θ, θ).
        a = v.flatten(1).abs()
        s, _ = a.sort(dim=1, descending=True)
        cum = s.cumsum(1)
        k = torch.arange(1, a.shape[1] + 1, device=v.device, dtype=v.dtype)
        theta_k = (cum - t[:, None]) / k
        rho = (s > theta_k).sum(1).clamp_min(1)  # the largest k with s_k > θ_k
        theta = theta_k.gather(1, (rho - 1)[:, None]).squeeze(1).clamp_min(0)
        theta = torch.where(a.sum(1) <= t, torch.zeros_like(theta), theta)
        th = _view(theta, v)
        return torch.maximum(torch.minimum(v, th), -th)
    raise ValueError(f"norm must be one of {', '.join(PROX_NORMS)}, got {norm!r}")


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


def _bisect(model, x0, y, far, steps) -> Tensor:
    """The point ``x0 + s (far − x0)`` with the smallest ``s`` found by ``steps`` bisections that keeps
    ``far``'s misclassification (``far`` must be misclassified)."""
    lo = torch.zeros(len(y), device=x0.device, dtype=x0.dtype)
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        wrong = margin(_logits(model, x0 + _view(mid, x0) * (far - x0)), y) > 0
        hi = torch.where(wrong, mid, hi)
        lo = torch.where(wrong, lo, mid)
    return x0 + _view(hi, x0) * (far - x0)


def _ascent_step(g: Tensor, xa: Tensor, norm: str) -> Tensor:
    """One margin-ascent step along ``g = ∇c`` in ``norm``'s steepest direction (as a step, [-1, 1] units).

    L∞: ``a sign(g)`` (every entry by ``a``); L2 and L1: ``a √n g/‖g‖_2``; L0: a sparse step, the
    ``k = ⌈SPARSE_ASCENT_FRACTION · n⌉`` entries of largest ``|g|`` that the box ``[-1, 1]`` still lets move
    along ``sign(g)`` move by ``SPARSE_ASCENT_STEP`` each, so the start changes few pixels where the dense
    L2 start changes all of them. Measured on the demo checkpoint (100 test digits, docs/RESULTS.md): the
    sparse start lowers ProxLogBarrier's median L0 from 17 to 14 pixels, but raises its L1 median (×1.34
    FAB's against ×1.30 from the L2 start), so L1 keeps the L2 step (both at μ 0.1, before MU_DEFAULT).
    """
    if norm == "linf":
        return START_ASCENT_STEP * g.sign()
    if norm == "l0":
        flat, xf = g.flatten(1), xa.flatten(1)
        movable = ((flat > 0) & (xf < 1)) | ((flat < 0) & (xf > -1))
        score = torch.where(movable, flat.abs(), torch.zeros_like(flat))
        k = max(1, math.ceil(SPARSE_ASCENT_FRACTION * flat.shape[1]))
        top = score.topk(k, dim=1).indices
        step = torch.zeros_like(flat).scatter(1, top, SPARSE_ASCENT_STEP) * flat.sign() * movable
        return step.view_as(g)
    n = xa[0].numel()
    return START_ASCENT_STEP * math.sqrt(n) * g / _view(g.flatten(1).norm(dim=1).clamp_min(_FLOOR), g)


def _targeted_start(model, x0, y, norm, target, bisection_steps) -> tuple[Tensor, Tensor]:
    """A misclassified point per image reached by ascent on the targeted margin ``f[t] − f[y]`` toward
    the class ``target[i]`` (same steps as :func:`_start`'s ascent, up to ``2 · START_ASCENT_STEPS``),
    pulled back towards ``x0`` by bisection; and whether one was found (any wrong class counts)."""
    xa = x0.clone()
    hit = torch.zeros(len(y), dtype=torch.bool, device=x0.device)
    for _ in range(2 * START_ASCENT_STEPS):
        xr = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(xr).float()
            c = out.gather(1, target[:, None]).squeeze(1) - out.gather(1, y[:, None]).squeeze(1)
            (g,) = torch.autograd.grad(c.sum(), xr)
        hit |= margin(out.detach(), y) > 0
        if hit.all():
            break
        xa = torch.where(_view(hit, xa), xa, (xa + _ascent_step(g, xa, norm)).clamp(-1, 1)).detach()
    hit = margin(_logits(model, xa), y) > 0
    return _bisect(model, x0, y, torch.where(_view(hit, xa), xa, x0), bisection_steps), hit


def _start(model, x0, y, norm, tries, bisection_steps, generator) -> tuple[Tensor, Tensor]:
    """A misclassified point per image and whether one was found.

    Two candidates, each pulled back towards ``x0`` by bisection along its segment, the closer one (in
    ``norm``) kept: uniform noise on [−1, 1] (the papers' start; up to ``tries`` draws), and the first
    misclassified iterate of margin ascent ``x ← clamp(x + a √n ∇c/‖∇c‖_2)`` (L∞: ``x + a sign(∇c)``; L0:
    a sparse step, :func:`_ascent_step`) from ``x0`` (a = 0.02, at most ``START_ASCENT_STEPS``
    steps; ``n`` = entries per image). The barrier method stays inside the
    misclassified region it starts in, and noise alone often starts it in a region far from the nearest
    boundary; the ascent start finds the region PGD would.
    """
    found = torch.zeros(len(y), dtype=torch.bool, device=x0.device)
    far = x0.clone()
    for _ in range(tries):
        if found.all():
            break
        dev = generator.device if generator is not None else x0.device
        noise = (torch.rand(x0.shape, generator=generator, device=dev, dtype=x0.dtype).to(x0.device) * 2 - 1)
        ok = margin(_logits(model, noise), y) > 0
        new = ok & ~found
        far[new] = noise[new]
        found |= ok
    cands, oks = [], []
    if found.any():
        cands.append(_bisect(model, x0, y, far, bisection_steps))
        oks.append(found.clone())
    xa = x0.clone()
    hit = torch.zeros_like(found)
    for _ in range(START_ASCENT_STEPS):
        xr = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            c = margin(model(xr), y)
            (g,) = torch.autograd.grad(c.sum(), xr)
        hit |= c.detach() > 0
        if hit.all():
            break
        xa = torch.where(_view(hit, xa), xa, (xa + _ascent_step(g, xa, norm)).clamp(-1, 1)).detach()
    hit = margin(_logits(model, xa), y) > 0
    if hit.any():
        cands.append(_bisect(model, x0, y, torch.where(_view(hit, xa), xa, x0), bisection_steps))
        oks.append(hit)
    best = x0.clone()
    best_d = torch.full((len(y),), math.inf, device=x0.device, dtype=x0.dtype)
    for cand, ok in zip(cands, oks):
        d = torch.where(ok, distance(cand - x0, norm), torch.full_like(best_d, math.inf))
        closer = d < best_d
        best = torch.where(_view(closer, best), cand, best)
        best_d = torch.minimum(best_d, d)
    return best, torch.isfinite(best_d)


def min_norm_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: str = "logbarrier",
    norm: str = "l2",
    outer_steps: int = 10,
    inner_steps: int = 20,
    mu: float | None = None,
    mu_decay: float = 0.5,
    init_tries: int = 10,
    bisection_steps: int = 15,
    targets: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """LogBarrier / ProxLogBarrier (module docstring) on a batch; returns ``(x_adv, d)``.

    ``x_adv`` (``x``'s shape, in [−1, 1]) is misclassified wherever ``d`` is finite and non-zero; ``d``
    is ``distance(x_adv − x, norm)`` in [−1, 1] units (L0: changed pixels), 0 where ``x`` is already
    misclassified (``x_adv = x``) and ``inf`` where no misclassified start was found (``x_adv = x``).
    ``mu`` is the first barrier weight (unitless, relative to the start's distance; ``None``:
    :data:`MU_DEFAULT` of ``norm``), ``mu_decay`` its factor per outer step. The model's mode is the
    caller's; only input gradients are taken.

    ``targets = K > 0`` runs the barrier ``K`` more times per image, each from a targeted-ascent start
    toward one of the ``K`` wrong classes with the largest logits at ``x`` (:func:`_targeted_start`),
    and keeps the closest result: the barrier stays in the misclassified region it starts in, and the
    nearest boundary is often not the one the untargeted start reaches (LogBarrier L2 median over FAB's on
    100 test digits of the 2026-12-03 demo checkpoint: ×1.19 with ``targets = 0``, ×1.06 with 3; on the
    2026-12-04 one ×1.11 with 3; docs/RESULTS.md). It costs ``1 + K`` runs.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if norm not in ATTACKS[attack]:
        raise ValueError(f"{attack} supports the norms {', '.join(ATTACKS[attack])}, got {norm!r}")
    if outer_steps < 1 or inner_steps < 1 or init_tries < 1 or bisection_steps < 0 or targets < 0:
        raise ValueError("outer_steps, inner_steps and init_tries must be >= 1, bisection_steps and targets >= 0")
    mu = first_mu(norm, mu)
    if not mu > 0 or not 0 < mu_decay <= 1:
        raise ValueError(f"mu must be > 0 and mu_decay in (0, 1], got {mu} and {mu_decay}")
    x0 = x.detach()
    alive = margin(_logits(model, x0), y) <= 0  # correctly classified: the ones to attack
    x_adv = x0.clone()
    dist = torch.where(alive, torch.full((len(y),), math.inf, device=x0.device), torch.zeros(len(y), device=x0.device))
    idx = alive.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x_adv, dist
    xa, ya = x0[idx], y[idx]
    starts = [_start(model, xa, ya, norm, init_tries, bisection_steps, generator)]
    if targets > 0:
        ranked = _logits(model, xa).float().scatter(1, ya[:, None], float("-inf")).argsort(1, descending=True)
        for r in range(min(targets, ranked.shape[1] - 1)):
            starts.append(_targeted_start(model, xa, ya, norm, ranked[:, r], bisection_steps))
    best_x = xa.clone()
    best_d = torch.full((len(ya),), math.inf, device=x0.device)
    for start, found in starts:
        if not found.any():
            continue
        x_run = _barrier(model, xa[found], ya[found], start[found] - xa[found], attack=attack, norm=norm,
                         outer_steps=outer_steps, inner_steps=inner_steps, mu=mu, mu_decay=mu_decay)
        d_run = torch.full_like(best_d, math.inf)
        d_run[found] = distance(x_run - xa[found], norm).to(best_d.dtype)
        x_full = xa.clone()
        x_full[found] = x_run
        closer = d_run < best_d
        best_x = torch.where(_view(closer, best_x), x_full, best_x)
        best_d = torch.where(closer, d_run, best_d)
    found = torch.isfinite(best_d)
    # The returned image is misclassified by construction; its distance is measured on it.
    x_adv[idx[found]] = best_x[found]
    dist[idx[found]] = best_d[found].to(dist.dtype)
    return x_adv, dist


def _barrier(model, xa, ya, delta, *, attack, norm, outer_steps, inner_steps, mu, mu_decay) -> Tensor:
    """The barrier iterations (module docstring) from the misclassified ``xa + delta``; returns the
    closest misclassified image they visited (``xa``'s shape, in [−1, 1])."""
    scale = distance(delta, norm).clamp_min(_FLOOR)  # d(δ_start): makes μ unitless
    best, best_d = delta.clone(), distance(delta, norm)
    prox_step = attack == "proxlogbarrier"
    epigraph = attack == "logbarrier" and norm == "linf"
    # first step length: a tenth of the way back (per entry for the L∞ sign steps, in L2 otherwise)
    step = 0.1 * distance(delta, "linf" if epigraph else "l2").clamp_min(_FLOOR)
    n_entries = xa[0].numel()
    # L∞ LogBarrier: the epigraph variable τ ≥ |δ_i| (one more coordinate, started just above the start)
    tau = distance(delta, "linf") * 1.01 + 1e-6

    def phi_and_grad(d_: Tensor, tau_: Tensor, mu_k: float, need_grad: bool):
        d_ = d_.detach().requires_grad_(need_grad)
        tau_ = tau_.detach().requires_grad_(need_grad and epigraph)
        with torch.enable_grad() if need_grad else torch.no_grad():
            c = margin(model(xa + d_), ya)
            barrier = -mu_k * scale * torch.log(c.clamp_min(_FLOOR))
            if epigraph:
                slack = (_view(tau_, d_) ** 2 - d_**2).flatten(1)
                barrier = barrier - mu_k * scale * torch.log(slack.clamp_min(_FLOOR)).sum(1) / n_entries
                dist_term = tau_
            else:
                dist_term = distance(d_, norm) if prox_step else (d_.flatten(1).pow(2).sum(1) + _FLOOR).sqrt()
            smooth = barrier if prox_step else barrier + dist_term
            grads = torch.autograd.grad(smooth.sum(), [d_, tau_] if epigraph else [d_]) if need_grad else None
        phi = (barrier + (distance(d_.detach(), norm) if prox_step else dist_term)).detach()
        feasible = c.detach() > 0
        if epigraph:
            feasible &= (d_.detach().abs().flatten(1).amax(1) < tau_.detach())
        return phi, feasible, grads

    for k in range(outer_steps):
        mu_k = mu * mu_decay**k
        for _ in range(inner_steps):
            phi, _, grads = phi_and_grad(delta, tau, mu_k, True)
            grad = grads[0]
            tau_trial = tau
            if prox_step:
                # proximal gradient: step length t on the barrier, threshold t in the distance's prox
                t = step / grad.flatten(1).norm(dim=1).clamp_min(_FLOOR)
                trial = prox(delta - _view(t, delta) * grad, t, norm)
            elif epigraph:
                # steepest descent in L∞'s own geometry: every coordinate of (δ, τ) moves by the step length
                trial = delta - _view(step, delta) * grad.sign()
                tau_trial = tau - step * grads[1].sign()
            else:
                gnorm = grad.flatten(1).norm(dim=1).clamp_min(_FLOOR)
                trial = delta - _view(step / gnorm, delta) * grad
            trial = (xa + trial).clamp(-1, 1) - xa
            phi_new, feasible, _ = phi_and_grad(trial, tau_trial, mu_k, False)
            ok = feasible & (phi_new <= phi)
            delta = torch.where(_view(ok, delta), trial, delta)
            tau = torch.where(ok, tau_trial, tau)
            step = torch.where(ok, step * GROW, step / 2)
            d_now = distance(delta, norm)
            better = d_now < best_d
            best = torch.where(_view(better, delta), delta, best)
            best_d = torch.minimum(best_d, d_now)
    return (xa + best).clamp(-1, 1)


def robust_curve(dist: Tensor, eps: list[float] | Tensor) -> list[float]:
    """Robust accuracy at each ε implied by per-image minimum distances: ``mean[d_i > ε]``.

    An upper bound on the true robust accuracy (the attack may miss closer adversarial points); at ε = 0
    it is the clean accuracy, since misclassified images have ``d = 0``.
    """
    d = dist.detach().cpu()
    # ε in the distances' own dtype, so that ε = d_i (e.g. a float32 0.1) compares equal
    return [(d > torch.tensor(float(e), dtype=d.dtype)).double().mean().item() for e in eps]


def min_norm_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    runs: list[str],
    outer_steps: int = 10,
    inner_steps: int = 20,
    mu: float | None = None,
    mu_decay: float = 0.5,
    targets: int = 0,
    curve_points: int = 21,
    batch_size: int = 256,
    seed: int = 0,
    reference=None,
    progress=lambda s: None,
) -> dict:
    """Every ``ATTACK-NORM`` run of ``runs`` on ``(x, y)``: per-image distances, their median and the
    robust-accuracy curve, with the protocol.

    ``reference(norm) -> (d [N], protocol) | None`` gives a public attack's distances (FAB) for the same
    images; where it answers, the run also reports ``reference_median`` and ``median_ratio`` (ours over
    the reference's, over the images both broke: ≤ 1 means ours found closer points). Medians are over
    the images each attack broke (finite, non-zero distance). The curve is
    ``robust_accuracy(ε) = mean[d_i > ε]`` at ``curve_points`` ε from 0 to the largest finite distance,
    listed in both scales (``eps`` in [-1, 1] units, ``eps_01`` on [0, 1]; L0 counts pixels on both).
    """
    out: dict = {}
    refs: dict[str, tuple] = {}
    for run in runs:
        attack, norm = run.split("-", 1)
        progress(f"min-norm: {attack} {norm} on {len(y)} images")
        g = torch.Generator().manual_seed(seed)
        device = next(model.parameters(), x).device
        d = torch.cat([
            min_norm_attack(model, x[s : s + batch_size].to(device), y[s : s + batch_size].to(device), attack=attack,
                            norm=norm, outer_steps=outer_steps, inner_steps=inner_steps, mu=mu, mu_decay=mu_decay,
                            targets=targets, generator=g)[1].cpu()
            for s in range(0, len(y), batch_size)
        ])
        broke = torch.isfinite(d) & (d > 0)
        top = d[torch.isfinite(d)].max().item() if torch.isfinite(d).any() else 0.0
        eps = [top * i / (curve_points - 1) for i in range(curve_points)]
        k = SCALE_TO_01[norm]
        entry = {
            "attack": attack, "norm": norm, "mu": first_mu(norm, mu),
            "unit": "changed pixels" if norm == "l0" else "model input space [-1, 1]",
            "unit_01": "changed pixels" if norm == "l0" else "[0, 1] pixel scale (half)",
            "median": d[broke].median().item() if broke.any() else None,
            "median_01": d[broke].median().item() * k if broke.any() else None,
            "num_broken": int(broke.sum()), "num_already_wrong": int((d == 0).sum()),
            "num_not_found": int((~torch.isfinite(d)).sum()),
            "curve": {"eps": eps, "eps_01": [e * k for e in eps], "robust_accuracy": robust_curve(d, eps)},
            "distances": [v if math.isfinite(v) else None for v in d.tolist()],
        }
        if reference is not None and norm not in refs:
            refs[norm] = reference(norm)
        if reference is not None and refs[norm] is not None:
            d_ref, proto = refs[norm]
            both = broke & torch.isfinite(d_ref) & (d_ref > 0)
            entry["reference"] = proto
            entry["reference_distances"] = [v if math.isfinite(v) else None for v in d_ref.tolist()]
            if both.any():
                entry["reference_median"] = d_ref[both].median().item()
                entry["median_ratio"] = d[both].median().item() / max(d_ref[both].median().item(), _FLOOR)
                entry["num_compared"] = int(both.sum())
        out[run] = entry
    return out
