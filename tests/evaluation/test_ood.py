"""The OOD suite (rjem_ray/evaluation/ood.py): what each shift is, what each score computes, how the report ranks them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rjem_ray.evaluation import ood
from rjem_ray.config import ConfigError, load_config
from rjem_ray.core.data import load_split, to_model_space


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    imgs, _ = load_split("mnist5k", "test")
    return to_model_space(imgs[:200])


def _neighbour_corr(x: torch.Tensor) -> float:
    """Mean correlation of horizontally adjacent pixels (1: smooth images, 0: i.i.d. noise)."""
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_auto_expands_to_the_dataset_suite_and_refuses_the_dataset_itself():
    assert ood.shifts_for("mnist5k", ["auto"]) == ["uniform", "photos", "smooth", "inverted"]
    assert ood.shifts_for("cifar10", ["auto"])[:2] == ["svhn", "cifar100"]
    assert ood.shifts_for("mnist5k", ["uniform", "auto", "constant"]) == ["uniform", "photos", "smooth", "inverted",
                                                                          "constant"]
    with pytest.raises(ValueError, match="in-distribution"):
        ood.shifts_for("cifar10", ["cifar10"])


@pytest.mark.parametrize("name", ["uniform", "gaussian", "smooth", "constant", "photos", "inverted"])
def test_every_synthetic_shift_has_the_input_shape_and_range(name, digits):
    x, desc = ood.shift_images(name, 50, digits, torch.Generator().manual_seed(0))
    assert x.shape == (50,) + tuple(digits.shape[1:]) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and desc


def test_shifts_are_what_their_names_say(digits):
    g = torch.Generator().manual_seed(0)
    uniform, _ = ood.shift_images("uniform", 200, digits, g)
    smooth, _ = ood.shift_images("smooth", 200, digits, g)
    photos, _ = ood.shift_images("photos", 200, digits, g)
    constant, _ = ood.shift_images("constant", 20, digits, g)
    inverted, _ = ood.shift_images("inverted", 20, digits, g)
    assert abs(_neighbour_corr(uniform)) < 0.05
    assert _neighbour_corr(smooth) > 0.8 and _neighbour_corr(photos) > 0.6
    assert float(uniform.mean().abs()) < 0.02 and 0.55 < float(uniform.std()) < 0.6  # U(-1, 1): std 1/sqrt(3)
    assert torch.all(constant.flatten(1).std(1) == 0) and constant.flatten(1)[:, 0].unique().numel() == 20
    # each inverted image is the negation of a test image
    rows = {bytes((-d).numpy().tobytes()) for d in digits}
    assert all(bytes(x.numpy().tobytes()) in rows for x in inverted)
    # real photographs: many grey levels, not the digits' mostly-black background
    assert photos.unique().numel() > 1000 and float((photos < -0.95).float().mean()) < 0.2


def test_photos_come_from_the_shipped_photographs():
    photos = ood._photos()
    assert len(photos) == 3 and all(p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 400 for p in photos)
    one = ood.photo_crops(1, 3, 32, torch.Generator().manual_seed(0))
    two = ood.photo_crops(1, 3, 32, torch.Generator().manual_seed(0))
    assert torch.equal(one, two) and one.shape == (1, 3, 32, 32)


def test_unknown_shift_and_score_name_what_is_allowed(digits):
    with pytest.raises(ValueError, match="allowed: auto, uniform"):
        ood.shift_images("mnist-c", 5, digits, torch.Generator())
    with pytest.raises(ValueError, match="allowed: logsumexp, max_softmax, grad_norm"):
        ood.ood_scores(nn.Linear(4, 3), torch.zeros(2, 4), "energy")


def test_scores_compute_their_equations():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x = torch.randn(9, 6)
    logits = model(x)
    assert torch.allclose(ood.ood_scores(model, x, "logsumexp", batch_size=4), torch.logsumexp(logits, 1).detach())
    assert torch.allclose(ood.ood_scores(model, x, "max_softmax"), logits.softmax(1).amax(1).detach())
    # E = -logsumexp(W x + b): dE/dx = -W^T softmax(W x + b)
    grad = -(logits.softmax(1) @ model.weight).detach()
    assert torch.allclose(ood.ood_scores(model, x, "grad_norm", batch_size=4), -grad.norm(dim=1), atol=1e-6)


class _Scale(nn.Module):
    """logits = (a, 0, ..., 0) with a = -mean|x - 0.5|·k: inputs near 0.5 score highest under logsumexp."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        a = -(x - 0.5).abs().flatten(1).mean(1) * self.k
        return torch.stack([a, torch.zeros_like(a)], 1)


