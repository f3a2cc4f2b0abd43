"""PGD respects its ε-ball and [-1, 1], moves the loss the right way, and touches only the input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rjem_ray.attacks import STEPS, L2Step, LinfStep, pgd

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


def test_registry_names_every_step():
    assert STEPS == {"linf": LinfStep, "l2": L2Step}
