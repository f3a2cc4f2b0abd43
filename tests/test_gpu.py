"""Checks that need a CUDA device (marker ``gpu``): deselected by ``make test`` / CI (``-m "not gpu"``) and
run by ``scripts/gpu_check.sh`` on a GPU machine. On a machine without CUDA they fail, they never skip.

Runnable without pytest too (``python tests/test_gpu.py``): gpu_check.sh does that where pytest is absent.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

try:
    import pytest

    gpu = pytest.mark.gpu
except ImportError:  # the bare GPU machine: no pytest, run as a script
    pytest = None

    def gpu(fn):
        return fn

REPO = Path(__file__).resolve().parents[1]


def _synthetic(cfg, n=256):
    from rjem_ray.core.data import dataset_info, to_model_space
    from rjem_ray.method.gmm import fit_class_gmm

    info = dataset_info(cfg.data.name)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % info.num_classes
    return x, y, fit_class_gmm(to_model_space(x), y, info.num_classes)


def _learner(*overrides, device="cuda:0"):
    from rjem_ray.config import load_config
    from rjem_ray.method.learner import Learner

    cfg = load_config(REPO / "tune_configs" / "smoke.yaml", ["buffer.size=64", "train.batch_size=16", *overrides])
    x, y, gmm = _synthetic(cfg)
    return Learner(cfg, x, y, gmm, device=device)


@gpu
def test_cuda_is_the_default_device_of_a_plain_process():
    from rjem_ray.core.devices import default_device

    assert torch.cuda.is_available(), "this test needs a CUDA device"
    assert default_device() == torch.device("cuda", 0)


@gpu
def test_bf16_compiled_channels_last_step_on_cuda_matches_fp32():
    import warnings

    losses = {}
    for name, over in (("fp32", ["train.precision=fp32", "train.compile=false", "train.channels_last=false"]),
                       ("fast", ["train.precision=auto", "train.compile=auto", "train.channels_last=auto"])):
        learner = _learner(*over)
        assert learner.net.precision == ("bf16" if name == "fast" else "fp32")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses[name] = [learner.step()["loss"] for _ in range(3)]
        fallback = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
        assert not fallback, fallback[0]  # compilation must work on the GPU machine
        assert learner.net.compiled is (name == "fast")
        assert all(p.dtype == torch.float32 and p.is_cuda for p in learner.model.parameters())
        assert learner.buffer.state_dict()["buffer"].dtype == torch.float32
    assert all(math.isfinite(v) for v in losses["fast"])
    # the first step starts from the same weights and data: bf16 round-off only
    assert abs(losses["fast"][0] - losses["fp32"][0]) < 2e-2 * abs(losses["fp32"][0])


@gpu
def test_checkpoint_round_trip_restores_the_cuda_generator(tmp_path=None):
    import tempfile

    from rjem_ray.method.checkpoint import load_state, save_checkpoint

    tmp = Path(tmp_path or tempfile.mkdtemp())
    a = _learner("train.precision=fp32", "train.compile=false")
    a.step()
    save_checkpoint(tmp / "ck", a.state_dict())
    assert "cuda_rng" in load_state(tmp / "ck")["rng"]
    next_a = a.step()["loss"]  # draws PGD's random start from the CUDA generator
    b = _learner("train.precision=fp32", "train.compile=false")
    torch.cuda.manual_seed(12345)  # a different CUDA generator state, restored by the checkpoint
    b.load_state_dict(load_state(tmp / "ck"))
    next_b = b.step()["loss"]
    assert math.isclose(next_b, next_a, rel_tol=1e-5, abs_tol=1e-6), (next_b, next_a)


@gpu
def test_fused_pass_equals_separate_on_cuda():
    from rjem_ray.method.attacks import pgd
    from rjem_ray.method.models import WideResNet
    from rjem_ray.method.samplers import run_sampler
    from rjem_ray.method.inputs import attack_and_sample_fused

    torch.manual_seed(0)
    model = WideResNet(depth=10, widen=2, num_classes=10, in_channels=3, norm="batch").cuda().eval()
    with torch.no_grad():
        model.fc.weight.mul_(50.0)
    x = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    y = torch.arange(8, device="cuda") % 10
    x_q = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    torch.backends.cudnn.deterministic = True
    torch.cuda.manual_seed(3)
    a = pgd(model, x, y, eps=0.1, steps=3, step_size=0.03)
    q = run_sampler(model, x_q, kind="pyld", steps=3, inner_steps=2, step_size=0.2, noise_std=0.0)
    torch.cuda.manual_seed(3)
    fa, fq = attack_and_sample_fused(model, x, y, x_q, eps=0.1, attack_steps=3, attack_step_size=0.03, norm="linf",
                                     random_start=True, sampler_kind="pyld", sampler_steps=3, inner_steps=2,
                                     sampler_step_size=0.2, noise_std=0.0)
    assert torch.allclose(fa, a, atol=1e-4) and torch.allclose(fq, q, atol=1e-4)


if __name__ == "__main__":
    failed = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            try:
                fn()
                print(f"PASS {name}", flush=True)
            except Exception as exc:  # report every check, then fail
                failed += 1
                print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    sys.exit(1 if failed else 0)
