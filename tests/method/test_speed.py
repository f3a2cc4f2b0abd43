"""The speed settings (rjem_ray/method/speed.py): each leaves the network's function alone, up to round-off."""

import warnings

import pytest
import torch

from rjem_ray.config import ConfigError, load_config
from rjem_ray.method.models import WideResNet
from rjem_ray.method.speed import FastNet, resolve_precision, resolve_switch


def _model():
    torch.manual_seed(0)
    return WideResNet(depth=10, widen=1, num_classes=10, in_channels=1, norm="batch", stem_stride=2).eval()


def _pass(net, x):
    """Logits, the input gradient of their logsumexp and the parameter gradients: what PGD, the sampler
    and the loss take from the network."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    (gx,) = torch.autograd.grad(out.logsumexp(1).sum(), x, retain_graph=True)
    params = [p for p in net.parameters()]
    gp = torch.autograd.grad(torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % 10), params)
    return out.detach(), gx, gp


def test_auto_settings_follow_the_device():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_switch("compile", "auto", "cpu") is False and resolve_switch("compile", "auto", "cuda") is True
    assert resolve_switch("compile", True, "cpu") is True and resolve_switch("compile", "false", "cuda") is False
    with pytest.raises(ValueError, match="compile 'yes' is not allowed; choose one of auto, true, false"):
        resolve_switch("compile", "yes", "cpu")


@pytest.mark.parametrize("key", ["compile", "channels_last"])
def test_config_accepts_booleans_and_names_the_allowed_values(key):
    assert getattr(load_config("tune_configs/smoke.yaml", [f"train.{key}=true"]).train, key) == "true"
    assert getattr(load_config("tune_configs/smoke.yaml", [f"train.{key}=auto"]).train, key) == "auto"
    with pytest.raises(ConfigError, match=rf"train.{key}: 'sometimes' is not allowed; choose one of auto, true, false"):
        load_config("tune_configs/smoke.yaml", [f"train.{key}=sometimes"])


def test_channels_last_gives_the_same_pass():
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    ref = _pass(FastNet(_model()), x)
    net = FastNet(_model(), channels_last=True)
    assert net.net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    got = _pass(net, x)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert torch.allclose(got[1], ref[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got[2], ref[2]))


def test_a_failed_compilation_warns_once_and_runs_eager(monkeypatch):
    def broken_compile(model, *a, **kw):
        def fn(x):
            raise RuntimeError("backend compiler failed\nwith a long traceback")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    ref = FastNet(_model())(x)
    net = FastNet(_model(), compile=True)
    assert net.compiled
    with pytest.warns(RuntimeWarning, match=r"^\[rjem\] torch.compile failed \(RuntimeError: backend compiler "
                                            r"failed\); running eager$"):
        out = net(x)
    assert torch.equal(out, ref) and not net.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: the eager module runs from now on
        assert torch.equal(net(x), ref)


@pytest.mark.slow  # inductor compiles a forward and a backward graph with the system's C++ compiler (~1 min)
def test_compiled_pass_equals_the_eager_pass():
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    ref = _pass(FastNet(_model()), x)
    net = FastNet(_model(), compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would prove nothing
        got = _pass(net, x)
    assert net.compiled
    assert torch.allclose(got[0], ref[0], atol=1e-4)
    assert torch.allclose(got[1], ref[1], atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got[2], ref[2]))


def _eval_bn_losses(backend: str | None, steps: int, monkeypatch) -> dict[str, list[float]]:
    """Losses of ``steps`` robust-jem steps (PGD and the sampler fused, BatchNorm in eval mode for both),
    eager and compiled; ``backend`` is torch.compile's (``None``: its default, inductor)."""
    import functools

    from rjem_ray.core.data import load_split, to_model_space
    from rjem_ray.method.gmm import fit_class_gmm
    from rjem_ray.method.learner import Learner

    if backend is not None:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    x, y = load_split("mnist5k", "train")
    x, y = x[::8], y[::8]
    gmm = fit_class_gmm(to_model_space(x), y, 10)
    losses = {}
    for c in ("false", "true"):
        cfg = load_config("tune_configs/smoke.yaml", ["buffer.size=64", "train.batch_size=8", f"train.compile={c}",
                                                       "attack.bn_mode=eval", "train.sampler_bn_mode=eval"])
        learner = Learner(cfg, x, y, gmm)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            losses[c] = [learner.step()["loss"] for _ in range(steps)]
        assert learner.net.compiled is (c == "true") and learner.fused
    return losses


def test_compiled_steps_with_eval_mode_batchnorm_equal_the_eager_steps(monkeypatch):
    # The loss's eval-mode view of x_q runs before the train-mode passes update the running statistics
    # in place; a compiled graph saves what it normalised with for its backward (batchnorm.batchnorm_eval
    # gives it copies; without them this backward raises 'modified by an inplace operation').
    # AOTAutograd's graphs run by eager kernels (backend aot_eager): the compiled graphs' saved tensors
    # with eager's arithmetic, so three steps agree to the bit.
    losses = _eval_bn_losses("aot_eager", 3, monkeypatch)
    assert losses["true"] == losses["false"]


@pytest.mark.slow  # compiles every graph variant a step uses (~2 min here)
def test_an_inductor_compiled_step_with_eval_mode_batchnorm_equals_the_eager_step(monkeypatch):
    # One step only: inductor's own kernels round differently, and a ReLU-like kink turns that into
    # gradient differences that the next step's loss shows. On this batch (torch 2.13 CPU) inductor's
    # parameter gradients are up to 2.4% from a float64 reference (final_norm.bias 4.4e-3 but
    # final_norm.weight 5e-7: one of the 8192 final_norm outputs sits 5.6e-7 from leaky_relu's kink),
    # eager's and aot_eager's within 2e-6, and step 2's loss differs by 1.1e-3 (docs/SPEED.md).
    losses = _eval_bn_losses(None, 1, monkeypatch)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5, abs=1e-6)
