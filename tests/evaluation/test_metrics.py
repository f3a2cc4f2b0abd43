"""Properties of rjem_ray.evaluation.metrics, each of which fails if the formula or its bookkeeping is wrong."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import rjem_ray  # noqa: F401  (installs the torchvision shim before anything else)
from rjem_ray.evaluation import metrics


class FixedLinear(nn.Module):
    """``f(x) = flatten(x) @ W.T``: predictions known by construction."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x):
        return self.lin(x.flatten(1))


def _sign_model(d: int) -> FixedLinear:
    """Two classes: logits ``[s, −s]`` with ``s = mean(x)``; class 0 iff mean(x) > 0."""
    w = torch.full((1, d), 1.0 / d)
    return FixedLinear(torch.cat([w, -w]))


def _sign_data(n: int, d: int, margin: float, seed: int = 0):
    """Constant images ``±margin``: class 0 for +margin, class 1 for −margin; clean accuracy 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (1 - 2 * y).float().view(-1, 1, 1, 1) * margin * torch.ones(n, 1, 2, d // 2)
    return x, y


# ---------------------------------------------------------------- logits, accuracy, energy


def test_accuracy_counts_argmax_matches_on_a_hand_built_model():
    model = FixedLinear(torch.eye(3))  # logits = x, so the prediction is argmax x
    x = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0], [0, 0, 5.0]])
    y = torch.tensor([0, 1, 2, 1, 0])  # the last two are wrong
    assert metrics.accuracy(model, x, y) == pytest.approx(3 / 5)
    assert metrics.accuracy(model, x, y, batch_size=2) == pytest.approx(3 / 5)
    assert metrics.accuracy(model, x, torch.tensor([1, 0, 0, 1, 1])) == 0.0


def test_predict_logits_is_batched_without_grad_and_keeps_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Dropout(0.0))
    model.train()
    x = torch.randn(10, 3, 2, 2)
    full = metrics.predict_logits(model, x, batch_size=256)
    small = metrics.predict_logits(model, x, batch_size=3)
    torch.testing.assert_close(full, model(x).detach())
    torch.testing.assert_close(small, full)
    assert not full.requires_grad
    assert model.training  # the caller chooses the mode; metrics never flip it


def test_energy_scores_are_logsumexp_of_logits():
    model = FixedLinear(torch.eye(3))
    x = torch.tensor([[0.0, 0, 0], [1.0, 2.0, 3.0]])
    s = metrics.energy_scores(model, x, batch_size=1)
    torch.testing.assert_close(s, torch.tensor([torch.log(torch.tensor(3.0)), torch.logsumexp(x[1], 0)]))
    # A larger uniform shift of the logits is a lower energy, i.e. a higher score.
    assert metrics.energy_scores(model, x + 10)[0] == pytest.approx(s[0].item() + 10, abs=1e-5)


# ---------------------------------------------------------------- robust accuracy


def test_robust_accuracy_equals_accuracy_at_eps_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    x = torch.rand(64, 2, 2, 2) * 2 - 1
    y = torch.randint(0, 3, (64,))
    acc = metrics.accuracy(model, x, y)
    assert 0 < acc < 1
    assert metrics.robust_accuracy(model, x, y, eps=0.0) == pytest.approx(acc)


@pytest.mark.parametrize("norm, small, large", [("linf", 0.05, 0.5), ("l2", 0.1, 2.0)])
def test_robust_accuracy_drops_to_zero_beyond_the_margin(norm, small, large):
    d = 16
    model = _sign_model(d)
    x, y = _sign_data(200, d, margin=0.2)
    assert metrics.accuracy(model, x, y) == 1.0
    # L∞ distance to the boundary is 0.2, L2 distance 0.2·sqrt(16) = 0.8: `small` cannot flip, `large` can.
    g = torch.Generator().manual_seed(0)
    assert metrics.robust_accuracy(model, x, y, eps=small, norm=norm, steps=10, generator=g) == 1.0
    assert metrics.robust_accuracy(model, x, y, eps=large, norm=norm, steps=10, generator=g) == 0.0


def test_robust_accuracy_never_exceeds_accuracy():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(100, 3, 2, 2) * 2 - 1
    y = model(x).argmax(1)
    y[:30] = (y[:30] + 1) % 4  # 70 % clean accuracy by construction
    acc = metrics.accuracy(model, x, y)
    assert acc == pytest.approx(0.7)
    for eps in (0.01, 0.1, 0.3):
        r = metrics.robust_accuracy(model, x, y, eps=eps, steps=5, restarts=2, batch_size=32)
        assert 0.0 <= r <= acc


def test_robust_accuracy_needs_clean_and_every_restart(monkeypatch):
    """Aggregation: robust = correct on x AND on each restart's x_adv (stubbed attack, exact counts)."""
    model = FixedLinear(torch.eye(2))  # prediction = argmax of the two coordinates
    x = torch.tensor([[1.0, 0.0]] * 4)
    y = torch.tensor([0, 0, 0, 1])  # sample 3 is wrong on the clean input
    calls = []

    def stub(model_, xb, yb, *, eps, steps, step_size, norm, targeted, random_start, generator):
        calls.append(dict(n=xb.shape[0], eps=eps, steps=steps, step_size=step_size, norm=norm,
                          targeted=targeted, random_start=random_start))
        out = xb.clone()
        # every "attack" makes class yb win (so a clean-wrong sample would look robust if not excluded) ...
        out[:] = 0
        out[torch.arange(len(yb)), yb] = 1.0
        if len(calls) == 2:  # ... except that the second restart breaks the first sample it is given
            out[0] = torch.tensor([0.0, 1.0])
        return out

    monkeypatch.setattr(metrics, "pgd", stub)  # metrics imports attacks.pgd by name
    r = metrics.robust_accuracy(model, x, y, eps=0.1, steps=4, restarts=3)
    assert r == pytest.approx(2 / 4)  # samples 1, 2 survive; 0 broken at restart 2; 3 wrong when clean
    assert [c["n"] for c in calls] == [3, 3, 2]  # clean-wrong never attacked; broken ones not re-attacked
    assert calls[0]["step_size"] == pytest.approx(2.5 * 0.1 / 4)
    assert not calls[0]["targeted"] and calls[0]["random_start"] and calls[0]["norm"] == "linf"


