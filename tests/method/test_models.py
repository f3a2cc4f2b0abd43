import pytest
import torch

from rjem_ray.method.energy import joint_energy, marginal_energy
from rjem_ray.method.models import WideResNet


@pytest.mark.parametrize("channels, size, stride", [(1, 28, 1), (3, 32, 1), (3, 17, 2), (1, 12, 1)])
def test_any_input_size_and_channel_count(channels, size, stride):
    m = WideResNet(depth=10, widen=1, num_classes=7, in_channels=channels, norm="batch", stem_stride=stride)
    out = m(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)


def test_forward_is_head_of_stem_and_stem_is_linear():
    torch.manual_seed(0)
    m = WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="none").eval()
    x, z = torch.randn(2, 1, 12, 12), torch.randn(2, 1, 12, 12)
    assert torch.allclose(m(x), m.head(m.stem(x)))
    bias = m.stem.bias.view(1, -1, 1, 1)
    # linear up to its bias: stem(x + z) - bias = (stem(x) - bias) + (stem(z) - bias)
    assert torch.allclose(m.stem(x + z) - bias, (m.stem(x) - bias) + (m.stem(z) - bias), atol=1e-5)


def test_energies_match_their_definitions():
    torch.manual_seed(0)
    m = WideResNet(depth=10, widen=1, num_classes=5, in_channels=1, norm="none").eval()
    x, y = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    logits = m(x)
    assert torch.allclose(m.energy(x), -torch.logsumexp(logits, 1))
    assert torch.allclose(m.joint_energy(x, y), -logits[torch.arange(4), y])
    # E(x) = -log sum_y exp(-E(x, y)) and E(x) <= E(x, y) for every y
    assert torch.all(marginal_energy(logits) <= joint_energy(logits, y) + 1e-6)


def test_bad_depth_and_norm_are_rejected():
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=12)
    with pytest.raises(ValueError, match="model.norm"):
        WideResNet(depth=10, norm="layer")


def test_group_norm_output_depends_on_the_sample_alone():
    """GroupNorm: an image's logits are the same alone, in any batch, in train or eval mode (BatchNorm's are not)."""
    torch.manual_seed(0)
    x = torch.randn(6, 1, 12, 12)
    gn = WideResNet(depth=10, widen=2, num_classes=10, in_channels=1, norm="group")
    assert any(isinstance(mod, torch.nn.GroupNorm) for mod in gn.modules())
    with torch.no_grad():
        batch_train = gn.train()(x)
        alone_eval = torch.cat([gn.eval()(x[i : i + 1]) for i in range(6)])
        shuffled = gn.train()(torch.cat([x[3:], torch.randn(4, 1, 12, 12) * 5, x[:3]]))
    assert torch.allclose(batch_train, alone_eval, atol=1e-5)
    assert torch.allclose(torch.cat([shuffled[7:], shuffled[:3]]), batch_train, atol=1e-5)
    bn = WideResNet(depth=10, widen=2, num_classes=10, in_channels=1, norm="batch")
    with torch.no_grad():
        # the control: BatchNorm's train-mode output on a sample changes with its batch
        assert not torch.allclose(bn.train()(x)[:3], bn.train()(torch.cat([x[:3], x[3:] * 5]))[:3], atol=1e-3)


def _activation_inputs(m: WideResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a LeakyReLU of the network reads: the inputs of the (identity) norm modules."""
    seen: list[torch.Tensor] = []
    hooks = [mod.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
             for name, mod in m.named_modules() if name.endswith(("bn1", "bn2", "final_norm"))]
    m(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("channels, stride", [(1, 1), (3, 2)])
def test_farkas_wrn_keeps_an_active_unit_in_every_layer(channels, stride):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 16, 16)
    nets = {n: WideResNet(depth=16, widen=2, num_classes=10, in_channels=channels, norm=n, stem_stride=stride).eval()
            for n in ("farkas", "none")}
    for net in nets.values():
        with torch.no_grad():  # biases that kill every unit of an ordinary network
            for mod in net.modules():
                if isinstance(mod, torch.nn.Conv2d):
                    mod.bias.fill_(-10.0)
    farkas = _activation_inputs(nets["farkas"], x)
    assert len(farkas) == 2 * 6 + 1  # bn1 and bn2 of 2·3 blocks, and the final one
    for h in farkas:
        # at every pixel of every image at least one channel is active (pre-activation > 0)
        assert (h.amax(1) > 0).all()
    # the same network without Farkas layers has layers with dead pixels under those biases
    assert any((h.amax(1) <= 0).any() for h in _activation_inputs(nets["none"], x))
    # the invariant behind it: Σ_{c<C} z_c + √(C−1) z_C = 0 at every pixel
    for h in farkas:
        c = h.shape[1]
        torch.testing.assert_close(h[:, :-1].sum(1) + (c - 1) ** 0.5 * h[:, -1], torch.zeros_like(h[:, 0]),
                                   atol=1e-3, rtol=0)


def test_farkas_wrn_trains_through_build_model_and_keeps_the_stem_linear():
    from rjem_ray.config import load_config
    from rjem_ray.core.data import dataset_info
    from rjem_ray.method.models import FarkasConv2d, build_model

    cfg = load_config("tune_configs/smoke.yaml", ["model.norm=farkas"])
    m = build_model(cfg.model, dataset_info("mnist5k"))
    assert isinstance(m.stem, FarkasConv2d) and not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    x, z = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    b = m.stem(torch.zeros_like(x))
    torch.testing.assert_close(m.stem(x + z) - b, (m.stem(x) - b) + (m.stem(z) - b), atol=1e-5, rtol=1e-5)
    loss = m(x).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
