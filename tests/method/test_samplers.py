"""SGLD and PYLD lower the energy, stay in [-1, 1], touch only the input, and PYLD's inner loop is free."""

from __future__ import annotations

import copy

import pytest
import torch

from rjem_ray.method.energy import energy_fn, energy_of
from rjem_ray.method.models import WideResNet
from rjem_ray.method.samplers import SAMPLERS, pyld, run_sampler, sgld

BATCH = 8


@pytest.fixture(scope="module")
def model() -> WideResNet:
    torch.manual_seed(0)
    return WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="none").eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand((BATCH, 1, 12, 12), generator=torch.Generator().manual_seed(1)) * 2 - 1


LABELS = [None, torch.arange(BATCH) % 10]
LABEL_IDS = ["marginal", "joint"]


# Energy gradients of a freshly initialised network are ~1e-3 per pixel, hence step sizes far larger
# than the training defaults (SGLD lr 1, PYLD lr 0.2) to see a clear decrease in a few steps.
@pytest.mark.parametrize("y", LABELS, ids=LABEL_IDS)
def test_sgld_lowers_energy(model, x, y):
    energy = energy_fn(model, y)
    x_q = sgld(energy, x, steps=10, step_size=20.0, noise_std=1e-3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, after = energy(x), energy(x_q)
    assert (after < before).all()
    assert x_q.min() >= -1 and x_q.max() <= 1 and not x_q.requires_grad


@pytest.mark.parametrize("y", LABELS, ids=LABEL_IDS)
def test_pyld_lowers_energy(model, x, y):
    x_q = pyld(model, x, outer_steps=5, inner_steps=3, step_size=5.0, y=y)
    with torch.no_grad():
        before, after = energy_of(model(x), y), energy_of(model(x_q), y)
    assert (after < before).all()
    assert x_q.min() >= -1 and x_q.max() <= 1 and not x_q.requires_grad


def test_pyld_matches_reference_hamiltonian_form(model, x):
    """One outer step equals JEM++'s inner loop on H = <stem(x), p> with p = d(-E)/dh, taken literally."""
    steep = copy.deepcopy(model)
    with torch.no_grad():  # steep enough that the gradient clamp to [-1, 1] is active on some pixels
        steep.fc.weight.mul_(3000.0)
    y = LABELS[1]
    h = steep.stem(x.clone().requires_grad_(True))
    (p,) = torch.autograd.grad(-energy_of(steep.head(h), y).sum(), h)
    expected = x.clone()
    for _ in range(4):
        x_in = expected.clone().requires_grad_(True)
        (grad_h,) = torch.autograd.grad((steep.stem(x_in) * p).sum(), x_in)
        assert grad_h.abs().max() > 1 and grad_h.abs().min() < 1
        expected = (expected + 0.1 * grad_h.clamp(-1, 1)).clamp(-1, 1)
    got = pyld(steep, x, outer_steps=1, inner_steps=4, step_size=0.1, y=y)
    assert not torch.equal(got, x)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("inner_steps", [1, 4])
def test_pyld_evaluates_network_once_per_outer_step(model, x, inner_steps):
    calls = {"stem": 0, "blocks": 0}
    hooks = [
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        for name in calls
    ]
    try:
        pyld(model, x, outer_steps=3, inner_steps=inner_steps, step_size=0.2)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"stem": 3, "blocks": 3}


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("training", [True, False])
def test_samplers_leave_parameter_grads_and_mode_alone(model, x, kind, training):
    model.train(training)
    try:
        with torch.no_grad():  # generation code often runs under no_grad; the sampler must still move
            x_q = run_sampler(model, x, kind=kind, steps=2, inner_steps=2, step_size=5.0, noise_std=0.0)
        assert not torch.equal(x_q, x)
        assert all(p.grad is None for p in model.parameters())
        assert all(m.training is training for m in model.modules())
    finally:
        model.eval()


def test_clamp_keeps_sgld_in_box_even_with_large_noise(model, x):
    x_q = sgld(energy_fn(model), x, steps=2, step_size=1.0, noise_std=2.0,
               generator=torch.Generator().manual_seed(3))
    assert x_q.min() == -1 and x_q.max() == 1  # the noise pushed past both faces and was clamped back
    free = sgld(energy_fn(model), x, steps=2, step_size=1.0, noise_std=2.0, clamp=False,
                generator=torch.Generator().manual_seed(3))
    assert free.abs().max() > 1