# ---------------------------------------------------------------- ECE


def _two_class(conf: list[float]) -> torch.Tensor:
    c = torch.tensor(conf, dtype=torch.float64)
    return torch.stack([c, 1 - c], dim=1)  # class 0 predicted with confidence c (c >= 0.5)


def test_ece_of_perfectly_calibrated_predictions_is_zero():
    # 10 predictions at confidence 0.7 of which 7 are right, 4 at confidence 1.0 all right.
    probs = _two_class([0.7] * 10 + [1.0] * 4)
    labels = torch.tensor([0] * 7 + [1] * 3 + [0] * 4)
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed_example():
    # bin (0.85, 0.9]: confs 0.9, 0.9, one right -> |0.5 - 0.9| * 2/5
    # bin (0.55, 0.6]: confs 0.6, 0.6, 0.6, all right -> |1 - 0.6| * 3/5
    probs = _two_class([0.9, 0.9, 0.6, 0.6, 0.6])
    labels = torch.tensor([0, 1, 0, 0, 0])
    expected = 0.4 * 2 / 5 + 0.4 * 3 / 5
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_ece_uses_twenty_right_closed_bins_by_default():
    # 0.72 (right) and 0.78 (wrong) share a bin when there are 10 bins, not with 20.
    probs, labels = _two_class([0.72, 0.78]), torch.tensor([0, 1])
    sep = 0.5 * (1 - 0.72) + 0.5 * 0.78
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(sep, abs=1e-12)
    assert metrics.expected_calibration_error(probs, labels, n_bins=20) == pytest.approx(sep, abs=1e-12)
    assert metrics.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(abs(0.5 - 0.75), abs=1e-12)
    # Right-closed: 0.75 belongs to (0.70, 0.75], apart from 0.76 in (0.75, 0.80].
    probs, labels = _two_class([0.75, 0.76]), torch.tensor([0, 1])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.25 + 0.5 * 0.76, abs=1e-12)


def test_ece_matches_a_direct_loop_on_random_softmax():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=g), dim=1)
    labels = torch.randint(0, 10, (500,), generator=g)
    conf, pred = probs.double().max(1)
    expected = 0.0
    for b in range(20):
        lo, hi = b / 20, (b + 1) / 20
        m = (conf > lo) & (conf <= hi)
        if m.any():
            expected += m.double().mean() * abs((pred[m] == labels[m]).double().mean() - conf[m].mean())
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(float(expected), abs=1e-10)


# ---------------------------------------------------------------- OOD AUROC


def test_auroc_separated_reversed_identical():
    a, b = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, -7.0])
    assert metrics.ood_auroc(a, b) == 1.0
    assert metrics.ood_auroc(b, a) == 0.0
    assert metrics.ood_auroc(a, a.clone()) == 0.5
    assert metrics.ood_auroc(torch.ones(5), torch.ones(3)) == 0.5


def test_auroc_hand_computed_with_a_tie():
    # pairs (in, out): (.9,.5)=1 (.9,.1)=1 (.5,.5)=½ (.5,.1)=1 (.5,.5)=½ (.5,.1)=1 -> 5 / 6
    s_in, s_out = torch.tensor([0.9, 0.5, 0.5]), torch.tensor([0.5, 0.1])
    assert metrics.ood_auroc(s_in, s_out) == pytest.approx(5 / 6, abs=1e-12)
    assert metrics.ood_auroc(s_out, s_in) == pytest.approx(1 / 6, abs=1e-12)
    # the last in-score moved below both out-scores: (.9,·)=1+1 (.5,.5)=½ (.5,.1)=1 (.0,·)=0+0 -> 3.5 / 6
    assert metrics.ood_auroc(torch.tensor([0.9, 0.5, 0.0]), s_out) == pytest.approx(3.5 / 6, abs=1e-12)


