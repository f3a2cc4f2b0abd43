"""rjem_ray.evaluation.masking: the report flags a model made to mask its gradients and passes the same model unmasked.

The masked model is a quantising input layer ``round(x·k)/k`` in front of a small trained MLP: its
gradient is zero almost everywhere, so PGD and APGD stall while the black-box Square attack still works;
its clean accuracy is the MLP's. Both models are trained for ~2 s on the offline mnist5k digits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.evaluation import masking
from rjem_ray.evaluation.metrics import accuracy

from digit_models import digit_subset, train_digit_mlp

EPS = 0.1  # [-1, 1] units (0.05 on [0, 1])
QUERIES = 1000  # Square's budget in these tests (5,000 in the standard suite); enough to beat a masked model


class Quantise(nn.Module):
    """``round(x·k)/k``: a staircase whose derivative is zero wherever it is defined."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.round(x * self.k) / self.k


@pytest.fixture(scope="module")
def mlp():
    return train_digit_mlp()


@pytest.fixture(scope="module")
def data():
    return digit_subset("test", 150)


@pytest.fixture(scope="module")
def plain_report(mlp, data):
    return masking.masking_report(mlp, *data, eps=EPS, square_queries=QUERIES)


@pytest.fixture(scope="module")
def masked_model(mlp):
    return nn.Sequential(Quantise(2), mlp).eval()


def test_a_masking_model_is_flagged(masked_model, mlp, data):
    x, y = data
    xg = x[:4].clone().requires_grad_(True)
    F.cross_entropy(masked_model(xg), y[:4]).backward()
    assert xg.grad.abs().max() == 0  # the construction: no gradient reaches the input
    assert accuracy(masked_model, x, y) > accuracy(mlp, x, y) - 0.05  # and it still classifies

    r = masking.masking_report(masked_model, x, y, eps=EPS, square_queries=QUERIES)
    text = "\n".join(r["warnings"])
    assert r["full_range_accuracy"] > masking.FULL_RANGE_ACCURACY_MAX
    assert f"accuracy at ε=2 in [-1, 1] (the whole input range) is {r['full_range_accuracy']:.2f}" in text
    assert "gradients look masked" in text
    assert r["square_accuracy"] < r["whitebox_accuracy"] - masking.BLACKBOX_MARGIN
    assert "Square (black-box) finds more adversarial examples than the white-box attacks" in text
    assert r["pgd_autoattack_gap"] > masking.PGD_GAP_MAX
    assert f"PGD-20 overstates robustness by {r['pgd_autoattack_gap']:.2f} against AutoAttack" in text
    assert "zero gradient" in text  # the library's own check, passed on
    assert all("\n" not in w for w in r["warnings"])  # `rjem eval` prints each as one line


def test_the_same_model_unmasked_passes(plain_report):
    r = plain_report
    assert r["warnings"] == []
    assert r["full_range_accuracy"] <= masking.FULL_RANGE_ACCURACY_MAX
    assert r["autoattack_accuracy"] <= r["pgd_accuracy"] + 1e-12  # the stronger attack finds at least as much
    assert r["autoattack_accuracy"] <= r["clean_accuracy"] and r["pgd_accuracy"] < r["clean_accuracy"]


def test_the_report_holds_the_grid_in_both_scales_and_its_protocol(plain_report):
    r = plain_report
    eps = [p["eps"] for p in r["pgd_grid"]]
    assert eps == sorted(eps) and eps == pytest.approx([0.05, 0.1, 0.2, 0.4, 2.0])
    assert all(p["eps_01_scale"] == pytest.approx(p["eps"] / 2) for p in r["pgd_grid"])
    acc = [p["accuracy"] for p in r["pgd_grid"]]
    assert all(a >= b - masking.MONOTONE_TOLERANCE for a, b in zip(acc, acc[1:]))
    assert r["pgd_accuracy"] == acc[1] and r["full_range_accuracy"] == acc[-1]
    assert r["eps"] == EPS and r["eps_01_scale"] == EPS / 2 and "[-1, 1]" in r["eps_unit"]
    assert r["num_samples"] == 150 and r["square_queries"] == QUERIES
    assert r["whitebox_attacks"] == list(masking.WHITEBOX_ATTACKS)
    assert r["pgd_autoattack_gap"] == pytest.approx(r["pgd_accuracy"] - r["autoattack_accuracy"])
    assert r["thresholds"]["pgd_gap_max"] == masking.PGD_GAP_MAX


def test_a_given_autoattack_result_is_used_for_the_gap_and_the_white_box_figure(mlp, data):
    x, y = data
    # A stand-in for a standard run: white-box attacks left 0.30, Square took it to 0.25.
    given = (0.25, {"version": "standard", "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"],
                    "accuracy_after": [{"attack": "apgd-ce", "accuracy": 0.4}, {"attack": "apgd-t", "accuracy": 0.35},
                                       {"attack": "fab-t", "accuracy": 0.30}, {"attack": "square", "accuracy": 0.25}],
                    "library_warnings": []})
    r = masking.masking_report(mlp, x, y, eps=EPS, eps_factors=[1.0], autoattack=given, square_queries=100)
    assert r["autoattack_accuracy"] == 0.25 and r["whitebox_accuracy"] == 0.30
    assert r["whitebox_attacks"] == ["apgd-ce", "apgd-t", "fab-t"]
    text = "\n".join(r["warnings"])
    assert f"PGD-20 overstates robustness by {r['pgd_accuracy'] - 0.25:.2f} against AutoAttack" in text
    assert "Square broke 0.05 of the images that survived the white-box attacks" in text
    assert [p["eps"] for p in r["pgd_grid"]] == [EPS, 2.0]


def test_full_range_eps_holds_the_whole_cube():
    x = torch.zeros(3, 1, 4, 4)
    assert masking.full_range_eps("linf", x) == 2.0
    assert masking.full_range_eps("l2", x) == pytest.approx(2 * math.sqrt(16))
    corner_to_corner = torch.ones(16) * 2  # from all −1 to all +1
    assert corner_to_corner.norm().item() == pytest.approx(masking.full_range_eps("l2", x))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(eps=EPS, eps_factors=[]), "eps_factors must be non-empty"),
    (dict(eps=EPS, eps_factors=[1.0, -2.0]), "eps_factors must be non-empty and > 0"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError) as exc:
        masking.masking_report(nn.Flatten(), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), **kwargs)
    assert fragment in str(exc.value)


def test_grid_points_beyond_the_full_range_collapse_onto_it(mlp, data):
    x, y = data
    given = (0.5, {"version": "custom", "attacks": ["apgd-ce"], "accuracy_after": [{"attack": "apgd-ce", "accuracy": 0.5}],
                   "library_warnings": []})
    # ε = 0.6 × {0.5, 1, 2, 4} = 0.3, 0.6, 1.2, 2.4: the last is the whole cube, i.e. the full-range point.
    r = masking.masking_report(mlp, x[:20], y[:20], eps=0.6, autoattack=given, square_queries=20)
    assert [p["eps"] for p in r["pgd_grid"]] == pytest.approx([0.3, 0.6, 1.2, 2.0])
