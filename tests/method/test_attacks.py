"""PGD respects its ε-ball and [-1, 1], moves the loss the right way, and touches only the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rjem_ray.method.attacks import L2Step, LinfStep, pgd

SHAPE = (1, 4, 4)
CLASSES = 3
TOL = 1e-5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    # Pixels on and near the box's faces, where the ball sticks out of [-1, 1].
    x[: n // 2, 0, 0, :2] = torch.tensor([1.0, -1.0])
    x[: n // 2, 0, 1, :2] = torch.tensor([0.99, -0.99])
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, y


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


@pytest.mark.parametrize("norm, eps, step_size", [("linf", 0.1, 0.03), ("l2", 0.5, 0.2)])
def test_result_stays_in_ball_and_box(norm, eps, step_size):
    x, y = _batch()
    x_adv = pgd(_model(), x, y, eps=eps, steps=10, step_size=step_size, norm=norm,
                generator=torch.Generator().manual_seed(2))
    dist = (x_adv - x).flatten(1).abs().amax(dim=1) if norm == "linf" else _l2(x_adv - x)
    assert (dist <= eps + TOL).all()
    assert dist.max() > 0.5 * eps  # it did move: a no-op attack would pass the bounds trivially
    assert x_adv.min() >= -1 and x_adv.max() <= 1
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and not x_adv.requires_grad


@pytest.mark.parametrize("norm, eps, step_size", [("linf", 0.1, 0.03), ("l2", 0.5, 0.2)])
def test_untargeted_raises_cross_entropy(norm, eps, step_size):
    model, (x, y) = _model(), _batch()
    x_adv = pgd(model, x, y, eps=eps, steps=10, step_size=step_size, norm=norm,
                generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
        # A random point of the ball's surface is the baseline that PGD must clearly beat.
        rand_dir = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
        rand_dir = rand_dir.sign() if norm == "linf" else rand_dir / _l2(rand_dir).view(-1, 1, 1, 1)
        rand = F.cross_entropy(model((x + eps * rand_dir).clamp(-1, 1)), y, reduction="none")
    assert (adv > clean).all()
    assert (adv - clean).mean() > 2.5 * (rand - clean).abs().mean()


@pytest.mark.parametrize("norm, eps, step_size", [("linf", 0.1, 0.03), ("l2", 0.5, 0.2)])
def test_targeted_raises_target_logit(norm, eps, step_size):
    model, (x, y) = _model(), _batch()
    target = (y + 1) % CLASSES
    x_adv = pgd(model, x, target, eps=eps, steps=10, step_size=step_size, norm=norm, targeted=True,
                generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        clean, adv = model(x), model(x_adv)
    rows = torch.arange(len(x))
    assert (adv[rows, target] > clean[rows, target]).all()
    ce_to_target = [F.cross_entropy(logits, target, reduction="none") for logits in (clean, adv)]
    assert (ce_to_target[1] < ce_to_target[0]).all()


def test_same_generator_seed_gives_same_attack():
    model, (x, y) = _model(), _batch()
    runs = [pgd(model, x, y, eps=0.1, steps=3, step_size=0.03, generator=torch.Generator().manual_seed(5))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("training", [True, False])
def test_leaves_parameter_grads_and_mode_alone(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, CLASSES))
    model.train(training)
    x, y = _batch()
    with torch.no_grad():  # callers evaluating under no_grad must still get a real attack
        x_adv = pgd(model, x, y, eps=0.1, steps=2, step_size=0.05)
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training is training for m in model.modules())


@pytest.mark.parametrize("kwargs", [{"eps": 0.0, "steps": 5}, {"eps": 0.1, "steps": 0}])
def test_no_budget_returns_input(kwargs):
    x, y = _batch()
    x_adv = pgd(_model(), x, y, step_size=0.03, **kwargs)
    assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"norm": "l1"}, "norm"),
        ({"eps": -0.1}, "eps"),
        ({"step_size": -0.01}, "step_size"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    x, y = _batch(4)
    args = {"eps": 0.1, "steps": 2, "step_size": 0.03, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must"):
        pgd(_model(), x, y, **args)


@pytest.mark.parametrize("step_cls", [LinfStep, L2Step])
def test_project_is_idempotent_and_lands_in_ball(step_cls):
    x0, _ = _batch()
    far = x0 + 3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    step = step_cls(eps=0.3, step_size=0.1)
    once = step.project(far, x0)
    assert torch.allclose(step.project(once, x0), once, atol=1e-6)
    dist = (once - x0).abs().flatten(1).amax(dim=1) if step_cls is LinfStep else _l2(once - x0)
    assert (dist <= 0.3 + TOL).all() and once.abs().max() <= 1


@pytest.mark.parametrize("step_cls", [LinfStep, L2Step])
def test_random_start_is_in_ball_and_reproducible(step_cls):
    x0, _ = _batch()
    step = step_cls(eps=0.3, step_size=0.1)
    a = step.random_start(x0, torch.Generator().manual_seed(7))
    b = step.random_start(x0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, x0)
    dist = (a - x0).abs().flatten(1).amax(dim=1) if step_cls is LinfStep else _l2(a - x0)
    assert (dist <= 0.3 + TOL).all() and a.abs().max() <= 1


def test_step_directions():
    x = torch.zeros(2, *SHAPE)
    grad = torch.zeros(2, *SHAPE)
    grad[0, 0, 0, 0], grad[0, 0, 1, 1] = 3.0, -4.0  # sample 1 keeps a zero gradient
    linf = LinfStep(eps=1.0, step_size=0.1).step(x, grad)
    l2 = L2Step(eps=1.0, step_size=0.5).step(x, grad)
    assert torch.equal(linf, 0.1 * grad.sign())
    assert torch.allclose(_l2(l2), torch.tensor([0.5, 0.0]))
    assert torch.allclose(l2[0, 0, 0, 0], torch.tensor(0.3)) and torch.isfinite(l2).all()


def test_linf_project_is_the_nearest_point_of_the_cube_then_the_box():
    """``clamp(x0 + clamp(x − x0, −ε, ε), −1, 1)``, entry by entry."""
    x0 = torch.tensor([0.5, 0.5, 0.5, 0.9, -0.9, 0.0]).view(1, 1, 2, 3)
    x = torch.tensor([0.9, 0.1, 0.6, 1.5, -1.5, 0.0]).view(1, 1, 2, 3)
    got = LinfStep(eps=0.3, step_size=0.1).project(x, x0)
    #              clipped to x0+ε, x0−ε, inside (kept), the box's 1 and −1 win over x0±ε, unchanged
    want = torch.tensor([0.8, 0.2, 0.6, 1.0, -1.0, 0.0]).view(1, 1, 2, 3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_l2_project_scales_back_along_the_perturbation_and_keeps_the_inside():
    """``x0 + δ · min(1, ε/‖δ‖₂)`` per sample: outside, the point of the sphere on the segment to x0."""
    x0 = torch.zeros(3, *SHAPE)
    x = torch.zeros(3, *SHAPE)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 0.6, -0.8   # ‖δ‖ = 1 > ε = 0.5: halved
    x[1, 0, 2, 2], x[1, 0, 3, 3] = 0.3, 0.4    # ‖δ‖ = 0.5 = ε: unchanged
    x[2, 0, 0, 1] = 0.1                         # inside: unchanged
    got = L2Step(eps=0.5, step_size=0.1).project(x, x0)
    want = x.clone()
    want[0] *= 0.5
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # a per-sample norm: the far sample does not shrink the others (a batch-wide norm would)
    assert torch.equal(got[2], x[2])


def test_linf_random_start_is_uniform_over_the_cube():
    """``x0 + U[−ε, ε]^d``: per-pixel offsets have mean 0, variance ε²/3 and fill the cube to its faces."""
    x0 = torch.zeros(4000, *SHAPE)
    delta = LinfStep(eps=0.3, step_size=0.1).random_start(x0, torch.Generator().manual_seed(0)) - x0
    # 64k draws: sd of the mean ≈ 0.17/253 ≈ 7e-4, of the variance ≈ 0.03·√(0.8/64000) ≈ 1e-4.
    assert abs(delta.mean().item()) < 4e-3
    assert abs(delta.var().item() - 0.3**2 / 3) < 1e-3  # a normal or a corner draw has another variance
    assert delta.abs().max() <= 0.3 and delta.abs().max() > 0.299
    assert (delta.abs() < 0.03).float().mean().item() == pytest.approx(0.1, abs=0.01)  # flat density


def test_l2_random_start_is_uniform_in_volume_over_the_ball():
    """Radius ``ε · U^{1/d}`` (so ``(r/ε)^d ~ U[0, 1]``) and a uniform direction."""
    n, d = 20000, 16
    x0 = torch.zeros(n, *SHAPE)
    delta = L2Step(eps=0.5, step_size=0.1).random_start(x0, torch.Generator().manual_seed(0)) - x0
    r = _l2(delta) / 0.5
    assert r.max() <= 1 + 1e-6
    u = r.double() ** d
    # U[0, 1]: mean 1/2, variance 1/12 (sd of the mean ≈ 0.002); ε·U (no 1/d power) gives mean 1/(d+1)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # isotropic: every pixel's mean offset ~ 0 and the per-pixel second moments equal (E δ_i² = ε² E r² / d)
    flat = delta.flatten(1).double()
    assert flat.mean(0).abs().max() < 0.01
    second = (flat**2).mean(0)
    assert torch.allclose(second, torch.full_like(second, 0.25 * d / (d + 2) / d), rtol=0.06)


def _linear_two_class(w: torch.Tensor) -> nn.Module:
    """Logits ``[0, ⟨w, x⟩]``: CE(f(x), 0) grows with ⟨w, x⟩, CE(f(x), 1) falls with it."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(w.numel(), 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros_like(w.flatten()), w.flatten()]))
    return model


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_reaches_the_exact_maximiser_for_a_linear_classifier(norm, targeted):
    """Against logits ``[0, ⟨w, x⟩]`` the untargeted loss CE(·, 0) (and the targeted loss towards class 1)
    is maximised (minimised) over the ball at ``x0 + ε·sign(w)`` for L∞ and ``x0 + ε·w/‖w‖₂`` for L2,
    clamped to [−1, 1] where the box cuts the L∞ ball. PGD from x0 gets there and stays."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(SHAPE, generator=g)
    x0 = (torch.rand(2, *SHAPE, generator=g) - 0.5) * 0.8  # inside [-0.4, 0.4]: the box does not bind ...
    if norm == "linf":
        x0[1, 0, 0, 0] = 0.95 * torch.sign(w[0, 0, 0])  # ... except here, where x0 + ε·sign(w) leaves [-1, 1]
    eps = 0.1 if norm == "linf" else 0.5
    y = torch.full((2,), 1 if targeted else 0)
    x_adv = pgd(_linear_two_class(w), x0, y, eps=eps, steps=20, step_size=eps / 4, norm=norm, targeted=targeted,
                random_start=False)
    direction = w.sign() if norm == "linf" else w / w.norm()
    want = (x0 + eps * direction).clamp(-1, 1)
    torch.testing.assert_close(x_adv, want, atol=1e-5, rtol=0)
    if norm == "linf":
        assert x_adv[1, 0, 0, 0].abs().item() == 1.0