def test_sgld_is_reproducible_with_a_generator(model, x):
    runs = [
        sgld(energy_fn(model), x, steps=2, step_size=1.0, noise_std=0.01, generator=torch.Generator().manual_seed(4))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kind", SAMPLERS)
def test_run_sampler_dispatches(model, x, kind):
    y = LABELS[1]
    got = run_sampler(model, x, kind=kind, steps=2, inner_steps=3, step_size=5.0, noise_std=0.0, y=y)
    if kind == "sgld":
        expected = sgld(energy_fn(model, y), x, steps=2, step_size=5.0, noise_std=0.0)
    else:
        expected = pyld(model, x, outer_steps=2, inner_steps=3, step_size=5.0, y=y)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_zero_steps_return_input(model, x, kind):
    x_q = run_sampler(model, x, kind=kind, steps=0, inner_steps=5, step_size=1.0, noise_std=0.01)
    assert torch.equal(x_q, x) and x_q.data_ptr() != x.data_ptr()
    assert torch.equal(pyld(model, x, outer_steps=3, inner_steps=0, step_size=1.0), x)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"kind": "hmc"}, "kind"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"inner_steps": -2}, "inner_steps"),
        ({"step_size": -0.1}, "step_size"),
        ({"noise_std": float("nan")}, "noise_std"),
    ],
)
def test_bad_arguments_name_themselves(model, x, kwargs, name):
    args = {"kind": "sgld", "steps": 1, "inner_steps": 1, "step_size": 1.0, "noise_std": 0.01, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name} must") as err:
        run_sampler(model, x, **args)
    if name == "kind":
        assert "sgld" in str(err.value) and "pyld" in str(err.value)


def test_direct_sampler_arguments_are_validated(model, x):
    with pytest.raises(ValueError, match="^outer_steps must"):
        pyld(model, x, outer_steps=-1, inner_steps=1, step_size=0.2)
    with pytest.raises(ValueError, match="^noise_std must"):
        sgld(energy_fn(model), x, steps=1, step_size=1.0, noise_std=-1.0)


def _manual_pyld(model, x, y, outer_steps, inner_steps, step_size, outer_step_size):
    """PYLD written out: g = ∂(−E)/∂x through the whole network, x ← clamp(x + η g), then n inner steps
    x ← clamp(x + lr · clamp(g, −1, 1)) that reuse g (taken before the outer step)."""
    out = x.clone()
    for _ in range(outer_steps):
        x_in = out.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(-energy_of(model(x_in), y).sum(), x_in)
        if outer_step_size > 0:
            out = (out + outer_step_size * g).clamp(-1, 1)
        for _ in range(inner_steps):
            out = (out + step_size * g.clamp(-1, 1)).clamp(-1, 1)
    return out


@pytest.mark.parametrize("outer_steps", [1, 2])
def test_pyld_outer_step_size_leads_each_outer_step_with_a_plain_gradient_step(model, x, outer_steps):
    steep = copy.deepcopy(model)
    with torch.no_grad():  # gradients of order 1-10 per pixel: the η step moves pixels and hits the box
        steep.fc.weight.mul_(3000.0)
    y, eta = LABELS[1], 0.05
    x_in = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(-energy_of(steep(x_in), y).sum(), x_in)
    assert ((x + eta * g).abs() > 1).any()  # the clamp after the η step is exercised

    got = pyld(steep, x, outer_steps=outer_steps, inner_steps=3, step_size=0.1, y=y, outer_step_size=eta)
    torch.testing.assert_close(got, _manual_pyld(steep, x, y, outer_steps, 3, 0.1, eta), atol=1e-6, rtol=0)
    old = pyld(steep, x, outer_steps=outer_steps, inner_steps=3, step_size=0.1, y=y)
    assert (got - old).abs().max() > 0.05  # the η step changed the result
    # η = 0 is the old behaviour, exactly
    assert torch.equal(pyld(steep, x, outer_steps=outer_steps, inner_steps=3, step_size=0.1, y=y, outer_step_size=0.0),
                       old)
    torch.testing.assert_close(old, _manual_pyld(steep, x, y, outer_steps, 3, 0.1, 0.0), atol=1e-6, rtol=0)
    # run_sampler hands η to PYLD
    via = run_sampler(steep, x, kind="pyld", steps=outer_steps, inner_steps=3, step_size=0.1, noise_std=0.0, y=y,
                      outer_step_size=eta)
    assert torch.equal(via, got)


def test_pyld_refuses_a_negative_outer_step_size(model, x):
    with pytest.raises(ValueError, match="^outer_step_size must"):
        pyld(model, x, outer_steps=1, inner_steps=1, step_size=0.2, outer_step_size=-0.1)
    with pytest.raises(ValueError, match="^outer_step_size must"):
        run_sampler(model, x, kind="pyld", steps=1, inner_steps=1, step_size=0.2, noise_std=0.0,
                    outer_step_size=float("nan"))