def test_auroc_matches_brute_force_pair_count_with_ties():
    g = torch.Generator().manual_seed(0)
    s_in = torch.randint(0, 6, (37,), generator=g).float()  # few distinct values: many ties
    s_out = torch.randint(-2, 4, (23,), generator=g).float()
    pairs = list(itertools.product(s_in.tolist(), s_out.tolist()))
    brute = sum(1.0 if i > o else 0.5 if i == o else 0.0 for i, o in pairs) / len(pairs)
    assert metrics.ood_auroc(s_in, s_out) == pytest.approx(brute, abs=1e-12)
    assert metrics.ood_auroc(s_out, s_in) == pytest.approx(1 - brute, abs=1e-12)


def test_auroc_rejects_nan_and_empty():
    with pytest.raises(ValueError):
        metrics.ood_auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0]))
    with pytest.raises(ValueError):
        metrics.ood_auroc(torch.tensor([]), torch.tensor([0.0]))


# ---------------------------------------------------------------- expected Bayes ratio


def test_ebr_equals_a_hand_computation_on_a_fixed_histogram():
    # correct / wrong per bin: N = 16, C = 9, W = 7.
    correct, wrong = [1, 2, 6], [3, 2, 2]
    # No smoothing: prior odds 9/7; bin odds 1/3, 1, 3; BR = 7/27, 7/9, 7/3; P(b) = 4/16, 4/16, 8/16.
    res = metrics.bayes_ratio_from_histogram(correct, wrong, pseudo_count=0)
    assert res["bayes_ratio"] == pytest.approx([7 / 27, 7 / 9, 7 / 3])
    assert res["ebr"] == pytest.approx(4 / 16 * 7 / 27 + 4 / 16 * 7 / 9 + 8 / 16 * 7 / 3)  # = 77/54
    # ... which is 1 + P(C) χ²(P(b|C) ‖ P(b|W)).
    pc, pw = [c / 9 for c in correct], [w / 7 for w in wrong]
    chi2 = sum(a * a / b for a, b in zip(pc, pw)) - 1
    assert res["ebr"] == pytest.approx(1 + 9 / 16 * chi2)
    # Laplace (pseudo count 1): prior odds 10/8; bin odds 2/4, 3/3, 7/3.
    res1 = metrics.bayes_ratio_from_histogram(correct, wrong, pseudo_count=1)
    assert res1["ebr"] == pytest.approx(0.25 * 0.5 / 1.25 + 0.25 * 1 / 1.25 + 0.5 * (7 / 3) / 1.25)
    assert res1["posterior_correct"] == pytest.approx([2 / 6, 3 / 6, 7 / 10])


def test_ebr_is_one_for_an_uninformative_histogram_and_skips_empty_bins():
    res = metrics.bayes_ratio_from_histogram([3, 0, 6, 9], [1, 0, 2, 3], pseudo_count=0)
    assert res["ebr"] == pytest.approx(1.0)
    assert res["bayes_ratio"][1] is None
    # A bin without wrong predictions has infinite odds unless smoothed.
    assert metrics.bayes_ratio_from_histogram([5, 5], [5, 0], pseudo_count=0)["ebr"] == float("inf")
    assert metrics.bayes_ratio_from_histogram([5, 5], [5, 0], pseudo_count=1)["ebr"] > 1


def test_expected_bayes_ratio_bins_softmax_confidences_like_ece():
    # Three classes, predictions = class 0 with confidence 0.35 (bin (0.2, 0.4]) x4, 0.55 (bin (0.4, 0.6]) x4,
    # 0.9 (bin (0.8, 1]) x8: the histogram of the hand computation above, with two empty bins.
    p = torch.zeros(16, 3)
    p[:4] = torch.tensor([0.35, 0.33, 0.32])
    p[4:8] = torch.tensor([0.55, 0.30, 0.15])
    p[8:] = torch.tensor([0.90, 0.05, 0.05])
    labels = torch.tensor([0, 1, 1, 1] + [0, 0, 1, 1] + [0] * 6 + [1] * 2)
    ebr, hist = metrics.expected_bayes_ratio(p, labels, n_bins=5, pseudo_count=0)
    assert hist["correct"] == [0, 1, 2, 0, 6] and hist["wrong"] == [0, 3, 2, 0, 2]
    assert hist["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1])
    assert ebr == pytest.approx(77 / 54)
    assert hist["bayes_ratio"][0] is None and hist["bayes_ratio"][3] is None
