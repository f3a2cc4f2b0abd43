import pytest
import torch

from rjem_ray.config import GenerateConfig, SamplerConfig
from rjem_ray.data import load_split, to_model_space
from rjem_ray.generate import generate, reduce_contrast
from rjem_ray.gmm import fit_class_gmm
from rjem_ray.models import WideResNet


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = load_split("mnist5k", "train")
    x, y = to_model_space(x[::10]), y[::10]
    gmm = fit_class_gmm(x, y, 10)
    model = WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch", stem_stride=2)
    # a few steps of plain training so gradients carry class information
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for i in range(30):
        idx = torch.randint(0, len(y), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval(), gmm


def gen_cfg(**kw):
    base = dict(n=20, pgd_eps=0.5, pgd_steps=10, pgd_step_size=0.1, contrast=0.7, batch_size=8,
                sampler=SamplerConfig(kind="sgld", steps=10, inner_steps=1, step_size=1.0, noise_std=0.0))
    base.update(kw)
    return GenerateConfig(**base)


@pytest.mark.parametrize("mode", ["energy", "pgd", "combined"])
def test_modes_return_requested_classes_in_range(setup, mode):
    model, gmm = setup
    x, y = generate(model, gmm, gen_cfg(), mode=mode, n=12, classes=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (12, 1, 28, 28) and torch.all(y == 3)
    assert x.min() >= -1 and x.max() <= 1
    assert not model.training  # restored to the caller's mode (eval here)


def test_pgd_mode_raises_the_target_logit_and_respects_its_ball(setup):
    model, gmm = setup
    seeds, _ = gmm.sample(16, classes=torch.full((16,), 7, dtype=torch.long), generator=torch.Generator().manual_seed(5))
    x, y = generate(model, gmm, gen_cfg(batch_size=16), mode="pgd", n=16, classes=7,
                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before, after = model(seeds)[:, 7], model(x)[:, 7]
    assert after.mean() > before.mean() + 0.5
    assert (x - seeds).abs().max() <= 0.5 + 1e-5


def test_energy_mode_lowers_the_conditional_energy(setup):
    model, gmm = setup
    seeds, _ = gmm.sample(16, classes=torch.full((16,), 2, dtype=torch.long), generator=torch.Generator().manual_seed(9))
    x, _ = generate(model, gmm, gen_cfg(batch_size=16), mode="energy", n=16, classes=2,
                    generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (-model(x)[:, 2]).mean() < (-model(seeds)[:, 2]).mean()


def test_reduce_contrast_keeps_the_mean_and_scales_deviations():
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    r = reduce_contrast(x, 0.5)
    assert torch.allclose(r.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(r - r.mean((1, 2, 3), keepdim=True), 0.5 * (x - x.mean((1, 2, 3), keepdim=True)), atol=1e-6)


def test_bad_mode_and_class(setup):
    model, gmm = setup
    with pytest.raises(ValueError, match="choose one of energy, pgd, combined"):
        generate(model, gmm, gen_cfg(), mode="diffusion", n=2)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, gmm, gen_cfg(), mode="pgd", n=2, classes=10)