def test_report_ranks_each_shift_and_names_its_protocol():
    g = torch.Generator().manual_seed(0)
    x_in = 0.5 + 0.01 * torch.randn(60, 1, 8, 8, generator=g)  # "in distribution": near 0.5 everywhere
    figures, proto = ood.ood_report(_Scale(), x_in, ["uniform", "inverted"], ["logsumexp", "max_softmax"], 40, g)
    assert figures["uniform"]["logsumexp"] == 1.0 and figures["inverted"]["logsumexp"] == 1.0
    # the in-distribution inputs are the least confident under max softmax: the baseline fails here
    assert figures["uniform"]["max_softmax"] == 0.0
    assert proto["shifts"]["uniform"]["num_out"] == 40 and proto["num_in"] == 60
    assert "roc_auc_score" in proto["auroc"] and set(proto["scores"]) == {"logsumexp", "max_softmax", "grad_norm"}


def test_config_names_the_renamed_key_and_guards_the_suite(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("eval: {ood_dataset: svhn}\n")
    with pytest.raises(ConfigError, match=r"eval.ood_dataset was renamed eval.ood_shifts"):
        load_config(bad)
    with pytest.raises(ConfigError, match="in-distribution"):
        load_config("tune_configs/demo.yaml", ["eval.ood_shifts=[mnist5k]"])
    with pytest.raises(ConfigError, match="eval.ood_shifts.*allowed|eval.ood_shifts.*choose"):
        load_config("tune_configs/demo.yaml", ["eval.ood_shifts=[fashion]"])
    with pytest.raises(ConfigError, match="must include logsumexp"):
        load_config("tune_configs/demo.yaml", ["eval.ood_scores=[max_softmax]"])


def test_noise_init_starts_that_fraction_of_chains_from_uniform_noise():
    from rjem_ray.method.gmm import as_init_fn, fit_class_gmm

    imgs, labels = load_split("mnist5k", "train")
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:800]  # the split is class-sorted
    gmm = fit_class_gmm(to_model_space(imgs[pick]), labels[pick], 10)
    draws = {f: as_init_fn(gmm, f)(400, np.random.default_rng(0)) for f in (0.0, 0.5, 1.0)}
    # a pixel of a mixture draw near the digits' black border is close to -1; noise is spread over [-1, 1]
    corner = {f: np.abs(d[:, 0, :3, :3].reshape(len(d), -1).mean(1) + 1) for f, d in draws.items()}
    noisy = {f: float((c > 0.5).mean()) for f, c in corner.items()}
    assert noisy[0.0] < 0.05 and noisy[1.0] > 0.95 and 0.4 < noisy[0.5] < 0.6
    assert np.abs(draws[1.0]).max() <= 1 and abs(float(draws[1.0].mean())) < 0.02
    again = as_init_fn(gmm, 0.5)(400, np.random.default_rng(0))
    assert np.array_equal(again, draws[0.5])  # a function of the numpy RNG state (restores replay it)
    with pytest.raises(ValueError, match="noise_init must be in"):
        as_init_fn(gmm, 1.5)


def test_cifar10_suite_reads_svhn_and_cifar100_through_their_loaders(tmp_path):
    """The natural-image suite on the files a user has: SVHN's .mat and CIFAR-100's pickles (tests/fakedata.py
    writes them in the real formats, channel c in [85c, 85c + 84])."""
    from fakedata import write_cifar100, write_svhn

    write_svhn(tmp_path, n_test=12)
    write_cifar100(tmp_path, n_test=12)
    x_in = torch.zeros(5, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    for name in ("svhn", "cifar100"):
        x, desc = ood.shift_images(name, 8, x_in, g, str(tmp_path))
        assert x.shape == (8, 3, 32, 32) and desc.startswith(f"{name} test split")
        # channel order survives: channel c of the fake files lies in [85c, 85c + 84] / 127.5 - 1
        for c in range(3):
            lo, hi = 85 * c / 127.5 - 1, (85 * c + 84) / 127.5 - 1
            assert lo - 1e-6 <= float(x[:, c].min()) and float(x[:, c].max()) <= hi + 1e-6
    grey, _ = ood.shift_images("svhn", 4, torch.zeros(2, 1, 28, 28), g, str(tmp_path))
    assert grey.shape == (4, 1, 28, 28)  # colour -> grey, 32 -> 28 for a digits model
