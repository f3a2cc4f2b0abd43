import pytest
import torch

from rjem_ray.config import GenerateConfig, SamplerConfig
from rjem_ray.core.data import load_split, to_model_space
from rjem_ray.evaluation.generate import generate, reduce_contrast
from rjem_ray.method.gmm import fit_class_gmm
from rjem_ray.method.models import WideResNet


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


def test_l2_pgd_mode_leaves_pixels_of_small_gradient_still_where_linf_moves_them(setup):
    """generate.pgd_norm: a linear model that reads a central 8x8 patch (weights ~1) and the rest of the
    image only faintly (1e-4). L∞ sign steps move the faint pixels by the full budget anyway (the
    salt-and-pepper background); L2 steps follow the gradient, so they stay put, inside the L2 ball."""
    _, gmm = setup
    g = torch.Generator().manual_seed(11)
    w = torch.randn(10, 1, 28, 28, generator=g) * 1e-4
    w[:, :, 10:18, 10:18] = torch.randn(10, 1, 8, 8, generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(w.flatten(1))
    outside = torch.ones(1, 1, 28, 28, dtype=torch.bool)
    outside[:, :, 10:18, 10:18] = False
    seeds, _ = gmm.sample(16, classes=torch.full((16,), 4, dtype=torch.long), generator=torch.Generator().manual_seed(2))
    moved = {}
    for norm, eps in (("linf", 0.5), ("l2", 4.0)):
        cfg = gen_cfg(batch_size=16, pgd_norm=norm, pgd_eps=eps, pgd_steps=20, pgd_step_size=2.5 * eps / 20)
        x, _ = generate(model, gmm, cfg, mode="pgd", n=16, classes=4, generator=torch.Generator().manual_seed(2))
        delta = x - seeds
        moved[norm] = delta.abs()[outside.expand_as(delta)]
        if norm == "l2":
            assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-4
        with torch.no_grad():
            assert (model(x)[:, 4] - model(seeds)[:, 4]).mean() > 0.5
    assert (moved["linf"] > 0.2).float().mean() > 0.3  # the speckle: a third or more of the faint pixels
    assert moved["l2"].max() < 0.01


def test_energy_mode_lowers_the_conditional_energy(setup):
    model, gmm = setup
    seeds, _ = gmm.sample(16, classes=torch.full((16,), 2, dtype=torch.long), generator=torch.Generator().manual_seed(9))
    x, _ = generate(model, gmm, gen_cfg(batch_size=16), mode="energy", n=16, classes=2,
                    generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (-model(x)[:, 2]).mean() < (-model(seeds)[:, 2]).mean()


def test_reduce_contrast_keeps_the_mean_and_scales_deviations():
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    r = reduce_contrast(x, 0.5, center=None)  # None: each image's own mean (the image-mean centre)
    assert torch.allclose(r.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(r - r.mean((1, 2, 3), keepdim=True), 0.5 * (x - x.mean((1, 2, 3), keepdim=True)), atol=1e-6)


def test_bad_mode_and_class(setup):
    model, gmm = setup
    with pytest.raises(ValueError, match="choose one of energy, pgd, combined"):
        generate(model, gmm, gen_cfg(), mode="diffusion", n=2)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, gmm, gen_cfg(), mode="pgd", n=2, classes=10)


def test_class_mean_contrast_keeps_a_black_background_black():
    # digit-like images: strokes (random grey to white) on a black background, −1 in [-1, 1] units
    background = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    background[..., 1:5, 2:4] = False
    g = torch.Generator().manual_seed(0)
    x = torch.where(background, -1.0, torch.rand(3, 1, 6, 6, generator=g) * 1.5 - 0.5)
    class_mean = torch.where(background, -1.0, 0.4)  # black wherever every image of the class is black
    bg = background.expand_as(x)
    for kappa in (0.0, 0.3, 0.7, 1.0):
        r = reduce_contrast(x, kappa, center=class_mean)
        assert torch.equal(r[bg], torch.full_like(r[bg], -1.0))  # exactly black, not nearly
        assert r.min() >= -1 and r.max() <= 1
        torch.testing.assert_close(r - class_mean, kappa * (x - class_mean), atol=1e-6, rtol=0)
    # the image-mean centre greys the same background: −1 → −1 + (1 − κ)(1 + x̄)
    r = reduce_contrast(x, 0.7)
    x_bar = x.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(r[bg], (-1 + 0.3 * (1 + x_bar)).expand_as(x)[bg], atol=1e-6, rtol=0)
    assert (r[bg] > -1 + 0.05).all()


def test_combined_mode_reduces_contrast_about_the_configured_centre(setup, monkeypatch):
    """With PGD and the sampler replaced by the identity, combined mode is m + κ (x0 − m) of its own seeds,
    m = that sample's class mean (class-mean), its own mean (image-mean) or −1 (floor)."""
    import rjem_ray.evaluation.generate as gen_mod

    model, gmm = setup
    seen = {}

    def identity_sampler(model, x, **kw):
        seen.update(kw)
        return x.clone()

    monkeypatch.setattr(gen_mod, "pgd", lambda model, x, y, **kw: x.clone())
    monkeypatch.setattr(gen_mod, "run_sampler", identity_sampler)
    sampler = SamplerConfig(kind="pyld", steps=1, inner_steps=1, step_size=0.2, outer_step_size=0.3)
    n, batch = 20, 8  # classes cycle 0..9 across batches of 8: every sample needs its own class's mean

    def run(center):
        cfg = gen_cfg(contrast=0.5, batch_size=batch, sampler=sampler, contrast_center=center)
        return generate(model, gmm, cfg, mode="combined", n=n, generator=torch.Generator().manual_seed(3))

    x, y = run("class-mean")
    g = torch.Generator().manual_seed(3)  # the seeds generate drew: one generator, batch by batch
    seeds = torch.cat([gmm.sample(len(yb), classes=yb, generator=g)[0] for yb in y.split(batch)])
    means = gmm.means[y].reshape(seeds.shape)
    torch.testing.assert_close(x, means + 0.5 * (seeds - means), atol=1e-6, rtol=0)
    assert seen["outer_step_size"] == 0.3  # generate.sampler.outer_step_size reaches the sampler
    # pixels black in both the class mean and the seed stay black; the image-mean centre greys them
    black = (means == -1) & (seeds == -1)
    assert black.sum() > 1000 and torch.all(x[black] == -1)
    x_img, _ = run("image-mean")
    x_bar = seeds.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(x_img, x_bar + 0.5 * (seeds - x_bar), atol=1e-6, rtol=0)
    assert (x_img[black] > -1 + 0.05).all()
    # the floor centre, m = −1: every seed pixel's height above black halves; black seed pixels stay black
    x_floor, _ = run("floor")
    torch.testing.assert_close(x_floor, -1 + 0.5 * (seeds + 1), atol=1e-6, rtol=0)
    assert torch.all(x_floor[seeds == -1] == -1)


def test_bn_mode_train_uses_the_batch_statistics_and_leaves_running_statistics_alone(setup):
    """generate.bn_mode=train normalises by the generated batch (so a sample depends on its batch
    mates, unlike eval), restores the model's modes, and does not move BatchNorm's running statistics."""
    model, gmm = setup
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    g = torch.Generator
    cfg_e, cfg_t = gen_cfg(bn_mode="eval"), gen_cfg(bn_mode="train")
    ev, _ = generate(model, gmm, cfg_e, mode="energy", n=8, classes=2, generator=g().manual_seed(3))
    tr, _ = generate(model, gmm, cfg_t, mode="energy", n=8, classes=2, generator=g().manual_seed(3))
    assert not model.training and all(not m.training for m in bns)
    for m, (mu, var) in zip(bns, before):
        assert torch.equal(m.running_mean, mu) and torch.equal(m.running_var, var)
    assert (ev - tr).abs().max() > 1e-3  # a different energy landscape: batch vs running statistics
    # batch statistics: the first 4 samples change when generated in a batch of 4 instead of 8
    tr4, _ = generate(model, gmm, gen_cfg(bn_mode="train", batch_size=4), mode="energy", n=4, classes=2,
                      generator=g().manual_seed(3))
    assert (tr4 - tr[:4]).abs().max() > 1e-3
    ev4, _ = generate(model, gmm, gen_cfg(bn_mode="eval", batch_size=4), mode="energy", n=4, classes=2,
                      generator=g().manual_seed(3))
    torch.testing.assert_close(ev4, ev[:4])  # eval: each sample independent of its batch mates


@pytest.mark.parametrize("mode", ["energy", "pgd", "combined"])
def test_bf16_generation_runs_the_network_in_bf16_and_keeps_images_fp32(setup, mode):
    model, gmm = setup
    seen = []
    hook = model.fc.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    try:
        x16, _ = generate(model, gmm, gen_cfg(), mode=mode, n=8, classes=3, precision="bf16",
                          generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    x32, _ = generate(model, gmm, gen_cfg(), mode=mode, n=8, classes=3, generator=torch.Generator().manual_seed(0))
    assert x16.dtype == torch.float32
    assert seen and all(o == torch.bfloat16 for _, o in seen)  # the classifier's last layer ran in bf16
    # The same images up to bf16 round-off along the chain: most pixels agree. Not the mean: a sign step of PGD
    # flips where bf16 flips a gradient's sign, moving those pixels across the box (a quarter of them in pgd mode,
    # median 0), so the mean sits near 0.05 and turns on the machine's float order.
    d = (x16 - x32).abs()
    assert d.median() < 0.05 and (d > 0.1).float().mean() < 0.4, (float(d.median()), float((d > 0.1).float().mean()))


@pytest.mark.parametrize("mode,conditional", [("pgd", True), ("energy", True), ("energy", False), ("combined", True)])
def test_modes_chain_their_stages_in_order_on_the_requested_classes(setup, monkeypatch, mode, conditional):
    """With PGD and the sampler replaced by marked recorders, each mode is exactly its chain of stages:
    pgd = PGD(x0 → c, targeted); energy = Langevin(x0 | c, or unconditional); combined = Langevin(m + κ(PGD(x0) − m) | c),
    all from the Gaussian-mixture seeds of the requested classes."""
    import rjem_ray.evaluation.generate as gen_mod

    model, gmm = setup
    calls = []

    def fake_pgd(model, x, y, **kw):
        calls.append(("pgd", x.clone(), y.clone(), kw))
        return x + 0.25

    def fake_sampler(model, x, **kw):
        calls.append(("sampler", x.clone(), kw.get("y"), kw))
        return x * 0.5

    monkeypatch.setattr(gen_mod, "pgd", fake_pgd)
    monkeypatch.setattr(gen_mod, "run_sampler", fake_sampler)
    classes = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    cfg = gen_cfg(batch_size=8, contrast=0.6, contrast_center="floor", conditional=conditional)
    x, y = generate(model, gmm, cfg, mode=mode, n=8, classes=classes, generator=torch.Generator().manual_seed(4))
    seeds, _ = gmm.sample(8, classes=classes, generator=torch.Generator().manual_seed(4))
    assert torch.equal(y, classes)
    stages = [c[0] for c in calls]
    assert stages == {"pgd": ["pgd"], "energy": ["sampler"], "combined": ["pgd", "sampler"]}[mode]
    if "pgd" in stages:
        _, x_in, y_in, kw = calls[0]
        torch.testing.assert_close(x_in, seeds, atol=0, rtol=0)
        assert torch.equal(y_in, classes) and kw["targeted"] is True
        assert kw["eps"] == cfg.pgd_eps and kw["steps"] == cfg.pgd_steps and kw["step_size"] == cfg.pgd_step_size
    if mode == "pgd":
        expected = seeds + 0.25
    elif mode == "energy":
        _, x_in, y_in, _ = calls[0]
        torch.testing.assert_close(x_in, seeds, atol=0, rtol=0)
        assert (y_in is None) if not conditional else torch.equal(y_in, classes)
        expected = seeds * 0.5
    else:
        _, x_in, y_in, _ = calls[1]
        between = -1 + 0.6 * (seeds + 0.25 + 1)  # contrast reduced about the floor, between the two stages
        torch.testing.assert_close(x_in, between, atol=1e-6, rtol=0)
        assert torch.equal(y_in, classes)
        expected = between * 0.5
    torch.testing.assert_close(x, expected.clamp(-1, 1), atol=1e-6, rtol=0)


def test_progress_reports_each_batch_of_a_long_generation(setup):
    model, gmm = setup
    lines = []
    generate(model, gmm, gen_cfg(batch_size=8, pgd_steps=1), mode="pgd", n=20, generator=torch.Generator().manual_seed(0),
             progress=lines.append)
    assert lines == ["pgd mode: 8/20 images", "pgd mode: 16/20 images", "pgd mode: 20/20 images"]
    lines.clear()
    generate(model, gmm, gen_cfg(batch_size=8, pgd_steps=1), mode="pgd", n=8, progress=lines.append)
    assert lines == []  # one batch: the caller's own line says enough
